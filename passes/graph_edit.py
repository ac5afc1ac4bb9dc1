"""Inserting ATen nodes into a graph that later passes can read.

Every pass after capture relies on `node.meta['val']` (shapes, strides, dtypes as
FakeTensors), so a node a pass adds must carry one: it is computed by running the
op on its arguments' FakeTensors under their fake mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch._guards import detect_fake_mode


def fake_mode_of(args: Any) -> Any:
    """The fake mode that the FakeTensors of the nodes among `args` belong to."""
    vals: list[Any] = []
    fx.node.map_arg(args, lambda n: vals.append(n.meta.get("val")))
    return detect_fake_mode(vals)


def call_with_meta(graph: fx.Graph, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
    """`graph.call_function(target, args, kwargs)` at the graph's insertion point, with meta['val']."""
    node = graph.call_function(target, args, kwargs)
    refresh_meta(node)
    return node


def refresh_meta(node: fx.Node) -> None:
    """Compute `node`'s meta['val'] from its arguments' (again, after a pass changed an input's layout)."""
    vals, kwvals = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["val"])
    with fake_mode_of((node.args, node.kwargs)):
        val = node.target(*vals, **kwvals)
    node.meta["val"] = _without_base(val)


def _without_base(val: Any) -> Any:
    """A view's FakeTensor as one over the same storage with no autograd base, as AOTAutograd's
    graphs hold them: a view keeps its base's fake mode, which torch's GraphPickler cannot write,
    so a graph holding one could not be kept in the AOTAutograd cache (graphopt/artifact.py)."""
    if isinstance(val, torch.Tensor) and val._base is not None:
        return val.detach()
    return val
