"""`graphopt bisect` names a deliberately broken pass (and kernel) and writes a repro that reproduces."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from graphopt import cli

GRAPHOPT = str(Path(sys.executable).parent / "graphopt")

# Test-only hooks: the scripts import them, and they insert a broken pass into graphopt's pipeline.
BROKEN_PASS_HOOK = textwrap.dedent(
    """
    import torch
    import graphopt.pipeline as pipeline

    def add_becomes_sub(gm, ctx):
        for node in gm.graph.nodes:
            if node.target == torch.ops.aten.add.Tensor:
                node.target = torch.ops.aten.sub.Tensor
        return gm, pipeline.PassReport()

    def harmless(gm, ctx):
        return gm, pipeline.PassReport()

    _original = pipeline.graph_passes

    def graph_passes(options):
        passes = _original(options)
        return passes[:1] + [("harmless", harmless), ("add_becomes_sub", add_becomes_sub)] + passes[1:]

    pipeline.graph_passes = graph_passes
    """
)

BROKEN_KERNEL_HOOK = textwrap.dedent(
    """
    import torch
    import graphopt.pipeline as pipeline
    from graphopt.passes import fusion
    from graphopt.runtime import GuardedCall

    def _off_by_one(primary):
        return lambda *args: torch.utils._pytree.tree_map(lambda t: t + 1, primary(*args))

    def fusion_with_bad_sin_kernel(gm, ctx):
        gm, report = fusion.run(gm, ctx)
        for node in gm.graph.nodes:
            target = node.target
            if isinstance(target, GuardedCall) and any(
                n.target == torch.ops.aten.sin.default for n in target.fallback.graph.nodes
            ):
                node.target = GuardedCall(target.__name__, _off_by_one(target.primary), target.fallback)
        gm.recompile()
        return gm, report

    _original = pipeline.graph_passes
    pipeline.graph_passes = lambda options: [
        (name, fusion_with_bad_sin_kernel if name == "fusion" else p) for name, p in _original(options)
    ]
    """
)

SCRIPT = textwrap.dedent(
    """
    import torch
    import {hook}

    def main():
        f = torch.compile(lambda x, w: (torch.relu(x @ w + 1).sum(-1), torch.cos(x) * 3), backend="graphopt")
        g = torch.compile(lambda x: torch.sin(x) * 2, backend="graphopt")
        x = torch.randn(4, 8)
        a, b = f(x, torch.randn(8, 8))
        return a, b, g(x)
    """
)


def _bisect(tmp_path, hook_name, hook_source, *extra):
    (tmp_path / f"{hook_name}.py").write_text(hook_source)
    script = tmp_path / "model.py"
    script.write_text(SCRIPT.format(hook=hook_name))
    repro = tmp_path / "repro.py"
    done = subprocess.run(
        [GRAPHOPT, "bisect", str(script), "--repro", str(repro), *extra],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )
    return done, repro


def _run_repro(tmp_path, repro):
    return subprocess.run(
        [sys.executable, str(repro)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )


def test_bisect_names_the_broken_pass_and_writes_a_repro_that_reproduces(tmp_path):
    done, repro = _bisect(tmp_path, "broken_pass_hook", BROKEN_PASS_HOOK)
    assert done.returncode == 0, done.stderr
    assert (
        "first pass that changes the result: add_becomes_sub (pass 3 of 9: cleanup, harmless, add_becomes_sub, conv_layout, pad_matmul, fusion, batch_casts, planned_views, buffer_reuse"
        in done.stdout
    )
    assert "emits no generated kernels; bisected passes only" in done.stdout
    assert "reproduces)" in done.stdout
    replayed = _run_repro(tmp_path, repro)
    assert replayed.returncode == 1, replayed.stderr
    assert "reproduced: pass 'add_becomes_sub' changes the result" in replayed.stdout


def test_bisect_names_the_broken_kernel_and_its_repro_is_that_kernel_alone(tmp_path):
    done, repro = _bisect(tmp_path, "broken_kernel_hook", BROKEN_KERNEL_HOOK)
    assert done.returncode == 0, done.stderr
    assert "first pass that changes the result: fusion" in done.stdout
    kernel_line = next(line for line in done.stdout.splitlines() if "first kernel that changes the result" in line)
    assert "aten.sin.default" in kernel_line and "aten.relu.default" not in kernel_line
    assert "the eager subgraph of kernel" in done.stdout
    text = repro.read_text()
    assert "torch.ops.aten.sin.default" in text and "torch.ops.aten.mm" not in text
    replayed = _run_repro(tmp_path, repro)
    assert replayed.returncode == 1, replayed.stdout + replayed.stderr


def test_bisect_with_nothing_wrong_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    (tmp_path / "no_hook.py").write_text("")
    script = tmp_path / "model.py"
    script.write_text(SCRIPT.format(hook="no_hook"))
    assert cli.main(["bisect", str(script), "--repro", str(tmp_path / "repro.py")]) == 0
    assert "graphopt matches eager within rtol=1.3e-06, atol=1e-05: nothing to bisect" in capsys.readouterr().out
    assert not (tmp_path / "repro.py").exists()


def test_bisect_needs_a_main(tmp_path, capsys):
    script = tmp_path / "no_main.py"
    script.write_text("import torch\nprint(torch.ones(2))\n")
    assert cli.main(["bisect", str(script)]) == 2
    assert capsys.readouterr().err.strip() == (
        "graphopt: error: no_main.py defines no main(); bisect compares what main() returns"
    )


def test_compare_uses_the_tolerances_for_tensors_and_floats_and_checks_structure():
    import torch

    from graphopt.bisect import compare

    x = torch.ones(3)
    assert compare({"loss": 1.0, "y": x}, {"loss": 1.0 + 1e-9, "y": x + 1e-9}, rtol=1e-6, atol=1e-6) is None
    assert "output 1" in compare({"loss": 1.0, "y": x}, {"loss": 1.0, "y": x + 1}, rtol=1e-6, atol=1e-6)
    assert compare([2.0], [2.1], rtol=1e-6, atol=1e-6) == "output 0: 2.1 instead of 2.0"
    assert "different structure" in compare((x,), [x], rtol=0, atol=0)
