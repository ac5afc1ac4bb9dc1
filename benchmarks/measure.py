"""Measure one benchmark row in this process: `python -m benchmarks.measure JOB.json [--wait-for-go]`.

`benchmarks.run` starts one such process per row, so no compiled code, kernel
cache or allocator state of one row reaches the next, and a crash or hang ends
only its own row. `run` also points inductor's and Triton's on-disk caches at a
fresh folder per row, so the first call is a cold compile.

The job file holds the row, the settings and the record to fill; the process
writes the record back to the same file whatever happens, with what it measured
up to a failure and the error. With --wait-for-go it first imports what the row
needs, then waits for a `go` line on stdin before touching the device: `run`
starts the next row's process while the current row measures, so the imports
(seconds per row) overlap with measuring instead of adding to the run's time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import statistics
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import torch

from benchmarks import backends, environment, timing
from benchmarks.models import get_model, logits_of
from benchmarks.rows import Row


def _precision_context(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return contextlib.nullcontext
    raise ValueError(f"unknown precision {precision!r}")


def _step_function(
    call: Callable[..., Any], model: torch.nn.Module, row: Row, inputs: list[tuple[torch.Tensor, ...]], device
) -> Callable[[int], None]:
    """step(i) runs one training or inference step on input set i (rotating)."""
    precision = _precision_context(row.precision, device)
    # inductor's CUDA graph trees must be told where an iteration starts when outputs are not consumed
    mark_step = torch.compiler.cudagraph_mark_step_begin if row.cuda_graphs else (lambda: None)

    def train(i: int) -> None:
        mark_step()
        model.zero_grad(set_to_none=True)
        with precision():
            out = call(*inputs[i % len(inputs)])
        logits_of(out).mean().backward()

    def infer(i: int) -> None:
        mark_step()
        with torch.no_grad(), precision():
            call(*inputs[i % len(inputs)])

    return train if row.mode == "train" else infer


def _graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


def _fallbacks() -> list[dict[str, Any]]:
    from graphopt.fallback import fallbacks

    return [{"op": f.op, "reason": f.reason, "count": n} for f, n in fallbacks().items()]


@contextlib.contextmanager
def _pass_seconds(row: Row, record: dict[str, Any]) -> Iterator[None]:
    """For graphopt rows: seconds spent in each graphopt pass (summed over graphs) while the block runs."""
    if row.backend != "graphopt":
        yield
        return
    from graphopt import events

    with events.capture() as graphs:
        yield
    seconds: dict[str, float] = {}
    for graph in graphs:
        for pass_record in graph.records:
            seconds[pass_record.name] = seconds.get(pass_record.name, 0.0) + pass_record.seconds
    record["pass_seconds"] = seconds


def _warm_compile(model, row, cache_dir, inputs, device, record: dict[str, Any]) -> None:
    """Compile again from a reset Dynamo with the same tuning-cache folder, twice: the first finds the
    tuning cache warm and stores the compiled graphs in torch's AOTAutograd cache (the cold compile
    ran under events.capture, which stores nothing: graphopt/artifact_cache.py), the second finds
    both warm, as a user's next process does. The second is `warm_compile_s`."""
    from graphopt.cache import lookups, reset_lookups

    from torch._dynamo.utils import counters

    with _aot_cache_problems() as problems:
        for key in ("warm_tuning_only_compile_s", "warm_compile_s"):
            torch._dynamo.reset()
            reset_lookups()
            counters["aot_autograd"].clear()
            compiled = backends.compile_model(model, row, cache_dir)
            step = _step_function(compiled, model, row, inputs, device)
            record[key] = timing.time_call_s(lambda: step(0), device)
            seen = lookups()
            record["warm_cache_hits"] = sum(lookup.hit for lookup in seen)
            record["warm_cache_misses"] = sum(not lookup.hit for lookup in seen)
    # torch's AOTAutograd-cache events of the last compile (hit, miss, saved, bypass), and what went
    # wrong in either (a bypass, or a graph that could not be saved by the first or loaded by the
    # second): whether it loaded graphopt's compiled graphs (graphopt/artifact_cache.py), and if not, why
    aot_events = {name.removeprefix("autograd_cache_"): n for name, n in counters["aot_autograd"].items() if "cache" in name}
    record["warm_aot_cache"] = {**aot_events, "problems": sorted(set(problems))}


def _warm_compile_inductor(model, row, inputs, device, record: dict[str, Any]) -> None:
    """Compile again from a reset Dynamo, in the same process, with inductor's caches as the cold
    compile left them (its FX-graph and AOTAutograd caches on by default, in the row's fresh cache
    folder): the bar for graphopt's `warm_compile_s`. Its cache events go to `warm_aot_cache`."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters["aot_autograd"].clear()
    counters["inductor"].clear()
    with _aot_cache_problems() as problems:
        compiled = backends.compile_model(model, row, cache_dir=None)
        step = _step_function(compiled, model, row, inputs, device)
        record["warm_compile_s"] = timing.time_call_s(lambda: step(0), device)
    aot_events = {name.removeprefix("autograd_cache_"): n for name, n in counters["aot_autograd"].items() if "cache" in name}
    fx_events = {name: n for name, n in counters["inductor"].items() if name.startswith("fxgraph_cache")}
    record["warm_aot_cache"] = {**aot_events, **fx_events, "problems": sorted(set(problems))}


def _profile_warm_compile(model, row, cache_dir, inputs, device, record: dict[str, Any]) -> None:
    """One more warm compile, under cProfile (the measured ones are not, cProfile slows them down):
    `warm_compile_profile`, host seconds per package (benchmarks/compile_profile.py)."""
    from benchmarks.compile_profile import profiled

    torch._dynamo.reset()
    compiled = backends.compile_model(model, row, cache_dir)
    step = _step_function(compiled, model, row, inputs, device)
    _, record["warm_compile_profile"] = profiled(lambda: timing.time_call_s(lambda: step(0), device))


_AOT_CACHE_PROBLEMS = ("Bypassing", "unable to serialize", "unable to load")


@contextlib.contextmanager
def _aot_cache_problems() -> Iterator[list[str]]:
    """What torch's AOTAutograd cache logs (INFO and WARNING) about bypassing it, or failing to save
    or load a compiled graph, while the block runs."""
    logger = logging.getLogger("torch._functorch._aot_autograd.autograd_cache")
    reasons: list[str] = []

    class _Collect(logging.Handler):
        def emit(self, entry: logging.LogRecord) -> None:
            message = entry.getMessage()
            if any(problem in message for problem in _AOT_CACHE_PROBLEMS):
                reasons.append(message[:300])

    handler, level = _Collect(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield reasons
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def measure(row: Row, device: torch.device, record: dict[str, Any], save: Callable[[], None]) -> None:
    """Fill `record` with the row's measurements, calling `save` after each phase, so that a row
    killed by its timeout keeps what it measured; raises on failure, leaving what was measured."""
    record["device"] = device.type
    record["device_name"] = environment.device_name(device)
    record["versions"] = environment.versions()
    record["timer"] = timing.timer_name(device)
    spec = get_model(row.model)
    model = spec.build(device)
    if row.mode == "infer":
        model.eval()
    inputs = [spec.inputs(seed, device) for seed in range(record["input_sets"])]
    with tempfile.TemporaryDirectory(prefix="graphopt-bench-cache-") as cache_dir, backends.compile_config(row):
        compiled = backends.compile_model(model, row, cache_dir)
        step = _step_function(compiled, model, row, inputs, device)
        with _pass_seconds(row, record):
            record["compile_s"] = timing.time_call_s(lambda: step(0), device)
        save()
        for i in range(1, 1 + record["warmup"]):
            step(i)
        timing.synchronize(device)
        record["graph_breaks"] = _graph_breaks()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            allocations = torch.cuda.memory_stats(device)["allocation.all.allocated"]
        times = timing.time_steps(step, 1 + record["warmup"], record["steps"], device)
        record["step_ms"] = times
        record["step_ms_median"] = statistics.median(times)
        if device.type == "cuda":
            record["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            allocated = torch.cuda.memory_stats(device)["allocation.all.allocated"] - allocations
            record["allocations_per_step"] = allocated / len(times)
            record["host_ms_median"] = statistics.median(timing.host_ms(step, 0, len(inputs) * 3, device))
        save()
        # (not inductor's CUDA-graph rows: its CUDA graph trees of the first compile are still alive then)
        warm = record["warm_compile"] and (
            (row.backend == "inductor" and not row.cuda_graphs)
            or (row.backend == "graphopt" and backends.supports_warm_cache())
        )
        if not warm:
            return
        del compiled, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if row.backend == "inductor":
            _warm_compile_inductor(model, row, inputs, device, record)
        else:
            _warm_compile(model, row, cache_dir, inputs, device, record)
        if record["profile_warm_compile"]:
            _profile_warm_compile(model, row, None if row.backend == "inductor" else cache_dir, inputs, device, record)


def _import_ahead(row: Row) -> None:
    """Import the modules the row will need (model library, compiler) before its turn comes."""
    modules = list(get_model(row.model).modules)
    modules.append({"graphopt": "graphopt.backend", "inductor": "torch._inductor.compile_fx"}.get(row.backend, "torch"))
    for module in modules:
        importlib.import_module(module)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.measure")
    parser.add_argument("job", help="job file: row, device, record; the record is written back into it")
    parser.add_argument("--wait-for-go", action="store_true", help="import ahead, then wait for `go` on stdin")
    args = parser.parse_args(argv)
    job_path = args.job
    with open(job_path) as f:
        job = json.load(f)
    record = job["record"]
    row = Row(**job["row"])
    device = torch.device(job["device"])

    def save() -> None:
        if row.backend == "graphopt":
            record["fallbacks"] = _fallbacks()
        partial = job_path + ".partial"  # written aside and renamed: a kill never leaves half a file
        with open(partial, "w") as f:
            json.dump({**job, "record": record}, f, indent=1)
        os.replace(partial, job_path)

    try:
        if args.wait_for_go:
            _import_ahead(row)
            if sys.stdin.readline().strip() != "go":
                return 0  # the run ended or skipped this row before its turn: nothing to record
        measure(row, device, record, save)
        record["status"] = "ok"
    except Exception as e:  # noqa: BLE001  any failure of the row is its result, recorded, not raised
        traceback.print_exc()
        record["status"] = "error"
        record["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
