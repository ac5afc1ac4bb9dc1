"""Where a compile's host time goes, per package: `profiled(call)` runs `call` under cProfile.

A warm compile (tuning cache and AOTAutograd cache warm) is mostly torch's own work (Dynamo
tracing the model, guards, the cache key), some graphopt's (loading the kept graphs, making
their kernels) and Triton's (loading each kernel's binary on its first launch). The summary
adds each function's own time to the package its file belongs to, so a record says which
of these a warm compile is waiting on. cProfile slows Python down: read the shares.
"""

from __future__ import annotations

import cProfile
import os
import pstats
from collections.abc import Callable
from typing import Any

import graphopt
import graphopt.codegen
import graphopt.cost_model
import graphopt.passes

# (package, path fragment), first match wins: torch's subpackages before torch as a whole
_TORCH_PACKAGES = (
    ("dynamo", "torch/_dynamo/"),
    ("aot_autograd", "torch/_functorch/"),
    ("inductor", "torch/_inductor/"),
    ("fake_tensor", "torch/_subclasses/"),
    ("fx", "torch/fx/"),
    ("sympy", "sympy/"),
    ("triton", "triton/"),
    ("torch (other)", "torch/"),
)
_GRAPHOPT_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (graphopt, graphopt.codegen, graphopt.cost_model, graphopt.passes))


def package_of(filename: str) -> str:
    """The package a profiled function belongs to, from its file ('~' is cProfile's for C builtins)."""
    if filename == "~":
        return "C builtins"
    if filename.startswith(_GRAPHOPT_DIRS) or filename.startswith("<graphopt"):
        return "graphopt"
    path = filename.replace(os.sep, "/")
    for package, fragment in _TORCH_PACKAGES:
        if fragment in path:
            return package
    return "other"


def summarize(stats: pstats.Stats, top: int = 20) -> dict[str, Any]:
    """Own seconds per package, and the `top` functions by own time."""
    by_package: dict[str, float] = {}
    rows = []
    for (filename, line, name), (_, calls, own, _, _) in stats.stats.items():
        package = package_of(filename)
        by_package[package] = by_package.get(package, 0.0) + own
        rows.append({"function": f"{os.path.basename(filename)}:{line}:{name}", "package": package, "own_s": own, "calls": calls})
    rows.sort(key=lambda r: r["own_s"], reverse=True)
    return {
        "total_s": sum(by_package.values()),
        "by_package": dict(sorted(by_package.items(), key=lambda item: item[1], reverse=True)),
        "top": rows[:top],
    }


def profiled(call: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """`call()`'s result, and the summary of its host time."""
    profiler = cProfile.Profile()
    result = profiler.runcall(call)
    return result, summarize(pstats.Stats(profiler))
