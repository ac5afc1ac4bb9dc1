"""What each compile produced, for whoever listens: tests, the CLI, reports.

The backend announces every compiled graph here; `capture()` collects them for
the duration of a `with` block. Listening costs nothing when nobody listens.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

from torch import fx

from graphopt.pipeline import GraphKind, PassRecord


@dataclasses.dataclass
class CompiledGraphInfo:
    name: str
    kind: GraphKind
    input_gm: fx.GraphModule
    output_gm: fx.GraphModule
    records: list[PassRecord]
    error: Exception | None = None


_listeners: list[Callable[[CompiledGraphInfo], None]] = []


def graph_compiled(info: CompiledGraphInfo) -> None:
    for listener in list(_listeners):
        listener(info)


def listening() -> bool:
    """Whether anything listens to compiles (a compile loaded from a cache announces nothing)."""
    return bool(_listeners)


@contextlib.contextmanager
def capture() -> Iterator[list[CompiledGraphInfo]]:
    """Collect the CompiledGraphInfo of every graph compiled inside the block."""
    seen: list[CompiledGraphInfo] = []
    _listeners.append(seen.append)
    try:
        yield seen
    finally:
        _listeners.remove(seen.append)
