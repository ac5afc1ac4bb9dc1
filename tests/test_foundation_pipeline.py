"""The pass manager's records, the debug dump, and both levels of eager fallback."""

import warnings

import pytest
import torch
from torch import fx

import graphopt.pipeline as pipeline
from graphopt import events
from graphopt.fallback import GraphoptFallbackWarning, fallbacks
from graphopt.options import Options
from graphopt.runtime import GuardedCall


def _f(x, w):
    return torch.nn.functional.gelu(x @ w).sum(dim=-1)


def test_every_pass_is_recorded_with_graphs_time_and_report():
    compiled = torch.compile(_f, backend="graphopt")
    with events.capture() as graphs:
        compiled(torch.randn(4, 8), torch.randn(8, 8))
    (info,) = graphs
    names = [r.name for r in info.records]
    assert names == [name for name, _ in pipeline.graph_passes(Options())]
    for record in info.records:
        assert isinstance(record.before, fx.GraphModule) and isinstance(record.after, fx.GraphModule)
        assert record.seconds >= 0 and isinstance(record.report, pipeline.PassReport)
    assert info.records[0].before is info.input_gm
    assert info.records[-1].after is info.output_gm


def test_passes_do_not_mutate_their_input():
    gm = fx.symbolic_trace(lambda x: x.view(x.shape).relu() + 1)
    ctx = pipeline.PassContext(Options(), "g", "inference", [torch.randn(3)])
    before = gm.code
    pipeline.run_pipeline(gm, ctx)
    assert gm.code == before


def test_debug_dir_writes_one_folder_per_graph_and_one_file_per_pass(tmp_path):
    compiled = torch.compile(_f, backend="graphopt", options={"debug_dir": str(tmp_path)})
    x = torch.randn(4, 8, requires_grad=True)
    compiled(x, torch.randn(8, 8)).sum().backward()
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 2 and folders[0].endswith("backward") and folders[1].endswith("forward")
    for folder in tmp_path.iterdir():
        files = sorted(p.name for p in folder.iterdir())
        passes = [name for name, _ in pipeline.graph_passes(Options())]
        assert files == ["00_input.py"] + [f"{i:02d}_{name}.py" for i, name in enumerate(passes, start=1)]
        text = (folder / files[-1]).read_text()
        assert text.startswith("# graph ") and "# report:" in text and "def forward" in text


def test_a_failing_pass_falls_back_to_eager_for_that_graph_with_a_warning(monkeypatch):
    def broken(gm, ctx):
        raise RuntimeError("deliberately broken pass")

    monkeypatch.setattr(pipeline, "graph_passes", lambda options: [("broken", broken)])
    compiled = torch.compile(_f, backend="graphopt")
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    with pytest.warns(GraphoptFallbackWarning, match="deliberately broken pass"):
        out = compiled(x, w)
    torch.testing.assert_close(out, _f(x, w))


def test_guarded_call_falls_back_once_and_warns_once():
    calls = []

    def kernel(x):
        calls.append("kernel")
        raise RuntimeError("launch failed: out of resources")

    def eager(x):
        calls.append("eager")
        return x * 2

    guarded = GuardedCall("fused_mul_0", kernel, eager)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = guarded(torch.ones(2)), guarded(torch.ones(2))
    torch.testing.assert_close(first, torch.full((2,), 2.0))
    torch.testing.assert_close(second, first)
    assert calls == ["kernel", "eager", "eager"]
    messages = [str(w.message) for w in caught if issubclass(w.category, GraphoptFallbackWarning)]
    assert messages == ["graphopt: running fused_mul_0 in eager ATen: RuntimeError: launch failed: out of resources"]
    assert any(f.op == "fused_mul_0" for f in fallbacks())
