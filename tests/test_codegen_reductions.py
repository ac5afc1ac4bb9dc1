"""Reductions with pointwise prologue and epilogue, persistent and looped, against eager."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fusion_helpers import (
    assert_kernels_ran,
    assert_matches,
    force_looped_reductions,
    run_fused,
)

from graphopt import events

aten = torch.ops.aten

REDUCTIONS = [aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.mean.dim]
DIMS = [[0], [1], [2], [-1], [0, 2], [0, 1, 2]]


@pytest.fixture(params=["persistent", "looped"])
def variant(request, monkeypatch):
    if request.param == "looped":
        force_looped_reductions(monkeypatch)
    return request.param


@pytest.mark.parametrize("keepdim", [True, False])
@pytest.mark.parametrize("dims", DIMS, ids=str)
@pytest.mark.parametrize("op", REDUCTIONS, ids=str)
def test_reduction_with_prologue_and_epilogue(op, dims, keepdim, variant):
    x = torch.randn(3, 5, 10)

    def fn(x):
        pre = aten.add.Tensor(aten.mul.Tensor(x, 2.0), 1.0)
        red = op(pre, dims, keepdim)
        return red, aten.exp.default(aten.mul.Tensor(red, 0.1))

    result, calls = run_fused(fn, x)
    assert len(calls) == 1
    assert_matches(result, fn(x), rtol=1e-5, atol=1e-5)


def test_two_reductions_and_full_epilogue_over_a_transposed_input(variant):
    """softmax over dim 0 of a transposed view: a column reduction with a full-size epilogue."""
    x = torch.randn(7, 9).t()

    def fn(x):
        m = aten.amax.default(x, [0], True)
        e = aten.exp.default(aten.sub.Tensor(x, m))
        s = aten.sum.dim_IntList(e, [0], True)
        return aten.div.Tensor(e, s)

    result, calls = run_fused(fn, x)
    assert len(calls) == 1 and calls[0].primary.spec.domain.is_reduction
    assert calls[0].primary.inner_reduction, "dim 0 of a transposed view is contiguous: an inner reduction"
    assert_matches(result, fn(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", [aten.amax.default, aten.amin.default], ids=str)
def test_max_and_min_propagate_nan_like_eager(op, variant):
    """tl.max/tl.min drop NaN; torch's amax/amin give NaN for a row with one (whatever its other values)."""
    x = torch.randn(4, 11)
    x[0, 3] = float("nan")
    x[1, 10] = float("nan")
    x[2, 0], x[2, 5] = float("inf"), -float("inf")
    x[3, :] = float("nan")

    def fn(x):
        return op(aten.mul.Tensor(x, 2.0), [1], False)

    result, calls = run_fused(fn, x)
    assert len(calls) == 1
    assert_matches(result, fn(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_sums_accumulate_in_fp32(dtype):
    x = (torch.rand(4, 4096) + 0.5).to(dtype)

    def fn(x):
        return aten.sum.dim_IntList(x, [1], False)

    result, _ = run_fused(fn, x)
    exact = x.double().sum(1)
    # one rounding of the result (rel 2^-8 for bf16), not 4096 roundings of a running sum
    torch.testing.assert_close(result.double(), exact, rtol=8e-3 if dtype == torch.bfloat16 else 1e-3, atol=0)


def test_integer_and_bool_reductions():
    x = torch.randint(-50, 50, (6, 11), dtype=torch.int32)

    def fn(x):
        return aten.sum.dim_IntList(x, [1], False), aten.amax.default(x, [0]), aten.amin.default(aten.gt.Scalar(x, 0), [1])

    result, _ = run_fused(fn, x)
    assert_matches(result, fn(x), rtol=0, atol=0)


def _compiled_matches(fn, inputs, *, rtol, atol, dtype=torch.float32):
    """fn forward and backward through torch.compile(backend="graphopt") vs eager; kernels must have run."""
    ref_inputs = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
    with events.capture() as graphs:
        out = torch.compile(fn, backend="graphopt")(*inputs)
        out.float().square().sum().backward()
    ref = fn(*ref_inputs)
    ref.float().square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    for t, r in zip(inputs, ref_inputs):
        if t.requires_grad:
            torch.testing.assert_close(t.grad, r.grad, rtol=rtol, atol=atol)
    return assert_kernels_ran(graphs)


@pytest.mark.parametrize("n", [16, 100])
def test_softmax_and_log_softmax_forward_backward(n, variant):
    x = torch.randn(6, n, requires_grad=True)
    _compiled_matches(lambda x: torch.softmax(x * 2, -1) + torch.log_softmax(x, -1), [x], rtol=1e-4, atol=1e-5)


def test_softmax_over_a_middle_dim_forward_backward(variant):
    x = torch.randn(3, 10, 4, requires_grad=True)
    _compiled_matches(lambda x: torch.softmax(x, 1), [x], rtol=1e-4, atol=1e-5)


def test_layer_norm_forward_backward(variant):
    x = torch.randn(2, 5, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    calls = _compiled_matches(lambda x, w, b: F.layer_norm(x, (24,), w, b), [x, w, b], rtol=1e-4, atol=1e-4)
    assert any(call.primary.spec.domain.is_reduction for call in calls)


def _forward_backward(fn, inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.float().square().sum().backward()
    return [out.detach(), *(t.grad for t in inputs)]


def test_bf16_layer_norm_is_as_accurate_as_eager(variant):
    """bf16 results differ from eager's by roundings; both must be as close to a float64 oracle."""
    inputs = [torch.randn(2, 5, 24), torch.randn(24), torch.randn(24)]
    bf16 = [t.bfloat16() for t in inputs]

    def fn(x, w, b):
        return F.layer_norm(x, (24,), w, b)

    with events.capture() as graphs:
        ours = _forward_backward(torch.compile(fn, backend="graphopt"), bf16)
    assert_kernels_ran(graphs)
    eager = _forward_backward(fn, bf16)
    oracle = _forward_backward(fn, [t.double() for t in bf16])
    for mine, theirs, exact in zip(ours, eager, oracle):
        assert mine.dtype == torch.bfloat16
        eager_error = (theirs.double() - exact).abs().max().item()
        # plus one rounding of the largest result to bf16 (half an ulp, 2^-9 relative)
        assert (mine.double() - exact).abs().max().item() <= 1.25 * eager_error + exact.abs().max().item() * 2**-9


def test_rms_norm_forward_backward(variant):
    x = torch.randn(4, 6, 32, requires_grad=True)
    w = torch.randn(32, requires_grad=True)
    _compiled_matches(lambda x, w: F.rms_norm(x, (32,), w, eps=1e-6), [x, w], rtol=1e-4, atol=1e-5)


def test_cross_entropy_forward_backward(variant):
    logits = torch.randn(8, 37, requires_grad=True)
    target = torch.randint(0, 37, (8,))
    target[3] = -100  # ignored

    def fn(logits):
        return F.cross_entropy(logits * 1.5, target, ignore_index=-100)

    _compiled_matches(fn, [logits], rtol=1e-4, atol=1e-5)


def test_var_mean_and_std_forward_backward(variant):
    x = torch.randn(5, 12, requires_grad=True)

    def fn(x):
        var, mean = torch.var_mean(x, dim=1, correction=1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) + x.var(0) + x.mean()

    _compiled_matches(fn, [x], rtol=1e-4, atol=1e-5)
