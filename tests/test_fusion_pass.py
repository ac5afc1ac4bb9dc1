"""The fusion pass: what it groups, what it refuses and why, and that fused graphs compute what eager does."""

from __future__ import annotations

import warnings

import pytest
import torch
from fusion_helpers import assert_kernels_ran, assert_matches, fuse, kernels, run_fused
from helpers import assert_training_matches_eager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphopt import events
from graphopt.codegen import compiler, lowerings
from graphopt.fallback import GraphoptFallbackWarning, fallbacks, reset_fallbacks
from graphopt.passes import fusion

aten = torch.ops.aten


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.norm(x + self.down(torch.nn.functional.gelu(self.up(x)))).tanh()


def test_mlp_trains_like_eager_with_generated_kernels():
    torch.manual_seed(0)
    batches = [torch.randn(6, 16) for _ in range(3)]
    with events.capture() as graphs:
        assert_training_matches_eager(
            _MLP(), batches, lambda run, x: run(x).square().mean(), rtol=1e-4, atol=1e-5
        )
    calls = assert_kernels_ran(graphs)
    kinds = {info.kind for info in graphs}
    assert {"forward", "backward"} <= kinds
    assert any(call.primary.spec.domain.is_reduction for call in calls)


def test_matmuls_stay_extern_and_their_neighbours_fuse():
    x, w, b = torch.randn(8, 12), torch.randn(12, 10), torch.randn(10)

    def fn(x, w, b):
        h = aten.mm.default(aten.relu.default(aten.mul.Tensor(x, 2)), w)
        return aten.tanh.default(aten.add.Tensor(h, b))

    gm, report = fuse(fn, x, w, b)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.mm.default in targets
    assert len(report.groups) == 2 and all(g.kind == "pointwise" for g in report.groups)
    assert {"relu", "mul"} <= set(report.groups[0].nodes) and "mm" not in report.groups[0].nodes
    assert_matches(gm(x, w, b), fn(x, w, b), rtol=1e-5, atol=1e-5)
    assert "fused_" in gm.print_readable(print_output=False)


def test_softmax_is_one_kernel_and_the_report_says_how_it_was_built():
    x = torch.randn(4, 30)

    def fn(x):
        m = aten.amax.default(x, [1], True)
        e = aten.exp.default(aten.sub.Tensor(x, m))
        return aten.div.Tensor(e, aten.sum.dim_IntList(e, [1], True))

    gm, report = fuse(fn, x)
    (group,) = report.groups
    assert group.kind == "reduction" and set(group.nodes) == {"amax", "sub", "exp", "sum_1", "div"}
    assert any(m.startswith("vertical") for m in group.merges)
    assert group.bytes_moved == 2 * x.numel() * 4
    assert group.estimated_seconds < group.unfused_seconds
    (call,) = kernels(gm)
    assert "tl.max" in call.primary.triton_source and "tl.sum" in call.primary.triton_source
    assert "in eager" not in report.summary() and "1 kernels" in report.summary()


def test_reductions_over_different_dims_are_separate_kernels_with_the_reason():
    x = torch.randn(6, 8)

    def fn(x):
        y = aten.exp.default(x)
        return aten.sum.dim_IntList(y, [0]), aten.sum.dim_IntList(y, [1])

    gm, report = fuse(fn, x)
    assert len(report.groups) == 2
    # exp goes with the row sum; the column sum would have to store exp column-wise (or to share
    # one iteration space with the row sum)
    reasons = {r.reason for r in report.rejected}
    assert reasons & {"a reduction across rows does not also store full-size outputs", "reductions over different iteration spaces"}
    assert_matches(gm(x), fn(x), rtol=1e-5, atol=1e-5)


def test_a_merge_that_would_form_a_cycle_is_rejected():
    """a -> mm -> c and a -> c: a kernel holding a and c would need mm's result before mm can run."""
    x, w = torch.randn(5, 5), torch.randn(5, 5)

    def fn(x, w):
        a = aten.exp.default(x)
        return aten.add.Tensor(a, aten.mm.default(a, w))

    gm, report = fuse(fn, x, w)
    assert any("cycle" in r.reason for r in report.rejected)
    assert len(report.groups) == 2
    assert_matches(gm(x, w), fn(x, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_reductions_with_few_rows_are_split_into_two_kernels(dtype):
    x = torch.randn(2, 2**16).to(dtype)

    def fn(x):
        return aten.sum.dim_IntList(aten.exp.default(x), [1], True), aten.amax.default(aten.mul.Tensor(x, 2), [0, 1])

    gm, report = fuse(fn, x)
    assert len(report.split_reductions) == 2
    assert len(report.groups) == 4  # chunks of different length: no kernel can do both first steps
    result = gm(x)
    expected = (x.double().exp().sum(1, keepdim=True), (x.double() * 2).amax())
    for r, e in zip(result, expected):
        assert r.dtype == dtype
        torch.testing.assert_close(r.double(), e, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=0)


def test_a_long_column_reduction_is_split_keeping_columns_adjacent():
    """A bias gradient (sum over many rows of few columns): chunks of rows, reduced across rows."""
    x = torch.randn(8192, 16)

    def fn(x):
        return aten.sum.dim_IntList(aten.mul.Tensor(x, 3), [0])

    gm, report = fuse(fn, x)
    assert report.split_reductions
    first = kernels(gm)[0].primary
    assert first.spec.domain.is_reduction and not first.inner_reduction
    torch.testing.assert_close(gm(x), fn(x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("columns", [768, 2304, 3072])
def test_bias_gradients_of_transformer_widths_fill_the_gpu(columns):
    """GPT-2's bias gradients (8192 rows) run on at least one block per SM of an H100/H200 (132);
    3072 columns once ran unsplit on 48 blocks of 64 columns."""
    from graphopt.codegen import heuristics

    factor = heuristics.split_reduction_factor(columns, 8192, inner=False)
    config = heuristics.reduction_config(columns * factor, 8192 // factor, inner=False)
    assert columns * factor // config.xblock >= 132


def test_a_reshaped_cast_of_a_layer_norm_is_stored_by_the_layer_norm_kernel():
    """GPT-2's pattern: layer norm in fp32, viewed as [tokens, dim] and cast to bf16 for the next
    matmul. The cast's output has another shape than the kernel's domain, same elements."""
    x, w, b = torch.randn(2, 8, 32), torch.randn(32), torch.randn(32)

    def fn(x, w, b):
        residual = aten.add.Tensor(x, 1.0)
        centered = aten.sub.Tensor(residual, aten.mean.dim(residual, [-1], True))
        variance = aten.mean.dim(aten.mul.Tensor(centered, centered), [-1], True)
        normed = aten.add.Tensor(aten.mul.Tensor(aten.mul.Tensor(centered, aten.rsqrt.default(variance)), w), b)
        flat = aten.view.default(normed, [16, 32])
        return residual, torch.ops.prims.convert_element_type.default(flat, torch.bfloat16)

    gm, report = fuse(fn, x, w, b)
    assert len(report.groups) == 1, [g.nodes for g in report.groups]
    for got, expected in zip(gm(x, w, b), fn(x, w, b), strict=True):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-5, atol=1e-5)


def test_siblings_reading_one_input_share_a_kernel():
    x = torch.randn(7, 9)

    def fn(x):
        return aten.exp.default(x), aten.mul.Tensor(aten.sin.default(x), 3)

    gm, report = fuse(fn, x)
    (group,) = report.groups
    assert any(m.startswith("horizontal") for m in group.merges)
    assert_matches(gm(x), fn(x), rtol=1e-5, atol=1e-5)


def test_in_place_input_mutation_keeps_reads_before_the_write():
    def fn(x):
        y = x * 2
        x.add_(1)
        return y + x.sin()

    x = torch.randn(5, 6)
    x_ref = x.clone()
    with torch.no_grad(), events.capture() as graphs:
        out = torch.compile(fn, backend="graphopt")(x)
    ref = fn(x_ref)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x, x_ref)
    assert_kernels_ran(graphs)


def test_unsupported_pointwise_op_runs_in_aten_with_one_warning():
    x = torch.rand(4, 5) + 0.5

    def fn(x):
        return aten.exp.default(aten.digamma.default(aten.mul.Tensor(x, 2)))

    reset_fallbacks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, calls = run_fused(fn, x)
    named = [w for w in caught if issubclass(w.category, GraphoptFallbackWarning) and "digamma" in str(w.message)]
    assert len(named) == 1
    assert len(calls) == 2  # mul before, exp after
    assert_matches(result, fn(x), rtol=1e-5, atol=1e-5)


def test_a_failing_kernel_falls_back_to_its_subgraph_with_one_warning(monkeypatch):
    broken = lowerings.Lowering(lambda a: f"tl.no_such_function({a})")
    monkeypatch.setitem(lowerings.POINTWISE, aten.sin.default, broken)
    x = torch.randn(6, 4)

    def fn(x):
        return aten.add.Tensor(aten.sin.default(x), 1)

    gm, _ = fuse(fn, x)
    reset_fallbacks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = gm(x), gm(x * 2)
    graphopt_warnings = [w for w in caught if issubclass(w.category, GraphoptFallbackWarning)]
    assert len(graphopt_warnings) == 1 and "fused_" in str(graphopt_warnings[0].message)
    (call,) = kernels(gm)
    assert call.failed_reason is not None
    assert sum(fallbacks().values()) == 1
    torch.testing.assert_close(first, fn(x))
    torch.testing.assert_close(second, fn(x * 2))


def test_fusion_option_off_generates_nothing():
    model = _MLP()
    with events.capture() as graphs:
        torch.compile(model, backend="graphopt", options={"fusion": False})(torch.randn(3, 16)).sum().backward()
    assert graphs and not any(kernels(info.output_gm) for info in graphs)
    assert all(record.name != "fusion" for info in graphs for record in info.records)


def test_dynamic_batch_sizes_reuse_one_kernel():
    model = _MLP()
    compiled = torch.compile(model, backend="graphopt", dynamic=True)
    with events.capture() as graphs:
        out = compiled(torch.randn(3, 16))
        out.sum().backward()
    calls = assert_kernels_ran(graphs)
    sources = compiler.compiled_sources()
    launches = sum(call.primary.launches for call in calls)
    for batch in (5, 9, 17):
        x = torch.randn(batch, 16)
        out = compiled(x)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
        out.sum().backward()
    assert [info.kind for info in graphs].count("forward") == 1, "recompiled for a new batch size"
    assert compiler.compiled_sources() == sources, "generated a new kernel for a new batch size"
    assert sum(call.primary.launches for call in calls) > launches
    assert any(call.primary.spec.domain.xnumel.free_symbols for call in calls), "sizes were baked into the kernels"


# ------------------------------------------------------------------ random DAGs

_UNARY = [aten.exp.default, aten.tanh.default, aten.neg.default, aten.relu.default, aten.sigmoid.default]
_BINARY = [aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, aten.maximum.default]
_REDUCE = [aten.sum.dim_IntList, aten.amax.default, aten.mean.dim]

_step = st.one_of(
    st.tuples(st.just("unary"), st.sampled_from(_UNARY), st.integers(0, 99)),
    st.tuples(st.just("binary"), st.sampled_from(_BINARY), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("reduce"), st.sampled_from(_REDUCE), st.integers(0, 99), st.sampled_from([0, 1])),
    st.tuples(st.just("transpose"), st.integers(0, 99)),
)


def _program(steps):
    """A function building a DAG: each step reads earlier values (by index modulo their count)."""

    def fn(x, y):
        values = [x, y]
        for step in steps:
            kind, *args = step
            if kind == "unary":
                op, i = args
                values.append(op(aten.mul.Tensor(values[i % len(values)], 0.5)))
            elif kind == "binary":
                op, i, j = args
                values.append(op(values[i % len(values)], values[j % len(values)]))
            elif kind == "reduce":
                op, i, dim = args
                values.append(op(values[i % len(values)], [dim], True))  # keepdim: broadcasts back
            else:
                (i,) = args
                v = values[i % len(values)]
                if v.shape[0] == v.shape[1]:
                    values.append(aten.permute.default(v, [1, 0]))
        return tuple(values[2:]) or (aten.add.Tensor(x, y),)

    return fn


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_step, min_size=1, max_size=8), st.sampled_from([(6, 6), (5, 7)]))
def test_random_dags_match_eager(steps, shape):
    fn = _program(steps)
    x, y = torch.randn(shape), torch.randn(shape)
    gm, _ = fuse(fn, x, y)
    for call in kernels(gm):
        assert isinstance(call.primary, fusion.codegen.FusedKernel)
    result = gm(x, y)
    for call in kernels(gm):
        assert call.failed_reason is None, call.failed_reason
    assert_matches(result, fn(x, y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_pass_is_pure_on_its_input_copy(dynamic):
    """Running the pass twice on fresh traces gives the same report (no state carried between runs)."""
    x = torch.randn(4, 6)

    def fn(x):
        return aten.sum.dim_IntList(aten.exp.default(x), [1], True)

    _, first = fuse(fn, x, dynamic=dynamic)
    _, second = fuse(fn, x, dynamic=dynamic)
    assert [g.nodes for g in first.groups] == [g.nodes for g in second.groups]


def test_a_column_sum_does_not_carry_full_size_outputs():
    """A weight gradient (sum over tokens) next to an activation gradient of the same tokens: the
    activation gradient is written by a row-wise kernel, the column sum runs on its own."""
    grad, x, w = torch.randn(64, 32), torch.randn(64, 32), torch.randn(32)

    def fn(grad, x, w):
        scaled = aten.mul.Tensor(grad, x)
        return aten.mul.Tensor(scaled, w), aten.sum.dim_IntList(scaled, [0])

    gm, report = fuse(fn, grad, x, w)
    for call in kernels(gm):
        spec = call.primary.spec
        assert not (spec.domain.is_reduction and not spec.inner and "full" in spec.roles), spec.nodes
    assert_matches(gm(grad, x, w), fn(grad, x, w), rtol=1e-5, atol=1e-5)
