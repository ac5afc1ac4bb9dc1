"""Views whose layout is known at compile time run as a stride check and an alias.

After fusion, the final graph still calls ATen for every view between kernels and
extern ops (GPT-2 has hundreds per step: view, unsqueeze, permute, expand, slice).
Each is a full ATen call through the dispatcher, several microseconds of host time
on a GPU machine, where the host issuing the step is often what bounds it. When the
view's input and result have static sizes and strides in the graph's meta, the
result is fully determined by the input's strides: a `PlannedView` checks those and
makes the alias directly (torch's `_reinterpret_tensor`, as inductor's generated code
does), about a quarter of the ATen call's cost. If the input arrives with other
strides than the graph promised, it calls the ATen op as written: never wrong, only
slower. A view of a value whose layout is certain (a generated kernel's output, which
runtime.GuardedCall always returns in the graph's layout, or a view of one) skips the
check: its node calls `_reinterpret_tensor` itself, without a Python frame in between.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef

from graphopt.pipeline import PassContext, PassReport
from graphopt.runtime import GuardedCall

aten = torch.ops.aten

# single-result ATen views; a reshape counts only where meta shows it did not copy
_VIEW_OPS = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.squeeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.permute.default,
    aten.t.default,
    aten.transpose.int,
    aten.slice.Tensor,
    aten.select.int,
    aten.alias.default,
    aten.as_strided.default,
}

# also the target of a view of a value whose layout is certain: (source, size, stride, offset delta)
alias = torch._C._dynamo.guards._reinterpret_tensor


class PlannedView:
    """A graph node target: `op(source, *args)` made as an alias of the layout the graph planned."""

    __module__ = "graphopt.passes.planned_views"

    def __init__(self, name: str, op: Any, source_stride: tuple[int, ...], size: tuple[int, ...], stride: tuple[int, ...], offset_delta: int):
        self.__name__ = name
        self.__qualname__ = name
        self.op = op
        self.source_stride = source_stride
        self.size = size
        self.stride = stride
        self.offset_delta = offset_delta

    def __call__(self, source: torch.Tensor, *args: Any) -> torch.Tensor:
        if source.stride() == self.source_stride:
            return alias(source, self.size, self.stride, self.offset_delta)
        return self.op(source, *args)

    def __repr__(self) -> str:
        return f"PlannedView({self.op}, size={self.size}, stride={self.stride})"


class PlannedAsStrided(PlannedView):
    """An as_strided with an explicit storage_offset: that offset is into the storage, not relative
    to the source's own, so the alias's offset does not move with the source's (a graph input may
    arrive as a view at another storage offset than the traced one). Nor is the alias inside the
    source's elements, so unlike the other views it may reach past a smaller storage than the
    traced one: then ATen's call raises its bounds error (_reinterpret_tensor does not check)."""

    __module__ = "graphopt.passes.planned_views"

    def __init__(self, name: str, op: Any, source_stride: tuple[int, ...], size: tuple[int, ...], stride: tuple[int, ...], storage_offset: int, itemsize: int):
        super().__init__(name, op, source_stride, size, stride, offset_delta=0)
        self.storage_offset = storage_offset
        span = 1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0
        self.storage_bytes = (storage_offset + span) * itemsize

    def __call__(self, source: torch.Tensor, *args: Any) -> torch.Tensor:
        if source.stride() == self.source_stride and source.untyped_storage().nbytes() >= self.storage_bytes:
            return alias(source, self.size, self.stride, self.storage_offset - source.storage_offset())
        return self.op(source, *args)


@dataclasses.dataclass(frozen=True)
class PlannedViewsReport(PassReport):
    planned: int
    kept: dict[str, int]
    unchecked: int = 0  # of `planned`: views of values whose layout is certain, made without a stride check

    def summary(self) -> str:
        kept = sum(self.kept.values())
        return f"{self.planned} views planned as aliases ({self.unchecked} without a stride check), {kept} left as ATen calls"


def _static(values: Any) -> tuple[int, ...] | None:
    return tuple(values) if all(type(v) is int for v in values) else None


def _plan(node: fx.Node) -> PlannedView | str:
    """The node's PlannedView, or why it stays an ATen call."""
    if node.kwargs:
        return "keyword arguments"
    source = node.args[0]
    val = node.meta.get("val")
    src = source.meta.get("val") if isinstance(source, fx.Node) else None
    if not isinstance(val, torch.Tensor) or not isinstance(src, torch.Tensor):
        return "no tensor meta"
    size, stride, source_stride = _static(val.shape), _static(val.stride()), _static(src.stride())
    offsets = (val.storage_offset(), src.storage_offset())
    if size is None or stride is None or source_stride is None or not all(type(o) is int for o in offsets):
        return "symbolic layout"
    if StorageWeakRef(val.untyped_storage()) != StorageWeakRef(src.untyped_storage()):
        return "copies its input"
    name = f"planned_{node.target.__name__.replace('.', '_')}"
    if node.target is aten.as_strided.default and len(node.args) > 3 and node.args[3] is not None:
        return PlannedAsStrided(name, node.target, source_stride, size, stride, offsets[0], val.dtype.itemsize)
    return PlannedView(name, node.target, source_stride, size, stride, offsets[0] - offsets[1])


def _certain_layouts(node: fx.Node, certain: set[fx.Node]) -> bool:
    """Whether the node's value has its meta's layout on every call: a generated kernel's output
    (GuardedCall returns its outputs in the graph's layout), one of several outputs, or an
    unchecked view of such a value."""
    target = node.target
    if isinstance(target, GuardedCall):
        return target.output_strides is not None
    if target is operator.getitem:
        return node.args[0] in certain
    return target is alias


def run(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PlannedViewsReport]:
    planned = unchecked = 0
    kept: dict[str, int] = {}
    certain: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _VIEW_OPS:
            plan = _plan(node)
            if isinstance(plan, str):
                kept[plan] = kept.get(plan, 0) + 1
                continue
            planned += 1
            if node.args[0] in certain and type(plan) is PlannedView:
                node.target, node.args, node.kwargs = alias, (node.args[0], plan.size, plan.stride, plan.offset_delta), {}
                unchecked += 1
            else:
                node.target = plan
        if _certain_layouts(node, certain):
            certain.add(node)
    gm.recompile()
    return gm, PlannedViewsReport(planned, kept, unchecked)
