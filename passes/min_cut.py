"""torch's min-cut partition, with its one expensive decision kept in the tuning cache.

`min_cut_rematerialization_partition` spends most of its time in
`choose_saved_values_set` (a max-flow over the joint graph); everything around
it (tagging, extraction, reordering, rng threading) is cheap and deterministic
given the saved set. So the saved set is what is cached (namespace "min-cut"),
and a hit runs torch's own partition with the stored choice substituted for the
max-flow: it returns exactly the graphs a miss would.

The choice is stored as positions in the joint graph, each with the op found
there, which a hit checks: an entry that does not fit the graph is a miss. The
key adds to the graph's key what else the choice depends on: the forward/backward
split, the static inputs, the budget torch passes and functorch's config.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any
from unittest import mock

from torch import fx
from torch._functorch import config as functorch_config
from torch._functorch import partitioners

from graphopt.cache import NodeIndex, TuningCache
from graphopt.pipeline import copy_graph_module

CACHE_NAMESPACE = "min-cut"


def _key(graph_key: str, num_fwd_outputs: int, static_indices: Sequence[int], args: Any, kwargs: Any) -> str:
    material = (graph_key, num_fwd_outputs, list(static_indices), args, sorted(kwargs.items()))
    config = sorted(functorch_config.save_config_portable().items())
    return hashlib.sha256(repr((material, config)).encode()).hexdigest()[:32]


def partition(
    joint: fx.GraphModule,
    num_fwd_outputs: int,
    static_lifetime_input_indices: Sequence[int],
    cache: TuningCache | None,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """torch's min-cut forward/backward of `joint` (not modified), its saved set from `cache` when there."""
    choose = partitioners.choose_saved_values_set

    def cached_choice(joint_graph: fx.Graph, node_info: Any, *args: Any, **kwargs: Any) -> list[fx.Node]:
        key = _key(cache.graph_key, num_fwd_outputs, static_lifetime_input_indices, args, kwargs)
        index = NodeIndex(joint_graph.nodes)
        saved = cache.get(CACHE_NAMESPACE, key, lambda value: index.resolve(value["saved"]))
        if saved is None:
            saved = choose(joint_graph, node_info, *args, **kwargs)
            cache.put(CACHE_NAMESPACE, key, {"saved": index.refs(saved)})
        return saved

    use_cache = cache is not None and cache.graph_key is not None
    # cse off: the same graph as the caller's, so node names match its analysis
    with functorch_config.patch(cse=False), (
        mock.patch.object(partitioners, "choose_saved_values_set", cached_choice) if use_cache else nullcontext()
    ):
        return partitioners.min_cut_rematerialization_partition(
            copy_graph_module(joint),
            None,
            num_fwd_outputs=num_fwd_outputs,
            static_lifetime_input_indices=list(static_lifetime_input_indices),
        )
