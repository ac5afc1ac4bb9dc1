"""The analytical roofline: how long one ATen node takes on a device, from its sizes alone.

A node's time is bounded by its arithmetic (FLOPs over the device's rate: the matrix
units for matmuls/convolutions/attention, the vector units for everything else) and
by its memory traffic (bytes read plus bytes written over the copy bandwidth); it
takes the larger of the two, plus one kernel launch. That is crude, but it is
monotone in the right things, it needs no measurement, and it is what the passes'
solvers compare alternatives with until a learned model replaces it.

Sizes come from `node.meta['val']` (FakeTensors). Symbolic sizes are replaced by
their hints without installing a guard, so pricing a dynamic graph never
specializes it. FLOP formulas for the ops that have them come from torch's own
`torch.utils.flop_counter` registry.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """Sustained rates of one device. `matmul_flops_per_s` is the 16-bit matrix rate;
    float32 matrix products run at `fp32_matmul_flops_per_s` (TF32 or IEEE, as torch
    was configured when the spec was made)."""

    name: str
    matmul_flops_per_s: float
    vector_flops_per_s: float
    bytes_per_s: float
    launch_overhead_s: float
    fp32_matmul_flops_per_s: float | None = None
    # How many times slower a matrix product runs when a leading dimension is not a multiple
    # of 16 bytes (cuBLAS falls back to align-1 kernels); 1.0: alignment picks no kernels.
    misaligned_matmul_slowdown: float = 1.0
    # Whether the device's convolution library is fastest on channels-last (NHWC) tensors (cuDNN).
    channels_last_convolutions: bool = False

    def matmul_rate(self, dtype: torch.dtype | None) -> float:
        """FLOP/s of a matrix product whose operands have `dtype`."""
        if dtype in (torch.float32, torch.float64) and self.fp32_matmul_flops_per_s is not None:
            return self.fp32_matmul_flops_per_s
        return self.matmul_flops_per_s


@dataclasses.dataclass(frozen=True)
class _KnownDevice:
    """Figures of one device family: `fp32_ieee`/`fp32_tf32` are float32 matmul rates."""

    name_contains: str
    sm_count: int
    matmul_flops_per_s: float
    fp32_ieee_flops_per_s: float
    fp32_tf32_flops_per_s: float
    vector_flops_per_s: float
    bytes_per_s: float
    launch_overhead_s: float


# Sustained (not datasheet-peak) figures. H100: measured on the lent machine (about
# 3.0e12 B/s device-to-device copy, 8.0e14 bf16 matmul FLOP/s); the others are their
# datasheet peaks scaled by the same measured/peak ratios.
_KNOWN_CUDA_DEVICES: tuple[_KnownDevice, ...] = (
    _KnownDevice("H200", 132, 8.0e14, 5.0e13, 4.0e14, 6.0e13, 4.3e12, 4e-6),
    _KnownDevice("H100", 132, 8.0e14, 5.0e13, 4.0e14, 6.0e13, 3.0e12, 4e-6),
    _KnownDevice("A100", 108, 2.5e14, 1.6e13, 1.25e14, 1.6e13, 1.6e12, 4e-6),
    _KnownDevice("L4", 58, 9.0e13, 2.4e13, 4.5e13, 2.4e13, 2.6e11, 4e-6),
)
# GPT-2's LM head (vocabulary 50257) on an H200: cuBLAS align-1 kernels took 4.3 to 6.6 ms
# where the aligned products take about 1 ms (benchmarks/results/2026-12-04-h200/profile).
CUDA_MISALIGNED_MATMUL_SLOWDOWN = 4.0
# An unrecognised GPU is priced as an H100 scaled by its SM count.
_REFERENCE_CUDA_DEVICE = _KNOWN_CUDA_DEVICES[1]

# A CPU core complex: modest figures, so CPU plans are still ranked sensibly.
CPU_SPEC = DeviceSpec(
    name="cpu",
    matmul_flops_per_s=1.0e11,
    vector_flops_per_s=2.0e10,
    bytes_per_s=1.0e10,
    launch_overhead_s=2e-6,
    fp32_matmul_flops_per_s=1.0e11,
)


def _cuda_spec(name: str, sm_count: int) -> DeviceSpec:
    tf32 = torch.get_float32_matmul_precision() != "highest"
    for known in _KNOWN_CUDA_DEVICES:
        if known.name_contains in name:
            scale = 1.0
            break
    else:
        known = _REFERENCE_CUDA_DEVICE
        scale = sm_count / known.sm_count
    return DeviceSpec(
        name=name,
        matmul_flops_per_s=known.matmul_flops_per_s * scale,
        vector_flops_per_s=known.vector_flops_per_s * scale,
        bytes_per_s=known.bytes_per_s * scale,
        launch_overhead_s=known.launch_overhead_s,
        fp32_matmul_flops_per_s=(known.fp32_tf32_flops_per_s if tf32 else known.fp32_ieee_flops_per_s) * scale,
        misaligned_matmul_slowdown=CUDA_MISALIGNED_MATMUL_SLOWDOWN,
        channels_last_convolutions=True,
    )


def device_spec(device: torch.device) -> DeviceSpec:
    """The rates of `device`: a known GPU by name, an unknown one scaled by SM count, else CPU."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        return _cuda_spec(props.name, props.multi_processor_count)
    return CPU_SPEC


@dataclasses.dataclass(frozen=True)
class NodeCost:
    flops: float
    bytes: float
    seconds: float


ZERO_COST = NodeCost(0.0, 0.0, 0.0)


def size_hint(value: int | torch.SymInt, fallback: int = 4096) -> int:
    """A concrete number for a (possibly symbolic) size, without installing a guard.

    Backed symbols have a hint (the example input's size); an unbacked one with no
    hint gets `fallback`, a plausible size for pricing only."""
    if isinstance(value, int):
        return value
    node = value.node
    if node.has_hint():
        return int(node.hint)
    hinted = node.shape_env.size_hint(node.expr, allow_none=True)
    return int(hinted) if hinted is not None else fallback


def numel_hint(t: torch.Tensor) -> int:
    n = 1
    for s in t.shape:
        n *= size_hint(s)
    return n


def nbytes_hint(t: torch.Tensor) -> int:
    """Bytes of a tensor's elements (its storage if contiguous), symbolic sizes hinted."""
    return numel_hint(t) * t.dtype.itemsize


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    for leaf in tree_flatten(value)[0]:
        if isinstance(leaf, torch.Tensor):
            yield leaf


def _meta_val(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, fx.Node) else arg


def _concrete_meta(value: Any) -> Any:
    """Tensors -> empty meta tensors of hinted shape; SymInts -> hints (inputs to FLOP formulas)."""
    if isinstance(value, torch.Tensor):
        return torch.empty([size_hint(s) for s in value.shape], dtype=value.dtype, device="meta")
    if isinstance(value, torch.SymInt):
        return size_hint(value)
    return value


def _is_free(node: fx.Node) -> bool:
    """Nodes that launch nothing and move no data: graph plumbing, views, size arithmetic."""
    if node.op != "call_function":
        return True
    target = node.target
    if target is operator.getitem:
        return True
    if isinstance(target, torch._ops.OpOverload):
        return target.is_view or next(_tensors(node.meta.get("val")), None) is None
    return False


def matmul_flops(node: fx.Node) -> float | None:
    """FLOPs from torch's flop_counter registry (matmul, conv, attention), else None."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    formula = flop_registry.get(packet) if packet is not None else None
    if formula is None:
        return None
    args, kwargs = tree_map(_concrete_meta, tree_map(_meta_val, (node.args, node.kwargs)))
    out = tree_map(_concrete_meta, node.meta.get("val"))
    return float(formula(*args, out_val=out, **kwargs))


def node_cost(node: fx.Node, spec: DeviceSpec) -> NodeCost:
    """FLOPs, bytes moved (inputs read + outputs written) and roofline seconds of one node."""
    if _is_free(node):
        return ZERO_COST
    inputs = [t for a in node.all_input_nodes for t in _tensors(a.meta.get("val"))]
    outputs = list(_tensors(node.meta.get("val")))
    moved = float(sum(nbytes_hint(t) for t in inputs) + sum(nbytes_hint(t) for t in outputs))
    flops = matmul_flops(node)
    if flops is not None:
        dtype = inputs[0].dtype if inputs else None
        compute_s = flops / spec.matmul_rate(dtype)
    else:
        flops = float(sum(numel_hint(t) for t in outputs))  # one operation per element written
        compute_s = flops / spec.vector_flops_per_s
    seconds = max(compute_s, moved / spec.bytes_per_s) + spec.launch_overhead_s
    return NodeCost(flops, moved, seconds)


def graph_cost(gm: fx.GraphModule, spec: DeviceSpec) -> NodeCost:
    """The sum over a graph's nodes (each node its own kernel: an upper bound before fusion)."""
    costs = [node_cost(n, spec) for n in gm.graph.nodes]
    return NodeCost(sum(c.flops for c in costs), sum(c.bytes for c in costs), sum(c.seconds for c in costs))
