"""`graphopt report DIR`: one self-contained HTML page from a `graphopt dump` folder."""

from __future__ import annotations

import argparse
import json
import os

from rich.console import Console

from graphopt.cli_script import CliError
from graphopt.report_html import render_report
from graphopt.run_record import RUN_FILE

HELP = "write one self-contained HTML page (pass timeline, kernels and their cost, memory plan) for a dump"
EXAMPLE = """example:
  graphopt dump train.py --out /tmp/dump
  graphopt report /tmp/dump                   # writes /tmp/dump/report.html; open it in a browser
  graphopt report /tmp/dump --out ~/run1.html
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a folder written by `graphopt dump`")
    parser.add_argument("--out", help="the HTML file to write (default: DIR/report.html)")


def main(args: argparse.Namespace, console: Console) -> int:
    run_file = os.path.join(args.dir, RUN_FILE)
    if not os.path.isfile(run_file):
        raise CliError(f"{args.dir} is not a `graphopt dump` folder (no {RUN_FILE})")
    try:
        with open(run_file) as f:
            summary = json.load(f)
        page = render_report(summary, args.dir)
    except (ValueError, KeyError, TypeError) as e:
        raise CliError(f"{run_file} is not readable as a graphopt run: {type(e).__name__}: {e}") from None
    out = args.out or os.path.join(args.dir, "report.html")
    with open(out, "w") as f:
        f.write(page)
    console.print(f"wrote {out} ({len(summary['graphs'])} graphs)")
    return 0
