"""`graphopt diff DIR --pass NAME`: what one pass changed, as a unified diff of the
readable graph before and after it, for every graph folder of a dump (or one folder)."""

from __future__ import annotations

import argparse
import difflib
import os
import re

from rich.console import Console
from rich.syntax import Syntax

from graphopt.cli_script import CliError

HELP = "show what a pass changed: unified diff of the graph before/after it, from a dump folder"
EXAMPLE = """example:
  graphopt dump train.py --out /tmp/dump
  graphopt diff /tmp/dump --pass cleanup
  graphopt diff /tmp/dump/g0_frame0_0_forward --pass fusion
"""

_STAGE = re.compile(r"^(\d\d)_(.+)\.py$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="a `graphopt dump` folder, or one graph folder inside it")
    parser.add_argument("--pass", dest="pass_name", required=True, help="the pass whose change to show")
    parser.add_argument("--context", type=int, default=3, help="lines of context around each change (default 3)")


def _stages(folder: str) -> list[tuple[str, str]]:
    """(stage name, file path) in pipeline order: 'input', then each pass."""
    found = []
    if not os.path.isdir(folder):
        return []
    for name in os.listdir(folder):
        match = _STAGE.match(name)
        if match:
            found.append((int(match.group(1)), match.group(2), os.path.join(folder, name)))
    return [("input" if index == 0 else stage, path) for index, stage, path in sorted(found)]


def _code(path: str) -> list[str]:
    """The graph's code without the dump's header comments (which name the pass and its time)."""
    with open(path) as f:
        lines = f.readlines()
    return [line for line in lines if not line.startswith(("# graph ", "# report: "))]


def pass_diff(folder: str, pass_name: str, context: int = 3) -> str | None:
    """The diff of one graph folder, or None if that graph did not run the pass."""
    stages = _stages(folder)
    for position, (stage, path) in enumerate(stages):
        if stage == pass_name and position > 0:
            before_name, before_path = stages[position - 1]
            return "".join(
                difflib.unified_diff(
                    _code(before_path),
                    _code(path),
                    fromfile=f"{os.path.basename(folder)} before {pass_name} ({before_name})",
                    tofile=f"{os.path.basename(folder)} after {pass_name}",
                    n=context,
                )
            )
    return None


def main(args: argparse.Namespace, console: Console) -> int:
    if not os.path.isdir(args.dir):
        raise CliError(f"no such dump folder: {args.dir}")
    folders = (
        [args.dir]
        if _stages(args.dir)
        else [
            os.path.join(args.dir, name)
            for name in sorted(os.listdir(args.dir))
            if _stages(os.path.join(args.dir, name))
        ]
    )
    if not folders:
        raise CliError(f"{args.dir} holds no graph stages (NN_<pass>.py files); make one with `graphopt dump`")
    shown = 0
    passes_seen: set[str] = set()
    for folder in folders:
        passes_seen.update(stage for stage, _ in _stages(folder))
        diff = pass_diff(folder, args.pass_name, args.context)
        if diff is None:
            continue
        shown += 1
        if diff:
            console.print(Syntax(diff, "diff", theme="ansi_dark", background_color="default"))
        else:
            console.print(f"{os.path.basename(folder)}: pass {args.pass_name!r} changed nothing")
    if not shown:
        valid = ", ".join(sorted(passes_seen - {"input"}))
        raise CliError(f"no graph in {args.dir} ran a pass named {args.pass_name!r}; passes found: {valid}")
    return 0
