"""Zero-pad matrix products whose sizes break cuBLAS's 16-byte alignment.

cuBLAS uses its fast tensor-core kernels only when each operand's leading dimension
(and the output's row length) is a multiple of 16 bytes. One odd size is enough to
fall back to slow align-1 kernels: GPT-2's vocabulary of 50257 made the LM head's
three products take 15.4 ms of a 37 ms training step on an H200 (profiled with
benchmarks/profile_kernels.py), against about 2 ms aligned. Inductor pads these too
(its pad_mm pass).

The rewrite pads the misaligned sizes with zeros, which leaves every dot product
unchanged, and slices the padded result back; when the row length N was padded the
slice is copied to the layout the graph promised (the copy fuses into the consumer
when that is pointwise). A product that is only returned to the caller (through
views that keep its rows, like GPT-2's logits) is returned as the slice: its rows
keep the padded stride, as inductor's pad_mm returns them, saving the copy (0.43 ms
and 0.77 GiB of GPT-2's logits on an H200). So a caller that views them as if they
were contiguous (`logits.view(-1)`) gets torch's view error, as after inductor, whose
user-visible views keep only their stride order; `reshape` works. Values the forward
graph saves for the backward keep the copy: the backward graph was traced for their layout.
A product is padded only when the roofline says the copies
cost less than the align-1 slowdown saves (the device's misaligned_matmul_slowdown
in cost_model/roofline.py: 1.0 on the CPU, where the pass does nothing). Static
sizes only. The rewrite itself is device-agnostic and tested on the CPU.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx

from graphopt.cost_model.roofline import DeviceSpec, device_spec
from graphopt.passes.graph_edit import call_with_meta, refresh_meta
from graphopt.pipeline import PassContext, PassReport

aten = torch.ops.aten

_ALIGN_BYTES = 16
_PADDED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclasses.dataclass(frozen=True)
class PaddedProduct:
    node: str
    sizes: tuple[int, ...]  # (batch?, M, K, N) before padding
    padded: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PadMatmulReport(PassReport):
    padded: list[PaddedProduct]
    skipped: str | None = None  # why the pass did nothing on this graph

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        return f"padded {len(self.padded)} matrix products" + "".join(
            f"; {p.node} {p.sizes} -> {p.padded}" for p in self.padded
        )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _leading_dim(t: torch.Tensor) -> int | None:
    """The stride between rows (row-major) or columns (column-major) of the last two dims."""
    rows, cols = t.stride()[-2:]
    if cols == 1:
        return rows
    if rows == 1:
        return cols
    return None  # neither: cuBLAS gets a contiguous copy anyway


def _static(*tensors: torch.Tensor) -> bool:
    return all(isinstance(s, int) for t in tensors for s in (*t.shape, *t.stride()))


@dataclasses.dataclass(frozen=True)
class _Plan:
    m: int
    k: int
    n: int
    pad_m: int
    pad_k: int
    pad_n: int


def _plan(a: torch.Tensor, b: torch.Tensor) -> _Plan | None:
    """Which of M, K, N to pad so that every leading dimension is aligned, or None if all are."""
    align = _ALIGN_BYTES // a.element_size()
    m, k = a.shape[-2:]
    n = b.shape[-1]
    lds = (_leading_dim(a), _leading_dim(b), n)
    if all(ld is None or ld % align == 0 for ld in lds):
        return None
    a_column_major = a.stride()[-1] != 1 and a.stride()[-2] == 1
    pad_k = _round_up(k, align) - k
    pad_n = _round_up(n, align) - n
    pad_m = _round_up(m, align) - m if a_column_major else 0
    if pad_m == pad_k == pad_n == 0:
        return None  # misaligned by strides, not sizes (a slice): padding sizes cannot help
    return _Plan(m, k, n, pad_m, pad_k, pad_n)


def _worth_it(plan: _Plan, a: torch.Tensor, b: torch.Tensor, spec: DeviceSpec) -> bool:
    """The align-1 slowdown the padding saves exceeds the bytes the pads and the output copy move."""
    batch = a.numel() // (plan.m * plan.k)
    flops = 2 * batch * plan.m * plan.k * plan.n
    saved_s = flops / spec.matmul_rate(a.dtype) * (spec.misaligned_matmul_slowdown - 1)
    copied = 0
    if plan.pad_m or plan.pad_k:
        copied += 2 * a.numel()
    if plan.pad_k or plan.pad_n:
        copied += 2 * b.numel()
    if plan.pad_n:
        copied += 2 * batch * plan.m * plan.n
    cost_s = copied * a.element_size() / spec.bytes_per_s + 3 * spec.launch_overhead_s
    return saved_s > cost_s


_TRANSPOSES = (aten.t.default, aten.transpose.int, aten.permute.default)


def _transposed_source(node: fx.Node) -> fx.Node | None:
    """X when `node` is X with its last two dims swapped (t, transpose, permute), else None."""
    if node.op != "call_function" or node.target not in _TRANSPOSES:
        return None
    rank = node.meta["val"].dim()
    if node.target == aten.t.default:
        swapped = rank == 2
    elif node.target == aten.transpose.int:
        swapped = sorted(d % rank for d in node.args[1:3]) == [rank - 2, rank - 1]
    else:
        swapped = [d % rank for d in node.args[1]] == [*range(rank - 2), rank - 1, rank - 2]
    return node.args[0] if swapped else None


class _Pads:
    """Zero-padded copies of operands, one per (tensor, padding): a backward that multiplies the
    same gradient twice (GPT-2's LM head: grad @ W and grad^T @ x) pads it once.

    A column-major operand (a transposed row-major tensor) is padded through its row-major
    source and transposed back: the copy reads and writes memory in order, and the padded
    buffer is the same as a row-major use of that source needs."""

    def __init__(self, graph: fx.Graph):
        self.graph = graph
        self.made: dict[tuple[fx.Node, tuple[int, ...]], fx.Node] = {}

    def pad(self, node: fx.Node, rows: int, cols: int) -> fx.Node:
        """`node` with `rows` zero rows and `cols` zero columns appended (last two dims)."""
        if rows == cols == 0:
            return node
        val = node.meta["val"]
        if val.stride()[-2] == 1 and val.stride()[-1] != 1:  # column-major
            source = _transposed_source(node)
            if source is None:
                source = call_with_meta(self.graph, aten.transpose.int, node, -2, -1)
            padded = self._constant_pad(source, [0, rows, 0, cols] if cols else [0, rows])
            return call_with_meta(self.graph, aten.transpose.int, padded, -2, -1)
        return self._constant_pad(node, [0, cols, 0, rows] if rows else [0, cols])

    def _constant_pad(self, node: fx.Node, pads: list[int]) -> fx.Node:
        key = (node, tuple(pads))
        if key not in self.made:
            self.made[key] = call_with_meta(self.graph, aten.constant_pad_nd.default, node, pads, 0.0)
        return self.made[key]


def _pad_bias(graph: fx.Graph, bias: fx.Node, plan: _Plan) -> fx.Node:
    """addmm's bias, padded where it has the product's full M or N extent (not where it broadcasts)."""
    val = bias.meta["val"]
    cols = plan.pad_n if val.dim() >= 1 and val.shape[-1] == plan.n and plan.n != 1 else 0
    rows = plan.pad_m if val.dim() == 2 and val.shape[0] == plan.m and plan.m != 1 else 0
    if rows == cols == 0:
        return bias
    pads = [0, cols, 0, rows] if rows else [0, cols]  # constant_pad_nd pads from the last dim backwards
    return call_with_meta(graph, aten.constant_pad_nd.default, bias, pads, 0.0)


def _rewrite(graph: fx.Graph, node: fx.Node, plan: _Plan, pads: _Pads, copy_back: bool) -> fx.Node:
    """The padded product, sliced back to the original's sizes; if N was padded and `copy_back`,
    copied to the original's layout."""
    if node.target == aten.addmm.default:
        bias, a, b = node.args[:3]
    else:
        a, b = node.args[:2]
    with graph.inserting_before(node):
        padded_a = pads.pad(a, plan.pad_m, plan.pad_k)
        padded_b = pads.pad(b, plan.pad_k, plan.pad_n)
        if node.target == aten.addmm.default:
            product = call_with_meta(graph, aten.addmm.default, _pad_bias(graph, bias, plan), padded_a, padded_b)
        else:
            product = call_with_meta(graph, node.target, padded_a, padded_b)
        rank = product.meta["val"].dim()
        result = product
        if plan.pad_m:
            result = call_with_meta(graph, aten.slice.Tensor, result, rank - 2, 0, plan.m)
        if plan.pad_n:
            result = call_with_meta(graph, aten.slice.Tensor, result, rank - 1, 0, plan.n)
            if copy_back:
                result = call_with_meta(graph, aten.clone.default, result, memory_format=torch.contiguous_format)
    return result


def _candidate(node: fx.Node) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The operands' FakeTensors of a product this pass may pad."""
    if node.op != "call_function":
        return None
    if node.target in (aten.mm.default, aten.bmm.default):
        a, b = node.args[:2]
    elif node.target == aten.addmm.default and not node.kwargs:  # beta = alpha = 1
        a, b = node.args[1:3]
    else:
        return None
    a, b = a.meta.get("val"), b.meta.get("val")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return None
    if a.dtype not in _PADDED_DTYPES or b.dtype != a.dtype or not _static(a, b) or 0 in (*a.shape, *b.shape):
        return None
    return a, b


_ROW_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _returned_through_row_views(node: fx.Node, n: int, user_outputs: int) -> list[fx.Node] | None:
    """The views between `node` and the graph's output when the first `user_outputs` outputs are all
    that read it, each view keeping the rows of length `n` whole (so it stays a view of rows with a
    padded stride); else None."""
    views = []
    for user in node.users:
        if user.op == "output":
            outputs = user.args[0] if isinstance(user.args[0], (list, tuple)) else [user.args[0]]
            positions = [i for i, out in enumerate(outputs) if out is node]
            if not positions or max(positions) >= user_outputs:  # none: inside a nested output structure
                return None
            continue
        if user.op != "call_function" or user.target not in _ROW_VIEWS or user.meta["val"].shape[-1] != n:
            return None
        below = _returned_through_row_views(user, n, user_outputs)
        if below is None:
            return None
        views += [user, *below]
    return views


def pad_matmuls(
    gm: fx.GraphModule, spec: DeviceSpec, user_outputs: int = 0
) -> tuple[fx.GraphModule, list[PaddedProduct]]:
    """Pad, in place, every matrix product of `gm` that is misaligned and worth padding on `spec`.
    A product that only the first `user_outputs` outputs read is returned with padded rows, not copied."""
    padded = []
    pads = _Pads(gm.graph)
    for node in list(gm.graph.nodes):
        operands = _candidate(node)
        if operands is None:
            continue
        a, b = operands
        plan = _plan(a, b)
        if plan is None or not _worth_it(plan, a, b, spec):
            continue
        returned_views = _returned_through_row_views(node, plan.n, user_outputs)
        if returned_views and plan.pad_m and a.dim() > 2:
            returned_views = None  # its rows are evenly spaced only within a batch: a view may merge batches
        replacement = _rewrite(gm.graph, node, plan, pads, copy_back=returned_views is None)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        for view in returned_views or ():
            refresh_meta(view)
        batch = tuple(a.shape[:-2])
        padded.append(
            PaddedProduct(
                node.name,
                (*batch, plan.m, plan.k, plan.n),
                (*batch, plan.m + plan.pad_m, plan.k + plan.pad_k, plan.n + plan.pad_n),
            )
        )
    return gm, padded


def run(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, PadMatmulReport]:
    spec = device_spec(ctx.device)
    if spec.misaligned_matmul_slowdown <= 1:
        return gm, PadMatmulReport([], skipped=f"alignment picks no matrix-product kernels on {spec.name}")
    gm, padded = pad_matmuls(gm, spec, ctx.user_outputs)
    return gm, PadMatmulReport(padded)
