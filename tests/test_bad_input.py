"""Inputs and settings graphopt cannot or need not optimize: eager-equal results, or a clear error.

Unsupported dtypes (complex, quantized), data-dependent output shapes, in-place ops on
inputs, non-contiguous and zero-size tensors, NaN/Inf, malformed options, and generated
kernels that fail to compile or launch. Each case either matches eager (values, NaN
positions, input mutations, gradients) — with a graphopt warning where part of it runs
as eager ATen — or raises an error that says what to change.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conformance import hidden_crash

from graphopt import events
from graphopt.codegen import compiler, launcher
from graphopt.options import Options, OptionsError
from graphopt.runtime import GuardedCall

RTOL, ATOL = 1e-5, 1e-6  # float32; these graphs are a few pointwise ops and one small reduction


def _inputs(make_args: Callable[[], tuple[Any, ...]], grad: bool) -> tuple[Any, ...]:
    """Fresh inputs (same values each time: seeded), floating ones requiring grad if `grad`."""
    torch.manual_seed(0)
    return tuple(
        a.requires_grad_() if grad and isinstance(a, torch.Tensor) and (a.is_floating_point() or a.is_complex()) else a
        for a in make_args()
    )


def run_both(fn: Callable[..., Any], make_args: Callable[[], tuple[Any, ...]], grad: bool = True, options: dict | None = None):
    """[eager, graphopt]: each (outputs, input gradients if `grad`, the inputs after the call,
    the graphs graphopt compiled, graphopt's fallback warnings)."""
    results = []
    for backend in (None, "graphopt"):
        torch._dynamo.reset()
        inputs = _inputs(make_args, grad)
        run = fn if backend is None else torch.compile(fn, backend=backend, options=options)
        with warnings.catch_warnings(record=True) as caught, events.capture() as graphs:
            warnings.simplefilter("always")
            out = run(*inputs)
            grads = ()
            leaves = [i for i in inputs if isinstance(i, torch.Tensor) and i.requires_grad]
            if leaves and isinstance(out, torch.Tensor) and out.requires_grad:
                weights = torch.linspace(-1, 1, out.numel()).view(out.shape)
                loss = out.abs().sum() if out.is_complex() else (out * weights).sum()
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        warned = [str(w.message) for w in caught if str(w.message).startswith("graphopt")]
        results.append((out, grads, inputs, graphs, warned))
    return results


def assert_eager_equal(
    fn: Callable[..., Any], make_args: Callable[[], tuple[Any, ...]], grad: bool = True, options: dict | None = None
) -> list[str]:
    """graphopt equals eager (outputs with NaN positions, gradients, mutated inputs) and nothing
    of graphopt's own crashed; returns graphopt's fallback warnings."""
    (out_e, grads_e, inputs_e, _, _), (out_g, grads_g, inputs_g, graphs, warned) = run_both(
        fn, make_args, grad=grad, options=options
    )
    torch.testing.assert_close(out_g, out_e, rtol=RTOL, atol=ATOL, equal_nan=True)
    torch.testing.assert_close(grads_g, grads_e, rtol=RTOL, atol=ATOL, equal_nan=True)
    for a, e in zip(inputs_g, inputs_e):
        if isinstance(e, torch.Tensor) and not e.is_quantized:
            torch.testing.assert_close(a.detach(), e.detach(), rtol=RTOL, atol=ATOL, equal_nan=True, msg="inputs after the call")
    assert graphs, "Dynamo handed graphopt no graph: nothing was tested"
    crash = hidden_crash(graphs)
    assert crash is None, crash
    return warned


# ---------------------------------------------------------------- unsupported dtypes


def test_complex_tensors_run_as_eager_aten_with_a_warning():
    warned = assert_eager_equal(lambda x: (torch.exp(x) * x + 1).abs() * 2, lambda: (torch.randn(6, dtype=torch.complex64),))
    assert any("complex64" in w for w in warned), warned


def test_quantized_tensors_match_eager():
    q = torch.quantize_per_tensor(torch.randn(8), scale=0.1, zero_point=0, dtype=torch.qint8)
    out_e = q.dequantize().sin() * 2
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out_g = torch.compile(lambda q: q.dequantize().sin() * 2, backend="graphopt")(q)
    torch.testing.assert_close(out_g, out_e, rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- data-dependent shapes


DATA_DEPENDENT = {
    "nonzero": lambda x: torch.nonzero(x > 0).float().sum(0) + x.sum(),
    "masked_select": lambda x: torch.masked_select(x, x > 0).sin().sum() * x,
    "unique": lambda x: torch.unique(x.detach().round()).exp().sum() + x,
    "boolean_index": lambda x: x[x > 0.5].square().sum() + x.mean(),
}


@pytest.mark.parametrize("capture", [False, True], ids=["graph_break", "captured_unbacked"])
@pytest.mark.parametrize("name", DATA_DEPENDENT)
def test_data_dependent_output_shapes(name, capture):
    """Graph-broken (Dynamo's default) and captured with unbacked sizes, which graphopt's passes see."""
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=capture):
        assert_eager_equal(DATA_DEPENDENT[name], lambda: (torch.randn(4, 5),))


# ---------------------------------------------------------------- in-place ops on inputs


def _add_to_input(x, y):
    x.add_(y)
    return (x * 2).sum(-1)


def _mul_row_of_input(x):
    x[0].mul_(3)
    return x.exp().sum()


def _inplace_on_intermediate(x):
    h = x * 2
    h.add_(1)
    h[:, 0] = 0.0
    return h.sin().sum(1)


@pytest.mark.parametrize("fn", [_add_to_input, _mul_row_of_input])
def test_inplace_ops_on_inputs_mutate_them_as_eager_does(fn):
    assert_eager_equal(fn, lambda: (torch.randn(3, 4), torch.randn(4))[: fn.__code__.co_argcount], grad=False)


def test_inplace_ops_on_intermediates_in_a_training_graph():
    assert_eager_equal(_inplace_on_intermediate, lambda: (torch.randn(3, 4),))


# ---------------------------------------------------------------- layouts and sizes


def _pointwise_and_reduction(x):
    return torch.softmax(x.sin() * 2 + 1, dim=-1) * x.sum(-1, keepdim=True)


LAYOUTS = {
    "transposed": lambda: torch.randn(5, 4).t(),
    "sliced": lambda: torch.randn(4, 10)[:, ::2],
    "offset_slice": lambda: torch.randn(6, 5)[2:],
    "expanded": lambda: torch.randn(4, 1).expand(4, 5),
    "channels_last": lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    "zero_size_rows": lambda: torch.randn(0, 5),
    "zero_size_reduced": lambda: torch.randn(4, 0),
    "scalar": lambda: torch.tensor(0.7),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_and_zero_size_inputs(layout):
    assert_eager_equal(_pointwise_and_reduction, lambda: (LAYOUTS[layout](),))


def test_reduction_without_identity_over_zero_size_raises_like_eager():
    x = torch.randn(0, 3)
    with pytest.raises(Exception) as eager_error:
        x.sin().amax(0)
    with pytest.raises(Exception) as graphopt_error, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.compile(lambda x: x.sin().amax(0), backend="graphopt")(x)
    assert "zero-size" in str(graphopt_error.value) or "non-zero size" in str(graphopt_error.value)
    assert "amax" in str(eager_error.value)


# ---------------------------------------------------------------- NaN and Inf


SPECIALS = torch.tensor([[1.0, float("nan"), -2.0], [float("inf"), 0.5, -float("inf")], [0.0, -0.0, 3.0]])

NAN_INF = {
    "pointwise": lambda x: torch.sigmoid(x) * x + torch.exp(-x.abs()),
    "maximum_clamp_relu": lambda x: torch.maximum(x, x.flip(0)) + x.clamp(-1, 1) + torch.relu(x),
    "division": lambda x: x / (x - 0.5),
    "sum": lambda x: (x * 2).sum(-1),
    "softmax": lambda x: torch.softmax(x * 1.5, dim=-1),
    "log_softmax": lambda x: torch.log_softmax(x, dim=0),
    "var_mean": lambda x: torch.var_mean(x, dim=1)[0] + x.mean(1),
    "amax": lambda x: (x * 2).amax(-1),
    "amin": lambda x: (x * 2).amin(0),
    "max_all": lambda x: (x + 1).max(),
    "argmax": lambda x: (x * 2).argmax(-1),
}

@pytest.mark.parametrize("name", NAN_INF)
def test_nan_and_inf_propagate_as_in_eager(name):
    assert_eager_equal(NAN_INF[name], lambda: (SPECIALS.clone(),), grad=name != "argmax")


# ---------------------------------------------------------------- malformed options


def test_every_option_rejects_a_malformed_value_naming_itself_and_its_valid_values():
    for field in dataclasses.fields(Options):
        with pytest.raises(OptionsError) as error:
            Options.parse({field.name: object()})
        message = str(error.value)
        assert repr(field.name) in message and field.metadata["valid"] in message, message
        assert isinstance(error.value, ValueError)


def test_unknown_option_lists_every_valid_option():
    with pytest.raises(ValueError) as error, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.compile(lambda x: x + 1, backend="graphopt", options={"fusion": True, "no_such_option": 1})(torch.randn(2))
    message = str(error.value)
    assert "'no_such_option'" in message
    for field in dataclasses.fields(Options):
        assert field.name in message, f"{field.name} missing from: {message}"


@pytest.mark.parametrize("options", ["fusion", 5, ["fusion"]])
def test_options_that_are_not_a_dict_say_so(options):
    with pytest.raises(ValueError, match=r"must be a dict of option name to value.*valid options: fusion"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.compile(lambda x: x + 1, backend="graphopt", options=options)(torch.randn(2))


@pytest.mark.skipif(
    "memory_budget" not in {f.name for f in dataclasses.fields(Options)}, reason="the memory_budget option does not exist yet"
)
@pytest.mark.parametrize("budget", [0, 0.0, 1e-9, "0B", "1B", "100TiB", 1e9, float("inf"), -1.0, float("nan"), "lots"])
def test_extreme_memory_budget_runs_like_eager_or_says_what_is_valid(budget):
    """Out-of-range values: a ValueError naming the valid ones. Unreachable budgets (zero, a byte):
    eager-equal results and a warning naming memory_budget. Huge ones: eager-equal, nothing to say."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    try:
        warned = assert_eager_equal(model, lambda: (torch.randn(4, 8),), options={"memory_budget": budget})
    except ValueError as error:
        assert "memory_budget" in str(error) and "valid" in str(error), str(error)
        return
    if budget in (0, 0.0, 1e-9, "0B", "1B"):
        assert any("memory_budget" in w for w in warned), warned


# ---------------------------------------------------------------- failing generated kernels


def _two_kernel_model(x, w):
    h = torch.nn.functional.gelu(x * 2 + 1)  # one generated kernel before the matmul
    return torch.softmax((h @ w).tanh(), dim=-1)  # and one after it


def _generated_kernels(graphs: list[events.CompiledGraphInfo]) -> list[GuardedCall]:
    return [n.target for info in graphs for n in info.output_gm.graph.nodes if isinstance(n.target, GuardedCall)]


@pytest.mark.parametrize("failure", ["compile", "launch"])
def test_a_failing_kernel_falls_back_for_its_group_only_and_the_model_runs(failure, monkeypatch):
    """The first kernel that runs fails (Triton compile error, or launch failure): its group runs as
    eager ATen with a warning naming it; the other kernels still run generated code."""
    failed: list[str] = []
    real_load, real_run = compiler.load_kernel, launcher.FusedKernel._first_launch

    def failing_load(source, name):
        if not failed:
            failed.append("compile")
            raise RuntimeError("triton.compiler.errors.CompilationError: deliberately broken kernel")
        return real_load(source, name)

    def failing_run(self, *args):
        if not failed:
            failed.append(self.name)
            raise RuntimeError("CUDA error: an illegal memory access was encountered (deliberate)")
        return real_run(self, *args)

    if failure == "compile":
        monkeypatch.setattr(compiler, "load_kernel", failing_load)
    else:
        monkeypatch.setattr(launcher.FusedKernel, "_first_launch", failing_run)
    (out_e, grads_e, *_), (out_g, grads_g, _, graphs, warned) = run_both(
        _two_kernel_model, lambda: (torch.randn(4, 8), torch.randn(8, 8))
    )
    torch.testing.assert_close(out_g, out_e, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grads_g, grads_e, rtol=RTOL, atol=ATOL)
    kernels = _generated_kernels(graphs)
    broken = [k for k in kernels if k.failed_reason is not None]
    assert failed and len(broken) == 1, [(k.__name__, k.failed_reason) for k in kernels]
    assert "deliberate" in broken[0].failed_reason
    assert any(broken[0].__name__ in w and "deliberate" in w for w in warned), warned
    others = [k for k in kernels if k is not broken[0]]
    assert others and all(k.primary.launches > 0 for k in others), "the other groups must still run generated kernels"


def test_empty_tensors_run_as_aten_without_a_fallback_warning():
    """Nothing to compute is not something graphopt failed to compile: no warning to alarm the user."""
    (out_e, grads_e, *_), (out_g, grads_g, _, _, warned) = run_both(
        lambda x: (x * 2 + 1).relu().sum(0), lambda: (torch.randn(0, 5),)
    )
    torch.testing.assert_close(out_g, out_e, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(grads_g, grads_e, rtol=RTOL, atol=ATOL)
    assert not any("empty" in w for w in warned), warned
