"""Every pointwise lowering against eager ATen: contiguous, transposed and broadcast operands, each dtype.

Each case fuses a small chain (the op between a load-side and a store-side op, so
the op is inside a kernel, not alone) and compares with the same ATen calls run eagerly.
"""

from __future__ import annotations

import pytest
import torch
from fusion_helpers import assert_matches, fuse, run_fused

from graphopt.codegen import lowerings

aten = torch.ops.aten
prims = torch.ops.prims

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
# Tolerances per dtype: kernels compute fp16/bf16 in fp32 and round once, eager rounds per op.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def _float(shape, dtype, positive=False):
    x = torch.randn(shape, dtype=torch.float32)
    if positive:
        x = x.abs() + 0.1
    return x.to(dtype)


# op -> (how many tensor operands, extra scalar args, positive operands only)
UNARY = {
    aten.neg.default: (),
    aten.abs.default: (),
    aten.exp.default: (),
    aten.exp2.default: (),
    aten.expm1.default: (),
    aten.log.default: "positive",
    aten.log2.default: "positive",
    aten.log1p.default: "positive",
    aten.sqrt.default: "positive",
    aten.rsqrt.default: "positive",
    aten.sin.default: (),
    aten.cos.default: (),
    aten.tanh.default: (),
    aten.atan.default: (),
    aten.erf.default: (),
    aten.sigmoid.default: (),
    aten.reciprocal.default: "positive",
    aten.floor.default: (),
    aten.ceil.default: (),
    aten.trunc.default: (),
    aten.round.default: (),
    aten.sign.default: (),
    aten.sgn.default: (),
    aten.relu.default: (),
    aten.clone.default: (),
    aten.lift_fresh_copy.default: (),
    aten.alias_copy.default: (),
}

BINARY = [
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.maximum.default,
    aten.minimum.default,
    aten.atan2.default,
    aten.pow.Tensor_Tensor,
    aten.rsub.Tensor,
]

COMPARE = [aten.eq.Tensor, aten.ne.Tensor, aten.lt.Tensor, aten.le.Tensor, aten.gt.Tensor, aten.ge.Tensor]


def _chain(op, *extra):
    """mul by 1 before (so the op reads a kernel value) and add 0 after (so its result is used)."""

    def fn(x):
        y = op(aten.mul.Tensor(x, 1), *extra)
        return aten.add.Tensor(y, 0) if y.dtype != torch.bool else aten.logical_not.default(y)

    return fn


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("op", list(UNARY), ids=str)
def test_unary(op, dtype):
    x = _float((5, 7), dtype, positive=UNARY[op] == "positive")
    fn = _chain(op)
    result, _ = run_fused(fn, x)
    assert_matches(result, fn(x), *TOL[dtype])


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "broadcast"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("op", BINARY + COMPARE, ids=str)
def test_binary(op, dtype, layout):
    x = _float((6, 5), dtype, positive=op == aten.pow.Tensor_Tensor)
    if layout == "contiguous":
        y = _float((6, 5), dtype, positive=True)
    elif layout == "transposed":
        y = _float((5, 6), dtype, positive=True).t()
    else:
        y = _float((1, 5), dtype, positive=True)

    def fn(x, y):
        out = op(aten.mul.Tensor(x, 1), y)
        return out if out.dtype == torch.bool else aten.add.Tensor(out, 0)

    result, _ = run_fused(fn, x, y)
    assert_matches(result, fn(x, y), *TOL[dtype])


SCALAR_OPS = [
    (aten.add.Tensor, 2.5),
    (aten.mul.Tensor, -3),
    (aten.div.Tensor, 7.0),
    (aten.pow.Tensor_Scalar, 2),
    (aten.pow.Tensor_Scalar, 3),
    (aten.pow.Tensor_Scalar, 0.5),
    (aten.pow.Tensor_Scalar, -0.5),
    (aten.pow.Tensor_Scalar, -1),
    (aten.pow.Tensor_Scalar, 1.7),
    (aten.rsub.Scalar, 1.0),
    (aten.clamp_min.default, 0.2),
    (aten.clamp_max.default, -0.1),
    (aten.leaky_relu.default, 0.1),
    (aten.lt.Scalar, 0.3),
    (aten.ge.Scalar, -0.2),
    (aten.eq.Scalar, 0.0),
]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("op,scalar", SCALAR_OPS, ids=lambda v: str(v))
def test_tensor_scalar(op, scalar, dtype):
    x = _float((4, 9), dtype, positive=op == aten.pow.Tensor_Scalar)
    fn = _chain(op, scalar)
    result, _ = run_fused(fn, x)
    assert_matches(result, fn(x), *TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_where_clamp_hardtanh_elu_and_backward_ops(dtype):
    x, g = _float((6, 8), dtype), _float((6, 8), dtype)

    def fn(x, g):
        a = aten.where.self(aten.gt.Scalar(x, 0), x, aten.mul.Tensor(x, 0.5))
        b = aten.clamp.default(a, -0.5, 0.7)
        c = aten.hardtanh.default(x, -0.3, 0.4)
        d = aten.elu.default(x, 1.2)
        e = aten.hardtanh_backward.default(g, x, -0.3, 0.4)
        f = aten.leaky_relu_backward.default(g, x, 0.2, False)
        return aten.add.Tensor(aten.add.Tensor(b, c), aten.add.Tensor(d, aten.mul.Tensor(e, f)))

    result, _ = run_fused(fn, x, g)
    assert_matches(result, fn(x, g), *TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_integer_and_bool_ops(dtype):
    a = torch.randint(-20, 20, (5, 6), dtype=dtype)
    b = torch.randint(1, 7, (1, 6), dtype=dtype)

    def fn(a, b):
        s = aten.add.Tensor(aten.mul.Tensor(a, b), 3)
        m = aten.maximum.default(s, aten.neg.default(a))
        bits = aten.bitwise_xor.Tensor(aten.bitwise_and.Tensor(m, b), aten.bitwise_or.Tensor(a, b))
        flag = aten.logical_and.default(aten.gt.Scalar(a, 0), aten.logical_not.default(aten.eq.Tensor(a, b)))
        true_div = aten.div.Tensor(a, b)  # integer inputs, float result
        floor_div = aten.div.Tensor_mode(aten.mul.Tensor(a, 1.0), b, rounding_mode="floor")
        return bits, flag, true_div, floor_div, aten.abs.default(s)

    result, _ = run_fused(fn, a, b)
    assert_matches(result, fn(a, b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8], ids=str)
def test_integer_rounding_division_is_exact(dtype):
    """Integer floor/trunc division divides integers: Triton's `/` on integers is an fp32 division,
    which was off for operands past 2**24 (2**40 + 1 // 7 gave 157073096704, not 157073089682)."""
    big = [2**40 + 1, -(2**40) - 1, 2**53 + 3, -(2**31) + 5] if dtype == torch.int64 else []
    big += [2**30 + 3, -(2**30) - 7] if dtype in (torch.int64, torch.int32) else []
    small = [17, -17, 17, -17, 100, 0, 120, -1, 1] if dtype != torch.uint8 else [17, 200, 255, 0, 5, 1, 254, 9, 100]
    divisors = [5, 5, -5, -5, 7, 3, 9, 7, -7] if dtype != torch.uint8 else [5, 3, 16, 7, 5, 2, 255, 9, 1]
    a = torch.tensor(small + big, dtype=dtype)
    b = torch.tensor(divisors + [7, 7, -3, 9, 11, -13][: len(big)], dtype=dtype)
    if dtype == torch.uint8:
        b = b.abs()

    def fn(a, b):
        a = aten.add.Tensor(a, 0)
        return (
            aten.div.Tensor_mode(a, b, rounding_mode="floor"),
            aten.div.Tensor_mode(a, b, rounding_mode="trunc"),
            aten.div.Tensor_mode(a, 3, rounding_mode="floor"),
        )

    result, _ = run_fused(fn, a, b)
    assert_matches(result, fn(a, b), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32], ids=str)
def test_integer_powers_are_exact(dtype):
    """Integer powers multiply (exact, wrapping as eager); libdevice.pow went through floats:
    3001 ** 5 was off by 7 and 3 ** 39 by 65626179, for a result that fits in int64."""
    big = dtype == torch.int64
    a = torch.tensor([3001 if big else 41, -2999 if big else -43, 7, 1, 0, -1, 123 if big else 12, 9], dtype=dtype)
    e = torch.tensor([5, 5, 9, 3, 2, 7, 8, 39 if big else 19], dtype=dtype)

    def powers(a):
        a = aten.add.Tensor(a, 0)
        return aten.pow.Tensor_Scalar(a, 5), aten.pow.Tensor_Scalar(a, 7), aten.pow.Tensor_Scalar(a, 0)

    result, _ = run_fused(powers, a)
    assert_matches(result, powers(a), rtol=0, atol=0)

    def tensor_exponents(a, e):
        return aten.pow.Tensor_Tensor(aten.add.Tensor(a, 0), e), aten.pow.Scalar(3, aten.add.Tensor(e, 0))

    gm, _ = fuse(tensor_exponents, a, e)  # no exact lowering: pow runs in eager ATen
    assert_matches(gm(a, e), tensor_exponents(a, e), rtol=0, atol=0)


def test_float_floor_division_is_pythons():
    """Floor division of floats is Python's (c10's div_floor_floating, from fmod): 1.0 // 0.1 is 9.0,
    where floor(1.0 / 0.1) rounds the quotient to 10.0 first."""
    a = torch.tensor([1.0, -1.0, 7.0, 0.7, 1e8 + 1, 5.0, -0.0, 3.0, -5.0, 0.5, -0.5, 1e30, float("nan"), float("inf")])
    b = torch.tensor([0.1, 0.1, 0.7, 0.1, 3.0, 0.0, 1.0, -0.0, 0.0, 2.0, 2.0, 1e-20, 1.0, 2.0])

    def fn(a, b):
        return aten.div.Tensor_mode(aten.mul.Tensor(a, 1), b, rounding_mode="floor")

    result, _ = run_fused(fn, a, b)
    expected = fn(a, b)
    assert_matches(result, expected, rtol=0, atol=0)
    assert torch.equal(result.signbit(), expected.signbit())


@pytest.mark.parametrize(
    "src,dst",
    [
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float16),
        (torch.float32, torch.int32),
        (torch.int64, torch.float32),
        (torch.float32, torch.bool),
        (torch.bool, torch.float32),
        (torch.float32, torch.float64),
        (torch.float64, torch.bfloat16),
        (torch.float64, torch.float16),
        (torch.int64, torch.bfloat16),
        (torch.int32, torch.float16),
    ],
    ids=str,
)
def test_casts(src, dst):
    x = (torch.randn(7, 5) * 5).to(src)

    def fn(x):
        y = prims.convert_element_type.default(aten.mul.Tensor(x, 1), dst)
        z = aten._to_copy.default(aten.mul.Tensor(x, 2), dtype=dst)
        return y, z

    result, _ = run_fused(fn, x)
    assert_matches(result, fn(x), rtol=0, atol=0)


def test_bf16_round_trip_rounds():
    """An explicit cast to bf16 inside a kernel rounds (the kernel computes in fp32 otherwise)."""
    x = torch.randn(64) * 3

    def fn(x):
        y = prims.convert_element_type.default(aten.mul.Tensor(x, 1.001), torch.bfloat16)
        return prims.convert_element_type.default(aten.mul.Tensor(y, 1), torch.float32)

    result, _ = run_fused(fn, x)
    assert torch.equal(result, fn(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_comparisons_and_steps_see_low_precision_operands_rounded_as_eager(dtype):
    """A product kept in fp32 inside a kernel equals the same product eager rounded and saved only
    by chance: comparisons and floor take their fp16/bf16 operands rounded to their dtype. (Only
    their own operands: `floor(p * 3)` still sees `p * 3` from an unrounded `p`, more accurate
    than eager's double rounding, as every other op is.)"""
    torch.manual_seed(0)
    a, b = torch.randn(64, 32, dtype=dtype) * 4, torch.randn(32, dtype=dtype)
    saved = a * b  # what eager computed and a forward graph saved

    def compare(a, b, saved):
        p = a * b
        return p == saved, p >= saved, p < saved, torch.floor(p), torch.ceil(p)

    result, _ = run_fused(compare, a, b, saved)
    assert_matches(result, compare(a, b, saved), rtol=0, atol=0)


def test_amax_over_rows_backward_in_bf16_finds_its_maximum():
    """amax's backward divides by the count of eq(amax, x); with x kept unrounded in fp32 it found
    no maximum in most columns and the gradient was 0/0 = NaN."""
    torch.manual_seed(0)

    def f(b, c):
        p = b * c
        return p.sum(-1), p.amax(0)

    b = torch.randn(64, 32, dtype=torch.bfloat16, requires_grad=True)
    c = torch.randn(32, dtype=torch.bfloat16, requires_grad=True)
    out = torch.compile(f, backend="graphopt")(b, c)
    (out[0].float().sum() + out[1].float().sum()).backward()
    got = b.grad
    b.grad = c.grad = None
    expected = f(b, c)
    (expected[0].float().sum() + expected[1].float().sum()).backward()
    assert not got.isnan().any()
    torch.testing.assert_close(got, b.grad, rtol=2e-2, atol=2e-2)


def test_views_as_index_math():
    """expand, permute, slice, select, unsqueeze/squeeze and reshape inside one kernel, over strided inputs."""
    base = torch.randn(4, 6, 10)[:, :, ::2]  # non-contiguous
    row = torch.randn(5)

    def fn(base, row):
        p = aten.permute.default(base, [2, 0, 1])  # [5, 4, 6]
        s = aten.slice.Tensor(p, 2, 1, 5)  # [5, 4, 4]
        e = aten.expand.default(aten.unsqueeze.default(aten.unsqueeze.default(row, 1), 2), [5, 4, 4])
        v = aten.view.default(aten.mul.Tensor(s, e), [5, 16])
        r = aten.reshape.default(aten.t.default(v), [4, 4, 5])
        sel = aten.select.int(aten.squeeze.dim(aten.unsqueeze.default(r, 0), 0), 1, 2)  # [4, 5]
        return aten.add.Tensor(aten.transpose.int(sel, 0, 1), 1.0)

    result, calls = run_fused(fn, base, row)
    assert len(calls) == 1
    assert_matches(result, fn(base, row), rtol=1e-6, atol=1e-6)


def test_constants_iota_and_fills():
    x = torch.randn(4, 6)

    def fn(x):
        ids = aten.arange.start_step(0, 6, 1, dtype=torch.int64)
        hit = aten.eq.Scalar(aten.unsqueeze.default(ids, 0), 2)
        zero = aten.scalar_tensor.default(0.0, dtype=torch.float32)
        full = aten.full.default([4, 6], 1.5, dtype=torch.float32)
        return aten.add.Tensor(aten.where.self(hit, x, zero), full)

    result, _ = run_fused(fn, x)
    assert_matches(result, fn(x), rtol=1e-6, atol=1e-6)


def test_scalar_overloads_predicates_and_copies():
    x = torch.randn(5, 6)
    x[0, 0], x[1, 1], x[2, 2] = float("nan"), float("inf"), float("-inf")
    lo, hi = torch.full((1, 6), -0.5), torch.full((5, 1), 0.5)
    ints = torch.randint(-5, 5, (5, 6))

    def fn(x, lo, hi, ints):
        a = aten.div.Scalar(aten.mul.Scalar(aten.sub.Scalar(aten.add.Scalar(x, 1.5), 0.5), 2), 4)
        b = aten.true_divide.Tensor(prims.div.default(a, aten.add.Tensor(aten.mul.Tensor(a, 0), 4.0)), 3)
        c = aten.pow.Scalar(2.0, aten.clamp.Tensor(b, lo, hi))
        flags = aten.logical_xor.default(
            aten.logical_or.default(aten.isnan.default(x), aten.isinf.default(x)),
            aten.logical_or.default(aten.ne.Scalar(ints, 0), aten.le.Scalar(x, 0.1)),
        )
        more = aten.logical_and.default(flags, aten.gt.Scalar(ints, -3))
        copied = aten.copy.default(aten.mul.Tensor(x, 0), aten.expand.default(aten.mul.Tensor(hi, 3), [5, 6]))
        return c, more, aten.bitwise_not.default(ints), copied

    result, _ = run_fused(fn, x, lo, hi, ints)
    assert_matches(result, fn(x, lo, hi, ints), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_constant_pad_cat_and_slice_scatter_read_their_inputs_only_in_bounds(dtype):
    """Padding (pad_matmul's copies), concatenation (rotary embeddings) and slice_scatter: low and high pads, a
    fill value, through views, of values computed in the same kernel (exp(0) outside the bound
    must not leak), fused with consumers; every load is masked by its input's bound."""
    x = torch.randn(3, 5, 7).to(dtype)
    y = torch.randn(15, 7).to(dtype)

    def fn(x, y):
        padded = aten.constant_pad_nd.default(aten.view.default(x, [15, 7]), [0, 3, 2, 1], 0.0)  # [18, 10]
        filled = aten.constant_pad_nd.default(y, [1, 0], -2.5)  # [15, 8]
        computed = aten.constant_pad_nd.default(aten.exp.default(y), [0, 1])  # [15, 8]
        half = aten.slice.Tensor(y, 1, 4, 7)
        rotated = aten.cat.default([aten.neg.default(half), aten.slice.Tensor(y, 1, 0, 4), aten.exp.default(half)], 1)
        scattered = aten.slice_scatter.default(aten.mul.Tensor(y, 2), aten.exp.default(half), 1, 2, 5)  # a slice's grad
        return aten.mul.Tensor(padded, 2), filled, computed, aten.mul.Tensor(rotated, 3), scattered

    gm, _ = fuse(fn, x, y)
    extern = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert not extern & {aten.cat.default, aten.constant_pad_nd.default, aten.slice_scatter.default}, gm.code
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: eager rounds exp before the cat, the kernel after
    assert_matches(gm(x, y), fn(x, y), rtol=tol, atol=tol)


def test_every_pointwise_lowering_is_covered_here():
    """A new lowering must come with a case in this file."""
    covered = set(UNARY) | set(BINARY) | set(COMPARE) | {op for op, _ in SCALAR_OPS}
    covered |= {
        aten.where.self, aten.clamp.default, aten.hardtanh.default, aten.elu.default, aten.hardtanh_backward.default,
        aten.leaky_relu_backward.default, aten.gt.Scalar, aten.bitwise_xor.Tensor, aten.bitwise_and.Tensor,
        aten.bitwise_or.Tensor, aten.logical_and.default, aten.logical_not.default, aten.div.Tensor_mode,
        aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, prims.div.default,
        aten.true_divide.Tensor, aten.pow.Scalar, aten.ne.Scalar, aten.le.Scalar, aten.logical_or.default,
        aten.logical_xor.default, aten.bitwise_not.default, aten.isnan.default, aten.isinf.default,
        aten.clamp.Tensor, aten.copy.default,
    }  # fmt: skip
    untested = {str(op) for op in lowerings.POINTWISE} - {str(op) for op in covered}
    assert not untested, sorted(untested)
