"""Memory-budget sweep of training: graphopt's remat (`memory_budget`) against inductor
(`torch._functorch.config.activation_memory_budget`) at the same budgets, in one run.

    python -m benchmarks.remat_sweep --models gpt2 --out DIR
    python -m benchmarks.remat_sweep --summarize DIR1 DIR2 --out MERGED   # merge invocations

The rows are the benchmark suite's own (`benchmarks.run`: one process per row, CUDA
events, `max_memory_allocated`, bf16 autocast), so DIR also gets the suite's
results.json/results.md/pareto.png. On top, this writes remat_sweep.json and
remat_sweep.md: per model and budget, both backends' step time and peak memory,
graphopt's speedup over inductor at that budget, graphopt's slowdown over its own
budget-1.0 step, the remat pass's seconds, and the issue's goals checked: graphopt
dominates (at every inductor point, a graphopt point with no more peak memory is at
least 5% faster) and its slowdown at budget 0.5 stays under 5%.

Note: the two budgets are not the same quantity. graphopt's is a fraction of the
activation memory of saving everything; inductor's interpolates between saving only
inputs (0) and its default min-cut plan (1). The Pareto plot (measured peak memory
against step time) is what compares them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from benchmarks import report, run

BUDGETS = (1.0, 0.7, 0.5, 0.3, 0.1)
MODELS = ("gpt2", "llama", "vit", "resnet50")
# One model's 12 rows (two backends x (default + 5 budgets)) fit a 10-minute device call.
DEFAULT_TIME_BUDGET_S = 540.0
SUMMARY_JSON, SUMMARY_TABLE = "remat_sweep.json", "remat_sweep.md"
# The goals.
DOMINANCE_MARGIN = 0.95  # graphopt at most this fraction of inductor's step time at no more memory
HALF_BUDGET_SLOWDOWN = 1.05  # graphopt's step at budget 0.5 over its own at 1.0


def _point(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "step_ms": record["step_ms_median"],
        "peak_gib": record["peak_bytes"] / 2**30 if record["peak_bytes"] is not None else None,
        "compile_s": record["compile_s"],
        "remat_s": record["pass_seconds"].get("remat"),
    }


def _dominates(graphopt: list[dict[str, Any]], inductor: list[dict[str, Any]]) -> bool | None:
    """At every inductor point, some graphopt point uses no more memory and is 5% faster."""
    measured = [p for p in graphopt + inductor if p["peak_gib"] is not None]
    if not measured or not inductor or not graphopt:
        return None
    return all(
        any(g["peak_gib"] <= i["peak_gib"] and g["step_ms"] <= DOMINANCE_MARGIN * i["step_ms"] for g in graphopt)
        for i in inductor
    )


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: both backends' points by budget (None: the backend's default) and the goals."""
    ok = [r for r in records if r["status"] == "ok" and r["mode"] == "train" and not r["cuda_graphs"]]
    models: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in ok):
        points = {
            backend: {r["memory_budget"]: _point(r) for r in ok if r["model"] == model and r["backend"] == backend}
            for backend in ("graphopt", "inductor")
        }
        graphopt, inductor = points["graphopt"], points["inductor"]
        full, half = graphopt.get(1.0), graphopt.get(0.5)
        models[model] = {
            "points": {b: {str(k): v for k, v in p.items()} for b, p in points.items()},
            "graphopt_dominates": _dominates(list(graphopt.values()), list(inductor.values())),
            "graphopt_half_budget_slowdown": half["step_ms"] / full["step_ms"] if full and half else None,
            "max_remat_s": max((p["remat_s"] for p in graphopt.values() if p["remat_s"] is not None), default=None),
        }
    budgets = sorted({r["memory_budget"] for r in ok if r["memory_budget"] is not None}, reverse=True)
    return {"budgets": budgets, "models": models}


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def table(summary: dict[str, Any]) -> str:
    lines = [
        "| model | budget | graphopt ms | graphopt GiB | inductor ms | inductor GiB | speedup | vs own 1.0 | remat s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    goals = []
    for model, entry in summary["models"].items():
        g, i = entry["points"]["graphopt"], entry["points"]["inductor"]
        full = g.get("1.0")
        for budget in ["None", *(str(b) for b in summary["budgets"])]:
            gp, ip = g.get(budget), i.get(budget)
            if gp is None and ip is None:
                continue
            speedup = ip["step_ms"] / gp["step_ms"] if gp and ip else None
            own = gp["step_ms"] / full["step_ms"] if gp and full else None
            lines.append(
                f"| {model} | {'default' if budget == 'None' else budget} "
                f"| {_num(gp and gp['step_ms'], 2)} | {_num(gp and gp['peak_gib'], 2)} "
                f"| {_num(ip and ip['step_ms'], 2)} | {_num(ip and ip['peak_gib'], 2)} "
                f"| {_num(speedup, 3)} | {_num(own, 3)} | {_num(gp and gp['remat_s'], 2)} |"
            )
        goals.append(
            f"- {model}: graphopt dominates inductor (>= {1 / DOMINANCE_MARGIN - 1:.0%} faster at no more memory): "
            f"{entry['graphopt_dominates']}; slowdown at budget 0.5 vs 1.0: "
            f"{_num(entry['graphopt_half_budget_slowdown'], 3)} (goal < {HALF_BUDGET_SLOWDOWN}); "
            f"longest remat pass: {_num(entry['max_remat_s'], 2)} s (all graphs of one compile)"
        )
    return "\n".join(lines + [""] + goals)


def write_summary(out: str, records: list[dict[str, Any]]) -> str:
    summary = summarize(records)
    with open(os.path.join(out, SUMMARY_JSON), "w") as f:
        json.dump(summary, f, indent=1)
    text = table(summary)
    with open(os.path.join(out, SUMMARY_TABLE), "w") as f:
        f.write("# Memory-budget sweep: graphopt remat vs inductor\n\n" + text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.remat_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2", help=f"comma-separated, of {','.join(MODELS)}; default gpt2")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="comma-separated fractions")
    parser.add_argument("--time-budget-s", type=float, default=DEFAULT_TIME_BUDGET_S)
    parser.add_argument("--git-commit", default=None, help="for a checkout without .git (the device machine)")
    parser.add_argument("--summarize", nargs="+", metavar="DIR", help="only merge and summarize earlier runs' folders")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    if args.summarize:
        records = report.load(args.summarize)
        if os.path.abspath(args.out) not in {os.path.abspath(f) for f in args.summarize}:
            report.main([*args.summarize, "--out", args.out])
    else:
        suite_args = [
            "--models", args.models, "--modes", "train", "--backends", "graphopt,inductor",
            "--memory-budgets", args.budgets, "--time-budget-s", str(args.time_budget_s), "--out", args.out,
            "--no-warm-compile",
        ]  # fmt: skip
        if args.git_commit:
            suite_args += ["--git-commit", args.git_commit]
        run.main(suite_args)
        records = report.load([args.out])
    print(write_summary(args.out, records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
