"""Tables and plots from benchmark results: `python -m benchmarks.report DIR [DIR...] [--out OUT]`.

Reads DIR/results.json of one or more runs (e.g. a suite split by model over
several device calls) and writes, into OUT (default: DIR when there is one),
results.md, speedup.png and pareto.png; into a new OUT it also writes the merged
results.json. Speedups are ratios against inductor measured in the
same run (same run_id), never across runs.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Iterable
from typing import Any

from benchmarks.record import read_results, write_results
from benchmarks.rows import Row

TABLE_FILE = "results.md"
SPEEDUP_PLOT = "speedup.png"
PARETO_PLOT = "pareto.png"
_GIB = 2**30


def load(folders: Iterable[str]) -> list[dict[str, Any]]:
    return [record for folder in folders for record in read_results(folder)]


def _ok(record: dict[str, Any]) -> bool:
    return record["status"] == "ok"


def _is_baseline(record: dict[str, Any]) -> bool:
    return record["backend"] == "inductor" and record["memory_budget"] is None and not record["cuda_graphs"]


def speedup_vs_inductor(records: list[dict[str, Any]]) -> dict[tuple[str, str], float]:
    """(run_id, key) -> inductor's median step time / this row's, for rows whose run has that baseline.

    The baseline is plain inductor (no budget, no CUDA graphs) of the same model,
    mode and precision in the same run.
    """
    baselines = {
        (r["run_id"], r["model"], r["mode"], r["precision"]): r["step_ms_median"]
        for r in records
        if _ok(r) and _is_baseline(r)
    }
    ratios = {}
    for r in filter(_ok, records):
        base = baselines.get((r["run_id"], r["model"], r["mode"], r["precision"]))
        if base is not None:
            ratios[(r["run_id"], r["key"])] = base / r["step_ms_median"]
    return ratios


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fallback_text(record: dict[str, Any]) -> str:
    return ", ".join(f"{f['op']} x{f['count']}" for f in record["fallbacks"])


def _runs_text(records: list[dict[str, Any]]) -> list[str]:
    """One line per run: where and with what it ran, and the command."""
    lines, seen = [], set()
    for r in records:
        if r["run_id"] in seen or r["device_name"] is None:
            continue
        seen.add(r["run_id"])
        v = r["versions"]
        lines.append(
            f"- run {r['run_id']}, {r['date']}, {r['device_name']}: torch {v.get('torch')}, triton {v.get('triton')}, "
            f"graphopt {v.get('graphopt')}, commit {r['git_commit']}; `{r['command']}`"
        )
    return lines


def markdown_table(records: list[dict[str, Any]], *, brief: bool = False) -> str:
    """The results as a markdown table; `brief` drops the columns a terminal summary can do without."""
    ratios = speedup_vs_inductor(records)
    head = ["model", "mode", "variant", "step ms", "peak GiB", "vs inductor", "first call s"]
    if not brief:
        head += ["warm first call s", "graph breaks", "fallbacks"]
    head.append("status")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        ratio = ratios.get((r["run_id"], r["key"]))
        peak = None if r["peak_bytes"] is None else r["peak_bytes"] / _GIB
        cells = [
            r["model"],
            r["mode"],
            r["label"],
            _number(r["step_ms_median"], 2),
            _number(peak, 2),
            "" if ratio is None else f"{ratio:.2f}x",
            _number(r["compile_s"], 1),
        ]
        if not brief:
            cells += [_number(r["warm_compile_s"], 1), _number(r["graph_breaks"], 0), _fallback_text(r)]
        error = (r["error"] or "").splitlines()[0][: 60 if brief else 200] if r["error"] else ""
        cells.append(r["status"] + (f": {error}" if error else ""))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _figure(panels: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, max(1, panels))
    rows = max(1, math.ceil(panels / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    return plt, fig, axes.flatten()


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def plot_speedup(records: list[dict[str, Any]], path: str) -> None:
    """Bars of speedup over inductor per model/mode (one bar per variant; 1.0 = inductor)."""
    ratios = speedup_vs_inductor(records)
    latest: dict[str, dict[str, float]] = {}
    for r in records:
        if (r["run_id"], r["key"]) in ratios and not _is_baseline(r):
            group = f"{r['model']}\n{r['mode']}" + ("" if r["precision"] == "bf16" else f" {r['precision']}")
            latest.setdefault(group, {})[r["label"]] = ratios[(r["run_id"], r["key"])]
    plt, fig, (ax,) = _figure(1)
    fig.set_size_inches(max(6.0, 1.3 * len(latest) + 2), 4.5)
    labels = sorted({label for bars in latest.values() for label in bars})
    if not labels:
        _no_data(ax, "no rows with an inductor baseline in the same run")
    else:
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            xs = [g + (i - (len(labels) - 1) / 2) * width for g, bars in enumerate(latest.values()) if label in bars]
            ys = [bars[label] for bars in latest.values() if label in bars]
            drawn = ax.bar(xs, ys, width, label=label)
            ax.bar_label(drawn, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(latest)), list(latest))
        ax.set_ylabel("speedup over inductor (inductor step / variant step)")
        ax.legend(fontsize="small")
    ax.set_title(_title(records, "speedup vs inductor"))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pareto(records: list[dict[str, Any]], path: str) -> None:
    """Step time vs peak memory of training rows, one panel per model; a budget sweep is a line."""
    train = [r for r in records if _ok(r) and r["mode"] == "train" and r["peak_bytes"] is not None]
    models = list(dict.fromkeys(r["model"] for r in train))
    plt, fig, axes = _figure(len(models))
    if not models:
        _no_data(axes[0], "no training rows with measured peak memory (GPU only)")
    for ax, model in zip(axes, models):
        series: dict[str, list[dict[str, Any]]] = {}
        for r in train:
            if r["model"] == model:
                unbudgeted = Row(
                    r["model"],
                    r["mode"],
                    r["backend"],
                    r["precision"],
                    None,
                    r["cuda_graphs"],
                    r.get("graphopt_off"),
                    r.get("graphopt_on"),
                )
                series.setdefault(unbudgeted.label, []).append(r)
        for name, points in series.items():
            points.sort(key=lambda r: 1.0 if r["memory_budget"] is None else r["memory_budget"])
            xs = [r["peak_bytes"] / _GIB for r in points]
            ys = [r["step_ms_median"] for r in points]
            ax.plot(xs, ys, marker="o", label=name)
            for r, x, y in zip(points, xs, ys):
                if r["memory_budget"] is not None:
                    ax.annotate(f"{r['memory_budget']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_title(f"{model} train")
        ax.set_xlabel("peak allocated GiB")
        ax.set_ylabel("median step ms")
        ax.legend(fontsize="small")
    for ax in axes[max(1, len(models)) :]:
        ax.set_axis_off()
    fig.suptitle(_title(records, "training: step time vs peak memory (numbers: memory budget)"), fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _title(records: list[dict[str, Any]], what: str) -> str:
    devices = sorted({r["device_name"] for r in records if r["device_name"]})
    dates = sorted({r["date"][:10] for r in records})
    return f"{what}\n{', '.join(devices) or 'no device'} ({', '.join(dates)})"


def write_report(out: str, records: list[dict[str, Any]]) -> list[str]:
    """Write the table and both plots into `out`; returns their paths."""
    os.makedirs(out, exist_ok=True)
    table = os.path.join(out, TABLE_FILE)
    with open(table, "w") as f:
        f.write("# Benchmark results\n\n" + "\n".join(_runs_text(records)) + "\n\n" + markdown_table(records) + "\n")
    speedup, pareto = os.path.join(out, SPEEDUP_PLOT), os.path.join(out, PARETO_PLOT)
    plot_speedup(records, speedup)
    plot_pareto(records, pareto)
    return [table, speedup, pareto]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="run folders holding results.json")
    parser.add_argument("--out", default=None, help="required with several folders; default: the one folder")
    args = parser.parse_args(argv)
    inputs = {os.path.abspath(f) for f in args.folders}
    if len(inputs) > 1 and (args.out is None or os.path.abspath(args.out) in inputs):
        parser.error("merging several folders needs --out, a folder other than the inputs")
    out = args.out or args.folders[0]
    records = load(args.folders)
    if os.path.abspath(out) not in inputs:
        write_results(out, records)
    for path in write_report(out, records):
        print(path)
    print(markdown_table(records, brief=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
