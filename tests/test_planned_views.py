"""Planned views: aliases made from the planned layout equal ATen's views, and fall back when the input's strides differ."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_training_matches_eager
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from graphopt import events
from graphopt.options import Options
from graphopt.passes import planned_views
from graphopt.pipeline import PassContext

aten = torch.ops.aten

VIEWS = {
    "view": lambda x: x.view(6, 4),
    "unsqueeze_expand": lambda x: x.unsqueeze(1).expand(4, 5, 6),
    "permute": lambda x: x.permute(1, 0),
    "transpose": lambda x: x.transpose(0, 1),
    "slice": lambda x: x[1:3, 2:],
    "select": lambda x: x[2],
    "squeeze": lambda x: x.unsqueeze(0).squeeze(0),
    "as_strided": lambda x: x.as_strided((2, 3), (1, 2), 5),
}


def _planned(fn, x):
    gm = make_fx(fn, tracing_mode="fake")(x)
    ctx = PassContext(options=Options(), graph_name="g0_test", kind="inference", example_inputs=[x])
    out, report = planned_views.run(gm, ctx)
    return out, report


@pytest.mark.parametrize("case", VIEWS)
def test_planned_view_equals_aten_view_and_aliases_its_input(case):
    x = torch.randn(4, 6)
    gm, report = _planned(VIEWS[case], x)
    assert report.planned >= 1, report
    fresh = torch.randn(4, 6)
    result, expected = gm(fresh), VIEWS[case](fresh)
    assert result.shape == expected.shape and result.stride() == expected.stride()
    assert result.storage_offset() == expected.storage_offset()
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    assert result.untyped_storage().data_ptr() == fresh.untyped_storage().data_ptr(), "a view must alias its input"


def test_input_with_other_strides_runs_the_aten_view():
    """The graph planned a contiguous input; a transposed one of the same shape gets ATen's answer."""
    gm, _ = _planned(lambda x: x.permute(1, 0).unsqueeze(0), torch.randn(4, 6))
    other = torch.randn(6, 4).t()
    torch.testing.assert_close(gm(other), other.permute(1, 0).unsqueeze(0), rtol=0, atol=0)


def test_copying_reshape_and_symbolic_views_stay_aten():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    t = graph.call_function(aten.t.default, (x,))
    flat = graph.call_function(aten.reshape.default, (t, [24]))
    graph.output(flat)
    with FakeTensorMode():
        x.meta["val"] = torch.empty(4, 6)
        t.meta["val"] = x.meta["val"].t()
        flat.meta["val"] = t.meta["val"].reshape(24)  # a transposed tensor cannot be flattened in place
    gm = torch.fx.GraphModule({}, graph)
    ctx = PassContext(options=Options(), graph_name="g0_test", kind="inference", example_inputs=[])
    gm, report = planned_views.run(gm, ctx)
    assert report.planned == 1 and report.kept == {"copies its input": 1}, report
    fresh = torch.randn(4, 6)
    torch.testing.assert_close(gm(fresh), fresh.t().reshape(24), rtol=0, atol=0)
    sym = make_fx(lambda x: x.view(-1), tracing_mode="symbolic")(torch.randn(4, 6))
    _, report = planned_views.run(sym, ctx)
    assert report.planned == 0 and report.kept == {"symbolic layout": 1}, report


def test_training_with_planned_views_matches_eager_and_plans_views():
    """A tiny attention block, forward and backward: losses and gradients equal eager's."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(16, 48)
            self.out = torch.nn.Linear(16, 16)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(x).split(16, dim=-1)
            q, k, v = (z.view(b, t, 2, 8).transpose(1, 2) for z in (q, k, v))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.out(y.transpose(1, 2).reshape(b, t, c))

    torch.manual_seed(0)
    batches = [torch.randn(2, 5, 16) for _ in range(2)]
    with events.capture() as graphs:
        assert_training_matches_eager(Block(), batches, lambda run, x: run(x).square().mean(), rtol=1e-4, atol=1e-5)
    planned = [r.report.planned for g in graphs for r in g.records if r.name == "planned_views"]
    assert planned and sum(planned) > 0, planned


def test_as_strided_offset_is_absolute_for_an_input_at_another_storage_offset():
    """as_strided's storage_offset is into the storage, not relative to its input's: a graph input that
    arrives as a view at another offset than the traced one gets ATen's answer, not one shifted by it."""
    fn = lambda x: x.as_strided((2, 3), (1, 2), 5)  # noqa: E731
    gm, report = _planned(fn, torch.randn(4, 6))
    assert report.planned == 1, report
    base = torch.randn(40)
    for offset in (0, 3, 7):
        x = base[offset : offset + 24].view(4, 6)
        result, expected = gm(x), fn(x)
        assert result.storage_offset() == expected.storage_offset() == 5
        torch.testing.assert_close(result, expected, rtol=0, atol=0)


def test_as_strided_past_the_end_of_a_smaller_storage_raises_as_eager_does():
    """Traced on an input whose storage reaches far enough; a same-shape input whose storage ends
    before the alias's last element must raise ATen's bounds error, not read past the storage."""
    fn = lambda x: x.as_strided((2, 3), (1, 2), 30)  # noqa: E731
    traced = torch.randn(40)[10:34].view(4, 6)
    gm, report = _planned(fn, traced)
    assert report.planned == 1, report
    small = torch.randn(4, 6)  # storage of 24 elements: offset 30 is out of bounds
    with pytest.raises(RuntimeError, match="out of bounds for storage"):
        fn(small)
    with pytest.raises(RuntimeError, match="out of bounds for storage"):
        gm(small)


def test_views_of_kernel_outputs_skip_the_stride_check_and_match_eager():
    """A generated kernel's output always has the graph's layout, so views of it (and views of those)
    are made without a check; forward and backward equal eager."""

    def block(x, w):
        h = torch.tanh(x * 2).view(2, 3, 8).transpose(1, 2)  # a kernel's output, viewed twice
        return (h.reshape(16, 3) @ w).exp()

    torch.manual_seed(0)
    w = torch.randn(3, 5, requires_grad=True)
    with events.capture() as graphs:
        compiled = torch.compile(block, backend="graphopt")
        x = torch.randn(6, 8, requires_grad=True)
        out = compiled(x, w)
        out.sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = block(x_ref, w_ref)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-5)
    unchecked = sum(r.report.unchecked for g in graphs for r in g.records if r.name == "planned_views")
    assert unchecked > 0


@pytest.mark.parametrize("primary", ["failing kernel", "eager"])
def test_a_kernel_call_returns_the_graphs_layout_whatever_runs_it(primary):
    """The eager fallback (or an eager primary, as bisect installs) may return other strides for an
    input of other strides: the call copies its result into the layout the graph promised, which
    views downstream rely on without checking."""
    from graphopt.fallback import GraphoptFallbackWarning
    from graphopt.runtime import GuardedCall

    fallback = make_fx(lambda x: x * 2, tracing_mode="fake")(torch.randn(4, 6))

    def failing(*args):
        raise RuntimeError("launch failed")

    guarded = GuardedCall("fused_k", failing if primary == "failing kernel" else fallback, fallback)
    x = torch.randn(6, 4).t()  # strides (1, 4): eager's x * 2 keeps them
    if primary == "failing kernel":
        with pytest.warns(GraphoptFallbackWarning):
            out = guarded(x)
    else:
        out = guarded(x)
    assert out.stride() == (6, 1)
    torch.testing.assert_close(out, x * 2, rtol=0, atol=0)


def test_unchecked_views_survive_the_artifact_cache_and_a_failing_kernel_after_loading():
    """A compiled graph kept in torch's AOTAutograd cache holds its unchecked views (the `alias`
    target pickles) and its kernels' promised layouts (from their fallback subgraphs' meta): the
    loaded graph's views are right even when its kernels fail and their fallbacks run."""
    import warnings

    from graphopt import artifact
    from graphopt.runtime import GuardedCall

    def fn(a, b, w):
        p = a * b
        q = torch.tanh(p).view(2, 4, 16).transpose(1, 2)
        return (q.reshape(32, 4) @ w).exp().t(), p.sum(-1).view(2, 4)[1]

    inputs = (torch.randn(8, 16), torch.randn(8, 16), torch.randn(4, 3))
    with events.capture() as graphs:
        torch.compile(fn, backend="graphopt")(*inputs)
    (graph,) = graphs
    loaded = artifact._loads(artifact._dumps(graph.output_gm))
    assert sum(n.target is planned_views.alias for n in loaded.graph.nodes) >= 3

    def failing(*args, reuse=None):
        raise RuntimeError("launch failed")

    kernels = [n.target for n in loaded.graph.nodes if isinstance(n.target, GuardedCall)]
    assert kernels and all(k.output_strides is not None for k in kernels)
    for kernel in kernels:
        kernel._call_primary = failing
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        actual = loaded(*inputs)
    assert all(k.failed_reason is not None for k in kernels)
    for a, e in zip(actual, fn(*inputs)):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
