"""`graphopt explain SCRIPT.py [args]`: what graphopt did to every graph a script compiled."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from graphopt.cli_script import check_script
from graphopt.run_record import human_bytes, observe_script, run_summary

HELP = "run a script with graphopt as the backend; print graph breaks, passes, fallbacks, cache use"
EXAMPLE = """example:
  graphopt explain train.py --steps 2
  graphopt explain --details train.py           # every decision of every pass, not just its summary
  graphopt explain --force-backend infer.py     # compile with graphopt even where the script asks for inductor
"""


RUNS_SCRIPT = True  # arguments graphopt does not know go to the script


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "%(prog)s [-h] [--force-backend] [--details] SCRIPT.py [script args ...]"
    parser.add_argument("script", help="the Python script to run (it calls torch.compile itself)")
    parser.add_argument(
        "--force-backend", action="store_true", help="make every torch.compile in the script use graphopt"
    )
    parser.add_argument(
        "--details", action="store_true", help="every field of every pass report (fusion groups, plans, ...)"
    )


def _ops_line(counts: dict[str, int], limit: int = 8) -> str:
    total = sum(counts.values())
    shown = ", ".join(f"{name.removeprefix('aten.')} x{n}" for name, n in list(counts.items())[:limit])
    more = f", ... ({len(counts) - limit} more kinds)" if len(counts) > limit else ""
    return f"{total} ops: {shown}{more}" if total else "0 ops"


def _cost_text(cost: Any) -> str:
    if not isinstance(cost, dict):
        return ""
    parts = []
    if isinstance(cost.get("bytes_moved"), (int, float)):
        parts.append(f"moves {human_bytes(cost['bytes_moved'])}")
    if isinstance(cost.get("seconds"), (int, float)):
        parts.append(f"predicted {cost['seconds'] * 1e6:.1f} us")
    return ", " + ", ".join(parts) if parts else ""


_MAX_ITEMS = 30


def _add_fields(branch: Tree, report: dict[str, Any]) -> None:
    """A report's fields, lists and dicts one item per line (fusion groups, remat plans, ...)."""
    for key, value in report.items():
        if isinstance(value, (list, dict)) and value:
            items = list(value.items()) if isinstance(value, dict) else list(enumerate(value))
            sub = branch.add(f"{key} ({len(items)})")
            for index, item in items[:_MAX_ITEMS]:
                text = ", ".join(f"{k}={v}" for k, v in item.items()) if isinstance(item, dict) else str(item)
                sub.add(escape(f"{index}: {text}"))
            if len(items) > _MAX_ITEMS:
                sub.add(f"... {len(items) - _MAX_ITEMS} more")
        else:
            branch.add(escape(f"{key} = {value}"))


def render_graph(graph: dict[str, Any], details: bool = False) -> Tree:
    title = f"[bold]{graph['name']}[/bold] ({graph['kind']})"
    tree = Tree(title)
    if graph["error"]:
        tree.add(f"[red]pipeline failed, graph runs as eager ATen:[/red] {graph['error']}")
    tree.add(f"input:  {_ops_line(graph['ops_in'])}")
    tree.add(f"output: {_ops_line(graph['ops_out'])}")
    passes = tree.add("passes")
    for record in graph["passes"]:
        branch = passes.add(f"[cyan]{record['name']}[/cyan] {record['seconds'] * 1e3:.1f} ms: {record['summary']}")
        if details and isinstance(record["report"], dict):
            _add_fields(branch, record["report"])
    if graph["kernels"]:
        kernels = tree.add(f"kernels ({len(graph['kernels'])})")
        for kernel in graph["kernels"]:
            kernels.add(f"{kernel['name']}: {len(kernel['original_nodes'])} nodes{_cost_text(kernel['cost'])}")
    if graph["memory"]:
        peak = max(live for _, live in graph["memory"])
        tree.add(f"live memory in node order: peak {human_bytes(peak)} (estimate from shapes)")
    if graph["cache"]:
        lookups = ", ".join(f"{ns}: {c['hits']} hit / {c['misses']} miss" for ns, c in graph["cache"].items())
        tree.add(f"tuning cache: {lookups}")
    else:
        tree.add("tuning cache: no lookups")
    return tree


def render(summary: dict[str, Any], console: Console, details: bool = False) -> None:
    console.print(
        f"[bold]{summary['script']}[/bold]: {len(summary['graphs'])} graph(s) compiled by graphopt "
        f"in {summary['seconds']:.1f} s"
    )
    breaks = summary["graph_breaks"]
    if breaks:
        table = Table(title=f"graph breaks ({sum(breaks.values())})", show_lines=False)
        table.add_column("count", justify="right")
        table.add_column("reason")
        for reason, count in sorted(breaks.items(), key=lambda item: -item[1]):
            table.add_row(str(count), reason.strip().splitlines()[0])
        console.print(table)
    else:
        console.print("graph breaks: none")
    if not summary["graphs"]:
        console.print(
            'graphopt compiled nothing: does the script call torch.compile(..., backend="graphopt")? '
            "(--force-backend makes every torch.compile use graphopt)"
        )
    for graph in summary["graphs"]:
        console.print(render_graph(graph, details))
    if summary["fallbacks"]:
        table = Table(title="eager fallbacks")
        for column in ("op", "reason", "times"):
            table.add_column(column)
        for f in summary["fallbacks"]:
            table.add_row(f["op"], f["reason"], str(f["count"]))
        console.print(table)
    else:
        console.print("eager fallbacks: none")


def main(args: argparse.Namespace, console: Console) -> int:
    script = check_script(args.script)
    render(run_summary(observe_script(script, args.args, force_backend=args.force_backend)), console, args.details)
    return 0
