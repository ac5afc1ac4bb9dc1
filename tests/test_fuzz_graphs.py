"""Random FX graphs through graphopt, compared with eager: forward and backward.

Hypothesis draws a program: inputs (random shapes, dtypes, and layouts: contiguous,
transposed, strided slices, broadcast by expand) and a DAG of steps over them
(pointwise, reduction, view, cast and matmul ops). The program is traced into an FX
graph, compiled with backend="graphopt" and compared with the same graph run eagerly.
A failure shrinks to a minimal program, printed as a literal; keep it in REGRESSIONS
so it is checked on every run.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import pytest
import torch
from conformance import hidden_crash, nearer_than_eager
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import fx

from graphopt import events

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64, "int64": torch.int64}
# (rtol, atol) by the least precise floating dtype in the program. A miss is retried against
# a float64 run of the same program (conformance.nearer_than_eager).
TOLERANCES = {torch.float64: (1e-7, 1e-7), torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 2e-2)}

UNARY = ("neg", "abs", "exp", "sin", "tanh", "sigmoid", "relu", "sqrt_abs", "log1p_abs", "square")
BINARY = ("add", "sub", "mul", "safe_div", "maximum", "minimum")
REDUCTIONS = ("sum", "amax", "mean", "softmax", "log_softmax", "var")


@dataclasses.dataclass(frozen=True)
class Input:
    shape: tuple[int, ...]
    dtype: str
    layout: str  # "contiguous" | "transposed" | "sliced" | "expanded"


@dataclasses.dataclass(frozen=True)
class Step:
    op: str
    operands: tuple[int, ...]  # indices into inputs + earlier steps
    params: tuple[Any, ...] = ()


@dataclasses.dataclass(frozen=True)
class Program:
    inputs: tuple[Input, ...]
    steps: tuple[Step, ...]


def _apply(step: Step, args: list[Any]) -> Any:
    """One step on tensors, meta tensors or FX proxies (so the same code traces the graph)."""
    op, p = step.op, step.params
    a = args[0]
    if op in ("neg", "abs", "exp", "sin", "tanh", "sigmoid", "relu", "square"):
        return getattr(torch, op)(a)
    if op == "sqrt_abs":
        return torch.sqrt(torch.abs(a))
    if op == "log1p_abs":
        return torch.log1p(torch.abs(a))
    b = (args[1] if len(args) > 1 else p[0]) if op in BINARY or op == "matmul" else None
    if op in ("add", "sub", "mul", "maximum", "minimum"):
        if op in ("maximum", "minimum") and not isinstance(b, torch.Tensor | fx.Proxy):
            return torch.clamp(a, min=b) if op == "maximum" else torch.clamp(a, max=b)
        return getattr(torch, op)(a, b)
    if op == "safe_div":
        return torch.div(a, torch.add(torch.abs(b), 1))
    if op in ("sum", "amax", "mean"):
        return getattr(torch, op)(a, p[0], keepdim=p[1])
    if op in ("softmax", "log_softmax"):
        return getattr(torch, op)(a, p[0])
    if op == "var":
        return torch.var(a, p[0], keepdim=p[1])
    if op == "transpose":
        return torch.transpose(a, p[0], p[1])
    if op == "permute":
        return torch.permute(a, p)
    if op == "unsqueeze":
        return torch.unsqueeze(a, p[0])
    if op == "flatten":
        return torch.flatten(a)
    if op == "narrow":
        return torch.narrow(a, p[0], p[1], p[2])
    if op == "expand":
        return a.expand(p)
    if op == "to":
        return a.to(DTYPES[p[0]])
    if op == "matmul":
        return torch.matmul(a, b)
    if op == "matmul_self_t":
        return torch.matmul(a, torch.transpose(a, -1, -2))
    raise ValueError(f"unknown fuzz op {op!r}")


def _run_program(program: Program, inputs: list[Any]) -> tuple[Any, ...]:
    """All values of the program; the outputs are the sinks (values no step reads)."""
    values = list(inputs)
    for step in program.steps:
        values.append(_apply(step, [values[i] for i in step.operands]))
    read = {i for step in program.steps for i in step.operands}
    sinks = [i for i in range(len(values)) if i not in read and i >= len(program.inputs)]
    return tuple(values[i] for i in sinks)


def to_graph(program: Program) -> fx.GraphModule:
    graph = fx.Graph()
    tracer = fx.proxy.GraphAppendingTracer(graph)
    proxies = [fx.Proxy(graph.placeholder(f"x{i}"), tracer) for i in range(len(program.inputs))]
    graph.output(tuple(out.node for out in _run_program(program, proxies)))
    return fx.GraphModule(torch.nn.Module(), graph)


def make_inputs(program: Program, seed: int, upcast: bool = False) -> list[torch.Tensor]:
    """Leaf tensors with each input's layout; floating ones require grad. `upcast`: floating
    inputs in float64 with the same values (the oracle's inputs)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for spec in program.inputs:
        shape, dtype = spec.shape, DTYPES[spec.dtype]
        if spec.layout == "transposed" and len(shape) >= 2:
            storage_shape, view = (*shape[:-2], shape[-1], shape[-2]), lambda t: t.transpose(-1, -2)
        elif spec.layout == "sliced" and len(shape) >= 1:
            storage_shape, view = (*shape[:-1], 2 * shape[-1]), lambda t: t[..., ::2]
        elif spec.layout == "expanded" and len(shape) >= 1:
            storage_shape, view = (*shape[:-1], 1), lambda t, shape=shape: t.expand(shape)
        else:
            storage_shape, view = shape, lambda t: t
        storage = torch.randn(storage_shape, generator=gen)
        if not dtype.is_floating_point:
            storage = (storage * 4).round()
        storage = storage.to(dtype)
        if upcast and dtype.is_floating_point:
            storage = storage.to(torch.float64)
        tensors.append(view(storage).detach().requires_grad_(dtype.is_floating_point))
    return tensors


def _broadcastable(a: torch.Size, b: torch.Size) -> bool:
    try:
        return torch.broadcast_shapes(a, b) == b
    except RuntimeError:
        return False


@st.composite
def _step(draw, examples: list[torch.Tensor]) -> Step:
    a = draw(st.integers(0, len(examples) - 1))
    x = examples[a]
    kind = draw(st.sampled_from(["unary", "binary", "reduction", "view", "cast", "matmul"]))
    if kind == "binary":
        op = draw(st.sampled_from(BINARY))
        partners = [j for j, m in enumerate(examples) if _broadcastable(m.shape, x.shape)]
        if partners and draw(st.booleans()):
            return Step(op, (a, draw(st.sampled_from(partners))))
        return Step(op, (a,), (draw(st.sampled_from([0.5, -1.5, 2.0])),))
    if kind == "reduction" and x.dim() >= 1:
        dim = draw(st.integers(-x.dim(), x.dim() - 1))
        return Step(draw(st.sampled_from(REDUCTIONS)), (a,), (dim, draw(st.booleans())))
    if kind == "view" and x.dim() >= 1:
        choices = ["unsqueeze", "flatten", "expand"]
        choices += ["transpose", "permute"] if x.dim() >= 2 else []
        choices += ["narrow"] if max(x.shape) >= 2 else []
        view = draw(st.sampled_from(choices))
        if view == "unsqueeze":
            return Step(view, (a,), (draw(st.integers(0, x.dim())),))
        if view == "flatten":
            return Step(view, (a,))
        if view == "expand":
            return Step(view, (a,), (draw(st.integers(1, 3)), *(3 if s == 1 else s for s in x.shape)))
        if view == "transpose":
            return Step(view, (a,), tuple(draw(st.permutations(range(x.dim())))[:2]))
        if view == "permute":
            return Step(view, (a,), tuple(draw(st.permutations(range(x.dim())))))
        dim = draw(st.sampled_from([d for d, s in enumerate(x.shape) if s >= 2]))
        start = draw(st.integers(0, x.shape[dim] - 1))
        return Step(view, (a,), (dim, start, draw(st.integers(1, x.shape[dim] - start))))
    if kind == "cast":
        return Step("to", (a,), (draw(st.sampled_from(["float32", "bfloat16", "float64"])),))
    if kind == "matmul" and x.dim() >= 2 and x.is_floating_point():
        partners = [j for j, m in enumerate(examples) if m.dim() == 2 and m.shape[0] == x.shape[-1] and m.dtype == x.dtype]
        if partners and draw(st.booleans()):
            return Step("matmul", (a, draw(st.sampled_from(partners))))
        return Step("matmul_self_t", (a,))
    return Step(draw(st.sampled_from(UNARY)), (a,))


@st.composite
def programs(draw, max_steps: int = 8) -> Program:
    inputs, examples = [], []
    for _ in range(draw(st.integers(1, 3))):
        shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
        dtype = draw(st.sampled_from(["float32", "float32", "bfloat16", "float64", "int64"]))
        inputs.append(Input(shape, dtype, draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))))
        examples.append(torch.ones(shape, dtype=DTYPES[dtype]))  # real CPU tensors: meta kernels skip dtype checks
    steps = []
    for _ in range(draw(st.integers(1, max_steps))):
        step = draw(_step(examples))
        try:
            examples.append(_apply(step, [examples[i] for i in step.operands]))
        except (RuntimeError, TypeError, ValueError, NotImplementedError):  # e.g. softmax of an int tensor
            continue
        steps.append(step)
    if not steps:
        steps.append(Step("neg", (0,)))
    return Program(tuple(inputs), tuple(steps))


def _floating(values: Any) -> list[torch.Tensor]:
    return [v for v in values if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad]


def _forward_backward(fn: Any, inputs: list[torch.Tensor]) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    outs = fn(*inputs)
    diff_outs, leaves = _floating(outs), _floating(inputs)
    if not diff_outs or not leaves:
        return outs, ()
    gen = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in diff_outs]
    return outs, torch.autograd.grad(diff_outs, leaves, cotangents, allow_unused=True)


def _tolerance(program: Program) -> tuple[float, float]:
    dtypes = {DTYPES[i.dtype] for i in program.inputs} | {DTYPES[s.params[0]] for s in program.steps if s.op == "to"}
    for dtype in (torch.bfloat16, torch.float32):
        if dtype in dtypes:
            return TOLERANCES[dtype]
    return TOLERANCES[torch.float64] if torch.float64 in dtypes else TOLERANCES[torch.float32]


def _assert_equal(actual: tuple, expected: tuple, oracle: tuple, tol: tuple[float, float], what: str) -> None:
    rtol, atol = tol
    assert len(actual) == len(expected), what
    for i, (a, e, o) in enumerate(zip(actual, expected, oracle)):
        if e is None or a is None:
            assert a is None and e is None, f"{what}[{i}]: {a} vs eager {e}"
            continue
        assert (a.dtype, a.shape) == (e.dtype, e.shape), f"{what}[{i}]: {(a.dtype, a.shape)} vs eager {(e.dtype, e.shape)}"
        try:
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True, check_stride=False)
        except AssertionError as error:
            if not e.is_floating_point() or not nearer_than_eager(a, e, o, atol):
                raise AssertionError(f"{what}[{i}] differs from eager and is not nearer the float64 result: {error}") from None


def check_program(program: Program) -> None:
    """graphopt's outputs and input gradients equal eager's for `program`."""
    torch._dynamo.reset()
    gm = to_graph(program)
    expected = _forward_backward(gm, make_inputs(program, seed=0))
    with warnings.catch_warnings(), events.capture() as compiled:
        warnings.simplefilter("ignore")  # deliberate fallbacks are allowed; results must still match
        actual = _forward_backward(torch.compile(gm, backend="graphopt"), make_inputs(program, seed=0))
    assert compiled, "Dynamo handed graphopt no graph"
    crash = hidden_crash(compiled)
    assert crash is None, crash
    oracle = _forward_backward(gm, make_inputs(program, seed=0, upcast=True))
    tol = _tolerance(program)
    _assert_equal(actual[0], expected[0], oracle[0], tol, "output")
    _assert_equal(actual[1], expected[1], oracle[1], tol, "gradient")


FUZZ_SETTINGS = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # CI sees the same programs every run
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


@dataclasses.dataclass(frozen=True)
class TrackedBug:
    """A known graphopt bug: its minimal program fails (strict xfail), and the random test skips
    programs that would hit it, so that it keeps finding new bugs. Fixed: delete the entry."""

    reason: str
    program: Program
    hits: Any  # Program -> bool


TRACKED_BUGS: list[TrackedBug] = []


@pytest.mark.slow
@FUZZ_SETTINGS
@given(programs())
def test_random_graph_matches_eager(program: Program):
    assume(not any(bug.hits(program) for bug in TRACKED_BUGS))
    check_program(program)


# Minimal programs that once failed (shrunk by Hypothesis), checked on every run.
REGRESSIONS: list[Program] = [
    # float64 -> bfloat16 inside a kernel: the Triton interpreter converted it through numpy as garbage (0.0)
    Program((Input((3,), "float64", "contiguous"),), (Step("to", (0,), ("bfloat16",)),)),
]


def _program_id(program: Program) -> str:
    return "-".join(f"{i.dtype}{list(i.shape)}" for i in program.inputs) + ":" + "-".join(s.op for s in program.steps)


@pytest.mark.parametrize(
    "program",
    [*REGRESSIONS, *(pytest.param(b.program, marks=pytest.mark.xfail(strict=True, reason=b.reason)) for b in TRACKED_BUGS)],
    ids=_program_id,
)
def test_regression(program: Program):
    check_program(program)
