"""Sweep launch configurations of graphopt's reduction kernels on the GPU, per kernel.

    python -m benchmarks.config_sweep --out DIR [--only layer_norm]

codegen/heuristics.py picks one configuration per reduction from its sizes. This
compiles a few GPT-2-shaped cases (layer norm forward+backward with the fp32
residual stream autocast gives it, bias-gradient column sums) once per candidate
configuration (block sizes and warps around the heuristic's choice) and reads
each generated kernel's GPU time from torch.profiler, next to inductor's kernels
for the same case. The table printed last says, per kernel, the heuristic's time,
the best candidate and its time: what to change in heuristics.py. A diagnostic,
not a benchmark: claims come from `benchmarks.run`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import itertools
import json
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._functorch.config
import torch.nn.functional as F

from benchmarks.profile_kernels import kernel_events
from graphopt.codegen import heuristics
from graphopt.codegen.heuristics import LaunchConfig

_REPS = 20


def _layer_norm_fwd_bwd(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps=1e-5)


def _column_sum(g):
    """A linear layer's bias gradient under autocast: a bf16 column sum (addmm's backward), cast to the
    fp32 parameter's dtype."""
    return g.sum(0).float()


def _cases() -> dict[str, tuple[Callable[..., Any], tuple[torch.Tensor, ...], bool]]:
    """name -> (function, inputs, whether to run its backward)."""
    cases: dict[str, tuple[Callable[..., Any], tuple[torch.Tensor, ...], bool]] = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(8192, 768, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(768, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(768, device="cuda", dtype=dtype, requires_grad=True)
        cases[f"layer_norm_fwd_bwd_8192x768_{str(dtype)[6:]}"] = (_layer_norm_fwd_bwd, (x, w, b), True)
    for cols in (768, 2304, 3072):
        g = torch.randn(8192, cols, device="cuda", dtype=torch.bfloat16)
        cases[f"column_sum_8192x{cols}_bf16"] = (_column_sum, (g,), False)
    return cases


def _candidates(default: LaunchConfig) -> Iterator[LaunchConfig]:
    """The heuristic's configuration first, then its neighbours: blocks x2 / /2 around it, 4-16 warps."""
    yield default
    xblocks = sorted({max(1, default.xblock // 2), default.xblock, default.xblock * 2})
    rblocks = [default.rblock] if default.persistent else sorted({max(16, default.rblock // 2), default.rblock, default.rblock * 2})
    for xblock, rblock, warps in itertools.product(xblocks, rblocks, (4, 8, 16)):
        candidate = LaunchConfig(default.persistent, xblock, rblock, warps)
        if candidate != default and xblock * rblock <= 16384:
            yield candidate


def _kernel_us(step: Callable[[], Any]) -> dict[str, float]:
    """GPU microseconds per step of each kernel the step launches, by name."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(_REPS):
            step()
        torch.cuda.synchronize()
    totals: dict[str, float] = collections.defaultdict(float)
    for event in kernel_events(prof):
        totals[event.name] += event.time_range.elapsed_us() / _REPS
    return dict(totals)


def _step(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], grad: bool) -> Callable[[], Any]:
    if not grad:
        return lambda: fn(*inputs)
    dy = torch.randn_like(fn(*inputs))

    def step() -> None:
        for t in inputs:
            t.grad = None
        fn(*inputs).backward(dy)

    return step


@contextlib.contextmanager
def _overridden(name: str) -> Iterator[tuple[dict[Any, Any], dict[Any, Any]]]:
    """heuristics.<name>(xnumel, rnumel, inner) recording what it decided per sizes in `seen`, and
    answering `override[sizes]` instead where set; restored on exit."""
    heuristic = getattr(heuristics, name)
    seen: dict[Any, Any] = {}
    override: dict[Any, Any] = {}

    def recording(*sizes: Any) -> Any:
        decided = seen.setdefault(sizes, heuristic(*sizes))
        return override.get(sizes, decided)

    setattr(heuristics, name, recording)
    try:
        yield seen, override
    finally:
        setattr(heuristics, name, heuristic)


def _graphopt_kernel_us(fn, inputs, grad: bool) -> dict[str, float]:
    torch._dynamo.reset()
    return _kernel_us(_step(torch.compile(fn, backend="graphopt"), inputs, grad))


def _sweep_case(fn, inputs, grad: bool) -> dict[str, Any]:
    """Inductor's kernels, then graphopt's kernels under each candidate configuration of one
    reduction kernel at a time (the others keep the heuristic's), then under each split factor."""
    torch._dynamo.reset()
    result: dict[str, Any] = {"inductor": _kernel_us(_step(torch.compile(fn), inputs, grad)), "sweeps": []}
    with _overridden("reduction_config") as (seen, override):
        result["graphopt"] = _graphopt_kernel_us(fn, inputs, grad)
        for sizes, default in list(seen.items()):
            timings = []
            for candidate in _candidates(default):
                override.clear()
                override[sizes] = candidate
                try:
                    us = _graphopt_kernel_us(fn, inputs, grad)
                except Exception as e:  # noqa: BLE001 - a configuration Triton cannot compile is a result
                    us = {"error": f"{type(e).__name__}: {e}"[:200]}
                timings.append({"config": dataclasses.asdict(candidate), "kernel_us": us})
            result["sweeps"].append({"sizes": sizes, "heuristic": dataclasses.asdict(default), "timings": timings})
    result["splits"] = _sweep_splits(fn, inputs, grad)
    return result


def _sweep_splits(fn, inputs, grad: bool) -> list[dict[str, Any]]:
    """graphopt's kernels with each long reduction split into 1, 2, 4, .. 64 chunks (the fusion pass's
    split_reduction_factor), the launch configurations left to the heuristic."""
    sweeps = []
    with _overridden("split_reduction_factor") as (seen, override):
        _graphopt_kernel_us(fn, inputs, grad)
        for sizes, default in list(seen.items()):
            timings = []
            for factor in (f for f in (1, 2, 4, 8, 16, 32, 64) if sizes[1] % f == 0 and sizes[1] // f >= 64):
                override.clear()
                override[sizes] = factor
                timings.append({"factor": factor, "kernel_us": _graphopt_kernel_us(fn, inputs, grad)})
            sweeps.append({"sizes": sizes, "heuristic": default, "timings": timings})
    return sweeps


def _summary(name: str, result: dict[str, Any]) -> list[str]:
    lines = [f"{name}: inductor {sum(result['inductor'].values()):.1f} us, graphopt {sum(result['graphopt'].values()):.1f} us"]
    for sweep in result["sweeps"]:
        totals = [
            (sum(v for v in t["kernel_us"].values() if isinstance(v, float)), t["config"])
            for t in sweep["timings"]
            if "error" not in t["kernel_us"]
        ]
        best_us, best = min(totals, key=lambda item: item[0])
        lines.append(
            f"  sizes {tuple(sweep['sizes'])}: heuristic {sweep['heuristic']} {totals[0][0]:.1f} us"
            f" -> best {best} {best_us:.1f} us (all kernels of the step)"
        )
    for sweep in result["splits"]:
        by_factor = ", ".join(f"{t['factor']}: {sum(t['kernel_us'].values()):.1f}" for t in sweep["timings"])
        lines.append(f"  split {tuple(sweep['sizes'])} (heuristic {sweep['heuristic']}): us by factor {by_factor}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated name parts: only the cases that contain one")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    results, lines = {}, []
    for name, (fn, inputs, grad) in _cases().items():
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        # every compile runs the passes: a graph loaded from torch's AOTAutograd cache would skip the split
        with torch._functorch.config.patch(enable_autograd_cache=False):
            results[name] = _sweep_case(fn, inputs, grad)
        summary = _summary(name, results[name])
        lines += summary
        print("\n".join(summary), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config_sweep.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
