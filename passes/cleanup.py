"""Remove work that changes nothing: identity views and dead nodes.

AOTAutograd's graphs carry views whose result has the input's own shape and
strides (reshape to the same size, expand to the same size, full slices). They
cost a Python call and an alias at run time and split fusion groups for no
reason, so they go first.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true, sym_eq

from graphopt.pipeline import PassContext, PassReport

aten = torch.ops.aten

# Views that are identities when their result has the input's shape and strides.
_VIEW_OPS = {
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.expand.default,
    aten.alias.default,
    aten.slice.Tensor,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.unsqueeze.default,
    aten.permute.default,
}


@dataclasses.dataclass(frozen=True)
class CleanupReport(PassReport):
    removed_identity_views: list[str]
    removed_dead_nodes: int


def _same_layout(a: fx.Node, b: fx.Node) -> bool:
    """Provably the same view. Symbolic sizes are compared without installing guards,
    which would specialize a dynamic graph and recompile it for every new size."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not isinstance(va, torch.Tensor) or not isinstance(vb, torch.Tensor):
        return False
    if va.dtype != vb.dtype or va.dim() != vb.dim():
        return False
    layout_a = (*va.shape, *va.stride(), va.storage_offset())
    layout_b = (*vb.shape, *vb.stride(), vb.storage_offset())
    return statically_known_true(sym_eq(layout_a, layout_b))


def run(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, CleanupReport]:
    removed = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _VIEW_OPS:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or not _same_layout(node, source):
            continue
        # Outputs keep their own view node: AOTAutograd tracks which outputs alias inputs.
        users = [u for u in node.users if u.op != "output"]
        for user in users:
            user.replace_input_with(node, source)
        if not node.users:
            removed.append(node.name)
            gm.graph.erase_node(node)
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    return gm, CleanupReport(removed, before - len(gm.graph.nodes))
