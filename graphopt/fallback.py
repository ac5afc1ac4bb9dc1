"""Eager fallback warnings: one warning per (op, reason), and a log of every fallback.

Anything graphopt cannot compile runs as eager ATen instead. The user must hear
about it once, with the op and the reason, and the CLI/tests must be able to list
what fell back; this module is the single place that does both.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings


class GraphoptFallbackWarning(UserWarning):
    """Part of a graph runs as eager ATen because graphopt could not compile it."""


@dataclasses.dataclass(frozen=True)
class Fallback:
    op: str
    reason: str


_lock = threading.Lock()
_seen: dict[Fallback, int] = {}


def warn_fallback(op: str, reason: str) -> None:
    """Record a fallback; warn the first time this (op, reason) is seen in the process."""
    key = Fallback(op, reason)
    with _lock:
        first = key not in _seen
        _seen[key] = _seen.get(key, 0) + 1
    if first:
        warnings.warn(f"graphopt: running {op} in eager ATen: {reason}", GraphoptFallbackWarning, stacklevel=2)


def fallbacks() -> dict[Fallback, int]:
    """Every fallback seen in this process, with how often it happened."""
    with _lock:
        return dict(_seen)


def reset_fallbacks() -> None:
    with _lock:
        _seen.clear()
