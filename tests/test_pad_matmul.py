"""The matmul padding pass: padded products equal the originals, layouts included."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import assert_training_matches_eager
from torch.fx.experimental.proxy_tensor import make_fx

from graphopt import events
from graphopt.cost_model.roofline import CPU_SPEC
from graphopt.passes import pad_matmul

aten = torch.ops.aten
# A device on which every misaligned product is worth padding.
SLOW_MATMUL_SPEC = dataclasses.replace(
    CPU_SPEC, matmul_flops_per_s=1.0, fp32_matmul_flops_per_s=1.0, misaligned_matmul_slowdown=4.0
)


def _pad(fn, *inputs):
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    return pad_matmul.pad_matmuls(gm, SLOW_MATMUL_SPEC)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


BF16, FP32 = torch.bfloat16, torch.float32
CASES = {
    # name: (fn, input shapes, padded (batch..., M, K, N) per dtype: 16 bytes = 8 bf16 or 4 fp32 elements)
    "n_odd": (lambda a, b: a @ b, [(16, 32), (32, 61)], {BF16: (16, 32, 64), FP32: (16, 32, 64)}),
    "k_odd": (lambda a, b: a @ b, [(16, 37), (37, 24)], {BF16: (16, 40, 24), FP32: (16, 40, 24)}),
    "m_odd_column_major_a": (lambda a, b: a.t() @ b, [(40, 19), (40, 8)], {BF16: (24, 40, 8), FP32: (20, 40, 8)}),
    "odd_transposed_b": (lambda a, b: a @ b.t(), [(13, 29), (31, 29)], {BF16: (13, 32, 32), FP32: (13, 32, 32)}),
    "bmm": (torch.bmm, [(3, 8, 21), (3, 21, 11)], {BF16: (3, 8, 24, 16), FP32: (3, 8, 24, 12)}),
    "addmm_bias_n": (torch.addmm, [(61,), (16, 32), (32, 61)], {BF16: (16, 32, 64), FP32: (16, 32, 64)}),
    "addmm_bias_mn": (
        lambda bias, a, b: torch.addmm(bias, a.t(), b),
        [(19, 61), (32, 19), (32, 61)],
        {BF16: (24, 32, 64), FP32: (20, 32, 64)},
    ),
}


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_padded_product_equals_original(case, dtype):
    fn, shapes, padded_sizes = CASES[case]
    inputs = [torch.randn(s, dtype=dtype) for s in shapes]
    gm, padded = _pad(fn, *inputs)
    assert [p.padded for p in padded] == [padded_sizes[dtype]]
    assert aten.constant_pad_nd.default in _targets(gm)
    gm.graph.lint()
    gm.recompile()
    expected = fn(*inputs)
    actual = gm(*inputs)
    # bf16: the pads add zeros, but a product of other sizes may block its sums differently
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == BF16 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(actual, expected, **tol)
    assert actual.stride() == expected.stride(), "the padded product keeps the original layout"


def test_padded_graph_pickles_for_the_compiled_graph_cache():
    """The slice a padded product returns has a fake value that torch's GraphPickler can write: a
    view's FakeTensor keeps its base's fake mode, which cannot pickle, so the graph of every padded
    model (GPT-2's LM head) failed to go into the AOTAutograd cache."""
    from graphopt import artifact

    a, b = torch.randn(16, 32), torch.randn(32, 61)
    gm, padded = _pad(lambda a, b: a @ b, a, b)
    assert len(padded) == 1
    loaded = artifact._loads(artifact._dumps(gm))
    torch.testing.assert_close(loaded(a, b), a @ b, rtol=1e-5, atol=1e-5)


def test_aligned_products_are_left_alone():
    a, b = torch.randn(16, 32, dtype=torch.bfloat16), torch.randn(32, 64, dtype=torch.bfloat16)
    gm, padded = _pad(lambda a, b: a @ b, a, b)
    assert padded == [] and aten.constant_pad_nd.default not in _targets(gm)


def test_small_products_are_not_worth_padding():
    gm = make_fx(lambda a, b: a @ b, tracing_mode="fake")(torch.randn(4, 8), torch.randn(8, 5))
    assert pad_matmul.pad_matmuls(gm, dataclasses.replace(CPU_SPEC, misaligned_matmul_slowdown=4.0))[1] == []


def test_devices_without_an_alignment_penalty_are_left_alone():
    gm, padded = _pad(lambda a, b: a @ b, torch.randn(16, 32), torch.randn(32, 61))
    assert padded
    gm = make_fx(lambda a, b: a @ b, tracing_mode="fake")(torch.randn(16, 32), torch.randn(32, 61))
    assert pad_matmul.pad_matmuls(gm, CPU_SPEC)[1] == []


def _pads(node):
    """Whether `node` pads: an ATen constant_pad_nd, or a generated kernel that does."""
    if node.target == aten.constant_pad_nd.default:
        return True
    spec = getattr(getattr(node.target, "primary", None), "spec", None)
    return spec is not None and any(n.target == aten.constant_pad_nd.default for n in spec.nodes)


def test_lm_head_with_odd_vocabulary_trains_like_eager(monkeypatch):
    """GPT-2's case end to end (forward, both backward products) with the pass forced on."""
    monkeypatch.setattr(pad_matmul, "device_spec", lambda device: SLOW_MATMUL_SPEC)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 61, bias=False))
    batches = [(torch.randn(3, 16, 24), torch.randint(0, 61, (3, 16))) for _ in range(2)]

    def loss_fn(run, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(run(x).flatten(0, 1), y.flatten())

    with events.capture() as graphs:
        assert_training_matches_eager(model, batches, loss_fn, rtol=1e-4, atol=1e-5)
    padded = {g.kind: len(r.report.padded) for g in graphs for r in g.records if r.name == "pad_matmul"}
    assert padded == {"forward": 1, "backward": 2}, "the LM head's product and both of its gradients"
    (forward,) = [g.output_gm for g in graphs if g.kind == "forward"]
    assert not any(n.target == aten.clone.default for n in forward.graph.nodes), "logits keep padded rows"
    (backward,) = [g.output_gm for g in graphs if g.kind == "backward"]
    pads = [n for n in backward.graph.nodes if _pads(n)]
    # grad @ W and grad^T @ h share one padded gradient; W has its own padded copy
    assert sorted(len(n.users) for n in pads) == [1, 2], [n.format_node() for n in pads]


class _OddHead(torch.nn.Module):
    """A bias-free head of odd width (61) whose forward returns `outputs(logits)`."""

    def __init__(self, outputs):
        super().__init__()
        self.head = torch.nn.Linear(24, 61, bias=False)
        self.outputs = outputs

    def forward(self, x):
        return self.outputs(self.head(x))


def _inference_against_eager(monkeypatch, model):
    """The model's outputs compiled with padding forced on, eager's, and the compiled graph."""
    monkeypatch.setattr(pad_matmul, "device_spec", lambda device: SLOW_MATMUL_SPEC)
    torch.manual_seed(0)
    x = torch.randn(3, 16, 24)
    with events.capture() as graphs, torch.no_grad():
        out = torch.compile(model, backend="graphopt")(x)
        expected = model(x)
    (graph,) = graphs
    return out, expected, graph.output_gm


def test_inference_returns_a_padded_product_with_padded_rows(monkeypatch):
    """Like inductor's pad_mm: logits that are only returned keep the padded row stride (no copy)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.GELU(), torch.nn.Linear(32, 61, bias=False))
    out, expected, gm = _inference_against_eager(monkeypatch, model)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.shape == expected.shape and out.stride() == (16 * 64, 64, 1)
    assert not any(n.target == aten.clone.default for n in gm.graph.nodes)


def test_inference_copies_a_padded_product_that_is_also_computed_on(monkeypatch):
    """A consumer besides the output (here the softmax) gets the promised contiguous layout."""
    torch.manual_seed(0)
    model = _OddHead(lambda logits: (logits, logits.softmax(-1)))
    (logits, probs), (expected_logits, expected_probs), _ = _inference_against_eager(monkeypatch, model)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, expected_probs, rtol=1e-5, atol=1e-6)
    assert logits.stride() == expected_logits.stride()


@pytest.mark.parametrize("user_outputs", [1, 2])
def test_only_outputs_the_caller_gets_keep_padded_rows(user_outputs):
    """Outputs past `user_outputs` are a forward graph's values saved for the backward graph, which
    was traced for the contiguous layout: a product that reaches one of them is copied back."""
    a, b = torch.randn(16, 32), torch.randn(32, 61)
    gm, padded = pad_matmul.pad_matmuls(
        make_fx(lambda a, b: (a @ b, (a @ b).view(4, 4, 61)), tracing_mode="fake")(a, b), SLOW_MATMUL_SPEC, user_outputs
    )
    gm.recompile()
    _, second = gm(a, b)
    torch.testing.assert_close(second, (a @ b).view(4, 4, 61), rtol=1e-5, atol=1e-5)
    copied = {1: True, 2: False}[user_outputs]
    assert (aten.clone.default in _targets(gm)) == copied
    assert second.is_contiguous() == copied


@pytest.mark.parametrize("replay_views", [True, False])
def test_outputs_aliasing_a_padded_product_equal_eager(monkeypatch, replay_views):
    """AOTAutograd rebuilds outputs that alias each other from one base, replaying the views (or with
    as_strided when view replay is off): each must see the padded rows."""
    torch.manual_seed(0)
    model = _OddHead(lambda logits: (logits, logits.view(-1, 61), logits.view(3, 4, 4, 61)))
    with torch._functorch.config.patch(view_replay_for_aliased_outputs=replay_views):
        outs, expected, _ = _inference_against_eager(monkeypatch, model)
    for out, want in zip(outs, expected):
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert outs[0].stride() == (16 * 64, 64, 1)


def test_a_batched_product_padded_in_m_is_copied_for_views_that_merge_its_batches():
    """A bmm whose column-major operand was padded in M has rows a padded stride apart only within
    each batch: a returned view over batch and rows (here (3, 19, 61) as (57, 61)) cannot view the
    slice, and the pass failed, sending the whole graph to eager ATen."""
    a, b = torch.randn(3, 40, 19), torch.randn(3, 40, 61)
    fn = lambda a, b: torch.bmm(a.transpose(1, 2), b).view(57, 61)  # noqa: E731
    gm, padded = pad_matmul.pad_matmuls(make_fx(fn, tracing_mode="fake")(a, b), SLOW_MATMUL_SPEC, user_outputs=1)
    assert [p.padded for p in padded] == [(3, 20, 40, 64)]
    gm.recompile()
    actual = gm(a, b)
    torch.testing.assert_close(actual, fn(a, b), rtol=1e-5, atol=1e-5)
    assert actual.is_contiguous()
