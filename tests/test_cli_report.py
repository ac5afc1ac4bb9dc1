"""`graphopt report`: one self-contained HTML page that renders in a headless browser."""

import json
import re
import shutil
import subprocess

import pytest

from graphopt import cli
from test_cli import SMALL_SCRIPT

CHROMIUM = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None
)


@pytest.fixture
def report(tmp_path, capsys):
    script = tmp_path / "small.py"
    script.write_text(SMALL_SCRIPT)
    dump = tmp_path / "dump"
    assert cli.main(["dump", str(script), "--out", str(dump)]) == 0
    assert cli.main(["report", str(dump)]) == 0
    assert f"wrote {dump / 'report.html'} (" in capsys.readouterr().out
    return dump / "report.html"


def test_report_is_one_self_contained_page_with_timeline_kernels_and_memory(report):
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)=["']?(https?:|//|/)""", page), "the page must not load anything"
    assert "<script" not in page
    # graph names carry a per-process counter, so they are read from the dump, not assumed
    summary = json.loads((report.parent / "run.json").read_text())
    kinds = [g["kind"] for g in summary["graphs"]]
    assert kinds.count("forward") == 2 and kinds.count("backward") == 2
    for graph in summary["graphs"]:
        assert f'<h2 id="{graph["name"]}">' in page
        for kernel in graph["kernels"]:
            assert f"<td>{kernel['name']}</td>" in page
    assert page.count('aria-label="pass timeline"') == len(kinds)
    assert page.count('aria-label="live memory"') == len(kinds)
    assert "bytes moved" in page
    assert "Data-dependent branching" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(report, tmp_path):
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    dom = subprocess.run([*args, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "graphopt report: small.py" in dom.stdout and "<svg" in dom.stdout
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [*args, f"--screenshot={shot}", "--window-size=1200,1600", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and shot.stat().st_size > 20_000, done.stderr[-2000:]
