"""batch_casts: lone cast kernels of graph inputs and of returned values become one multi-tensor
call, with eager's exact values, only where moving them keeps the estimated peak memory."""

from __future__ import annotations

import pickle

import pytest
import torch
from fusion_helpers import fuse, kernels

from graphopt import artifact, events
from graphopt.options import Options
from graphopt.passes import batch_casts
from graphopt.passes.batch_casts import BatchedCast
from graphopt.pipeline import PassContext

bf16 = torch.bfloat16


def _batched(fn, *inputs, kind="inference"):
    gm, _ = fuse(fn, *inputs)
    ctx = PassContext(options=Options(batch_casts=True), graph_name="g0_test", kind=kind, example_inputs=inputs)
    gm, report = batch_casts.run(gm, ctx)
    gm.graph.lint()
    return gm, report


def _batches(gm):
    return [n for n in gm.graph.nodes if isinstance(n.target, BatchedCast)]


def _layers(x, w1, b1, w2, b2):
    """Autocast's pattern: each parameter cast before its product; the casts are returned (saved)."""
    c1, d1, c2, d2 = w1.to(bf16), b1.to(bf16), w2.to(bf16), b2.to(bf16)
    h = torch.addmm(d1, x.to(bf16), c1)
    return torch.addmm(d2, torch.relu(h), c2), c1, d1, c2, d2


def test_casts_of_inputs_become_one_call_with_eagers_exact_values():
    inputs = torch.randn(4, 8), torch.randn(8, 16), torch.randn(16), torch.randn(16, 8), torch.randn(8)
    gm, report = _batched(_layers, *inputs)
    (batch,) = _batches(gm)
    assert report.batched == 5 and report.batches == 1 and len(batch.args) == 5, (report, gm.code)
    assert len(kernels(gm)) == 1  # the relu; x's cast is not returned, but small enough to be made early
    fresh = [torch.randn_like(t) for t in inputs]
    for got, want in zip(gm(*fresh), _layers(*fresh)):
        assert got.dtype == want.dtype and got.stride() == want.stride()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _grads(y, x, a, b, c):
    """A backward's pattern: products in bf16, their results cast to fp32 and returned only; the peak
    comes first (y @ y, as a backward's saved activations), so holding the products' results until the
    end costs nothing."""
    t = (y @ y).sum()
    return (x @ a).float(), (x @ b).float(), (x @ c).float() * 2, t


def _bf16(*shapes):
    return [torch.randn(*shape, dtype=bf16) for shape in shapes]


def test_casts_of_returned_values_are_made_together_at_the_end():
    inputs = _bf16((128, 128), (8, 8), (8, 4), (8, 4), (8, 4))
    gm, report = _batched(_grads, *inputs, kind="backward")
    (batch,) = _batches(gm)
    assert report.batched == 2, (report, gm.code)  # the third cast is fused with its product's use
    assert list(gm.graph.nodes)[-4] is batch  # then its two parts, then the output
    for got, want in zip(gm(*inputs), _grads(*inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _big_product_first(x, s1, s2, big):
    """With many rows, the peak is the product x @ x; `big`'s cast comes after it: made with the
    small casts before it, it would be alive during the product."""
    small = s1.to(bf16) @ s2.to(bf16)
    t = (x @ x).sum()
    return (big.to(bf16) @ small).float() + t


@pytest.mark.parametrize("rows, big_batched", [(512, False), (8, True)])
def test_a_cast_joins_its_batch_only_if_the_estimated_peak_stays(rows, big_batched):
    inputs = torch.randn(rows, rows), torch.randn(4, 4), torch.randn(4, 4), torch.randn(1024, 4)
    gm, report = _batched(_big_product_first, *inputs)
    assert report.batched == (3 if big_batched else 2), (report, gm.code)
    assert report.kept.get("would raise the estimated peak", 0) == (0 if big_batched else 1)
    torch.testing.assert_close(gm(*inputs), _big_product_first(*inputs), rtol=1e-3, atol=1e-3)


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16), torch.nn.Linear(16, 4))

    def forward(self, x):
        return self.layers(x)


def _step(options):
    """One autocast training step's output and gradients (eager's if `options` is None), and the graphs."""
    torch.manual_seed(0)
    model = _Mlp()
    x = torch.randn(256, 16)  # activations outweigh the parameters: the backward's peak is at its start
    compiled = model if options is None else torch.compile(model, backend="graphopt", options=options)
    with events.capture() as graphs:
        with torch.autocast("cpu", dtype=bf16):
            out = compiled(x)
        out.float().square().mean().backward()
    return out, [p.grad for p in model.parameters()], graphs


def test_autocast_training_batches_parameter_and_gradient_casts_with_unchanged_results():
    torch._dynamo.reset()
    out_off, grads_off, _ = _step({"batch_casts": False})
    torch._dynamo.reset()
    out_on, grads_on, graphs = _step({"batch_casts": True})
    batched = {g.kind: len(_batches(g.output_gm)) for g in graphs}
    assert batched == {"forward": 1, "backward": 1}, batched
    assert torch.equal(out_on, out_off) and all(torch.equal(a, b) for a, b in zip(grads_on, grads_off))
    out_eager, grads_eager, _ = _step(None)
    torch.testing.assert_close(out_on, out_eager, rtol=2e-2, atol=2e-2)  # bf16 products
    for got, want in zip(grads_on, grads_eager):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_a_batch_survives_pickling_and_the_artifact_cache():
    inputs = torch.randn(4, 8), torch.randn(8, 16), torch.randn(16), torch.randn(16, 8), torch.randn(8)
    gm, _ = _batched(_layers, *inputs)
    (batch,) = _batches(gm)
    again = pickle.loads(pickle.dumps(batch.target))
    sources = [torch.randn(*layout[0]) for layout in batch.target.layouts]
    assert all(torch.equal(a, b) for a, b in zip(again(*sources), batch.target(*sources)))
    loaded = artifact._loads(artifact._dumps(gm))
    for got, want in zip(loaded(*inputs), _layers(*inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_on_by_default():
    assert Options().batch_casts
    torch._dynamo.reset()
    _, _, graphs = _step({})
    assert all(_batches(g.output_gm) for g in graphs)


def _permuted_grads(y, x, a, b, c):
    """Square results, so each cast's input and output have the same layout; only the permutes that
    cancel out (a linear layer's weight gradient: permute(permute(mm))) leave a plain cast."""
    t = (y @ y).sum()
    transposed = (x @ a).t().to(torch.float32, memory_format=torch.contiguous_format)  # in and out (8, 1) strides
    return transposed, (x @ b).t().t().float(), (x @ c).permute(1, 0).transpose(0, 1).float(), t


def test_a_cast_after_permutes_joins_only_if_they_cancel_out():
    inputs = _bf16((128, 128), (8, 8), (8, 8), (8, 8), (8, 8))
    gm, report = _batched(_permuted_grads, *inputs, kind="backward")
    assert report.batched == 2, (report, gm.code)
    for got, want in zip(gm(*inputs), _permuted_grads(*inputs)):
        assert got.stride() == want.stride()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def _written_between(x, w1, w2):
    h = x.to(bf16) @ w1.to(bf16)
    w2.mul_(2)  # a graph that writes an input (AOTAutograd's functional graphs do it only at their end)
    return h @ w2.to(bf16), w1.to(bf16)


def test_a_cast_of_an_input_written_in_place_stays_where_it_is():
    inputs = torch.randn(4, 8), torch.randn(8, 8), torch.randn(8, 8)
    gm, _ = fuse(_written_between, *[t.clone() for t in inputs])
    # the cast after mul_ reads the input itself (as a graph may), not mul_'s result
    (mul,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.mul_.Tensor]
    (cast,) = [n for n in gm.graph.nodes if n.args == (mul,) and n.target in kernels(gm)]
    cast.args = (mul.args[0],)
    gm.recompile()
    ctx = PassContext(options=Options(batch_casts=True), graph_name="g0_test", kind="inference", example_inputs=inputs)
    gm, report = batch_casts.run(gm, ctx)
    # w2's cast after mul_, and w1's second cast after it too (moving it would be harmless, but
    # the rule is positional: nothing crosses a write)
    assert report.kept.get("an in-place write lies between it and its batch") == 2, (report, gm.code)
    got, want = gm(*[t.clone() for t in inputs]), _written_between(*[t.clone() for t in inputs])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _views_cast_then_written(x, buf):
    """Casts of views of an input (as_strided stays an ATen view), returned only, then the input is
    written in place: AOTAutograd's graph writes it (copy_) at its end, before the graph returns."""
    first, second = buf.as_strided((8,), (1,), 8).to(bf16), buf.as_strided((8,), (1,), 0).to(bf16)
    buf.mul_(2)
    return first, second, x + 1


def test_a_returned_cast_is_not_moved_past_a_write_to_its_source():
    outputs = []
    for options in ({"batch_casts": False}, {"batch_casts": True}):
        torch._dynamo.reset()
        inputs = torch.randn(4, generator=torch.Generator().manual_seed(0)), torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
        with events.capture() as graphs:
            outputs.append((*torch.compile(_views_cast_then_written, backend="graphopt", options=options)(*inputs), *inputs))
    (report,) = [r.report for g in graphs for r in g.records if r.name == "batch_casts"]
    assert report.kept.get("an in-place write lies between it and its batch") == 2, report
    assert all(torch.equal(a, b) for a, b in zip(*outputs))


def _cast_of_a_cast(p, q, w, x, y):
    """Casts of inputs, cast again and returned only; an in-place write between keeps fusion from
    making each pair one kernel, so the second casts read the first (batched) ones."""
    t = (y @ y).sum()
    c1, c2 = p.to(bf16), q.to(bf16)
    h = x.to(bf16) @ c1 @ c2
    w.mul_(2)
    return h + t, c1.to(torch.float16), c2.to(torch.float16)


def test_a_returned_cast_of_a_batched_cast_reads_the_batchs_part():
    inputs = [torch.randn(8, 8) for _ in range(4)] + [torch.randn(256, 256)]
    gm, _ = fuse(_cast_of_a_cast, *[t.clone() for t in inputs])
    ctx = PassContext(options=Options(batch_casts=True), graph_name="g0_test", kind="inference", example_inputs=inputs)
    gm, report = batch_casts.run(gm, ctx)
    gm.graph.lint()
    assert report.batches == 2, (report, gm.code)
    got, want = gm(*[t.clone() for t in inputs]), _cast_of_a_cast(*[t.clone() for t in inputs])
    torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=0)  # bf16, plus a sum made in another order
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
