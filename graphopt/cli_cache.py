"""`graphopt cache ls | show KEY | clear | export FILE | import FILE | stats`."""

from __future__ import annotations

import argparse
import json
import os
import time

from rich.console import Console
from rich.table import Table

from graphopt.cache import TuningCache, default_cache_dir, open_cache
from graphopt.cli_script import CliError
from graphopt.options import Options

HELP = "list, inspect, clear, export or import the tuning cache"
EXAMPLE = """example:
  graphopt cache ls
  graphopt cache show 3f2a9c                  # any unique key prefix
  graphopt cache export plans.json            # ship tuned plans with a model ...
  graphopt cache import plans.json            # ... and use them on another machine
  graphopt cache --dir /tmp/cache stats       # default: $GRAPHOPT_CACHE_DIR, else the user cache dir
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", help="the cache folder (default: $GRAPHOPT_CACHE_DIR, else the user cache dir)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=type(parser))
    ls = actions.add_parser("ls", help="one line per entry")
    ls.add_argument("--namespace", help="only this namespace (e.g. remat, fusion)")
    show = actions.add_parser("show", help="the stored value of an entry")
    show.add_argument("key", help="the entry's key, or a unique prefix of it")
    actions.add_parser("clear", help="delete every entry and statistic")
    export = actions.add_parser("export", help="write the entries to a JSON file")
    export.add_argument("file")
    export.add_argument("--namespace", help="only this namespace")
    load = actions.add_parser("import", help="add the entries of an exported JSON file")
    load.add_argument("file")
    actions.add_parser("stats", help="size, entries per namespace, hits and misses per graph")


def _open(folder: str | None) -> TuningCache:
    cache = open_cache(Options(cache_dir=folder) if folder else None)
    if cache is None:
        raise CliError(f"cannot open the tuning cache in {folder or default_cache_dir()}")
    return cache


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def main(args: argparse.Namespace, console: Console) -> int:
    cache = _open(args.dir)
    if args.action == "ls":
        table = Table(title=cache.path)
        for column in ("namespace", "key", "graph", "bytes", "hits", "last used"):
            table.add_column(column)
        for e in cache.entries(args.namespace):
            size = len(json.dumps(e.value))
            table.add_row(e.namespace, e.key, e.graph_name or "-", str(size), str(e.hits), _when(e.last_used))
        console.print(table)
    elif args.action == "show":
        found = cache.find(args.key)
        if not found:
            raise CliError(f"no cache entry with key {args.key!r} in {cache.path}")
        if len({e.key for e in found}) > 1:
            raise CliError(f"key prefix {args.key!r} matches {len(found)} entries; give more of the key")
        for e in found:
            console.print(
                f"[bold]{e.namespace}[/bold] {e.key} (graph {e.graph_name or '-'}, {e.hits} hits, "
                f"created {_when(e.created)})"
            )
            console.print_json(json.dumps(e.value))
    elif args.action == "clear":
        console.print(f"removed {cache.clear()} entries from {cache.path}")
    elif args.action == "export":
        console.print(f"exported {cache.export(args.file, args.namespace)} entries to {args.file}")
    elif args.action == "import":
        if not os.path.isfile(args.file):
            raise CliError(f"no such file: {args.file}")
        try:
            count = cache.import_(args.file)
        except (ValueError, KeyError, TypeError) as e:
            raise CliError(f"cannot import {args.file}: {e}") from None
        console.print(f"imported {count} entries into {cache.path}")
    elif args.action == "stats":
        _stats(cache, console)
    return 0


def _stats(cache: TuningCache, console: Console) -> None:
    size = sum(os.path.getsize(cache.path + s) for s in ("", "-wal") if os.path.exists(cache.path + s))
    entries = cache.entries()
    per_namespace: dict[str, int] = {}
    for e in entries:
        per_namespace[e.namespace] = per_namespace.get(e.namespace, 0) + 1
    console.print(
        f"{cache.path}: {size / 1024:.1f} KiB, {len(entries)} entries "
        f"({', '.join(f'{ns}: {n}' for ns, n in sorted(per_namespace.items())) or 'none'})"
    )
    stats = cache.graph_stats()
    hits, misses = sum(s.hits for s in stats), sum(s.misses for s in stats)
    rate = f"{100 * hits / (hits + misses):.0f}%" if hits + misses else "-"
    console.print(f"lookups: {hits} hits, {misses} misses (hit rate {rate})")
    table = Table(title="per graph")
    for column in ("graph key", "last graph name", "namespace", "hits", "misses", "last seen"):
        table.add_column(column)
    for s in stats:
        table.add_row(s.graph_key, s.graph_name or "-", s.namespace, str(s.hits), str(s.misses), _when(s.last_seen))
    console.print(table)
