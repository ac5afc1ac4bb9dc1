"""The channels-last convolution pass: same results as eager, layouts changed only inside the graph."""

from __future__ import annotations

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


def test_training_graphs_and_plain_cpus_keep_their_layouts(monkeypatch):
    model = SmallResNet()
    x = torch.randn(2, 3, 8, 8)
    with events.capture() as graphs:
        torch.compile(model, backend="graphopt")(x).sum().backward()
    skipped = {r.report.skipped for g in graphs for r in g.records if r.name == "conv_layout"}
    assert skipped == {"convolutions on cpu do not prefer channels-last"}
    monkeypatch.setattr(conv_layout, "device_spec", lambda device: CHANNELS_LAST_SPEC)
    torch._dynamo.reset()
    with events.capture() as graphs:
        torch.compile(model, backend="graphopt")(x).sum().backward()
    skipped = {r.report.skipped for g in graphs for r in g.records if r.name == "conv_layout"}
    assert skipped == {"training graphs keep the layouts the partition gave the backward's inputs"}
