"""`graphopt dump SCRIPT.py --out DIR`: every stage of every graph as readable Python.

Layout (the same as the `debug_dir` option's, written by graphopt/debug_dump.py):
DIR/<graph>/00_input.py, NN_<pass>.py per pass, plus DIR/<graph>/kernels/<name>.py
with the Triton source of each generated kernel, and DIR/run.json (what
`graphopt report` and `graphopt diff` read).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

from rich.console import Console

from graphopt.cli_script import CliError, check_script
from graphopt.debug_dump import write_graph_records
from graphopt.run_record import RUN_FILE, kernel_source, kernels, observe_script, run_summary, write_run_summary

HELP = "run a script and write every stage of every compiled graph (and its Triton kernels) as files"
EXAMPLE = """example:
  graphopt dump train.py --out /tmp/dump --steps 1
  graphopt diff /tmp/dump --pass cleanup
  graphopt report /tmp/dump
"""


RUNS_SCRIPT = True  # arguments graphopt does not know go to the script


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s [-h] [--force-backend] SCRIPT.py --out DIR [script args ...]"
    parser.add_argument("script", help="the Python script to run")
    parser.add_argument("--out", required=True, help="folder to write (created if missing)")
    parser.add_argument(
        "--force-backend", action="store_true", help="make every torch.compile in the script use graphopt"
    )


def _remove_previous_dump(folder: str) -> None:
    """A dump into the same folder replaces the previous one (only the folders its run.json names)."""
    previous = os.path.join(folder, RUN_FILE)
    if not os.path.isfile(previous):
        return
    try:
        with open(previous) as f:
            names = [g.get("folder") for g in json.load(f).get("graphs", [])]
    except (ValueError, AttributeError):
        return
    for name in names:
        if isinstance(name, str) and name and os.sep not in name and name not in (".", ".."):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def main(args: argparse.Namespace, console: Console) -> int:
    script = check_script(args.script)
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create {args.out}: {e.strerror}") from None
    run = observe_script(script, args.args, force_backend=args.force_backend)
    _remove_previous_dump(args.out)
    summary = run_summary(run)
    for info, graph in zip(run.graphs, summary["graphs"]):
        folder = write_graph_records(args.out, info.name, info.input_gm, info.records)
        graph["folder"] = os.path.basename(folder)
        written = list(kernels(info.output_gm))
        if written:
            os.makedirs(os.path.join(folder, "kernels"), exist_ok=True)
        for node, kernel in written:
            name = getattr(kernel, "name", node)
            with open(os.path.join(folder, "kernels", f"{name}.py"), "w") as f:
                f.write(f"# kernel {name}, called by node {node} of graph {info.name}\n")
                f.write(kernel_source(kernel) or "")
        stages = len(info.records) + 1
        console.print(f"{folder}: {stages} stages, {len(written)} kernels")
    path = write_run_summary(args.out, summary)
    console.print(f"wrote {len(run.graphs)} graph folder(s) and {path}")
    return 0
