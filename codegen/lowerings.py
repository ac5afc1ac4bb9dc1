"""The lowering table: core ATen pointwise ops and reductions as Triton expressions.

A lowering turns the Triton expressions of its operands (already converted to
the dtype the op computes in, see `ARG_DTYPES`) into one Triton expression.
Low-precision floats (fp16, bf16) compute in fp32 inside a kernel and are
rounded only where the graph says so (an explicit cast) or when stored, which
is at least as accurate as eager's per-op rounding.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from graphopt.codegen import compiler

aten = torch.ops.aten
prims = torch.ops.prims

TRITON_DTYPES = {
    torch.float32: "tl.float32",
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.float64: "tl.float64",
    torch.int8: "tl.int8",
    torch.int16: "tl.int16",
    torch.int32: "tl.int32",
    torch.int64: "tl.int64",
    torch.uint8: "tl.uint8",
    torch.bool: "tl.int1",
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a value of `dtype` is held in inside a kernel (fp32 for fp16/bf16)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def cast(expr: str, src: torch.dtype, dst: torch.dtype) -> str:
    if src == dst:
        return expr
    if dst == torch.bool:
        return f"({expr} != 0)"
    if dst in (torch.float16, torch.bfloat16) and src not in (torch.float32, torch.float16, torch.bfloat16):
        expr, src = f"{expr}.to(tl.float32)", torch.float32  # Triton's interpreter mangles f64/int -> f16/bf16
    if dst == torch.bfloat16 and src == torch.float32 and compiler.interpreting():
        return f"libdevice.round_to_bf16({expr})"  # the interpreter truncates; GPUs round to nearest even
    return f"{expr}.to({TRITON_DTYPES[dst]})"


def literal(value: Any) -> str:
    """A Python scalar argument as Triton source."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else 'float("-inf")'
        return repr(value)
    if isinstance(value, int):
        return str(value)
    raise TypeError(f"unsupported scalar {value!r}")


@dataclasses.dataclass(frozen=True)
class Lowering:
    """How one op becomes Triton.

    operands: "result" casts tensor operands to the result's compute dtype (arithmetic),
    "promoted" to the operands' common compute dtype (comparisons), "bool" to int1,
    "as_is" leaves them alone. `emit(*operands)` returns the expression; operands are Triton
    expressions (Python scalars as literals, strings such as a rounding mode as they are).

    exact: the result jumps where an operand crosses a value (a comparison, floor, sign): its
    fp16/bf16 operands are rounded to their dtype first, as eager computes them. Kept in fp32,
    a product that eager rounds could differ from the same product saved and loaded, and
    `amax`'s backward (`eq(amax, x)`) would then find no maximum in a column: 0/0.
    """

    emit: Callable[..., str]
    operands: str = "result"
    exact: bool = False


def _pow(a: str, b: str) -> str:
    """Small constant exponents as multiplications (exact, and what eager's pow does for them)."""
    try:
        exponent = float(b)
    except ValueError:
        return f"libdevice.pow({a}, {b})"
    if exponent.is_integer() and 1 <= exponent <= 4:
        return "(" + " * ".join([a] * int(exponent)) + ")"
    special = {0.5: f"tl.sqrt({a})", -0.5: f"tl.rsqrt({a})", -1.0: f"(1.0 / {a})"}
    return special.get(exponent, f"libdevice.pow({a}, {b})")


def _alpha(b: str, alpha: str | None) -> str:
    return b if alpha in (None, "1", "1.0") else f"({b} * {alpha})"


def _binary(op: str) -> Lowering:
    return Lowering(lambda a, b: f"({a} {op} {b})")


def _compare(op: str) -> Lowering:
    return Lowering(lambda a, b: f"({a} {op} {b})", operands="promoted", exact=True)


def _unary(fn: str, exact: bool = False) -> Lowering:
    return Lowering(lambda a: f"{fn}({a})", exact=exact)


def _clamp(a: str, lo: Any = None, hi: Any = None) -> str:
    """torch's clamp/maximum/minimum/relu keep NaN; Triton's default min/max drop it."""
    if lo is not None:
        a = f"tl.maximum({a}, {lo}, tl.PropagateNan.ALL)"
    if hi is not None:
        a = f"tl.minimum({a}, {hi}, tl.PropagateNan.ALL)"
    return a


def _where(cond: str, a: str, b: str) -> str:
    return f"tl.where({cond}, {a}, {b})"


def _sign(a: str) -> str:
    return f"(({a} > 0).to({a}.dtype) - ({a} < 0).to({a}.dtype))"


def _div_mode(a: str, b: str, rounding_mode: str | None = None) -> str:
    """Floats. Floor division is Python's, as c10's div_floor_floating computes it: from fmod (C's,
    Triton's float `%`), so 1.0 // 0.1 is 9.0 where floor(1.0 / 0.1) rounds the quotient to 10.0
    first; a zero divisor gives a / b, a zero quotient keeps the sign of a / b."""
    if rounding_mode is None:
        return f"({a} / {b})"
    if rounding_mode == "trunc":
        return f"libdevice.trunc({a} / {b})"
    mod = f"({a} % {b})"
    div = f"tl.where(({mod} != 0) & (({b} < 0) != ({mod} < 0)), ({a} - {mod}) / {b} - 1.0, ({a} - {mod}) / {b})"
    floor = f"tl.floor({div})"
    rounded = f"tl.where({div} - {floor} > 0.5, {floor} + 1.0, {floor})"
    return f"tl.where({b} == 0, {a} / {b}, tl.where({div} != 0, {rounded}, ({a} / {b}) * 0.0))"


def _int_div_mode(a: str, b: str, rounding_mode: str | None = None) -> str:
    """Integers (the result is an integer only with a rounding mode): Triton's `/` on integers is
    an fp32 division, inexact past 2**24; its `//` truncates and its `%` takes the dividend's
    sign (C's), so floor division steps down where the remainder and the divisor differ in sign."""
    if rounding_mode == "trunc":
        return f"({a} // {b})"
    mod = f"({a} % {b})"
    return f"tl.where(({mod} != 0) & (({mod} < 0) != ({b} < 0)), ({a} // {b}) - 1, {a} // {b})"


POINTWISE: dict[Any, Lowering] = {
    aten.add.Tensor: Lowering(lambda a, b, alpha=1: f"({a} + {_alpha(b, alpha)})"),
    aten.add.Scalar: Lowering(lambda a, b, alpha=1: f"({a} + {_alpha(b, alpha)})"),
    aten.sub.Tensor: Lowering(lambda a, b, alpha=1: f"({a} - {_alpha(b, alpha)})"),
    aten.sub.Scalar: Lowering(lambda a, b, alpha=1: f"({a} - {_alpha(b, alpha)})"),
    aten.rsub.Scalar: Lowering(lambda a, b, alpha=1: f"({b} - {_alpha(a, alpha)})"),
    aten.rsub.Tensor: Lowering(lambda a, b, alpha=1: f"({b} - {_alpha(a, alpha)})"),
    aten.mul.Tensor: _binary("*"),
    aten.mul.Scalar: _binary("*"),
    aten.div.Tensor: _binary("/"),
    aten.div.Scalar: _binary("/"),
    aten.div.Tensor_mode: Lowering(_div_mode, exact=True),
    prims.div.default: _binary("/"),
    aten.true_divide.Tensor: _binary("/"),
    aten.maximum.default: Lowering(lambda a, b: f"tl.maximum({a}, {b}, tl.PropagateNan.ALL)"),
    aten.minimum.default: Lowering(lambda a, b: f"tl.minimum({a}, {b}, tl.PropagateNan.ALL)"),
    aten.pow.Tensor_Scalar: Lowering(_pow),
    aten.pow.Tensor_Tensor: Lowering(lambda a, b: f"libdevice.pow({a}, {b})"),
    aten.pow.Scalar: Lowering(lambda a, b: f"libdevice.pow({a}, {b})"),
    aten.atan2.default: Lowering(lambda a, b: f"libdevice.atan2({a}, {b})"),
    aten.eq.Tensor: _compare("=="),
    aten.eq.Scalar: _compare("=="),
    aten.ne.Tensor: _compare("!="),
    aten.ne.Scalar: _compare("!="),
    aten.lt.Tensor: _compare("<"),
    aten.lt.Scalar: _compare("<"),
    aten.le.Tensor: _compare("<="),
    aten.le.Scalar: _compare("<="),
    aten.gt.Tensor: _compare(">"),
    aten.gt.Scalar: _compare(">"),
    aten.ge.Tensor: _compare(">="),
    aten.ge.Scalar: _compare(">="),
    aten.logical_and.default: Lowering(lambda a, b: f"({a} & {b})", operands="bool"),
    aten.logical_or.default: Lowering(lambda a, b: f"({a} | {b})", operands="bool"),
    aten.logical_xor.default: Lowering(lambda a, b: f"({a} ^ {b})", operands="bool"),
    aten.logical_not.default: Lowering(lambda a: f"({a} == 0)", operands="bool"),
    aten.bitwise_and.Tensor: _binary("&"),
    aten.bitwise_or.Tensor: _binary("|"),
    aten.bitwise_xor.Tensor: _binary("^"),
    aten.bitwise_not.default: Lowering(lambda a: f"(~{a})"),
    aten.neg.default: Lowering(lambda a: f"(-{a})"),
    aten.abs.default: _unary("tl.abs"),
    aten.exp.default: _unary("tl.exp"),
    aten.exp2.default: _unary("tl.exp2"),
    aten.expm1.default: _unary("libdevice.expm1"),
    aten.log.default: _unary("tl.log"),
    aten.log2.default: _unary("tl.log2"),
    aten.log1p.default: _unary("libdevice.log1p"),
    aten.sqrt.default: _unary("tl.sqrt"),
    aten.rsqrt.default: _unary("tl.rsqrt"),
    aten.sin.default: _unary("tl.sin"),
    aten.cos.default: _unary("tl.cos"),
    aten.tanh.default: _unary("libdevice.tanh"),
    aten.atan.default: _unary("libdevice.atan"),
    aten.erf.default: _unary("tl.erf"),
    aten.sigmoid.default: _unary("tl.sigmoid"),
    aten.reciprocal.default: Lowering(lambda a: f"(1.0 / {a})"),
    aten.floor.default: _unary("tl.floor", exact=True),
    aten.ceil.default: _unary("tl.ceil", exact=True),
    aten.trunc.default: _unary("libdevice.trunc", exact=True),
    aten.round.default: _unary("libdevice.nearbyint", exact=True),
    aten.sign.default: Lowering(_sign, exact=True),
    aten.sgn.default: Lowering(_sign, exact=True),
    aten.isnan.default: Lowering(lambda a: f"({a} != {a})", operands="promoted"),
    aten.isinf.default: Lowering(lambda a: f"(tl.abs({a}) == float('inf'))", operands="promoted"),
    aten.relu.default: Lowering(lambda a: f"tl.maximum({a}, 0, tl.PropagateNan.ALL)"),
    aten.clamp.default: Lowering(_clamp),
    aten.clamp_min.default: Lowering(lambda a, lo: _clamp(a, lo=lo)),
    aten.clamp_max.default: Lowering(lambda a, hi: _clamp(a, hi=hi)),
    aten.clamp.Tensor: Lowering(_clamp),
    aten.hardtanh.default: Lowering(lambda a, lo=-1.0, hi=1.0: _clamp(a, lo, hi)),
    aten.leaky_relu.default: Lowering(lambda a, slope=0.01: f"tl.where({a} > 0, {a}, {a} * {slope})"),
    aten.elu.default: Lowering(
        lambda a, alpha=1.0, scale=1.0, input_scale=1.0: (
            f"tl.where({a} > 0, {a} * {scale}, libdevice.expm1({a} * {input_scale}) * {alpha} * {scale})"
        )
    ),
    aten.where.self: Lowering(_where, operands="as_is"),
    aten.clone.default: Lowering(lambda a, **_: a),
    aten.alias_copy.default: Lowering(lambda a: a),
    aten.lift_fresh_copy.default: Lowering(lambda a: a),
    aten.copy.default: Lowering(lambda a, b, non_blocking=False: b, operands="result"),
    aten.hardtanh_backward.default: Lowering(
        lambda g, x, lo, hi: f"tl.where(({x} <= {lo}) | ({x} >= {hi}), 0.0, {g})", exact=True
    ),
    aten.leaky_relu_backward.default: Lowering(
        lambda g, x, slope, self_is_result=False: f"tl.where({x} > 0, {g}, {g} * {slope})", exact=True
    ),
}


class NoExactLowering(Exception):
    """No Triton expression computes this op exactly for these operands: the node runs in eager ATen."""


def _int_pow(a: str, b: str) -> str:
    """Integers to a constant power: multiplied out, exact and wrapping as eager's; libdevice.pow
    goes through floats (3001 ** 5 was off by 7)."""
    try:
        exponent = int(b)
    except ValueError:
        raise NoExactLowering("an integer power with a tensor exponent") from None
    if not 0 <= exponent <= 64:
        raise NoExactLowering(f"an integer power with exponent {exponent}")
    return f"({a} * 0 + 1)" if exponent == 0 else "(" + " * ".join([a] * exponent) + ")"


def _no_integer_lowering(*_: Any) -> str:
    raise NoExactLowering("a power of an integer tensor exponent (libdevice.pow goes through floats)")


# Lowerings of POINTWISE ops whose result has an integer dtype, where the float one is wrong for
# them; one whose emit raises NoExactLowering has none (the node runs in eager ATen)
INTEGER_POINTWISE: dict[Any, Lowering] = {
    aten.div.Tensor_mode: Lowering(_int_div_mode, exact=True),
    prims.div.default: Lowering(lambda a, b: f"({a} // {b})"),  # prims.div truncates integers
    aten.pow.Tensor_Scalar: Lowering(_int_pow),
    aten.pow.Tensor_Tensor: Lowering(_no_integer_lowering),
    aten.pow.Scalar: Lowering(_no_integer_lowering),
}

# Casts: the operand keeps its own dtype; the node's dtype is the target.
CASTS = {prims.convert_element_type.default, aten._to_copy.default}

# Ops whose element is one input's element chosen by index bounds: padding (else the fill value)
# concatenation and slice_scatter (a slice's gradient). codegen/kernel.py evaluates each input only under its bound (loads masked
# by it), so these are pointwise over their output's shape.
BOUNDED = {aten.constant_pad_nd.default, aten.cat.default, aten.slice_scatter.default}

# Ops whose value comes from their arguments alone: fills, and iota (the index itself).
CONSTANTS = {
    aten.full.default,
    aten.full_like.default,
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.scalar_tensor.default,
    aten.zeros.default,
    aten.ones.default,
    prims.iota.default,
    aten.arange.default,
    aten.arange.start,
    aten.arange.start_step,
}

# Ops of CONSTANTS whose value is start + index * step along their only dim.
RANGES = {prims.iota.default, aten.arange.default, aten.arange.start, aten.arange.start_step}


def range_start_step(target: Any, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    if target == prims.iota.default:
        return kwargs.get("start", 0), kwargs.get("step", 1)
    if target == aten.arange.default:
        return 0, 1
    return args[0], (args[2] if len(args) > 2 else kwargs.get("step", 1))


def constant_value(node_target: Any, args: tuple, kwargs: dict) -> Any:
    """The fill value of a CONSTANTS op other than iota."""
    if node_target in (aten.zeros_like.default, aten.zeros.default):
        return 0
    if node_target in (aten.ones_like.default, aten.ones.default):
        return 1
    if node_target == aten.scalar_tensor.default:
        return args[0]
    return args[1]


@dataclasses.dataclass(frozen=True)
class Reduction:
    """combine: Triton reduction over axis 1; neutral: masked lanes' value; mean: divide by count."""

    combine: str
    neutral: str
    mean: bool = False


REDUCTIONS: dict[Any, Reduction] = {
    aten.sum.dim_IntList: Reduction("tl.sum", "0"),
    aten.sum.default: Reduction("tl.sum", "0"),
    prims.sum.default: Reduction("tl.sum", "0"),
    aten.mean.dim: Reduction("tl.sum", "0", mean=True),
    aten.mean.default: Reduction("tl.sum", "0", mean=True),
    aten.amax.default: Reduction("tl.max", 'float("-inf")'),
    aten.amin.default: Reduction("tl.min", 'float("inf")'),
}


def reduction_dims(target: Any, args: tuple, kwargs: dict, ndim: int) -> tuple[tuple[int, ...], bool]:
    """(normalized reduced dims, keepdim) of a REDUCTIONS node."""
    dims = args[1] if len(args) > 1 else kwargs.get("dim")
    keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if target == prims.sum.default:
        keepdim = False
    if ndim == 0:  # a scalar: any dim list reduces nothing
        return (), bool(keepdim)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = range(ndim)
    if isinstance(dims, int):
        dims = [dims]
    return tuple(sorted({d + ndim if d < 0 else d for d in dims})), bool(keepdim)
