"""The write-backs of mutated graph inputs, made together by one multi-tensor copy.

AOTAutograd's graphs are functional: a module that updates its own buffers (batch norm's
running mean and variance and its step count, in training) gets the new values computed
inside the graph and copied into the input at its end, one `aten.copy_` per buffer.
ResNet-50 has 53 batch norms: 159 copies per training step, each a launch the host must
issue, and on a GPU machine the host issuing launches is what bounds such a step. ATen's
`_foreach_copy_` makes a list of copies with a few multi_tensor_apply launches on CUDA
(one source dtype, one destination dtype, equal layouts; elsewhere it copies one by one),
so the copies at the graph's end become one call per (device, source dtype, destination dtype).
A write-back of a generated kernel that only adds a number to the input it writes (batch
norm's step count, `num_batches_tracked += 1`: 53 more launches per ResNet-50 step) becomes
one `_foreach_add_` per (device, dtype, number) instead, at the same place.

Only the copies that end the graph are batched, into graph inputs, whose results nothing
reads. Two such copies commute unless one's source lives in an input another writes (checked
on the graph's storages, passes/live_memory.py) or both write the same input; only copies
that commute with all others, after the last one that does not, are moved into batches. A
batch of one stays a copy.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import numbers

import torch
from torch import fx

from graphopt.passes.live_memory import storages_of
from graphopt.pipeline import PassContext, PassReport
from graphopt.runtime import GuardedCall

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class BatchWriteBacksReport(PassReport):
    batched: int  # write-back copies now made by a batch
    increments: int  # of those, copies of an increment kernel (the kernel is gone too)
    batches: int
    kept: int  # write-back copies left as they were

    def summary(self) -> str:
        calls = f"{self.batches} multi-tensor call" + ("" if self.batches == 1 else "s")
        return f"{self.batched} input write-backs ({self.increments} increments) made by {calls}; {self.kept} kept"


def _trailing_write_backs(nodes: list[fx.Node]) -> list[fx.Node]:
    """The copies into graph inputs, results unread, that end the graph (before its output)."""
    copies: list[fx.Node] = []
    for node in reversed(nodes[:-1]):
        if node.target is not aten.copy_.default or node.users or node.args[0].op != "placeholder":
            break
        copies.append(node)
    return copies[::-1]


def _group(copy: fx.Node) -> tuple[object, ...] | None:
    """What a copy's batch shares (device, source and destination dtypes; and the number added, for
    increments), or None if it cannot join one."""
    dst, src = copy.args[0].meta.get("val"), copy.args[1].meta.get("val") if isinstance(copy.args[1], fx.Node) else None
    if not isinstance(dst, torch.Tensor) or not isinstance(src, torch.Tensor) or copy.kwargs.get("non_blocking"):
        return None
    if dst.device != src.device or tuple(dst.shape) != tuple(src.shape):  # no broadcasting copies
        return None
    return dst.device, src.dtype, dst.dtype


def _increment(copy: fx.Node) -> numbers.Number | None:
    """The number a write-back adds to its own input, if its source is a generated kernel that
    does only that and nothing else reads it."""
    dst, src = copy.args
    if not isinstance(src, fx.Node) or not isinstance(src.target, GuardedCall) or set(src.users) != {copy}:
        return None
    spec = getattr(src.target.primary, "spec", None)
    if spec is None or len(spec.nodes) != 1 or src.args != (dst,) or src.meta["val"].dtype != dst.meta["val"].dtype:
        return None
    (add,) = spec.nodes
    if add.target is not aten.add.Tensor or add.args[0] is not spec.inputs[0] or add.kwargs:
        return None
    number = add.args[1]
    return number if isinstance(number, (int, float)) and not isinstance(number, bool) else None


def run(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, BatchWriteBacksReport]:
    nodes = list(gm.graph.nodes)
    copies = _trailing_write_backs(nodes)
    storages = storages_of(nodes)
    written = {i for copy in copies for i in storages.of.get(copy.args[0], ())} | storages.unknown
    writes = collections.Counter(copy.args[0] for copy in copies)

    def commutes(copy: fx.Node) -> bool:
        """Whether the copy may run before or after any other write-back: its source lives in no
        written input and no other copy writes its input."""
        source = copy.args[1]
        return writes[copy.args[0]] == 1 and not (isinstance(source, fx.Node) and set(storages.of.get(source, ())) & written)

    # copies that commute with every other one, after the last that does not (nothing moves across it)
    movable = list(itertools.takewhile(commutes, reversed(copies)))[::-1]
    groups: dict[tuple[object, ...], list[fx.Node]] = {}
    for copy in movable:
        group = _group(copy)
        if group is not None:
            groups.setdefault((*group, _increment(copy)), []).append(copy)
    batches = {group: members for group, members in groups.items() if len(members) >= 2}
    for (*_, number), members in batches.items():
        destinations = [c.args[0] for c in members]
        with gm.graph.inserting_before(members[0]):
            if number is None:
                gm.graph.call_function(aten._foreach_copy_.default, (destinations, [c.args[1] for c in members]))
            else:
                gm.graph.call_function(aten._foreach_add_.Scalar, (destinations, number))
        for copy in members:
            source = copy.args[1]
            gm.graph.erase_node(copy)
            if number is not None:  # the increment kernel had no other reader
                gm.graph.erase_node(source)
    gm.recompile()
    batched = sum(len(members) for members in batches.values())
    increments = sum(len(members) for (*_, number), members in batches.items() if number is not None)
    return gm, BatchWriteBacksReport(batched, increments, len(batches), len(copies) - batched)
