"""Run 2-D convolutions in channels-last layout.

cuDNN's fast bf16/fp16 convolution kernels on NVIDIA GPUs work on NHWC
(channels-last) tensors; given NCHW it transposes around every convolution or
picks slower kernels. Eager PyTorch keeps the model's NCHW layout, and so did
graphopt: resnet50 inference ran at 0.29x of inductor on an H200, which lays
convolutions out channels-last (its layout optimization).

The pass gives every 2-D convolution a channels-last input and weight (a copy
that fuses into the producer's kernel when there is one), then propagates
layouts through the graph again with FakeTensors, as eager would compute them:
pointwise ops, batch norm and pooling keep channels-last, so the copies happen
once at the first convolution and wherever a layout-bound op demands another.
A view that the new strides no longer allow becomes a reshape. Graph outputs whose
layout changed are copied back, so callers see eager's strides.

Training graphs are laid out as one joint graph, before the partition
(passes/remat.py's Partitioner runs this pass first), so the forward's saved
activations and the backward's inputs agree on their layouts; the separate
forward and backward graphs are left as the partition made them. Static shapes
only.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from graphopt.cost_model.roofline import device_spec
from graphopt.passes.graph_edit import call_with_meta, fake_mode_of
from graphopt.pipeline import PassContext, PassReport, copy_graph_module

aten = torch.ops.aten

_VIEWS_TO_RESHAPE = {aten.view.default: aten.reshape.default, aten._unsafe_view.default: aten.reshape.default}


class _LayoutPropagation(FakeTensorProp):
    """FakeTensor propagation that turns a view its input's new layout no longer allows into a reshape."""

    def __init__(self, gm: fx.GraphModule, mode) -> None:
        super().__init__(gm, mode)
        self.reshaped: list[str] = []

    def run_node(self, n: fx.Node):
        try:
            return super().run_node(n)
        except (RuntimeError, ValueError):  # torch raises either for a view its strides do not allow
            if n.op != "call_function" or n.target not in _VIEWS_TO_RESHAPE:
                raise
            n.target = _VIEWS_TO_RESHAPE[n.target]
            self.reshaped.append(n.name)
            return super().run_node(n)


@dataclasses.dataclass(frozen=True)
class ConvLayoutReport(PassReport):
    channels_last_convolutions: list[str]
    copies_to_channels_last: list[str]  # the conv inputs/weights that needed a layout copy
    views_made_reshapes: list[str]  # views that the new layouts no longer allow
    outputs_restored: list[str]  # graph outputs copied back to their original layout
    skipped: str | None = None

    def summary(self) -> str:
        if self.skipped:
            return f"skipped: {self.skipped}"
        return (
            f"{len(self.channels_last_convolutions)} convolutions channels-last, "
            f"{len(self.copies_to_channels_last)} layout copies in, {len(self.outputs_restored)} outputs restored"
        )


# The 2-D convolution ops: which arguments are the activation and the weight, and where the flag
# `transposed` is (transposed convolutions keep their layout).
_CONVOLUTIONS = {
    aten.convolution.default: ((0, 1), 6),
    aten.convolution_backward.default: ((1, 2), 7),
}


def _is_conv2d(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _CONVOLUTIONS:
        return False
    (activation, _), transposed = _CONVOLUTIONS[node.target]
    x = node.args[activation].meta.get("val")
    return isinstance(x, torch.Tensor) and x.dim() == 4 and not node.args[transposed]


def _channels_last(val: torch.Tensor) -> bool:
    return val.is_contiguous(memory_format=torch.channels_last)


# Inductor's layout-optimization rules (torch/_inductor/graph.py decide_layout_opt), measured on an
# H200 here too: a graph with a single convolution among hundreds of nodes (ViT's patch embedding:
# 0.63x of the row-major run in inference) pays more for the layout copies than it gains, and
# grouped convolutions run many times slower channels-last.
_NODES_PER_CONVOLUTION_AT_MOST = 300


def _unprofitable(gm: fx.GraphModule, convs: list[fx.Node]) -> str | None:
    """Why channels-last would not pay for this graph's convolutions; None when it would."""
    nodes = len(gm.graph.nodes)
    if nodes >= _NODES_PER_CONVOLUTION_AT_MOST * len(convs):
        return f"only {len(convs)} convolution(s) among {nodes} nodes: the layout copies would cost more than they save"
    grouped = [c.name for c in convs if c.target == aten.convolution.default and c.args[8] > 1]
    if grouped:
        return f"grouped convolutions ({', '.join(grouped[:3])}) run slower channels-last"
    return None


def _static(gm: fx.GraphModule) -> bool:
    vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    sizes = [s for v in vals if isinstance(v, torch.Tensor) for s in v.shape]
    return not any(isinstance(v, torch.SymInt) for v in vals + sizes)


def _copy_to_channels_last(graph: fx.Graph, conv: fx.Node, copies: dict[fx.Node, fx.Node]) -> None:
    """Make `conv` read channels-last copies of its activation and weight, one copy per value
    (a backward convolution reads the copies its forward made)."""
    for index in _CONVOLUTIONS[conv.target][0]:
        arg = conv.args[index]
        if arg not in copies:
            with graph.inserting_before(conv):
                copies[arg] = call_with_meta(graph, aten.clone.default, arg, memory_format=torch.channels_last)
        conv.replace_input_with(arg, copies[arg])


def _drop_needless_copies(graph: fx.Graph, copies: list[fx.Node]) -> list[str]:
    """Remove the copies whose source is channels-last once layouts are propagated; name the others' sources."""
    kept = []
    for copy in copies:
        source = copy.args[0]
        if _channels_last(source.meta["val"]):
            copy.replace_all_uses_with(source)
            graph.erase_node(copy)
        else:
            kept.append(source.name)
    return kept


def _restore_outputs(graph: fx.Graph, original: dict[fx.Node, torch.Tensor]) -> list[str]:
    """Copy back every graph output whose layout the pass changed (eager's strides for callers)."""
    output = graph.output_node()
    restored = []
    for value in output.all_input_nodes:
        before, after = original.get(value), value.meta.get("val")
        if not isinstance(before, torch.Tensor) or before.stride() == after.stride():
            continue
        with graph.inserting_before(output):
            if before.is_contiguous():
                copy = call_with_meta(graph, aten.clone.default, value, memory_format=torch.contiguous_format)
            else:
                shape, stride = list(before.shape), list(before.stride())
                empty = call_with_meta(
                    graph, aten.empty_strided.default, shape, stride, dtype=before.dtype, device=before.device
                )
                copy = call_with_meta(graph, aten.copy.default, empty, value)
        output.replace_input_with(value, copy)
        restored.append(value.name)
    return restored


def to_channels_last(gm: fx.GraphModule) -> tuple[fx.GraphModule, ConvLayoutReport]:
    """Rewrite `gm` in place: channels-last convolutions, layouts propagated, outputs restored."""
    graph = gm.graph
    convs = [n for n in graph.nodes if _is_conv2d(n)]
    original = {n: n.meta.get("val") for n in graph.nodes}
    copies: dict[fx.Node, fx.Node] = {}
    for conv in convs:
        _copy_to_channels_last(graph, conv, copies)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    propagation = _LayoutPropagation(gm, fake_mode_of(tuple(placeholders)))
    propagation.propagate_dont_convert_inputs(*(n.meta["val"] for n in placeholders))
    copied = _drop_needless_copies(graph, list(copies.values()))  # a copy of a channels-last value changes no layout
    restored = _restore_outputs(graph, original)
    return gm, ConvLayoutReport([c.name for c in convs], copied, propagation.reshaped, restored)


def run(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, ConvLayoutReport]:
    def skip(reason: str) -> tuple[fx.GraphModule, ConvLayoutReport]:
        return gm, ConvLayoutReport([], [], [], [], skipped=reason)

    if not device_spec(ctx.device).channels_last_convolutions:
        return skip(f"convolutions on {ctx.device.type} do not prefer channels-last")
    if ctx.kind in ("forward", "backward"):
        return skip("laid out as the joint graph, before the partition")
    convs = [n for n in gm.graph.nodes if _is_conv2d(n)]
    if not convs:
        return skip("no 2-D convolutions")
    if reason := _unprofitable(gm, convs):
        return skip(reason)
    if not _static(gm):
        return skip("dynamic shapes")
    try:  # on a copy: a failure leaves `gm` as it was
        return to_channels_last(copy_graph_module(gm))
    except Exception as e:  # an op whose layout rules FakeTensors cannot follow: keep eager's layouts
        return skip(f"layouts could not be propagated: {type(e).__name__}: {e}".splitlines()[0][:300])
