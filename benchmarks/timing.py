"""Timing one step: CUDA events on a GPU, the host clock elsewhere.

GPU work is asynchronous, so a host clock around a step measures launch time,
not the step; events recorded on the stream measure the device's time. The CPU
run (tests) has no events and uses perf_counter, which is exact there.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer_name(device: torch.device) -> str:
    return "cuda_events" if device.type == "cuda" else "perf_counter"


def time_steps(step: Callable[[int], None], first: int, count: int, device: torch.device) -> list[float]:
    """Milliseconds of `step(i)` for i in first..first+count-1, each timed on its own.

    On CUDA all events are read after one synchronize at the end, so timing adds
    no host stall between steps.
    """
    if device.type == "cuda":
        pairs = []
        for i in range(first, first + count):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(i)
            end.record()
            pairs.append((start, end))
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in pairs]
    times = []
    for i in range(first, first + count):
        begin = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - begin) * 1e3)
    return times


def host_ms(step: Callable[[int], None], first: int, count: int, device: torch.device) -> list[float]:
    """Milliseconds the host takes to issue `step(i)` (Python, launches) from an idle device.

    The device is synchronized before each step, so the host is never held back by a full
    launch queue and the time is the host's own. A step whose host time is near its device
    time (time_steps) is host-bound: any host hiccup leaves the GPU idle, and step times
    vary from step to step."""
    times = []
    for i in range(first, first + count):
        synchronize(device)
        begin = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - begin) * 1e3)
    synchronize(device)
    return times


def time_call_s(call: Callable[[], None], device: torch.device) -> float:
    """Wall seconds of one call up to the completion of its device work (first calls: compile included)."""
    synchronize(device)
    begin = time.perf_counter()
    call()
    synchronize(device)
    return time.perf_counter() - begin
