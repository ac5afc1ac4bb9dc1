"""Casts that only change a tensor's dtype, made together by one multi-tensor call.

Under autocast, every step casts each fp32 parameter to bf16 before its matrix product,
and a training step casts the gradients of those products back to fp32. GPT-2's forward
makes 97 such casts and its backward 48, each its own generated kernel: a few
microseconds of GPU time, but a launch the host must issue, and on a GPU machine the
host issuing the launches is what bounds a training step. ATen's `_foreach_copy_`
casts a list of tensors with a few multi_tensor_apply launches on CUDA (its fast path
takes one source dtype, one result dtype and matching layouts; elsewhere it copies
tensor by tensor), so one call replaces a batch of cast kernels.

A batch needs its casts at one place in the graph. Casts of graph inputs (parameters)
are made together where the first of them was; casts whose results only the graph
returns (gradients) are made together just before it returns. Moving a cast earlier
holds its result longer, moving it later holds its source longer: each cast joins its
batch only if that does not raise the graph's estimated peak memory
(passes/live_memory.py). A batch of one stays a kernel.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from graphopt.codegen.launcher import allocator
from graphopt.passes.live_memory import estimate, writes_in_place
from graphopt.pipeline import PassContext, PassReport
from graphopt.runtime import GuardedCall

aten = torch.ops.aten

_CASTS = {aten._to_copy.default, torch.ops.prims.convert_element_type.default}

_Layout = tuple[tuple[int, ...], tuple[int, ...]]


class BatchedCast:
    """A graph node target: each source cast to `dtype` in its layout, by one `_foreach_copy_`."""

    __module__ = "graphopt.passes.batch_casts"
    makes_new_storages = True  # each result in a storage of its own (passes/live_memory.py)

    def __init__(self, name: str, dtype: torch.dtype, layouts: tuple[_Layout, ...], device: torch.device):
        self.__name__ = name
        self.__qualname__ = name
        self.dtype = dtype
        self.layouts = layouts
        self.device = device
        self._empty = allocator(device)

    def __call__(self, *sources: torch.Tensor) -> list[torch.Tensor]:
        results = [self._empty(size, stride, self.dtype) for size, stride in self.layouts]
        torch._foreach_copy_(results, list(sources))
        return results

    def __reduce__(self) -> tuple[Any, ...]:
        return BatchedCast, (self.__name__, self.dtype, self.layouts, self.device)

    def __repr__(self) -> str:
        return f"BatchedCast({len(self.layouts)} to {self.dtype})"


@dataclasses.dataclass(frozen=True)
class BatchCastsReport(PassReport):
    batched: int  # cast kernels now made by a batch
    batches: int
    kept: dict[str, int]  # cast kernels left alone, by why

    def summary(self) -> str:
        kept = "; ".join(f"{n} {why}" for why, n in sorted(self.kept.items()))
        calls = f"{self.batches} multi-tensor call" + ("" if self.batches == 1 else "s")
        return f"{self.batched} cast kernels made by {calls}" + (f"; kept: {kept}" if kept else "")


@dataclasses.dataclass
class _Cast:
    node: fx.Node
    source: fx.Node
    position: int
    layout: _Layout


def _static_layout(val: Any) -> _Layout | None:
    if not isinstance(val, torch.Tensor):
        return None
    size, stride = tuple(val.shape), tuple(val.stride())
    return (size, stride) if all(type(v) is int for v in (*size, *stride)) else None


def _dims(view: fx.Node, ndim: int) -> list[int] | None:
    """The permutation a permute/t/transpose node applies, or None for any other node."""
    if view.target is aten.permute.default:
        return [d % ndim for d in view.args[1]]
    if view.target is aten.t.default:
        return list(range(ndim))[::-1]
    if view.target is aten.transpose.int:
        dims = list(range(ndim))
        a, b = view.args[1] % ndim, view.args[2] % ndim
        dims[a], dims[b] = dims[b], dims[a]
        return dims
    return None


def _identity_chain(views: list[fx.Node], source: fx.Node) -> bool:
    """Whether permutes, each of the one before, compose to the identity (as a linear layer's
    weight gradient arrives in the backward: permute(permute(mm))."""
    ndim = source.meta["val"].dim()
    order, previous = list(range(ndim)), source
    for view in views:
        dims = _dims(view, ndim)
        if dims is None or view.args[0] is not previous:
            return False
        order, previous = [order[d] for d in dims], view
    return order == list(range(ndim))


def _lone_cast(node: fx.Node) -> fx.Node | None:
    """The source of a generated kernel that only casts one tensor to another dtype, element for
    element in the same layout (after permutes that cancel out)."""
    if node.op != "call_function" or not isinstance(node.target, GuardedCall) or len(node.args) != 1:
        return None
    spec = getattr(node.target.primary, "spec", None)
    if spec is None or len(spec.inputs) != 1:
        return None
    *views, cast = spec.nodes
    if cast.target not in _CASTS or cast.args[0] is not (views[-1] if views else spec.inputs[0]):
        return None
    if not _identity_chain(views, spec.inputs[0]):
        return None
    (source,) = node.args
    val, src = node.meta.get("val"), source.meta.get("val") if isinstance(source, fx.Node) else None
    layout = _static_layout(val)
    if layout is None or layout != _static_layout(src) or val.device != src.device or val.dtype == src.dtype:
        return None
    return source


class _Estimate:
    """The live-bytes estimate, changed as casts join batches; a change that would raise the peak is refused."""

    def __init__(self, nodes: list[fx.Node], ctx: PassContext):
        self.storages, self.life, self.live = estimate(nodes, ctx.kind)
        self.peak = max(self.live, default=0)
        self.extended: dict[int, int] = {}  # a source storage's last reader, moved later by a batch

    def _fits(self, changes: list[tuple[int, int, int]]) -> bool:
        """Apply (start, stop, bytes) changes to positions [start, stop) if the peak stays."""
        live = list(self.live)
        for start, stop, nbytes in changes:
            for pos in range(start, stop):
                live[pos] += nbytes
        if max(live, default=0) > self.peak:
            return False
        self.live = live
        return True

    def made_earlier(self, cast: _Cast, at: int) -> bool:
        """The cast's result made at position `at` instead of its own."""
        return self._fits([(at, cast.position, self._result_bytes(cast))])

    def made_later(self, cast: _Cast, at: int) -> bool:
        """The cast's result (returned: alive to the end) made at `at`; its sources read until then."""
        changes = [(cast.position, at, -self._result_bytes(cast))]
        extended = {}
        for i in self.storages.of.get(cast.source, ()):
            if i in self.life.to_end:
                continue
            stop = self.extended.get(i, self.life.last_use[i])
            if stop < at:  # read by the batch too, at `at`
                changes.append((stop + 1, at + 1, self.life.nbytes[i]))
                extended[i] = at
        if not self._fits(changes):
            return False
        self.extended.update(extended)
        return True

    def batch(self, members: list[_Cast], joins: Callable[[_Cast], bool]) -> list[_Cast]:
        """The members that join a batch; if fewer than two do, the estimate is left as it was."""
        live, extended = self.live, dict(self.extended)
        joined = [c for c in members if joins(c)]
        if len(joined) < 2:
            self.live, self.extended = live, extended
        return joined

    def _result_bytes(self, cast: _Cast) -> int:
        return sum(self.life.nbytes.get(i, 0) for i in self.storages.of.get(cast.node, ()))


def _batch(gm: fx.GraphModule, casts: list[_Cast], before: fx.Node, index: int, parts_of: dict[fx.Node, fx.Node]) -> None:
    """One BatchedCast node for `casts`, before `before`; each cast's users read its part. `parts_of`:
    the part that replaced each cast batched before (a returned cast may cast a batched one again)."""
    first = casts[0].node.meta["val"]
    target = BatchedCast(f"batched_cast_{index}", first.dtype, tuple(c.layout for c in casts), first.device)
    with gm.graph.inserting_before(before):
        batch = gm.graph.call_function(target, tuple(parts_of.get(c.source, c.source) for c in casts))
        batch.meta["val"] = tuple(c.node.meta["val"] for c in casts)
        parts = [gm.graph.call_function(operator.getitem, (batch, i)) for i in range(len(casts))]
    for cast, part in zip(casts, parts):
        part.meta["val"] = cast.node.meta["val"]
        cast.node.replace_all_uses_with(part)
        gm.graph.erase_node(cast.node)
        parts_of[cast.node] = part


def _count(kept: dict[str, int], why: str, n: int = 1) -> None:
    if n:
        kept[why] = kept.get(why, 0) + n


def run(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, BatchCastsReport]:
    nodes = list(gm.graph.nodes)
    output = nodes[-1]
    kept: dict[str, int] = {}
    early: dict[tuple[Any, ...], list[_Cast]] = {}  # casts of graph inputs, by (device, from, to)
    late: dict[tuple[Any, ...], list[_Cast]] = {}  # casts only returned
    for position, node in enumerate(nodes):
        source = _lone_cast(node)
        if source is None:
            continue
        val = node.meta["val"]
        cast = _Cast(node, source, position, _static_layout(val))
        group = (val.device, source.meta["val"].dtype, val.dtype)
        if source.op in ("placeholder", "get_attr"):
            early.setdefault(group, []).append(cast)
        elif set(node.users) == {output}:
            late.setdefault(group, []).append(cast)
        else:
            _count(kept, "of a computed value that is not only returned")
    # a moved cast must not cross an in-place write: its source may alias what is written (a view
    # of an input that AOTAutograd's graph writes back at its end), which the source's own users
    # do not show; as fusion keeps a group's reads on their side of every write
    writes = [i for i, node in enumerate(nodes) if writes_in_place(node)]

    def crosses(lo: int, hi: int) -> bool:
        return any(lo < i < hi for i in writes)

    found = sum(len(m) for m in (*early.values(), *late.values()))
    for group, members in early.items():  # made at the first's position
        early[group] = [c for c in members if not crosses(members[0].position, c.position)]
    for group, members in late.items():  # made just before the output
        late[group] = [c for c in members if not crosses(c.position, len(nodes) - 1)]
    considered = sum(len(m) for m in (*early.values(), *late.values()))
    _count(kept, "an in-place write lies between it and its batch", found - considered)
    estimate = _Estimate(nodes, ctx)
    position = {node: i for i, node in enumerate(nodes)}
    planned = [
        estimate.batch(members, lambda c, at=members[0].position: position[c.source] < at and estimate.made_earlier(c, at))
        for members in early.values()
        if members
    ]
    planned += [estimate.batch(members, lambda c: estimate.made_later(c, len(nodes) - 1)) for members in late.values() if members]
    _count(kept, "would raise the estimated peak", considered - sum(len(casts) for casts in planned))
    batches = [casts for casts in planned if len(casts) >= 2]
    _count(kept, "alone in its batch", sum(len(casts) for casts in planned if len(casts) == 1))
    parts_of: dict[fx.Node, fx.Node] = {}
    for index, casts in enumerate(batches):  # the casts of inputs first
        returned_only = casts[0].source.op not in ("placeholder", "get_attr")
        _batch(gm, casts, output if returned_only else casts[0].node, index, parts_of)
    gm.recompile()
    return gm, BatchCastsReport(sum(len(c) for c in batches), len(batches), kept)
