"""The `graphopt` command: each subcommand on a small script, help, and one-line errors."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from graphopt import cli
from graphopt.cache import TuningCache

GRAPHOPT = str(Path(sys.executable).parent / "graphopt")

# A model with a data-dependent branch (one graph break), trained one step.
SMALL_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 16)
            self.b = torch.nn.Linear(16, 4)

        def forward(self, x):
            h = torch.nn.functional.gelu(self.a(x))
            if h.sum() > 1e9:
                h = h * 2
            return torch.softmax(self.b(h), dim=-1)

    def main():
        torch.manual_seed(0)
        model = torch.compile(Net(), backend="graphopt")
        x = torch.randn(4, 8, requires_grad=True)
        out = model(x)
        out.sum().backward()
        return out, x.grad

    if __name__ == "__main__":
        main()
        print("script args:", sys.argv[1:])
    """
)

# A pass that asks the tuning cache for a plan (test-only hook: the script installs it).
CACHING_HOOK = textwrap.dedent(
    """
    import graphopt.pipeline as pipeline

    def planning(gm, ctx):
        ctx.cache.get_or_compute("test-plan", ctx.cache.graph_key, lambda: {"solved": True})
        return gm, pipeline.PassReport()

    _original = pipeline.graph_passes
    pipeline.graph_passes = lambda options: _original(options) + [("planning", planning)]
    """
)


def run_cli(*args, cwd=None, env=None):
    environment = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run([GRAPHOPT, *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=environment)


@pytest.fixture
def small_script(tmp_path):
    path = tmp_path / "small.py"
    path.write_text(SMALL_SCRIPT)
    return path


def test_explain_prints_graph_breaks_passes_ops_and_cache_use(tmp_path, small_script):
    (tmp_path / "caching_hook.py").write_text(CACHING_HOOK)
    script = tmp_path / "cached.py"
    script.write_text("import caching_hook\n" + SMALL_SCRIPT)
    trace_dir = tmp_path / "trace"
    cold = run_cli("explain", "--details", str(script), "--steps", "1", env={"TORCH_TRACE": str(trace_dir)})
    assert cold.returncode == 0, cold.stderr
    out = cold.stdout
    assert "script args: ['--steps', '1']" in out
    assert re.search(r"\d+ graph\(s\) compiled by graphopt", out)
    assert "Data-dependent branching" in out  # the graph break, from Dynamo's counters
    for graph in ("g0_frame0_0_forward", "g0_frame0_0_backward", "g1_frame1_0_forward", "g1_frame1_0_backward"):
        assert graph in out
    assert "cleanup" in out and "removed_identity_views" in out and "planning" in out
    assert "addmm.default x1" in out  # op counts
    assert "groups (1)" in out and "merges=['vertical:" in out  # --details: the fusion report's fields
    planned = out.count("test-plan: 0 hit / 1 miss")  # once per forward/backward graph
    assert planned >= 4
    warm = run_cli("explain", str(script))
    assert warm.returncode == 0, warm.stderr
    assert warm.stdout.count("test-plan: 1 hit / 0 miss") == planned and "test-plan: 0 hit" not in warm.stdout
    # tlparse users see graphopt's passes in the structured trace
    trace = "".join(p.read_text() for p in trace_dir.iterdir())
    assert '"name": "graphopt_g0_frame0_0_forward_01_cleanup"' in trace
    assert '"name": "graphopt_g0_frame0_0_forward_passes"' in trace


def test_explain_force_backend_compiles_an_inductor_script_with_graphopt_and_lists_fallbacks(tmp_path):
    script = tmp_path / "inductor_script.py"
    script.write_text(
        "import torch\n"
        "f = torch.compile(lambda x: torch.sin(x) * 2 + 1, mode='max-autotune')\n"
        "x = torch.randn(6)\n"
        "torch.testing.assert_close(f(x), torch.sin(x) * 2 + 1)\n"
    )
    # Without the Triton interpreter on a CPU machine the fusion pass falls back: explain names it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [GRAPHOPT, "explain", "--force-backend", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "COLUMNS": "200"},
    )
    assert done.returncode == 0, done.stderr
    assert "1 graph(s) compiled by graphopt" in done.stdout
    assert "eager fallbacks" in done.stdout and "Triton cannot run on cpu" in done.stdout


def test_dump_writes_every_stage_and_kernels_and_diff_shows_a_pass(tmp_path, small_script, capsys, monkeypatch):
    out = tmp_path / "dump"
    done = run_cli("dump", str(small_script), "--out", str(out))
    assert done.returncode == 0, done.stderr
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    summary = json.loads((out / "run.json").read_text())
    assert {g["folder"] for g in summary["graphs"]} == set(folders)
    for graph in summary["graphs"]:  # one file per stage, named after its pass
        stages = sorted(p.name for p in (out / graph["folder"]).glob("*.py"))
        assert stages == ["00_input.py"] + [f"{i:02d}_{p['name']}.py" for i, p in enumerate(graph["passes"], 1)]
        assert graph["memory"]
    for graph in ("g0_frame0_0_backward", "g0_frame0_0_forward", "g1_frame1_0_backward", "g1_frame1_0_forward"):
        assert graph in folders
    forward = out / "g0_frame0_0_forward"
    # the partition made the forward graph: its records (joint graph layout, remat) come first
    assert sorted(p.name for p in forward.glob("*.py")) == [
        "00_input.py",
        "01_conv_layout.py",
        "02_remat.py",
        "03_cleanup.py",
        "04_conv_layout.py",
        "05_pad_matmul.py",
        "06_fusion.py",
        "07_batch_casts.py",
        "08_planned_views.py",
        "09_buffer_reuse.py",
    ]
    kernels = list((forward / "kernels").glob("*.py"))
    assert kernels and "@triton.jit" in kernels[0].read_text()

    monkeypatch.setenv("COLUMNS", "200")
    capsys.readouterr()
    assert cli.main(["diff", str(out), "--pass", "cleanup"]) == 0
    diff = capsys.readouterr().out
    # The softmax backward's aliases are identity views that cleanup removes.
    assert "--- g1_frame1_0_backward before cleanup (input)" in diff
    assert "-        alias" in diff
    assert "g0_frame0_0_forward: pass 'cleanup' changed nothing" in diff
    assert cli.main(["diff", str(forward), "--pass", "fusion"]) == 0
    assert "+        fused_g0_forward_0 = " in capsys.readouterr().out
    assert cli.main(["diff", str(out), "--pass", "nonexistent"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"graphopt: error: no graph in {out} ran a pass named 'nonexistent'; passes found: batch_casts, buffer_reuse, cleanup, ")
    assert len(err.splitlines()) == 1 and "fusion" in err

    # Dumping again into the folder replaces the previous dump, stale graph folders included.
    (out / "g99_stale").mkdir()
    summary["graphs"].append({**summary["graphs"][0], "folder": "g99_stale"})
    (out / "run.json").write_text(json.dumps(summary))
    assert cli.main(["dump", str(small_script), "--out", str(out)]) == 0
    again = json.loads((out / "run.json").read_text())
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(g["folder"] for g in again["graphs"])


def test_cache_subcommands_list_show_stats_export_import_clear(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    folder = tmp_path / "cache"
    folder.mkdir()
    cache = TuningCache(str(folder / "tuning.sqlite"), graph_key="k" * 32, graph_name="g0_frame0_0_forward")
    cache.put("remat", "abcdef0123", {"saved": ["mm"], "peak_bytes": 4096})
    cache.get_or_compute("remat", "abcdef0123", lambda: None)
    cache.get("fusion", "missing")

    def run(*args):
        code = cli.main(["cache", "--dir", str(folder), *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    code, out, _ = run("ls")
    assert code == 0 and "remat" in out and "abcdef0123" in out
    code, out, _ = run("show", "abcd")
    assert code == 0 and '"peak_bytes": 4096' in out
    code, _, err = run("show", "zzz")
    assert code == 2 and err.strip() == f"graphopt: error: no cache entry with key 'zzz' in {folder / 'tuning.sqlite'}"
    code, out, _ = run("stats")
    assert code == 0 and "1 entries (remat: 1)" in out and "lookups: 1 hits, 1 misses (hit rate 50%)" in out
    assert "g0_frame0_0_forward" in out
    exported = tmp_path / "plans.json"
    assert run("export", str(exported))[0] == 0
    code, out, _ = run("clear")
    assert code == 0 and "removed 1 entries" in out
    assert TuningCache(cache.path).entries() == []
    code, out, _ = run("import", str(exported))
    assert code == 0 and "imported 1 entries" in out
    assert TuningCache(cache.path).get("remat", "abcdef0123") == {"saved": ["mm"], "peak_bytes": 4096}
    (tmp_path / "garbage.json").write_text("[1, 2")
    code, _, err = run("import", str(tmp_path / "garbage.json"))
    assert code == 2 and err.startswith("graphopt: error: cannot import") and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("name", cli.SUBCOMMANDS)
def test_every_subcommand_has_help_with_an_example(name, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main([name, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "example:" in out and f"graphopt {name}" in out.split("example:")[1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["explain", "nowhere.py"], "no such script: nowhere.py"),
        (["dump", "nowhere.py", "--out", "d"], "no such script: nowhere.py"),
        (["bisect", "nowhere.py"], "no such script: nowhere.py"),
        (["diff", "nowhere", "--pass", "cleanup"], "no such dump folder: nowhere"),
        (["report", "nowhere"], "nowhere is not a `graphopt dump` folder (no run.json)"),
        (["cache", "import", "nowhere.json"], "no such file: nowhere.json"),
        (["dump", "x.py"], "graphopt dump: the following arguments are required: --out"),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_bad_paths_and_usage_are_one_line_errors_with_exit_code_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("graphopt: error: ") and message in err


def test_a_script_that_raises_is_a_one_line_error_naming_where(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text("import torch\n\ndef helper():\n    raise ValueError('bad\\nthings')\n\nhelper()\n")
    done = run_cli("explain", str(script))
    assert done.returncode == 2
    assert done.stderr.strip() == "graphopt: error: failing.py:4: ValueError: bad"
    assert "Traceback" not in done.stdout + done.stderr
