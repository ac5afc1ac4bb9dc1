"""The write-backs of mutated graph inputs, made together by one multi-tensor copy.

AOTAutograd's graphs are functional: a module that updates its own buffers (batch norm's
running mean and variance and its step count, in training) gets the new values computed
inside the graph and copied into the input at its end, one `aten.copy_` per buffer.
ResNet-50 has 53 batch norms: 159 copies per training step, each a launch the host must
issue, and on a GPU machine the host issuing launches is what bounds such a step. ATen's
`_foreach_copy_` makes a list of copies with a few multi_tensor_apply launches on CUDA
(one source dtype, one destination dtype, equal layouts; elsewhere it copies one by one),
so the copies at the graph's end become one call per (device, source dtype, destination dtype).

Only the copies that end the graph are batched, into graph inputs, whose results nothing
reads: moving them among themselves changes nothing unless one's source lives in another's
destination, which is checked on the graph's storages (passes/live_memory.py). A batch of
one stays a copy.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from graphopt.passes.live_memory import Storages
from graphopt.pipeline import PassContext, PassReport

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class BatchWriteBacksReport(PassReport):
    batched: int  # write-back copies now made by a batch
    batches: int
    kept: int  # write-back copies left as they were

    def summary(self) -> str:
        calls = f"{self.batches} multi-tensor call" + ("" if self.batches == 1 else "s")
        return f"{self.batched} input write-backs made by {calls}; {self.kept} kept"


def _trailing_write_backs(nodes: list[fx.Node]) -> list[fx.Node]:
    """The copies into graph inputs, results unread, that end the graph (before its output)."""
    copies: list[fx.Node] = []
    for node in reversed(nodes[:-1]):
        if node.target is not aten.copy_.default or node.users or node.args[0].op != "placeholder":
            break
        copies.append(node)
    return copies[::-1]


def _group(copy: fx.Node) -> tuple[object, ...] | None:
    """What a copy's batch shares (device, source and destination dtypes), or None if it cannot join one."""
    dst, src = copy.args[0].meta.get("val"), copy.args[1].meta.get("val") if isinstance(copy.args[1], fx.Node) else None
    if not isinstance(dst, torch.Tensor) or not isinstance(src, torch.Tensor) or copy.kwargs.get("non_blocking"):
        return None
    if dst.device != src.device or tuple(dst.shape) != tuple(src.shape):  # no broadcasting copies
        return None
    return dst.device, src.dtype, dst.dtype


def run(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, BatchWriteBacksReport]:
    nodes = list(gm.graph.nodes)
    copies = _trailing_write_backs(nodes)
    storages = Storages()
    for node in nodes:
        storages.add(node)
    written = {i for copy in copies for i in storages.of.get(copy.args[0], ())}
    groups: dict[tuple[object, ...], list[fx.Node]] = {}
    for copy in copies:
        group = _group(copy)
        source_storages = set(storages.of.get(copy.args[1], ())) if isinstance(copy.args[1], fx.Node) else set()
        if group is not None and not source_storages & (written | storages.unknown):
            groups.setdefault(group, []).append(copy)
    batches = [members for members in groups.values() if len(members) >= 2]
    for members in batches:
        with gm.graph.inserting_before(members[0]):
            gm.graph.call_function(aten._foreach_copy_.default, ([c.args[0] for c in members], [c.args[1] for c in members]))
        for copy in members:
            gm.graph.erase_node(copy)
    gm.recompile()
    batched = sum(len(members) for members in batches)
    return gm, BatchWriteBacksReport(batched, len(batches), len(copies) - batched)
