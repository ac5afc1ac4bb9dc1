"""Running a user's script for the CLI: as `python SCRIPT.py args` would, with
graphopt listening, and with any failure turned into a one-line CliError.

`--force-backend` swaps torch.compile for a wrapper that compiles with graphopt
whatever backend the script asked for, so a script written for inductor (or for
no backend at all) can be explained without editing it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import runpy
import sys
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import torch


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def check_script(path: str) -> str:
    if not os.path.isfile(path):
        raise CliError(f"no such script: {path}")
    return os.path.abspath(path)


def _where_it_raised(error: BaseException, script: str) -> str:
    """'script.py:12' for the innermost frame of the user's script, else the script's name."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.abspath(f.filename) == script]
    name = os.path.basename(script)
    return f"{name}:{frames[-1].lineno}" if frames else name


def _graphopt_compile(original):
    @functools.wraps(original)
    def compile_with_graphopt(model=None, **kwargs: Any):
        if kwargs.get("backend", "inductor") != "graphopt":
            # inductor's mode/options mean nothing to graphopt
            kwargs.pop("mode", None)
            kwargs.pop("options", None)
        kwargs["backend"] = "graphopt"
        return original(model, **kwargs) if model is not None else original(**kwargs)

    return compile_with_graphopt


def _identity_compile(model=None, **kwargs: Any):
    """torch.compile that compiles nothing: the script's eager reference."""
    return model if model is not None else (lambda fn: fn)


@contextlib.contextmanager
def patched_compile(mode: str | None) -> Iterator[None]:
    """mode None: leave torch.compile alone; "graphopt": force graphopt; "eager": compile nothing."""
    if mode is None:
        yield
        return
    original = torch.compile
    torch.compile = _graphopt_compile(original) if mode == "graphopt" else _identity_compile
    try:
        yield
    finally:
        torch.compile = original


@contextlib.contextmanager
def script_environment(script: str, args: Sequence[str]) -> Iterator[None]:
    """sys.argv and sys.path[0] as `python SCRIPT args` would set them; restored afterwards."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(script))
    try:
        yield
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


@contextlib.contextmanager
def _script_failures(script: str) -> Iterator[None]:
    """Any failure of the script's own code becomes a one-line CliError naming where it raised."""
    try:
        yield
    except SystemExit as e:
        if e.code not in (None, 0):
            raise CliError(f"{os.path.basename(script)} exited with status {e.code}") from None
    except CliError:
        raise
    except Exception as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CliError(f"{_where_it_raised(e, script)}: {type(e).__name__}: {message}"[:500]) from None


def run_script(script: str, args: Sequence[str]) -> None:
    """Execute the script as `python SCRIPT args` would."""
    with script_environment(script, args), _script_failures(script):
        runpy.run_path(script, run_name="__main__")


def call_main(script: str, args: Sequence[str]) -> Any:
    """Load the script as a module (its `if __name__ == "__main__":` block does not run) and
    return what its `main()` returns: how `graphopt bisect` gets outputs to compare."""
    with script_environment(script, args), _script_failures(script):
        namespace = runpy.run_path(script, run_name="__graphopt_script__")
        main = namespace.get("main")
        if not callable(main):
            raise CliError(f"{os.path.basename(script)} defines no main(); bisect compares what main() returns")
        return main()
