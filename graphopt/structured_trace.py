"""graphopt's pass records in torch's structured trace (TORCH_TRACE=dir), so tlparse
shows graphopt's passes next to Dynamo's and AOTAutograd's artifacts.

Each pass becomes a string artifact `graphopt_<graph>_<NN>_<pass>` (the graph after
the pass, with its report in a header), and each graph one JSON artifact
`graphopt_<graph>_passes` (names, times, summaries). `trace_structured` evaluates
payloads only when a trace is being written, so this costs nothing otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx
from torch._logging import trace_structured

from graphopt.debug_dump import record_text
from graphopt.pipeline import PassRecord, readable


def _artifact(name: str, encoding: str, payload_fn) -> None:
    trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": encoding}, payload_fn=payload_fn)


def trace_graph_records(graph_name: str, gm: fx.GraphModule, records: Sequence[PassRecord]) -> None:
    _artifact(f"graphopt_{graph_name}_00_input", "string", lambda: readable(gm))
    for index, record in enumerate(records, start=1):
        _artifact(
            f"graphopt_{graph_name}_{index:02d}_{record.name}",
            "string",
            lambda record=record: record_text(graph_name, record),
        )
    _artifact(
        f"graphopt_{graph_name}_passes",
        "json",
        lambda: [{"pass": r.name, "seconds": r.seconds, "summary": r.report.summary()} for r in records],
    )
