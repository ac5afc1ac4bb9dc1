"""PyTorch's own OpInfo database through graphopt, compared with eager, forward and backward.

Every op of `op_db` with float32 samples on the CPU is called from a function compiled
with `backend="graphopt"` (generated kernels run under TRITON_INTERPRET=1) on its first
few sample inputs; the pointwise and reduction ops are also run on bf16 samples. Each
(op, dtype) ends in exactly one outcome:

  pass            results (and gradients) equal eager's within the tolerances below
  fallback        equal to eager, and graphopt warned that part of it runs as eager ATen
  failure         a wrong result or a crash: must be listed in opinfo_expectations.FAILURES
  dynamo-limited  Dynamo itself cannot run it (backend="eager" fails or differs too), or
                  captured no graph for graphopt to compile: listed in DYNAMO_LIMITED

The lists are strict both ways: a new failure fails the test, and so does a listed
outcome that no longer happens (remove it from the list).
"""

from __future__ import annotations

import dataclasses
import itertools
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conformance import hidden_crash, nearer_than_eager
from opinfo_expectations import DYNAMO_LIMITED, FAILURES, TORCH_2_11_DYNAMO_LIMITED, TORCH_2_11_FAILURES
from torch._dynamo.utils import counters
from torch.testing._internal.common_methods_invocations import op_db
from torch.testing._internal.opinfo.core import BinaryUfuncInfo, ReductionOpInfo, UnaryUfuncInfo
from torch.utils._pytree import tree_flatten, tree_map

from graphopt import events
from graphopt.fallback import fallbacks

if torch.__version__.startswith("2.11."):
    FAILURES = {**FAILURES, **TORCH_2_11_FAILURES}
    DYNAMO_LIMITED = {**DYNAMO_LIMITED, **TORCH_2_11_DYNAMO_LIMITED}

MAX_SAMPLES = 3  # the first samples of each op (compiled together): keeps the sweep inside its CI budget

# (rtol, atol) against eager in the same dtype. Generated kernels reorder reductions and
# compute bf16 in float32 rounding once, so a miss is retried against a float64 oracle
# (conformance.nearer_than_eager).
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}


def _op_id(op) -> str:
    return f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name


def _is_pointwise_or_reduction(op) -> bool:
    return isinstance(op, (UnaryUfuncInfo, BinaryUfuncInfo, ReductionOpInfo))


FLOAT32_OPS = [op for op in op_db if torch.float32 in op.supported_dtypes("cpu")]
BF16_OPS = [op for op in FLOAT32_OPS if _is_pointwise_or_reduction(op) and torch.bfloat16 in op.supported_dtypes("cpu")]


@dataclasses.dataclass
class Outcome:
    kind: str  # "pass" | "fallback" | "failure" | "dynamo-limited"
    detail: str = ""


class _Mismatch(Exception):
    """graphopt's result or gradient differs from eager's."""


def _clone(value: Any, dtype: torch.dtype | None = None) -> Any:
    """A fresh copy of a sample's tensors (optionally cast floating ones), keeping requires_grad."""

    def copy(t):
        if not isinstance(t, torch.Tensor):
            return t
        c = t.detach().clone()
        if dtype is not None and c.is_floating_point():
            c = c.to(dtype)
        return c.requires_grad_(t.requires_grad and c.is_floating_point())

    return tree_map(copy, value)


def _run(fn: Callable[..., Any], samples: list[Any], dtype: torch.dtype | None = None):
    """(outputs per sample, gradients of the inputs that require grad) of `fn` on copies of `samples`."""
    packed = [_clone((s.input, s.args, s.kwargs), dtype) for s in samples]
    outs = fn(packed)
    leaves = [t for t in tree_flatten(packed)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
    diff_outs = [
        t
        for sample, out in zip(samples, outs)
        for t in tree_flatten(sample.output_process_fn_grad(out))[0]
        if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()
    ]
    grads = ()
    if leaves and diff_outs:
        gen = torch.Generator().manual_seed(0)
        cotangents = [torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) for t in diff_outs]
        grads = torch.autograd.grad(diff_outs, leaves, cotangents, allow_unused=True)
        # No gradient and a zero gradient are the same answer (AOTAutograd returns zeros).
        grads = tuple(torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves))
    return outs, grads


def _tensors(value: Any) -> list[Any]:
    """The leaves of `value`, sparse tensors as dense (comparisons and NaN checks need strided ones)."""
    return [v.to_dense() if isinstance(v, torch.Tensor) and v.layout != torch.strided else v for v in tree_flatten(value)[0]]


def _compare(actual: Any, expected: Any, oracle: Any | None, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOLERANCES[dtype]
    flat_a, flat_e = _tensors(actual), _tensors(expected)
    flat_o = _tensors(oracle) if oracle is not None else [None] * len(flat_e)
    if len(flat_a) != len(flat_e):
        raise _Mismatch(f"{what}: {len(flat_a)} values, eager gives {len(flat_e)}")
    for i, (a, e, o) in enumerate(zip(flat_a, flat_e, flat_o)):
        if not isinstance(e, torch.Tensor):
            if isinstance(e, float) and isinstance(a, float):
                ok = a == e or abs(a - e) <= atol + rtol * abs(e) or (a != a and e != e)
            else:
                ok = a == e
            if not ok:
                raise _Mismatch(f"{what}[{i}]: {a!r} != eager {e!r}")
            continue
        if not isinstance(a, torch.Tensor) or a.dtype != e.dtype or a.shape != e.shape:
            meta = (type(a).__name__, getattr(a, "dtype", None), getattr(a, "shape", None))
            raise _Mismatch(f"{what}[{i}]: {meta} vs eager {(e.dtype, e.shape)}")
        try:
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True, check_stride=False)
        except AssertionError as err:
            if e.is_floating_point() and isinstance(o, torch.Tensor) and nearer_than_eager(a, e, o, atol):
                continue
            raise _Mismatch(f"{what}[{i}]: {str(err).splitlines()[1:3]}") from None


def _is_random(fn: Callable[..., Any], samples: list[Any], expected: Any) -> bool:
    """Two eager runs differ (random ops, uninitialized memory): only metadata can be compared."""
    again, _ = _run(fn, samples)
    for e, a in zip(_tensors(expected), _tensors(again)):
        if isinstance(e, torch.Tensor):
            try:
                torch.testing.assert_close(a, e, rtol=0, atol=0, equal_nan=True)
            except AssertionError:
                return True
    return False


def _oracle(fn: Callable[..., Any], samples: list[Any], op) -> Any | None:
    """Eager in float64 (outputs and gradients), where the op supports it."""
    if torch.float64 not in op.supported_dtypes("cpu"):
        return None
    try:
        return _run(fn, samples, torch.float64)
    except Exception:
        return None


def _check(op, fn: Callable[..., Any], backend: str, samples: list[Any], dtype: torch.dtype) -> None:
    """Raise (_Mismatch or the backend's own error) unless `backend` agrees with eager on `samples`."""
    expected = _run(fn, samples)
    torch._dynamo.reset()
    actual = _run(torch.compile(fn, backend=backend, fullgraph=False), samples)
    if _is_random(fn, samples, expected[0]):
        _compare(tree_map(_meta, actual[0]), tree_map(_meta, expected[0]), None, dtype, "output metadata")
        return
    try:
        _compare(actual[0], expected[0], None, dtype, "output")
        _compare(actual[1], expected[1], None, dtype, "gradient")
    except _Mismatch:
        oracle = _oracle(fn, samples, op)
        if oracle is None:
            raise
        _compare(actual[0], expected[0], oracle[0], dtype, "output")
        _compare(actual[1], expected[1], oracle[1], dtype, "gradient")


def _meta(value: Any) -> Any:
    return (value.dtype, tuple(value.shape)) if isinstance(value, torch.Tensor) else value


def _first_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return text[0][:240] if text else type(error).__name__


def _samples(op, dtype: torch.dtype, fn: Callable[..., Any]) -> list[Any]:
    """The first MAX_SAMPLES samples that eager runs (the others have nothing to compare with)."""
    grad = op.supports_autograd and dtype.is_floating_point
    runnable = []
    for sample in itertools.islice(op.sample_inputs("cpu", dtype, requires_grad=grad), MAX_SAMPLES * 3):
        try:
            _run(fn, [sample])
        except Exception:
            continue
        runnable.append(sample)
        if len(runnable) == MAX_SAMPLES:
            break
    return runnable


def _graph_break_reason() -> str:
    """Why Dynamo broke the graph (its first recorded reason), in one line."""
    reasons = list(counters["graph_break"])
    if not reasons:
        return "no graph break recorded (nothing left to compile)"
    lines = [line.strip() for line in reasons[0].splitlines() if line.strip()]
    explanation = next((line for line in lines if line.startswith("Explanation:")), "")
    return f"{lines[0]} {explanation}".strip()[:240]


def classify(op, dtype: torch.dtype) -> Outcome:
    """Run `op` on its first samples through graphopt and eager; say which outcome it ends in.

    All samples go through one compiled function (one graph, one compile: the sweep's cost is
    compilation), so an outcome is the op's, not a sample's."""
    call = op.op

    def one(inp, args, kwargs):
        return call(inp, *args, **kwargs)

    def fn(packed):
        # A graph break in one sample (inside `one`) makes Dynamo run the loop eagerly; it then
        # compiles each call of `one` as a frame of its own, so every sample still gets compiled.
        return [one(inp, args, kwargs) for inp, args, kwargs in packed]

    samples = _samples(op, dtype, fn)
    counters.clear()
    if not samples:
        return Outcome("dynamo-limited", "eager runs none of the first samples")
    before = fallbacks()
    try:
        with events.capture() as compiled, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _check(op, fn, "graphopt", samples, dtype)
    except Exception as error:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _check(op, fn, "eager", samples, dtype)
        except Exception as eager_error:
            return Outcome("dynamo-limited", f"backend='eager' fails too: {_first_line(eager_error)}")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _check(op, fn, "aot_eager", samples, dtype)
        except Exception:  # graphopt's responsibility all the same: it is built on AOTAutograd
            return Outcome("failure", f"{_first_line(error)} (backend='aot_eager' fails too)")
        return Outcome("failure", _first_line(error))
    crash = hidden_crash(compiled)
    if crash:
        return Outcome("failure", crash)
    if not compiled:
        return Outcome("dynamo-limited", f"Dynamo captured no graph for graphopt: {_graph_break_reason()}")
    new = sorted({f"{k.op}: {k.reason}" for k, n in fallbacks().items() if n > before.get(k, 0)})
    return Outcome("fallback", "; ".join(new)) if new else Outcome("pass")


def _check_against_expectations(op, dtype: torch.dtype) -> None:
    key = (_op_id(op), str(dtype).removeprefix("torch."))
    outcome = classify(op, dtype)
    listed = "failure" if key in FAILURES else "dynamo-limited" if key in DYNAMO_LIMITED else None
    if outcome.kind in ("failure", "dynamo-limited"):
        table = "FAILURES" if outcome.kind == "failure" else "DYNAMO_LIMITED"
        assert listed == outcome.kind, (
            f"{key}: new {outcome.kind}: {outcome.detail}\n"
            f"fix it, or add to tests/opinfo_expectations.py {table} (with the root cause as the reason):\n"
            f"    {key!r}: {outcome.detail!r},"
        )
    else:
        assert listed is None, f"{key} now ends in {outcome.kind}: remove it from tests/opinfo_expectations.py"


@pytest.mark.slow
@pytest.mark.parametrize("op", FLOAT32_OPS, ids=_op_id)
def test_opinfo_float32(op):
    _check_against_expectations(op, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("op", BF16_OPS, ids=_op_id)
def test_opinfo_bfloat16(op):
    _check_against_expectations(op, torch.bfloat16)


def _classify_by_id(key: tuple[str, str]) -> tuple[str, str, str, str]:
    op = next(op for op in FLOAT32_OPS if _op_id(op) == key[0])
    torch._dynamo.reset()
    outcome = classify(op, getattr(torch, key[1]))
    return (*key, outcome.kind, outcome.detail)


if __name__ == "__main__":
    # `python tests/test_opinfo.py`: the outcome counts for the README, and every non-pass outcome.
    import collections
    import multiprocessing
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")
    keys = [(_op_id(op), "float32") for op in FLOAT32_OPS] + [(_op_id(op), "bfloat16") for op in BF16_OPS]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count(), maxtasksperchild=50) as pool:
        rows = sorted(pool.imap_unordered(_classify_by_id, keys))
    for row in rows:
        if row[2] != "pass":
            print(*row, sep=" | ")
    for (dtype, kind), count in sorted(collections.Counter((r[1], r[2]) for r in rows).items()):
        print(f"{dtype:9} {kind:15} {count}")
