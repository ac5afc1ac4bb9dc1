"""The roofline cost model on small traced graphs: FLOPs, bytes, seconds, symbolic sizes."""

from __future__ import annotations

import pytest
import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from graphopt.cost_model.roofline import (
    CPU_SPEC,
    DeviceSpec,
    NodeCost,
    _cuda_spec,
    device_spec,
    graph_cost,
    node_cost,
)

SPEC = DeviceSpec("test", matmul_flops_per_s=1e12, vector_flops_per_s=1e10, bytes_per_s=1e9, launch_overhead_s=1e-6)


def _aten_graph(fn, *inputs) -> fx.GraphModule:
    return make_fx(fn, tracing_mode="fake")(*inputs)


def _node(gm: fx.GraphModule, target) -> fx.Node:
    (node,) = [n for n in gm.graph.nodes if n.target is target]
    return node


def test_matmul_flops_bytes_and_compute_bound_seconds():
    a, b = torch.randn(64, 128), torch.randn(128, 32)
    gm = _aten_graph(torch.mm, a, b)
    cost = node_cost(_node(gm, torch.ops.aten.mm.default), SPEC)
    assert cost.flops == 2 * 64 * 128 * 32
    assert cost.bytes == 4 * (64 * 128 + 128 * 32 + 64 * 32)
    assert cost.seconds == pytest.approx(max(cost.flops / 1e12, cost.bytes / 1e9) + 1e-6)


def test_pointwise_is_memory_bound_with_one_flop_per_output_element():
    x = torch.randn(1000)
    gm = _aten_graph(lambda t: t.relu(), x)
    cost = node_cost(_node(gm, torch.ops.aten.relu.default), SPEC)
    assert cost == NodeCost(flops=1000.0, bytes=8000.0, seconds=pytest.approx(8000 / 1e9 + 1e-6))


def test_views_and_plumbing_cost_nothing():
    gm = _aten_graph(lambda t: t.view(10, 10).t().sum(), torch.randn(100))
    costs = {str(n.target): node_cost(n, SPEC) for n in gm.graph.nodes}
    assert costs["aten.view.default"] == NodeCost(0.0, 0.0, 0.0)
    assert costs["aten.t.default"] == NodeCost(0.0, 0.0, 0.0)
    assert costs["aten.sum.default"].bytes == 4 * 100 + 4
    assert graph_cost(gm, SPEC).seconds == pytest.approx(costs["aten.sum.default"].seconds)


def test_convolution_uses_torch_flop_formula():
    x, w = torch.randn(2, 3, 16, 16), torch.randn(8, 3, 3, 3)
    gm = _aten_graph(lambda x, w: torch.nn.functional.conv2d(x, w, padding=1), x, w)
    cost = node_cost(_node(gm, torch.ops.aten.convolution.default), SPEC)
    assert cost.flops == 2 * (2 * 8 * 16 * 16) * (3 * 3 * 3)


def test_symbolic_sizes_are_priced_by_their_hints_without_guards():
    gm = make_fx(lambda a: torch.mm(a, a.t()), tracing_mode="symbolic")(torch.randn(48, 16))
    mm = _node(gm, torch.ops.aten.mm.default)
    assert isinstance(mm.meta["val"].shape[0], torch.SymInt)
    env = mm.meta["val"].shape[0].node.shape_env
    guards_before = len(env.guards)
    cost = node_cost(mm, SPEC)
    assert cost.flops == 2 * 48 * 16 * 48
    assert cost.bytes == 4 * (48 * 16 * 2 + 48 * 48)
    assert len(env.guards) == guards_before


def test_fp32_matmul_uses_the_fp32_rate():
    spec = DeviceSpec("t", 1e15, 1e13, 1e15, 0.0, fp32_matmul_flops_per_s=1e12)
    a = torch.randn(256, 256)
    mm32 = _node(_aten_graph(torch.mm, a, a), torch.ops.aten.mm.default)
    mm16 = _node(_aten_graph(torch.mm, a.bfloat16(), a.bfloat16()), torch.ops.aten.mm.default)
    assert node_cost(mm32, spec).seconds == pytest.approx(2 * 256**3 / 1e12)
    assert node_cost(mm16, spec).seconds == pytest.approx(2 * 256**3 / 1e15)


def test_device_table():
    assert device_spec(torch.device("cpu")) is CPU_SPEC
    h100 = _cuda_spec("NVIDIA H100 80GB HBM3", 132)
    assert h100.bytes_per_s == 3.0e12 and h100.matmul_flops_per_s == 8.0e14
    unknown = _cuda_spec("Some Future GPU", 66)
    assert unknown.bytes_per_s == pytest.approx(h100.bytes_per_s / 2)
