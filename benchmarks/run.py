"""Run the benchmark suite: `python -m benchmarks.run --models gpt2,llama --out DIR`.

Each row (model x mode x backend variant) runs in its own process
(`benchmarks.measure`, started one row ahead by `benchmarks.row_process` so its
imports overlap the previous row), one after another, under a per-row timeout and an
overall time budget: a row that fails or hangs is recorded with its error and
the run goes on; rows that no longer fit the budget are recorded as skipped, so
a run inside a time-limited device call always ends with its results written.
DIR gets results.json (rewritten after every row), results.md, the plots and one
log per row under logs/.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from benchmarks import backends, environment, report
from benchmarks.models import MODELS, SUITE
from benchmarks.record import new_record, write_results
from benchmarks.row_process import RowProcess
from benchmarks.rows import BACKENDS, MODES, PRECISIONS, plan_rows

MIN_TIMED_STEPS = 20
# Seconds kept at the end of the time budget for writing the table and plots.
REPORT_RESERVE_S = 20.0
# A row left less than this cannot compile and time even a small model: it is skipped, not started and killed.
MIN_ROW_S = 20.0


def _choices(valid: tuple[str, ...] | list[str]):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        bad = [item for item in items if item not in valid]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or 'nothing'} not in: {', '.join(valid)}")
        return items

    return parse


def _budgets(text: str) -> list[float]:
    try:
        budgets = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if any(not 0.0 <= b <= 1.0 for b in budgets):
        raise argparse.ArgumentTypeError("memory budgets are fractions between 0 and 1")
    return budgets


def _boolean_options(default: bool) -> Callable[[str], list[str]]:
    """Parses a comma-separated list of graphopt's boolean options whose default is `default`;
    an entry of several joined by '+' (a+b) is one row that switches them all."""

    def parse(text: str) -> list[str]:
        from graphopt.options import Options

        switchable = [f.name for f in dataclasses.fields(Options) if f.default is default]
        names = [n for n in text.split(",") if n]
        unknown = [part for n in names for part in n.split("+") if part not in switchable]
        if unknown:
            state = "on" if default else "off"
            raise argparse.ArgumentTypeError(
                f"not a graphopt option that is {state} by default: {', '.join(unknown)} (valid: {', '.join(switchable)})"
            )
        return names

    return parse


def _steps(text: str) -> int:
    steps = int(text)
    if steps < MIN_TIMED_STEPS:
        raise argparse.ArgumentTypeError(f"at least {MIN_TIMED_STEPS} timed steps")
    return steps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    listed = "comma-separated, of {}; default {}".format
    parser.add_argument(
        "--models", type=_choices(list(MODELS)), default=list(SUITE), help=listed(",".join(MODELS), ",".join(SUITE))
    )
    parser.add_argument("--modes", type=_choices(MODES), default=list(MODES), help=listed(",".join(MODES), "all"))
    parser.add_argument(
        "--backends", type=_choices(BACKENDS), default=list(BACKENDS), help=listed(",".join(BACKENDS), "all")
    )
    parser.add_argument(
        "--precisions",
        type=_choices(PRECISIONS),
        default=["bf16"],
        help=listed(",".join(PRECISIONS), "bf16") + " (bf16: autocast over fp32 weights)",
    )
    parser.add_argument(
        "--memory-budgets",
        type=_budgets,
        default=[],
        help="training rows of inductor (activation_memory_budget) and graphopt (memory_budget) at each, e.g. 0.5,0.3",
    )
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="add CUDA-graph rows: inductor reduce-overhead, graphopt cuda_graphs"
    )
    parser.add_argument(
        "--graphopt-ablations",
        type=_boolean_options(default=True),
        default=[],
        help="comma-separated boolean graphopt options (default on) to also run turned off, e.g. channels_last,pad_matmuls",
    )
    parser.add_argument(
        "--graphopt-trials",
        type=_boolean_options(default=False),
        default=[],
        help="comma-separated boolean graphopt options (default off) to also run turned on, e.g. remat_compress; a+b: one row with both on",
    )
    parser.add_argument("--steps", type=_steps, default=MIN_TIMED_STEPS, help="timed steps per row (>= 20)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=10,
        help="untimed steps after the first call (host-bound rows need several to settle after a compile)",
    )
    parser.add_argument("--input-sets", type=int, default=3, help="input batches the steps rotate through")
    parser.add_argument(
        "--no-warm-compile",
        dest="warm_compile",
        action="store_false",
        help="skip the warm compiles after the timed steps (sweeps that measure steps and memory only)",
    )
    parser.add_argument(
        "--profile-warm-compile",
        action="store_true",
        help="cProfile each row's last warm compile: host seconds per package (torch's Dynamo, AOTAutograd, graphopt, triton ...)",
    )
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--time-budget-s", type=float, default=None, help="skip rows that no longer fit; no limit if unset")
    parser.add_argument("--row-timeout-s", type=float, default=600.0, help="kill a row's process after this long")
    parser.add_argument(
        "--git-commit", default=None, help="commit to record where the checkout has no .git (default: git rev-parse HEAD)"
    )
    parser.add_argument("--out", required=True, help="folder for results.json, results.md, plots, logs")
    return parser.parse_args(argv)


def _summary(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return f"[yellow]{record['status']}[/]: {(record['error'] or '').splitlines()[0][:160]}"
    peak = f", peak {record['peak_bytes'] / 2**30:.2f} GiB" if record["peak_bytes"] is not None else ""
    if record["allocations_per_step"] is not None:
        peak += f", {record['allocations_per_step']:.0f} allocations/step"
    if record["host_ms_median"] is not None:
        peak += f", host {record['host_ms_median']:.2f} ms/step"
    warm = f", warm {record['warm_compile_s']:.1f} s" if record["warm_compile_s"] is not None else ""
    profile = record["warm_compile_profile"]
    if profile:
        shares = [f"{name} {seconds / profile['total_s']:.0%}" for name, seconds in list(profile["by_package"].items())[:4]]
        warm += f" ({', '.join(shares)})"
    return f"[green]ok[/]: {record['step_ms_median']:.2f} ms{peak}, first call {record['compile_s']:.1f} s{warm}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    start = time.monotonic()
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run = {
        "run_id": uuid.uuid4().hex[:12],
        "date": environment.utc_now(),
        "command": environment.command_line(argv),
        "git_commit": args.git_commit or environment.git_commit(),
    }
    settings = {
        "steps": args.steps,
        "warmup": args.warmup,
        "input_sets": args.input_sets,
        "warm_compile": args.warm_compile,
        "profile_warm_compile": args.profile_warm_compile,
    }
    rows = plan_rows(
        args.models,
        args.modes,
        args.backends,
        args.precisions,
        args.memory_budgets,
        args.cuda_graphs,
        args.graphopt_ablations,
        args.graphopt_trials,
    )
    console = Console(stderr=True)
    records: list[dict[str, Any]] = []
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    planned = [new_record(r.as_dict(), r.key, r.label, run, settings, backends.compile_options(r, None)) for r in rows]
    runnable = [i for i, row in enumerate(rows) if backends.unsupported_reason(row) is None]
    started: dict[int, RowProcess] = {}  # the current row's process and the one started ahead
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("rows", total=len(rows))
            for i, row in enumerate(rows):
                progress.update(task, description=row.key)
                record = planned[i]
                left = None
                if args.time_budget_s is not None:
                    left = args.time_budget_s - (time.monotonic() - start) - REPORT_RESERVE_S
                if reason := backends.unsupported_reason(row):
                    record["error"] = reason
                elif left is not None and left < MIN_ROW_S:
                    record["error"] = f"time budget of {args.time_budget_s:.0f} s used up"
                    if i in started:
                        started.pop(i).cancel()
                else:
                    process = started.pop(i, None) or RowProcess(row, record, device, args.out)
                    ahead = next((j for j in runnable if j > i), None)
                    if ahead is not None:
                        started[ahead] = RowProcess(rows[ahead], planned[ahead], device, args.out)
                    timeout = args.row_timeout_s if left is None else min(args.row_timeout_s, left)
                    record = process.measure(timeout)
                records.append(record)
                write_results(args.out, records)
                progress.console.print(f"{row.key}: {_summary(record)}")
                progress.advance(task)
    finally:
        for process in started.values():
            process.cancel()
    report.write_report(args.out, records)
    print(report.markdown_table(records, brief=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
