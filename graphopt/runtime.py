"""The compiled callable that AOTAutograd runs, and the per-node eager fallback.

The final GraphModule's generated Python is the program: ATen calls for extern
ops, and `call_function` nodes whose target is a `GuardedCall` for anything
graphopt compiled itself. A GuardedCall that fails (a Triton compile error, a
launch failure) warns once naming the op and the reason, then runs its eager
subgraph for good, so the model still runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import fx

from graphopt.fallback import warn_fallback


class GuardedCall:
    """A graph node target: `primary(*args)`, or `fallback(*args)` once primary has failed.

    FX codegen needs `__name__`/`__module__` on call_function targets; they also name
    the node in dumps and fallback warnings.
    """

    __module__ = "graphopt.runtime"

    def __init__(self, name: str, primary: Callable[..., Any], fallback: Callable[..., Any]):
        self.__name__ = name
        self.__qualname__ = name
        self.primary = primary
        self.fallback = fallback
        self.failed_reason: str | None = None

    def __call__(self, *args: Any) -> Any:
        if self.failed_reason is None:
            try:
                return self.primary(*args)
            except Exception as e:  # any failure of generated code must not kill the model
                self.failed_reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                warn_fallback(self.__name__, self.failed_reason)
        return self.fallback(*args)

    def __repr__(self) -> str:
        return f"GuardedCall({self.__name__})"


class CompiledGraph:
    """Runs one final GraphModule with AOTAutograd's boxed calling convention.

    Boxed: AOTAutograd passes the inputs as one list that the callee may clear, so
    inputs can be freed as soon as the graph no longer needs them. The flag is an
    instance attribute because Dynamo's `disable` wrapper around the backward copies
    the instance `__dict__` (functools.wraps), not class attributes.
    """

    def __init__(self, gm: fx.GraphModule, name: str):
        self._boxed_call = True
        self.gm = gm
        self.name = name
        self._forward = gm.forward

    def __call__(self, args: list[Any]) -> Any:
        inputs = list(args)
        args.clear()
        return self._forward(*inputs)
