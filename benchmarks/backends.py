"""How each backend variant of a row is compiled: eager, inductor, graphopt.

graphopt gains options while the suite is in use (`cache_dir`, `memory_budget`,
`cuda_graphs`), so an option is passed only when graphopt's Options has that
field; a row that needs a missing one is skipped with a reason, never run with
the option silently dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._functorch.config

from benchmarks.rows import Row


def graphopt_option_names() -> frozenset[str]:
    from graphopt.options import Options

    return frozenset(f.name for f in dataclasses.fields(Options))


def _graphopt_row_options(row: Row) -> dict[str, Any]:
    """The graphopt options a row asks for (without the per-row cache folder)."""
    options: dict[str, Any] = {}
    if row.memory_budget is not None:
        options["memory_budget"] = row.memory_budget
    if row.cuda_graphs:
        options["cuda_graphs"] = True
    for names, value in ((row.graphopt_off, False), (row.graphopt_on, True)):
        for name in filter(None, (names or "").split("+")):
            options[name] = value
    return options


def unsupported_reason(row: Row) -> str | None:
    """Why this graphopt cannot run the row (a missing option), or None."""
    if row.backend != "graphopt":
        return None
    missing = sorted(set(_graphopt_row_options(row)) - graphopt_option_names())
    return f"graphopt has no option {', '.join(missing)}" if missing else None


def supports_warm_cache() -> bool:
    """Whether graphopt takes a tuning-cache folder, so a second compile can find it warm."""
    return "cache_dir" in graphopt_option_names()


def compile_options(row: Row, cache_dir: str | None) -> dict[str, Any]:
    """What torch.compile gets besides the model, for the record and for `compile_model`."""
    if row.backend == "inductor":
        options: dict[str, Any] = {"mode": "reduce-overhead"} if row.cuda_graphs else {}
        if row.memory_budget is not None:
            options["activation_memory_budget"] = row.memory_budget
        return options
    if row.backend == "graphopt":
        options = _graphopt_row_options(row)
        if cache_dir is not None and supports_warm_cache():
            options["cache_dir"] = cache_dir
        return {"options": options}
    return {}


@contextlib.contextmanager
def compile_config(row: Row) -> Iterator[None]:
    """Global compiler settings a row needs while it compiles (inductor's activation budget)."""
    if row.backend == "inductor" and row.memory_budget is not None:
        with torch._functorch.config.patch(activation_memory_budget=row.memory_budget):
            yield
    else:
        yield


def compile_model(model: torch.nn.Module, row: Row, cache_dir: str | None) -> Callable[..., Any]:
    """The callable that the row's steps call: the model itself for eager."""
    if row.backend == "eager":
        return model
    options = compile_options(row, cache_dir)
    if row.backend == "inductor":
        return torch.compile(model, backend="inductor", mode=options.get("mode"))
    if row.backend == "graphopt":
        return torch.compile(model, backend="graphopt", options=options["options"])
    raise ValueError(f"unknown backend {row.backend!r}")
