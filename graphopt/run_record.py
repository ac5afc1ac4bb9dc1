"""What compiling a script did, as data: the CLI's `explain` prints it, `dump` writes
it (run.json next to the per-graph folders) and `report` renders it as HTML.

Per compiled graph: op counts before and after the pipeline, every pass's time,
summary and report fields, the generated kernels with their cost estimates, and
the live-memory timeline of the final graph in its node order. Per run: Dynamo's
graph breaks, graphopt's fallbacks and tuning-cache lookups.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import operator
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx

from graphopt import cache, events, fallback
from graphopt.cli_script import patched_compile, run_script
from graphopt.cost_model.roofline import nbytes_hint
from graphopt.passes.planned_views import PlannedView, alias
from graphopt.pipeline import node_op_name

RUN_FILE = "run.json"


@dataclasses.dataclass
class ScriptRun:
    """The raw outcome of one script run with graphopt listening."""

    script: str
    graphs: list[events.CompiledGraphInfo]
    graph_breaks: dict[str, int]
    fallbacks: dict[fallback.Fallback, int]
    lookups: list[cache.Lookup]
    seconds: float


def observe_script(script: str, args: Sequence[str], *, force_backend: bool) -> ScriptRun:
    """Run the script, collecting every graph graphopt compiled. Raises CliError if the script fails."""
    import torch._dynamo.utils

    torch._dynamo.utils.counters.clear()
    fallbacks_before = fallback.fallbacks()
    lookups_before = len(cache.lookups())
    start = time.perf_counter()
    with events.capture() as graphs, patched_compile("graphopt" if force_backend else None):
        run_script(script, args)
    new_fallbacks = {f: n - fallbacks_before.get(f, 0) for f, n in fallback.fallbacks().items()}
    return ScriptRun(
        script=script,
        graphs=list(graphs),
        graph_breaks=_graph_breaks(torch._dynamo.utils.counters),
        fallbacks={f: n for f, n in new_fallbacks.items() if n > 0},
        lookups=cache.lookups()[lookups_before:],
        seconds=time.perf_counter() - start,
    )


def _graph_breaks(counters: Any) -> dict[str, int]:
    """Dynamo's graph-break reasons with counts. Where Dynamo files a reason differs between
    torch versions ("graph_break", or "unimplemented" for e.g. data-dependent branches)."""
    reasons: collections.Counter[str] = collections.Counter()
    for category in ("graph_break", "unimplemented"):
        for message, count in counters[category].items():
            reasons[str(message).strip().splitlines()[0]] += count
    return dict(reasons.most_common())


# -- graph facts ------------------------------------------------------------------------


def op_counts(gm: fx.GraphModule) -> dict[str, int]:
    counts = collections.Counter(node_op_name(n) for n in gm.graph.nodes if n.op == "call_function")
    return dict(counts.most_common())


def kernel_of(target: Any) -> Any | None:
    """The generated-kernel object behind a node target (itself, or a GuardedCall's primary)."""
    for candidate in (target, getattr(target, "primary", None)):
        if candidate is not None and kernel_source(candidate) is not None:
            return candidate
    return None


def kernel_source(kernel: Any) -> str | None:
    try:
        source = getattr(kernel, "triton_source", None)
        if source is None:
            source = getattr(kernel, "source", None)
    except Exception:  # rendering a kernel's source must not break a report
        return None
    return source if isinstance(source, str) else None


def kernels(gm: fx.GraphModule) -> Iterator[tuple[str, Any]]:
    """(node name, kernel object) for every generated kernel the graph calls, in order."""
    for node in gm.graph.nodes:
        if node.op == "call_function":
            kernel = kernel_of(node.target)
            if kernel is not None:
                yield node.name, kernel


def _nbytes(value: Any) -> int:
    """Bytes of a node's value, symbolic sizes at their compile-time hints (the memory plan is an estimate)."""
    if isinstance(value, torch.Tensor):
        return nbytes_hint(value)
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0


def memory_timeline(gm: fx.GraphModule) -> list[tuple[str, int]]:
    """(node, bytes live after it) in graph order: inputs stay live, every other value
    until its last user has run. Views alias their input and add nothing; a kernel output
    written into a dead buffer (`reuse=`, passes/buffer_reuse.py) takes over its bytes."""
    last_user: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        for used in node.all_input_nodes:
            last_user[used] = node
    freed_after: dict[fx.Node, list[fx.Node]] = collections.defaultdict(list)
    for value, user in last_user.items():
        if value.op != "placeholder":
            freed_after[user].append(value)
    sizes: dict[fx.Node, int] = {}
    live, timeline = 0, []
    for node in gm.graph.nodes:
        if node.op == "output":
            break
        sizes[node] = 0 if _is_view(node.target) else _nbytes(node.meta.get("val"))
        donors = [d for d in node.kwargs.get("reuse", ()) if d is not None]
        live += sizes[node] - sum(sizes[d] for d in donors)
        timeline.append((node.name, live))
        live -= sum(sizes[v] for v in freed_after.get(node, ()) if v not in donors)
    return timeline


def _is_view(target: Any) -> bool:
    """ATen's views, and planned_views' aliases of them (which add no memory either)."""
    return target in _VIEWS or target is alias or isinstance(target, PlannedView)


_VIEWS = {
    operator.getitem,  # a part of a multi-output node, already counted there
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.expand.default,
    torch.ops.aten.permute.default,
    torch.ops.aten.t.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.select.int,
    torch.ops.aten.unsqueeze.default,
    torch.ops.aten.squeeze.dim,
    torch.ops.aten.alias.default,
    torch.ops.aten.as_strided.default,
}


# -- JSON ------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """Reports hold dataclasses, tuples, sympy and torch values: make them JSON."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    return str(value)


def graph_summary(info: events.CompiledGraphInfo, lookups: Sequence[cache.Lookup]) -> dict[str, Any]:
    mine = [lk for lk in lookups if lk.graph_name == info.name]
    cache_counts: dict[str, dict[str, int]] = {}
    for lk in mine:
        counts = cache_counts.setdefault(lk.namespace, {"hits": 0, "misses": 0})
        counts["hits" if lk.hit else "misses"] += 1
    return {
        "name": info.name,
        "kind": info.kind,
        "error": None if info.error is None else f"{type(info.error).__name__}: {info.error}".splitlines()[0],
        "ops_in": op_counts(info.input_gm),
        "ops_out": op_counts(info.output_gm),
        "passes": [
            {
                "name": r.name,
                "seconds": r.seconds,
                "summary": r.report.summary(),
                "report": jsonable(r.report),
                "nodes_after": len(r.after.graph.nodes),
            }
            for r in info.records
        ],
        "kernels": [
            {
                "node": node,
                "name": getattr(k, "name", getattr(k, "__name__", node)),
                "cost": jsonable(getattr(k, "cost", None)),
                "original_nodes": jsonable(getattr(k, "original_nodes", [])),
            }
            for node, k in kernels(info.output_gm)
        ],
        "memory": memory_timeline(info.output_gm),
        "cache": cache_counts,
    }


def run_summary(run: ScriptRun) -> dict[str, Any]:
    return {
        "script": run.script,
        "seconds": run.seconds,
        "graphs": [graph_summary(g, run.lookups) for g in run.graphs],
        "graph_breaks": run.graph_breaks,
        "fallbacks": [{"op": f.op, "reason": f.reason, "count": n} for f, n in run.fallbacks.items()],
    }


def write_run_summary(folder: str, summary: dict[str, Any]) -> str:
    import os

    path = os.path.join(folder, RUN_FILE)
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
