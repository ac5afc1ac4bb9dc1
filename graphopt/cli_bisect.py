"""`graphopt bisect SCRIPT.py`: which pass (and which kernel) makes graphopt differ from eager."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.syntax import Syntax

from graphopt.bisect import Bisector
from graphopt.cli_script import check_script

HELP = "find the first pass, then the first generated kernel, that makes graphopt's result differ from eager"
EXAMPLE = """how the script states its check:
  it defines main() that builds its model and inputs and returns the outputs to compare
  (a tensor, or lists/tuples/dicts of tensors and numbers), e.g. the loss and the gradients.
  main() compiles with torch.compile(..., backend="graphopt") itself (or use --force-backend).
  bisect loads the script afresh for every trial with torch.manual_seed(0) and calls main():
  once with torch.compile compiling nothing (eager), then with graphopt running only the
  first k passes, and then only the first j kernels of the culprit pass.

    def main():
        model = torch.compile(MyModel(), backend="graphopt")
        x = torch.randn(8, 16, requires_grad=True)
        loss = model(x).sum()
        loss.backward()
        return loss, x.grad

example:
  graphopt bisect model.py --rtol 1e-4 --atol 1e-5 --repro /tmp/repro.py
  python /tmp/repro.py        # exit status 1 while the bug is there
"""

RUNS_SCRIPT = True  # arguments graphopt does not know go to the script


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s [-h] [options] SCRIPT.py [script args ...]"
    parser.add_argument("script", help="the script; it defines main() returning the outputs to compare")
    parser.add_argument("--rtol", type=float, default=1.3e-6, help="relative tolerance (default 1.3e-6, float32's)")
    parser.add_argument("--atol", type=float, default=1e-5, help="absolute tolerance (default 1e-5)")
    parser.add_argument("--repro", default="graphopt_repro.py", help="where to write the repro file")
    parser.add_argument(
        "--force-backend", action="store_true", help="make every torch.compile in the script use graphopt"
    )


def main(args: argparse.Namespace, console: Console) -> int:
    script = check_script(args.script)
    bisector = Bisector(
        script, args.args, rtol=args.rtol, atol=args.atol, force_backend=args.force_backend, log=console.print
    )
    result = bisector.run(args.repro)
    if result.difference is None:
        console.print(f"graphopt matches eager within rtol={args.rtol}, atol={args.atol}: nothing to bisect")
        return 0
    console.print(
        f"[bold red]first pass that changes the result: {result.culprit}[/bold red] "
        f"(pass {result.culprit_index + 1} of {len(result.passes)}: {', '.join(result.passes)}; "
        f"{result.trials} trials)"
    )
    if result.kernel:
        console.print(
            f"[bold red]first kernel that changes the result: {result.kernel}[/bold red] "
            f"(fuses {', '.join(result.kernel_ops)})"
        )
    else:
        console.print(result.kernel_note)
    if result.repro_path:
        console.print(f"repro: {result.repro_path} ({result.repro_note})")
        with open(result.repro_path) as f:
            console.print(Syntax(f.read(), "python", theme="ansi_dark", background_color="default"))
    else:
        console.print(f"no repro written: {result.repro_note}")
    return 0
