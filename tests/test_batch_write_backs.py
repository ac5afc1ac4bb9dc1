"""batch_write_backs: the copies that write updated inputs back at a graph's end become one
multi-tensor copy per dtype pair, with the same values, unless a copy's source lives in an
input another copy writes."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from graphopt import artifact, events
from graphopt.options import Options
from graphopt.passes import batch_write_backs
from graphopt.pipeline import PassContext
from graphopt.runtime import GuardedCall

aten = torch.ops.aten


def _compiled_run(fn, inputs, options):
    """Outputs and the inputs after one compiled call on copies of `inputs`, and the graphs."""
    torch._dynamo.reset()
    copies = [t.clone() for t in inputs]
    with events.capture() as graphs:
        out = torch.compile(fn, backend="graphopt", options=options)(*copies)
    return out, copies, graphs


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _updates(a, b, c, steps):
    """Three buffers updated in place, as batch norm's running statistics and step count are."""
    a.mul_(0.9).add_(0.1)
    b.add_(a.square())
    steps.add_(1)
    c.copy_(a * 2)
    return (a + b).sum()


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(8, generator=gen), torch.randn(8, generator=gen), torch.randn(8, generator=gen), torch.zeros((), dtype=torch.long)]


def test_write_backs_become_one_call_per_dtype_pair_with_the_same_values():
    inputs = _inputs()
    want_out = _updates(*[t.clone() for t in inputs])
    want = [t.clone() for t in inputs]
    _updates(*want)
    out, written, graphs = _compiled_run(_updates, inputs, {"batch_write_backs": True})
    (graph,) = graphs
    ops = _ops(graph.output_gm)
    assert ops.count(aten._foreach_copy_.default) == 1 and ops.count(aten.copy_.default) == 1, graph.output_gm.code  # the long step count stays alone
    (report,) = [r.report for r in graph.records if r.name == "batch_write_backs"]
    assert (report.batched, report.batches, report.kept) == (3, 1, 1)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    for got, expected in zip(written, want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _crossed(a, b, c, d, e, f):
    """a's write-back reads b and b's reads a (in one parallel call b would get a's new value); e is
    written twice (the last write wins); f's reads d before d's write-back, which therefore must not
    be batched with c's at c's place. Nothing may be batched."""
    twice, thrice = aten.mul.Tensor(c, 2), aten.mul.Tensor(e, 3)
    aten.copy_.default(a, b)
    aten.copy_.default(b, a)
    aten.copy_.default(e, twice)
    aten.copy_.default(e, thrice)
    aten.copy_.default(c, twice)
    aten.copy_.default(f, d)
    aten.copy_.default(d, thrice)


def _crossed_late(a, b, c, d):
    """c's and d's write-backs, after the last copy that must stay in place, batch."""
    twice, thrice = aten.mul.Tensor(c, 2), aten.mul.Tensor(d, 3)
    aten.copy_.default(a, b)
    aten.copy_.default(b, a)
    aten.copy_.default(c, twice)
    aten.copy_.default(d, thrice)


@pytest.mark.parametrize("fn, batched", [(_crossed, 0), (_crossed_late, 2)])
def test_only_copies_that_commute_with_every_other_write_back_are_moved(fn, batched):
    gm = fx.symbolic_trace(fn)
    for node in gm.graph.nodes:
        node.meta["val"] = torch.empty(4) if node.op != "output" else None
    ctx = PassContext(options=Options(batch_write_backs=True), graph_name="g0_test", kind="forward", example_inputs=())
    gm, report = batch_write_backs.run(gm, ctx)
    assert report.batched == batched, gm.code
    inputs = [torch.randn(4) for _ in gm.graph.find_nodes(op="placeholder")]
    want = [t.clone() for t in inputs]
    fn(*want)
    gm(*inputs)
    assert all(torch.equal(a, b) for a, b in zip(inputs, want))


def _bn_step(options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    compiled = model if options is None else torch.compile(model, backend="graphopt", options=options)
    with events.capture() as graphs:
        compiled(torch.randn(2, 3, 8, 8)).square().mean().backward()
    return [p.grad for p in model.parameters()], list(model.buffers()), graphs


def test_batch_norm_running_statistics_and_step_counts_are_written_by_one_call_each_and_equal_the_option_off():
    torch._dynamo.reset()
    grads_off, buffers_off, graphs_off = _bn_step({"batch_write_backs": False})
    torch._dynamo.reset()
    grads_on, buffers_on, graphs = _bn_step({"batch_write_backs": True})
    forward = next(g for g in graphs if g.kind == "forward")
    ops = _ops(forward.output_gm)
    assert ops.count(aten._foreach_copy_.default) == 1 and ops.count(aten._foreach_add_.Scalar) == 1, forward.output_gm.code
    assert aten.copy_.default not in ops
    forward_off = next(g for g in graphs_off if g.kind == "forward")
    kernels_on, kernels_off = (sum(isinstance(t, GuardedCall) for t in _ops(g.output_gm)) for g in (forward, forward_off))
    assert kernels_off - kernels_on == 2  # the two step counts' increment kernels
    assert all(torch.equal(a, b) for a, b in zip(grads_on + buffers_on, grads_off + buffers_off))
    grads_eager, buffers_eager, _ = _bn_step(None)
    for got, want in zip(grads_on + buffers_on, grads_eager + buffers_eager):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    loaded = artifact._loads(artifact._dumps(forward.output_gm))  # the AOTAutograd cache keeps the graph pickled
    assert _ops(loaded).count(aten._foreach_copy_.default) == 1 and _ops(loaded).count(aten._foreach_add_.Scalar) == 1


def test_off_by_default():
    assert Options().batch_write_backs is False


def _counters(a, b, x):
    a.add_(1)
    b.add_(1)
    return x * 2


def _counters_read(a, b, x):
    """a's new value is also read: its kernel stays, and a's write-back is a plain copy."""
    a.add_(1)
    b.add_(1)
    return x * a


@pytest.mark.parametrize("fn, increments, kept", [(_counters, 2, 0), (_counters_read, 0, 2)])
def test_counters_become_one_foreach_add_unless_their_new_value_is_read(fn, increments, kept):
    inputs = [torch.zeros(()), torch.ones(()), torch.randn(4)]
    want = [t.clone() for t in inputs]
    want_out = fn(*want)
    out, written, graphs = _compiled_run(fn, inputs, {"batch_write_backs": True})
    (report,) = [r.report for r in graphs[0].records if r.name == "batch_write_backs"]
    assert (report.increments, report.kept) == (increments, kept), graphs[0].output_gm.code
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(written, want))
