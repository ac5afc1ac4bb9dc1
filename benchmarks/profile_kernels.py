"""Where a compiled step's time goes, per backend: GPU kernels vs host.

    python -m benchmarks.profile_kernels --models gpt2 --modes infer,train --backends inductor,graphopt

For each row it compiles the model as `benchmarks.run` does, warms up, then records a
few steps with torch.profiler and prints: the step's wall time (CUDA events), the
GPU time its kernels took (sum of kernel durations), the kernel launches per step,
and the kernels that took the most GPU time. A step much longer than its kernels is
host-bound (launch overhead, Python); kernels slower than another backend's are the
generated code's or the extern calls' fault. `--host-profile` adds where the host time
goes: cProfile over a few steps, the functions with the most time of their own per
step (cProfile slows Python down, so read the shares, not the microseconds).
This is a diagnostic, not a benchmark: claims come from `benchmarks.run`.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import json
import pathlib
import pstats
import statistics
from typing import Any

import torch

from benchmarks import backends, timing
from benchmarks.measure import _step_function
from benchmarks.models import get_model
from benchmarks.rows import Row

_PROFILED_STEPS = 3


def kernel_events(prof: torch.profiler.profile) -> list[Any]:
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _host_profile(step: Any, top: int, device: torch.device) -> list[dict[str, Any]]:
    """The `top` functions by own host time per step (cProfile over _PROFILED_STEPS steps)."""
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(_PROFILED_STEPS):
        step(i)
    timing.synchronize(device)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, function) -> (calls, primitive calls, own s, total s, callers)
    ranked = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [
        {
            "function": f"{pathlib.Path(file).name}:{line}:{name}",
            "own_us_per_step": own * 1e6 / _PROFILED_STEPS,
            "calls_per_step": calls / _PROFILED_STEPS,
        }
        for (file, line, name), (_, calls, own, _, _) in ranked
    ]


def profile_row(row: Row, device: torch.device, top: int, host: bool = False) -> dict[str, Any]:
    spec = get_model(row.model)
    model = spec.build(device)
    if row.mode == "infer":
        model.eval()
    inputs = [spec.inputs(seed, device) for seed in range(2)]
    call = backends.compile_model(model, row, cache_dir=None)
    step = _step_function(call, model, row, inputs, device)
    with backends.compile_config(row):
        for i in range(4):
            step(i)
    step_ms = statistics.median(timing.time_steps(step, 4, 10, device))
    host_ms = statistics.median(timing.host_ms(step, 4, 10, device))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for i in range(_PROFILED_STEPS):
            step(i)
        torch.cuda.synchronize()
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for event in kernel_events(prof):
        totals[event.name] += event.time_range.elapsed_us() / 1000
        counts[event.name] += 1
    kernels = sorted(totals, key=totals.get, reverse=True)[:top]
    host_top = _host_profile(step, top, device) if host else []
    return {
        "key": row.key,
        "step_ms": step_ms,
        "host_ms": host_ms,
        "kernel_ms_per_step": sum(totals.values()) / _PROFILED_STEPS,
        "launches_per_step": sum(counts.values()) / _PROFILED_STEPS,
        "top_kernels": [
            {"name": k[:90], "ms_per_step": totals[k] / _PROFILED_STEPS, "calls_per_step": counts[k] / _PROFILED_STEPS}
            for k in kernels
        ],
        "host_top": host_top,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2")
    parser.add_argument("--modes", default="infer,train")
    parser.add_argument(
        "--backends",
        default="inductor,graphopt",
        help="row labels as benchmarks.run names them: also graphopt-cg (cuda_graphs on), graphopt-no_OPTION (a boolean"
        " option off, e.g. graphopt-no_pad_matmuls), graphopt-with_OPTION (one on, e.g. graphopt-with_remat_compress),"
        " graphopt-budget50, graphopt-fp32",
    )
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--host-profile", action="store_true", help="also cProfile the host side of a few steps")
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    # every label parsed before any GPU time is spent: a typo fails at once
    rows = [
        Row.from_label(model, mode, label)
        for model in args.models.split(",")
        for mode in args.modes.split(",")
        for label in args.backends.split(",")
    ]
    results = []
    for row in rows:
        torch._dynamo.reset()
        try:
            result = profile_row(row, device, args.top, args.host_profile)
        except Exception as e:  # one row's failure is reported, the others still run
            result = {"key": row.key, "error": f"{type(e).__name__}: {e}"[:500]}
        results.append(result)
        print(json.dumps(result, indent=1), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.json").write_text(json.dumps(results, indent=1))
    print("| row | step ms | host ms | kernel ms | launches |")
    print("|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['key']} | error | | | |")
        else:
            print(
                f"| {r['key']} | {r['step_ms']:.2f} | {r['host_ms']:.2f} | {r['kernel_ms_per_step']:.2f}"
                f" | {r['launches_per_step']:.0f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
