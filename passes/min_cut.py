"""torch's min-cut partition, with its one expensive decision kept in the tuning cache.

`min_cut_rematerialization_partition` spends most of its time in
`choose_saved_values_set` (a max-flow over the joint graph); everything around
it (tagging, extraction, reordering, rng threading) is cheap and deterministic
given the saved set. So the saved set is what is cached (namespace "min-cut"),
and a hit runs torch's own partition with the stored choice substituted for the
max-flow: it returns exactly the graphs a miss would. `saved_names` stops
torch's partition right after that choice, for callers that need only the set.

On a miss the max-flow itself runs in OR-Tools (C++) instead of networkx's pure
Python preflow-push, which takes a good part of a second on a transformer: the
cut is the same whichever algorithm finds the flow (see `_minimum_cut`).

The choice is stored as positions in the joint graph, each with the op found
there, which a hit checks: an entry that does not fit the graph is a miss. The
key adds to the graph's key what else the choice depends on: the forward/backward
split, the static inputs, the budget torch passes and functorch's config.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any
from unittest import mock

import networkx
import numpy as np
from ortools.graph.python import max_flow
from torch import fx
from torch._functorch import config as functorch_config
from torch._functorch import partitioners

from graphopt.cache import NodeIndex, TuningCache
from graphopt.pipeline import copy_graph_module

CACHE_NAMESPACE = "min-cut"

_networkx_minimum_cut = networkx.minimum_cut


def _minimum_cut(flow_graph: networkx.DiGraph, source: Any, sink: Any, capacity: str = "capacity", **kwargs: Any):
    """`networkx.minimum_cut`'s result, with the max-flow solved by OR-Tools.

    networkx's partition puts on the sink side the nodes that can reach the sink in
    the residual graph. That set is the same for every maximum (pre)flow (it is the
    sink side of the minimum cut closest to the sink), so OR-Tools' sink side is
    networkx's, node for node. Infinite capacities (a missing one means infinite,
    as in networkx) become one more than all finite ones together: a flow that
    large crosses an infinite path, which networkx reports as unbounded."""
    edges = list(flow_graph.edges(data=capacity, default=math.inf))
    finite = [c for *_, c in edges if c != math.inf]
    infinite = sum(finite) + 1
    if kwargs or infinite >= 2**62 or any(c != int(c) for c in finite):  # a flow_func, or beyond int64 arithmetic
        return _networkx_minimum_cut(flow_graph, source, sink, capacity=capacity, **kwargs)
    nodes = list(flow_graph)
    index = {n: i for i, n in enumerate(nodes)}
    solver = max_flow.SimpleMaxFlow()
    solver.add_arcs_with_capacity(
        np.fromiter((index[u] for u, _, _ in edges), np.int32, len(edges)),
        np.fromiter((index[v] for _, v, _ in edges), np.int32, len(edges)),
        np.fromiter((infinite if c == math.inf else c for *_, c in edges), np.int64, len(edges)),
    )
    if solver.solve(index[source], index[sink]) != solver.OPTIMAL:  # e.g. a source without arcs
        return _networkx_minimum_cut(flow_graph, source, sink, capacity=capacity)
    if solver.optimal_flow() >= infinite:
        raise networkx.NetworkXUnbounded("Infinite capacity path, flow unbounded above.")
    sink_side = {nodes[i] for i in solver.get_sink_side_min_cut()}
    return solver.optimal_flow(), (set(nodes) - sink_side, sink_side)


def _key(graph_key: str, num_fwd_outputs: int, static_indices: Sequence[int], args: Any, kwargs: Any) -> str:
    material = (graph_key, num_fwd_outputs, list(static_indices), args, sorted(kwargs.items()))
    config = sorted(functorch_config.save_config_portable().items())
    return hashlib.sha256(repr((material, config)).encode()).hexdigest()[:32]


def _partition(
    joint: fx.GraphModule,
    num_fwd_outputs: int,
    static_lifetime_input_indices: Sequence[int],
    cache: TuningCache | None,
    on_choice: Callable[[list[fx.Node]], None],
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """torch's min-cut partition of a copy of `joint`, its saved set from `cache` when there, else
    from the OR-Tools max-flow (and stored in `cache`); `on_choice` sees the set before extraction."""
    choose = partitioners.choose_saved_values_set
    use_cache = cache is not None and cache.graph_key is not None

    def chosen(joint_graph: fx.Graph, node_info: Any, *args: Any, **kwargs: Any) -> list[fx.Node]:
        saved = None
        if use_cache:
            key = _key(cache.graph_key, num_fwd_outputs, static_lifetime_input_indices, args, kwargs)
            index = NodeIndex(joint_graph.nodes)
            saved = cache.get(CACHE_NAMESPACE, key, lambda value: index.resolve(value["saved"]))
        if saved is None:
            saved = choose(joint_graph, node_info, *args, **kwargs)
            if use_cache:
                cache.put(CACHE_NAMESPACE, key, {"saved": index.refs(saved)})
        on_choice(saved)
        return saved

    # cse off: the same graph as the caller's, so node names match its analysis
    with (
        functorch_config.patch(cse=False),
        mock.patch.object(partitioners, "choose_saved_values_set", chosen),
        mock.patch.object(networkx, "minimum_cut", _minimum_cut),
    ):
        return partitioners.min_cut_rematerialization_partition(
            copy_graph_module(joint),
            None,
            num_fwd_outputs=num_fwd_outputs,
            static_lifetime_input_indices=list(static_lifetime_input_indices),
        )


def partition(
    joint: fx.GraphModule,
    num_fwd_outputs: int,
    static_lifetime_input_indices: Sequence[int],
    cache: TuningCache | None,
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """torch's min-cut forward/backward of `joint` (not modified), its saved set from `cache` when there."""
    return _partition(joint, num_fwd_outputs, static_lifetime_input_indices, cache, lambda saved: None)


class _Chosen(Exception):
    """Ends torch's partition once the saved set is chosen (the extraction is not needed)."""

    def __init__(self, saved: list[fx.Node]):
        super().__init__()
        self.saved = saved


def saved_names(
    joint: fx.GraphModule,
    num_fwd_outputs: int,
    static_lifetime_input_indices: Sequence[int],
    cache: TuningCache | None,
) -> list[str]:
    """Names of the nodes `partition` would save, without building its forward and backward."""

    def stop(saved: list[fx.Node]) -> None:
        raise _Chosen(saved)

    try:
        _, bw = _partition(joint, num_fwd_outputs, static_lifetime_input_indices, cache, stop)
    except _Chosen as chosen:
        return [n.name for n in chosen.saved]
    # torch partitioned without a cut (nothing requires a backward): what its backward reads
    return [n.name for n in bw.graph.find_nodes(op="placeholder") if "tangents" not in n.name]
