"""benchmarks/remat_sweep.py's summary: points by budget, dominance and slowdown goals."""

from __future__ import annotations

from benchmarks.remat_sweep import summarize, table

GIB = 2**30


def _record(backend, budget, ms, gib, status="ok"):
    return {
        "status": status, "mode": "train", "cuda_graphs": False, "model": "gpt2", "backend": backend,
        "memory_budget": budget, "step_ms_median": ms, "peak_bytes": gib * GIB, "compile_s": 10.0,
        "pass_seconds": {"remat": 1.5} if backend == "graphopt" else {},
    }  # fmt: skip


def test_graphopt_dominates_when_faster_at_no_more_memory_everywhere():
    records = [
        _record("inductor", None, 30.0, 6.0), _record("inductor", 0.5, 36.0, 4.5),
        _record("graphopt", 1.0, 25.0, 6.0), _record("graphopt", 0.5, 26.0, 4.0),
        _record("graphopt", 0.3, 40.0, 3.0, status="error"),
    ]  # fmt: skip
    entry = summarize(records)["models"]["gpt2"]
    assert entry["graphopt_dominates"] is True
    assert entry["graphopt_half_budget_slowdown"] == 26.0 / 25.0
    assert entry["max_remat_s"] == 1.5
    assert set(entry["points"]["graphopt"]) == {"1.0", "0.5"}  # the failed row is left out
    text = table(summarize(records))
    assert "| gpt2 | 0.5 | 26.00 | 4.00 | 36.00 | 4.50 | 1.385 | 1.040 | 1.50 |" in text


def test_no_dominance_when_inductor_has_a_point_graphopt_cannot_match():
    records = [
        _record("inductor", None, 30.0, 6.0), _record("inductor", 0.1, 50.0, 2.0),
        _record("graphopt", 1.0, 25.0, 6.0), _record("graphopt", 0.1, 49.0, 2.0),
    ]  # fmt: skip
    assert summarize(records)["models"]["gpt2"]["graphopt_dominates"] is False
