"""The `graphopt` command: explain, dump, diff, bisect, cache, report.

Each subcommand lives in its own graphopt/cli_<name>.py with HELP, EXAMPLE,
add_arguments(parser) and main(args, console) -> exit code. This file only wires
them up and turns any user-facing failure (CliError, a bad path) into one line
on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from graphopt.cli_script import CliError

SUBCOMMANDS = ("explain", "dump", "diff", "bisect", "cache", "report")


def _module(name: str):
    import importlib

    return importlib.import_module(f"graphopt.cli_{name}")


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors as one line and exit code 2 (argparse's own convention)."""

    def error(self, message: str):
        raise CliError(message if self.prog == "graphopt" else f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="graphopt",
        description="Inspect and debug what the graphopt torch.compile backend does to your model.",
        epilog="example:\n  graphopt explain train.py\n  graphopt <command> --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name in SUBCOMMANDS:
        module = _module(name)
        sub = commands.add_parser(
            name,
            help=module.HELP,
            description=module.HELP,
            epilog=module.EXAMPLE,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
        )
        module.add_arguments(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    console = Console(highlight=False, soft_wrap=True)
    try:
        args, extra = build_parser().parse_known_args(argv)
        module = _module(args.command)
        if getattr(module, "RUNS_SCRIPT", False):
            args.args = extra
        elif extra:
            raise CliError(f"graphopt {args.command}: unrecognized arguments: {' '.join(extra)}")
        return module.main(args, console)
    except CliError as e:
        print(f"graphopt: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"graphopt: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
