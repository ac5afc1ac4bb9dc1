"""Run an ATen function through the fusion pass alone (no Dynamo), and inspect what it made."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from graphopt.options import Options
from graphopt.passes import fusion
from graphopt.pipeline import PassContext
from graphopt.runtime import GuardedCall


def fuse(
    fn: Callable[..., Any], *inputs: Any, dynamic: bool = False, options: Options | None = None
) -> tuple[fx.GraphModule, fusion.FusionReport]:
    """`fn` traced to ATen (symbolic sizes if `dynamic`) and run through passes/fusion.py."""
    gm = make_fx(fn, tracing_mode="symbolic" if dynamic else "fake")(*inputs)
    ctx = PassContext(options=options or Options(), graph_name="g0_test", kind="inference", example_inputs=inputs)
    out, report = fusion.run(gm, ctx)
    out.graph.lint()
    out.recompile()
    return out, report


def kernels(gm: fx.GraphModule) -> list[GuardedCall]:
    return [n.target for n in gm.graph.nodes if isinstance(n.target, GuardedCall)]


def run_fused(fn: Callable[..., Any], *inputs: Any, dynamic: bool = False) -> tuple[Any, list[GuardedCall]]:
    """The fused graph's result on `inputs`; asserts every generated kernel ran (no fallback)."""
    gm, _ = fuse(fn, *inputs, dynamic=dynamic)
    calls = kernels(gm)
    assert calls, f"nothing was fused:\n{gm.code}"
    result = gm(*inputs)
    for call in calls:
        assert call.failed_reason is None, f"{call.__name__} fell back: {call.failed_reason}\n{call.primary.triton_source}"
    return result, calls


def assert_matches(result: Any, expected: Any, rtol: float, atol: float) -> None:
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
        result = (result,) if isinstance(result, torch.Tensor) else result
    for r, e in zip(result, expected, strict=True):
        assert r.dtype == e.dtype and r.shape == e.shape and r.stride() == e.stride(), (r.dtype, e.dtype, r.shape, e.shape, r.stride(), e.stride())
        torch.testing.assert_close(r, e, rtol=rtol, atol=atol, equal_nan=True)


def graph_kernels(graphs: list[Any]) -> list[GuardedCall]:
    """The GuardedCalls of every graph captured by graphopt.events.capture()."""
    return [call for info in graphs for call in kernels(info.output_gm)]


def assert_kernels_ran(graphs: list[Any]) -> list[GuardedCall]:
    calls = graph_kernels(graphs)
    assert calls, "no kernels were generated"
    for call in calls:
        assert call.failed_reason is None, f"{call.__name__} fell back: {call.failed_reason}"
    assert any(call.primary.launches for call in calls)
    return calls


def force_looped_reductions(monkeypatch: Any, xblock: int = 2, rblock: int = 4) -> None:
    """Make every reduction kernel loop over the reduced extent in small steps."""
    from graphopt.codegen import heuristics

    config = heuristics.LaunchConfig(persistent=False, xblock=xblock, rblock=rblock, num_warps=1)
    monkeypatch.setattr(heuristics, "reduction_config", lambda xnumel, rnumel, inner: config)

