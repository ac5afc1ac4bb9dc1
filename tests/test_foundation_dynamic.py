"""Dynamic shapes: SymInt placeholders are accepted and a new batch size does not recompile forever."""

import torch
from torch._dynamo.utils import counters

from graphopt import events


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _check_batch(compiled, eager, batch):
    x = torch.randn(batch, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = compiled(x), eager(x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)


def test_dynamic_true_compiles_once_for_all_batch_sizes():
    eager = _model()
    compiled = torch.compile(eager, backend="graphopt", dynamic=True)
    counters.clear()
    with events.capture() as graphs:
        for batch in (3, 5, 9, 17):
            _check_batch(compiled, eager, batch)
    assert counters["stats"]["unique_graphs"] == 1
    forward = next(g for g in graphs if g.kind == "forward")
    assert any(n.op == "placeholder" and isinstance(n.meta.get("val"), torch.SymInt) for n in forward.input_gm.graph.nodes)


def test_automatic_dynamic_after_a_shape_change_stops_recompiling():
    eager = _model()
    compiled = torch.compile(eager, backend="graphopt")
    counters.clear()
    for batch in (4, 6, 7, 11, 13):
        _check_batch(compiled, eager, batch)
    # one static graph for batch 4, one dynamic graph for every later batch size
    assert counters["stats"]["unique_graphs"] == 2
