"""The channels-last convolution pass: same results as eager, layouts changed only inside the graph."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from graphopt import events
from graphopt.cost_model.roofline import CPU_SPEC
from graphopt.passes import conv_layout

CHANNELS_LAST_SPEC = dataclasses.replace(CPU_SPEC, channels_last_convolutions=True)
# A pipeline failure would fall back to eager and pass the comparisons: make it fail the test.
pytestmark = pytest.mark.filterwarnings("error::graphopt.fallback.GraphoptFallbackWarning")


class SmallResNet(nn.Module):
    """conv-bn-relu, pooling, a residual block, global pooling and a classifier: resnet50's pieces."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _compile_and_run(model, x, monkeypatch, **options):
    monkeypatch.setattr(conv_layout, "device_spec", lambda device: CHANNELS_LAST_SPEC)
    with events.capture() as graphs, torch.no_grad():
        out = torch.compile(model, backend="graphopt", options=options)(x)
    reports = [r.report for g in graphs for r in g.records if r.name == "conv_layout"]
    return out, reports


def _randomize_batch_norms(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("fusion", [True, False])
def test_cnn_inference_runs_channels_last_and_matches_eager(monkeypatch, fusion):
    torch.manual_seed(0)
    model = _randomize_batch_norms(SmallResNet())
    x = torch.randn(2, 3, 16, 16)
    out, reports = _compile_and_run(model, x, monkeypatch, fusion=fusion)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert out.stride() == expected.stride()
    (report,) = reports
    assert len(report.channels_last_convolutions) == 3
    # the image and the two 3x3 weights are copied (a 1x1 weight is both layouts at once); later
    # convolutions read channels-last activations: pooling, batch norm and the residual kept the layout
    assert len(report.copies_to_channels_last) == 3


def test_conv_output_as_graph_output_keeps_eager_layout_and_views_become_reshapes(monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()

    def fn(x):
        y = conv(x)
        return y, y.view(y.shape[0], -1) * 2  # a view over C, H, W: invalid channels-last

    x = torch.randn(2, 4, 5, 5)
    monkeypatch.setattr(conv_layout, "device_spec", lambda device: CHANNELS_LAST_SPEC)
    with events.capture() as graphs, torch.no_grad():
        outs = torch.compile(fn, backend="graphopt")(x)
        expected = fn(x)
    for got, want in zip(outs, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert got.stride() == want.stride()
    (report,) = [r.report for g in graphs for r in g.records if r.name == "conv_layout"]
    assert report.views_made_reshapes and report.outputs_restored


def test_plain_cpus_keep_their_layouts():
    with events.capture() as graphs:
        torch.compile(SmallResNet(), backend="graphopt")(torch.randn(2, 3, 8, 8)).sum().backward()
    skipped = {r.report.skipped for g in graphs for r in g.records if r.name == "conv_layout"}
    assert skipped == {"convolutions on cpu do not prefer channels-last"}


def _train_like_eager(model, x):
    """One training step through graphopt and in eager from the same weights: outputs, gradients
    (values and strides) and buffers must agree. Returns the graphs graphopt compiled."""
    reference = copy.deepcopy(model)
    with events.capture() as graphs:
        out = torch.compile(model, backend="graphopt")(x)
        out.square().sum().backward()
    expected = reference(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")
        assert p.grad.stride() == q.grad.stride(), name
    for b, c in zip(model.buffers(), reference.buffers()):  # batch-norm running statistics
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)
    return graphs


def test_cnn_training_lays_out_the_joint_graph_and_matches_eager(monkeypatch):
    """Forward and backward agree on the saved activations' layouts; gradients keep eager's strides."""
    monkeypatch.setattr(conv_layout, "device_spec", lambda device: CHANNELS_LAST_SPEC)
    torch.manual_seed(0)
    graphs = _train_like_eager(SmallResNet(), torch.randn(2, 3, 16, 16))
    reports = {(g.kind, r.report.skipped) for g in graphs for r in g.records if r.name == "conv_layout"}
    assert ("forward", None) in reports, "the joint graph was laid out (reported with the forward)"
    joint_report = next(r.report for g in graphs for r in g.records if r.name == "conv_layout" and not r.report.skipped)
    assert len(joint_report.channels_last_convolutions) == 6, "3 forward and 3 backward convolutions"
    backward = next(g for g in graphs if g.kind == "backward")
    conv_backwards = [n for n in backward.output_gm.graph.nodes if n.target == torch.ops.aten.convolution_backward.default]
    conv_inputs = [n.args[1].meta["val"] for n in conv_backwards]
    assert conv_inputs and all(v.is_contiguous(memory_format=torch.channels_last) for v in conv_inputs)


class PatchEmbedding(nn.Module):
    """ViT's stem: a strided convolution whose output is flattened into a token sequence."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.norm(self.conv(x).flatten(2).transpose(1, 2))).mean(1)


def test_patch_embedding_views_work_channels_last_in_training_and_inference(monkeypatch):
    monkeypatch.setattr(conv_layout, "device_spec", lambda device: CHANNELS_LAST_SPEC)
    torch.manual_seed(0)
    model = PatchEmbedding()
    x = torch.randn(2, 3, 16, 16)
    graphs = _train_like_eager(model, x)
    with events.capture() as inference_graphs, torch.no_grad():
        inferred = torch.compile(model, backend="graphopt")(x)
        torch.testing.assert_close(inferred, model(x), rtol=1e-4, atol=1e-5)
    records = [(g.kind, r) for g in graphs + inference_graphs for r in g.records if r.name == "conv_layout"]
    laid_out = {kind for kind, r in records if not r.report.skipped}
    assert laid_out == {"forward", "inference"}


def test_a_failed_layout_propagation_keeps_the_graph_as_it_was(monkeypatch):
    monkeypatch.setattr(conv_layout, "device_spec", lambda device: CHANNELS_LAST_SPEC)

    def broken(*args, **kwargs):
        raise RuntimeError("deliberately broken propagation")

    monkeypatch.setattr(conv_layout._LayoutPropagation, "propagate_dont_convert_inputs", broken)
    model = _randomize_batch_norms(SmallResNet())
    x = torch.randn(2, 3, 8, 8)
    out, reports = _compile_and_run(model, x, monkeypatch)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    (report,) = reports
    assert report.skipped.startswith("layouts could not be propagated: RuntimeError: deliberately broken")


class OneConvDeepStack(nn.Module):
    """A single convolution before hundreds of other ops, as in ViT (one patch embedding)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        for i in range(160):
            x = torch.tanh(x * (1.0 + i / 1000))
        return x


def test_layouts_stay_where_channels_last_would_not_pay(monkeypatch):
    """Few convolutions in a large graph, or grouped convolutions: skipped, with the reason."""
    torch.manual_seed(0)
    grouped = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 1))
    for model, x, reason in [
        (OneConvDeepStack(), torch.randn(2, 3, 8, 8), "only 1 convolution(s) among"),
        (grouped, torch.randn(2, 8, 8, 8), "grouped convolutions"),
    ]:
        out, reports = _compile_and_run(model, x, monkeypatch)
        with torch.no_grad():
            torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
        (report,) = reports
        assert report.skipped and report.skipped.startswith(reason), report.skipped
