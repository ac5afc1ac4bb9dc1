"""Training through graphopt with a memory budget: gradients equal eager at every budget,
predicted activation memory within the budget (or the documented warning), dropout
bit-equal under a fixed seed, and dynamic shapes without recompiles."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from graphopt import events
from graphopt.passes.remat import RematReport, RematWarning

# float32; recomputation reruns the same ATen kernels, the rest is graphopt's usual reassociation.
RTOL, ATOL = 1e-4, 1e-5
BUDGETS = [1.0, 0.5, 0.2, 0.0]


class _Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm, self.up, self.down = torch.nn.LayerNorm(width), torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


def _mlp():
    return torch.nn.Sequential(*[_Block(32) for _ in range(6)], torch.nn.Linear(32, 4))


def _cnn():
    layers = []
    for c_in, c_out in [(3, 8), (8, 8), (8, 16), (16, 16)]:
        layers += [torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 5))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)  # dropout 0.1 everywhere: random ops in the joint graph
    model.config.use_cache = False
    return model


def _case(name):
    """(model, input, loss) of one test model; weights and input from a fixed seed."""
    torch.manual_seed(0)
    if name == "mlp":
        return _mlp(), torch.randn(8, 16, 32), lambda out: out.square().mean()
    if name == "cnn":
        return _cnn(), torch.randn(4, 3, 16, 16), lambda out: out.square().mean()
    return _gpt2().train(), torch.randint(0, 128, (2, 16)), lambda out: out.logits.float().square().mean()


def _step(run, model, x, loss_fn):
    """One forward/backward from a fixed RNG state: the loss and every gradient."""
    torch.manual_seed(1234)
    loss = loss_fn(run(x))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compiled_step(name, options):
    model, x, loss_fn = _case(name)
    compiled_model = copy.deepcopy(model)
    expected = _step(model, model, x, loss_fn)
    with warnings.catch_warnings(record=True) as caught, events.capture() as graphs:
        warnings.simplefilter("always", RematWarning)
        compiled = torch.compile(compiled_model, backend="graphopt", options=options)
        got = _step(compiled, compiled_model, x, loss_fn)
    reports = [r.report for g in graphs if g.kind == "forward" for r in g.records if r.name == "remat"]
    remat_warnings = [str(w.message) for w in caught if issubclass(w.category, RematWarning)]
    return expected, got, reports, remat_warnings


def _assert_same_training_step(expected, got, *, rtol, atol):
    (loss, grads), (ref_loss, ref_grads) = got, expected
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=rtol, atol=atol, msg=lambda m: f"grad {n}: {m}")


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt2"])
def test_gradients_equal_eager_and_plan_fits_or_warns(name, budget):
    options = {"memory_budget": budget, "fusion": False, "remat_time_limit_s": 1.0}
    expected, got, reports, remat_warnings = _compiled_step(name, options)
    _assert_same_training_step(expected, got, rtol=RTOL, atol=ATOL)
    assert reports and all(isinstance(r, RematReport) for r in reports)
    for report in reports:
        if report.source == "cp-sat":
            assert report.predicted_peak_bytes <= budget * report.save_everything_peak_bytes
        else:
            assert report.source == "smallest reachable peak"
            assert any("is not reachable" in w for w in remat_warnings)
    if budget == 1.0:
        assert all(r.source == "cp-sat" and r.predicted_extra_ms == 0.0 for r in reports)


def test_dropout_stays_bit_equal_to_eager_at_the_smallest_budget():
    """Dropout masks come from the RNG once, in the forward; recomputation never redraws them."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(64, 16))
    x = torch.randn(32, 16)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, backend="graphopt", options={"memory_budget": 0.0, "fusion": False})
    for _ in range(2):
        torch.manual_seed(7)
        ref = model(x)
        torch.manual_seed(7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RematWarning)
            out = compiled(x)
        assert torch.equal(out, ref)
        ref.square().sum().backward()
        out.square().sum().backward()
    for p, q in zip(compiled_model.parameters(), model.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_fused_gpt2_at_half_budget_trains_like_eager():
    expected, got, reports, _ = _compiled_step("gpt2", {"memory_budget": 0.5, "remat_time_limit_s": 1.0})
    _assert_same_training_step(expected, got, rtol=RTOL, atol=ATOL)
    assert reports


def test_dynamic_batch_with_a_budget_compiles_once():
    torch.manual_seed(0)
    eager = _mlp()
    compiled = torch.compile(copy.deepcopy(eager), backend="graphopt", dynamic=True, options={"memory_budget": 0.6})
    counters.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RematWarning)
        for batch in (3, 5, 9):
            x = torch.randn(batch, 4, 32)
            torch.testing.assert_close(compiled(x), eager(x), rtol=RTOL, atol=ATOL)
            compiled(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == 1


def test_autocast_casts_of_one_value_are_computed_and_saved_once():
    """Autocast casts a shared input once per projection; the joint graph's CSE merges the casts,
    so the backward saves one bf16 copy, not three (the default min-cut plan and a budgeted one)."""

    class Projections(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(32)
            self.q, self.k, self.v = (torch.nn.Linear(32, 32, bias=False) for _ in range(3))

        def forward(self, x):
            h = self.norm(x)
            return self.q(h) * self.k(h).sigmoid() + self.v(h)

    for options in ({}, {"memory_budget": 1.0}):
        torch._dynamo.reset()
        model = Projections()
        with events.capture() as graphs, torch.autocast("cpu", dtype=torch.bfloat16):
            torch.compile(model, backend="graphopt", options=options)(torch.randn(4, 8, 32)).float().sum().backward()
        forward = next(g for g in graphs if g.kind == "forward")
        joint_out = next(r.after for r in forward.records if r.name == "remat")
        casts = [
            n for n in joint_out.graph.nodes
            if n.target == torch.ops.aten._to_copy.default and n.kwargs.get("dtype") == torch.bfloat16
            and n.args[0].meta["val"].shape == (4, 8, 32)
        ]
        assert len(casts) == 1, (options, [c.name for c in casts])
