"""Oracles shared by the conformance tests (OpInfo sweep, fuzzing, bad input).

`nearer_than_eager`: when graphopt and eager differ beyond a tolerance, the float64
result of the same computation decides: generated kernels compute bf16 in float32 and
reassociate reductions, so graphopt may be *closer* to the truth than eager is.

`hidden_crash`: graphopt never lets a failure of its own reach the user (a pass that
raises makes the graph run as eager ATen; a generated kernel that fails runs its
group's ATen subgraph). The result is then right, but it is still a bug, and the
conformance tests must see it rather than count it as a deliberate fallback.
"""

from __future__ import annotations

import torch

from graphopt import events
from graphopt.runtime import GuardedCall

# Within the float64 oracle, graphopt's error may be this many times eager's own, plus atol.
ORACLE_SLACK = 2.0


def nearer_than_eager(actual: torch.Tensor, expected: torch.Tensor, oracle: torch.Tensor, atol: float) -> bool:
    """Same NaNs as eager, and every element no further from float64 than ORACLE_SLACK x eager's error + atol."""
    if not torch.equal(actual.isnan(), expected.isnan()):
        return False
    oracle = oracle.detach().double()
    err_graphopt = (actual.detach().double() - oracle).abs().nan_to_num(0.0)
    err_eager = (expected.detach().double() - oracle).abs().nan_to_num(0.0)
    return bool((err_graphopt <= ORACLE_SLACK * err_eager + atol).all())


def hidden_crash(compiled: list[events.CompiledGraphInfo]) -> str | None:
    """The first pass that raised or generated kernel that failed among `compiled` graphs, or None."""
    for info in compiled:
        if info.error is not None:
            return f"pipeline of the {info.kind} graph raised {type(info.error).__name__}: {info.error}".splitlines()[0][:300]
        for node in info.output_gm.graph.nodes:
            if isinstance(node.target, GuardedCall) and node.target.failed_reason is not None:
                return f"generated kernel {node.target.__name__} failed: {node.target.failed_reason}"[:300]
    return None
