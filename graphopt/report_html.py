"""One self-contained HTML page for a `graphopt dump` folder: per graph, the pass
timeline, the kernels with their cost, the memory plan; no scripts, no external
files (inline CSS and SVG), so it can be mailed or attached to an issue.
"""

from __future__ import annotations

import html
import os
from typing import Any

from graphopt.run_record import human_bytes

_PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1100px; color: #222; padding: 0 16px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 36px; border-bottom: 2px solid #ddd; }
h3 { font-size: 15px; margin: 18px 0 6px; color: #444; }
.meta { color: #666; } .error { color: #b00020; font-weight: 600; }
table { border-collapse: collapse; margin: 6px 0 12px; width: 100%; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; font-size: 13px; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; }
details summary { cursor: pointer; color: #335; }
.legend span { display: inline-block; margin-right: 14px; font-size: 12px; }
.legend i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[Any]], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>"
        + "".join(f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _svg(width: int, height: int, label: str, content: str) -> str:
    """An inline chart that scales with the page; `label` names it for screen readers and tests."""
    return (
        f'<svg viewBox="0 0 {width} {height}" width="100%" height="{height}" '
        f'preserveAspectRatio="xMinYMid meet" role="img" aria-label="{label}">{content}</svg>'
    )


def _timeline(passes: list[dict[str, Any]]) -> str:
    """The passes as consecutive bars, width proportional to their time."""
    total = sum(p["seconds"] for p in passes) or 1.0
    width, x, bars, legend = 1000, 0.0, [], []
    for i, p in enumerate(passes):
        color = _PALETTE[i % len(_PALETTE)]
        w = max(width * p["seconds"] / total, 1.0)
        label = f"{p['name']} {p['seconds'] * 1e3:.1f} ms"
        text = (
            f'<text x="{x + 4:.1f}" y="23" font-size="12" fill="#fff">{_e(label)}</text>' if w > 8 * len(label) else ""
        )
        rect = f'<rect x="{x:.1f}" y="6" width="{w:.1f}" height="26" fill="{color}">'
        bars.append(f"{rect}<title>{_e(label)}</title></rect>{text}")
        legend.append(f'<span><i style="background:{color}"></i>{_e(label)}</span>')
        x += w
    return _svg(width, 38, "pass timeline", "".join(bars)) + f'<div class="legend">{"".join(legend)}</div>'


def _memory_chart(timeline: list[list[Any]]) -> str:
    """Live bytes after each node, in the final graph's order, with the peak marked."""
    if not timeline:
        return "<p>no values</p>"
    width, height, pad = 1000, 160, 40
    peak = max(live for _, live in timeline) or 1
    n = len(timeline)
    step = (width - pad) / max(n - 1, 1)
    points = " ".join(
        f"{pad + i * step:.1f},{height - 20 - (live / peak) * (height - 40):.1f}"
        for i, (_, live) in enumerate(timeline)
    )
    peak_index = max(range(n), key=lambda i: timeline[i][1])
    px = pad + peak_index * step
    area = f"{pad},{height - 20} {points} {pad + (n - 1) * step:.1f},{height - 20}"
    return _svg(
        width,
        height,
        "live memory",
        f'<polygon points="{area}" fill="#4e79a7" fill-opacity="0.25"/>'
        f'<polyline points="{points}" fill="none" stroke="#4e79a7" stroke-width="2"/>'
        f'<line x1="{px:.1f}" y1="10" x2="{px:.1f}" y2="{height - 20}" stroke="#e15759" stroke-dasharray="4 3"/>'
        f'<text x="{min(px + 6, width - 260):.1f}" y="16" font-size="12" fill="#e15759">'
        f"peak {_e(human_bytes(peak))} after {_e(timeline[peak_index][0])}</text>"
        f'<text x="0" y="{height - 24}" font-size="11" fill="#666">0</text>'
        f'<text x="{pad}" y="{height - 4}" font-size="11" fill="#666">node order ({n} nodes) &#8594;</text>',
    )


def _memory_decisions(passes: list[dict[str, Any]]) -> list[list[Any]]:
    """Report fields about memory (predicted peaks, budgets, saved bytes) from every pass."""
    rows = []
    for p in passes:
        report = p["report"] if isinstance(p["report"], dict) else {}
        for key, value in report.items():
            if any(word in key for word in ("peak", "bytes", "memory", "budget")) and not isinstance(
                value, (list, dict)
            ):
                rows.append(
                    [
                        p["name"],
                        key,
                        human_bytes(value) if "bytes" in key and isinstance(value, (int, float)) else value,
                    ]
                )
    return rows


def _kernels(kernels: list[dict[str, Any]]) -> str:
    if not kernels:
        return "<p>no generated kernels</p>"
    rows = []
    for k in kernels:
        cost = k["cost"] if isinstance(k["cost"], dict) else {}
        seconds = cost.get("seconds")
        rows.append(
            [
                k["name"],
                len(k["original_nodes"]),
                human_bytes(cost["bytes_moved"]) if isinstance(cost.get("bytes_moved"), (int, float)) else "-",
                f"{seconds * 1e6:.2f} us" if isinstance(seconds, (int, float)) else "-",
                cost.get("source", "-"),
            ]
        )
    table = _table(["kernel", "nodes", "bytes moved", "predicted time", "cost model"], rows, numeric={1, 2, 3})
    details = "".join(
        f"<details><summary>{_e(k['name'])}: original nodes</summary>"
        f"<pre>{_e(chr(10).join(k['original_nodes']))}</pre></details>"
        for k in kernels
    )
    return table + details


def _final_code(folder: str) -> str:
    stages = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(folder) else []
    if not stages:
        return ""
    with open(os.path.join(folder, stages[-1])) as f:
        code = f.read()
    return f"<details><summary>final graph ({_e(stages[-1])})</summary><pre>{_e(code)}</pre></details>"


def _graph_section(graph: dict[str, Any], dump_dir: str) -> str:
    parts = [f'<h2 id="{_e(graph["name"])}">{_e(graph["name"])} <span class="meta">({_e(graph["kind"])})</span></h2>']
    if graph["error"]:
        parts.append(f'<p class="error">pipeline failed, graph runs as eager ATen: {_e(graph["error"])}</p>')
    ops_in, ops_out = sum(graph["ops_in"].values()), sum(graph["ops_out"].values())
    parts.append(
        f"<p>{ops_in} ops in, {ops_out} calls out; tuning cache: "
        + (
            ", ".join(f"{_e(ns)} {c['hits']} hit / {c['misses']} miss" for ns, c in graph["cache"].items())
            or "no lookups"
        )
        + "</p>"
    )
    parts.append("<h3>Pass timeline</h3>" + _timeline(graph["passes"]))
    parts.append(
        _table(
            ["pass", "time", "nodes after", "decisions"],
            [[p["name"], f"{p['seconds'] * 1e3:.2f} ms", p["nodes_after"], p["summary"]] for p in graph["passes"]],
            numeric={1, 2},
        )
    )
    parts.append(f"<h3>Kernels ({len(graph['kernels'])})</h3>" + _kernels(graph["kernels"]))
    parts.append("<h3>Memory plan</h3>" + _memory_chart(graph["memory"]))
    decisions = _memory_decisions(graph["passes"])
    if decisions:
        parts.append(_table(["pass", "decision", "value"], decisions))
    if graph.get("folder"):
        parts.append(_final_code(os.path.join(dump_dir, graph["folder"])))
    return "\n".join(parts)


def render_report(summary: dict[str, Any], dump_dir: str) -> str:
    graphs = summary["graphs"]
    breaks = summary["graph_breaks"]
    header = [
        f"<h1>graphopt report: {_e(os.path.basename(summary['script']))}</h1>",
        f'<p class="meta">{_e(summary["script"])}: {len(graphs)} graph(s), script ran {summary["seconds"]:.2f} s; '
        f"{sum(breaks.values())} graph break(s); {len(summary['fallbacks'])} eager fallback(s)</p>",
        _table(
            ["graph", "kind", "passes", "pipeline time", "kernels", "peak memory (estimate)"],
            [
                [
                    g["name"],
                    g["kind"],
                    len(g["passes"]),
                    f"{sum(p['seconds'] for p in g['passes']) * 1e3:.1f} ms",
                    len(g["kernels"]),
                    human_bytes(max((m[1] for m in g["memory"]), default=0)),
                ]
                for g in graphs
            ],
            numeric={2, 3, 4, 5},
        ),
    ]
    if breaks:
        header.append("<h3>Graph breaks</h3>" + _table(["count", "reason"], [[n, r] for r, n in breaks.items()], {0}))
    if summary["fallbacks"]:
        header.append(
            "<h3>Eager fallbacks</h3>"
            + _table(["op", "reason", "times"], [[f["op"], f["reason"], f["count"]] for f in summary["fallbacks"]], {2})
        )
    body = "\n".join(header + [_graph_section(g, dump_dir) for g in graphs])
    title = f"graphopt report: {os.path.basename(summary['script'])}"
    head = f'<meta charset="utf-8"><title>{_e(title)}</title><style>{_CSS}</style>'
    return f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head><body>\n{body}\n</body></html>\n'
