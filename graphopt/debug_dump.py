"""Writes the pass manager's records as readable files (the `debug_dir` option).

Layout: DEBUG_DIR/<graph name>/00_input.py, then NN_<pass>.py per pass, each the
graph after that pass with the pass's time and report in a header comment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from torch import fx

from graphopt.pipeline import PassRecord, readable


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_graph_records(debug_dir: str, graph_name: str, gm: fx.GraphModule, records: Sequence[PassRecord]) -> str:
    """Write one folder for the graph; returns its path."""
    folder = os.path.join(debug_dir, _safe(graph_name))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "00_input.py"), "w") as f:
        f.write(f"# graph {graph_name}: as graphopt received it\n")
        f.write(readable(gm))
    for index, record in enumerate(records, start=1):
        with open(os.path.join(folder, f"{index:02d}_{_safe(record.name)}.py"), "w") as f:
            f.write(record_text(graph_name, record))
    return folder


def record_text(graph_name: str, record: PassRecord) -> str:
    """The graph after one pass as Python, with the pass's time and report in a header comment."""
    header = f"# graph {graph_name} after pass {record.name!r} ({record.seconds * 1e3:.1f} ms)\n"
    header += "".join(f"# report: {line}\n" for line in record.report.summary().splitlines())
    return header + readable(record.after)
