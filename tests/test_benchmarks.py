"""The benchmark harness on the CPU: it runs end to end, writes valid records, and rebuilds its report.

Timings are not asserted (CPU, shared cores); what is checked is what the GPU
run relies on: every row gets a schema-valid record whatever happens to it, the
time budget skips instead of overrunning, and the table and plots come back
from the JSON alone.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from benchmarks import backends, measure, report, run
from benchmarks.backends import graphopt_option_names
from benchmarks.models import MODELS, get_model, logits_of
from benchmarks.record import new_record, read_results, schema_errors, write_results
from benchmarks.row_process import RowProcess
from benchmarks.rows import Row, plan_rows

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: str) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path


def _assert_report_files(folder: str, records: list[dict]) -> None:
    with open(os.path.join(folder, report.TABLE_FILE)) as f:
        table = f.read()
    for r in records:
        assert f"| {r['model']} | {r['mode']} | {r['label']} |" in table
    _assert_png(os.path.join(folder, report.SPEEDUP_PLOT))
    _assert_png(os.path.join(folder, report.PARETO_PLOT))


def test_plan_rows_budgets_only_for_compiled_training():
    rows = plan_rows(["tiny"], ["train", "infer"], ["eager", "inductor", "graphopt"], ["bf16"], [0.5, 0.2], True)
    keys = [r.key for r in rows]
    assert len(keys) == len(set(keys))
    budgeted = {(r.mode, r.backend) for r in rows if r.memory_budget is not None}
    assert budgeted == {("train", "inductor"), ("train", "graphopt")}
    assert {r.label for r in rows if r.mode == "train"} == {
        "eager",
        "inductor",
        "inductor-cg",
        "inductor-budget50",
        "inductor-budget20",
        "graphopt",
        "graphopt-cg",
        "graphopt-budget50",
        "graphopt-budget20",
    }
    assert Row("tiny", "train", "graphopt", "fp32", 0.3, True).label == "graphopt-budget30-cg-fp32"


def test_ablation_rows_turn_one_graphopt_option_off():
    rows = plan_rows(["tiny"], ["infer"], ["inductor", "graphopt"], ["bf16"], [], False, ["channels_last", "fusion"])
    assert [r.label for r in rows] == ["inductor", "graphopt", "graphopt-no_channels_last", "graphopt-no_fusion"]
    assert backends.compile_options(rows[2], None) == {"options": {"channels_last": False}}
    with pytest.raises(SystemExit):
        run.parse_args(["--graphopt-ablations", "memory_budget", "--out", "x"])


def test_trial_rows_turn_one_graphopt_option_on():
    rows = plan_rows(["tiny"], ["train"], ["graphopt"], ["bf16"], [], False, [], ["remat_compress"])
    assert [r.label for r in rows] == ["graphopt", "graphopt-with_remat_compress"]
    assert backends.compile_options(rows[1], None) == {"options": {"remat_compress": True}}
    assert run.parse_args(["--graphopt-trials", "remat_compress", "--out", "x"]).graphopt_trials == ["remat_compress"]
    with pytest.raises(SystemExit):  # on by default: an ablation, not a trial
        run.parse_args(["--graphopt-trials", "fusion", "--out", "x"])


def test_a_trial_joined_with_plus_turns_each_option_on_in_one_row():
    trial = run.parse_args(["--graphopt-trials", "remat_compress+cuda_graphs", "--out", "x"]).graphopt_trials
    rows = plan_rows(["tiny"], ["train"], ["graphopt"], ["bf16"], [], False, [], trial)
    assert Row.from_label("tiny", "train", rows[1].label) == rows[1]
    assert backends.compile_options(rows[1], None) == {"options": {"remat_compress": True, "cuda_graphs": True}}
    with pytest.raises(SystemExit):
        run.parse_args(["--graphopt-trials", "remat_compress+fusion", "--out", "x"])


def test_suite_models_build_lazily_and_tiny_runs():
    assert {"gpt2", "llama", "resnet50", "vit", "mlp", "tiny"} <= set(MODELS)
    spec = get_model("tiny")
    model = spec.build(torch.device("cpu"))
    (x,) = spec.inputs(0, torch.device("cpu"))
    assert torch.equal(x, spec.inputs(0, torch.device("cpu"))[0])
    assert not torch.equal(x, spec.inputs(1, torch.device("cpu"))[0])
    assert logits_of(model(x)).shape == x.shape
    with pytest.raises(ValueError, match="unknown benchmark model"):
        get_model("nope")


def test_inductor_budget_is_set_only_while_its_row_runs():
    default = torch._functorch.config.activation_memory_budget
    with backends.compile_config(Row("tiny", "train", "inductor", memory_budget=0.3)):
        assert torch._functorch.config.activation_memory_budget == 0.3
    with backends.compile_config(Row("tiny", "train", "graphopt", memory_budget=0.3)):
        assert torch._functorch.config.activation_memory_budget == default
    assert torch._functorch.config.activation_memory_budget == default
    assert backends.compile_options(Row("tiny", "train", "inductor", memory_budget=0.3, cuda_graphs=True), None) == {
        "mode": "reduce-overhead",
        "activation_memory_budget": 0.3,
    }


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU kernels need a C++ compiler")
def test_inductor_rows_record_a_warm_compile_from_inductors_own_caches(tmp_path):
    """The bar for graphopt's warm compile: inductor compiled again with its caches as the cold
    compile left them, which it loads from (FX-graph and AOTAutograd cache hits)."""
    out = str(tmp_path / "run")
    argv = ["--models", "tiny", "--modes", "infer", "--backends", "inductor", "--device", "cpu"]
    assert run.main([*argv, "--out", out]) == 0
    (record,) = read_results(out)
    assert record["status"] == "ok", record["error"]
    assert 0 < record["warm_compile_s"] < record["compile_s"]
    assert record["warm_aot_cache"]["fxgraph_cache_hit"] > 0 and record["warm_aot_cache"]["problems"] == []


def test_fewer_than_20_timed_steps_rejected(capsys):
    with pytest.raises(SystemExit):
        run.parse_args(["--steps", "19", "--out", "x"])
    assert "at least 20" in capsys.readouterr().err


@pytest.mark.slow
def test_run_end_to_end_on_cpu_then_rebuild_report(tmp_path):
    out = str(tmp_path / "run")
    argv = ["--models", "tiny", "--modes", "train,infer", "--backends", "eager,graphopt", "--device", "cpu"]
    assert run.main([*argv, "--out", out]) == 0
    records = read_results(out)  # raises on any schema error
    assert [r["key"] for r in records] == [
        "tiny-train-eager",
        "tiny-train-graphopt",
        "tiny-infer-eager",
        "tiny-infer-graphopt",
    ]
    for r in records:
        assert r["status"] == "ok", r["error"]
        assert len(r["step_ms"]) == 20 and all(t > 0 for t in r["step_ms"])
        assert r["timer"] == "perf_counter" and r["device"] == "cpu"
        assert r["versions"]["torch"] == torch.__version__
        assert r["compile_s"] > 0 and r["peak_bytes"] is None
        assert "--models tiny" in r["command"]
    graphopt_rows = [r for r in records if r["backend"] == "graphopt"]
    warm_expected = "cache_dir" in graphopt_option_names()
    assert all((r["warm_compile_s"] is not None) == warm_expected for r in graphopt_rows)
    assert all(r["warm_compile_s"] is None for r in records if r["backend"] == "eager")
    if warm_expected:  # the second warm compile loads what the first stored in torch's AOTAutograd cache
        assert all(r["warm_aot_cache"].get("hit", 0) > 0 for r in graphopt_rows), [r["warm_aot_cache"] for r in graphopt_rows]
        assert all(r["warm_aot_cache"]["problems"] == [] for r in graphopt_rows), [r["warm_aot_cache"] for r in graphopt_rows]
    _assert_report_files(out, records)

    # the report rebuilds from the JSON alone, and merges run folders into a new one
    for name in (report.TABLE_FILE, report.SPEEDUP_PLOT, report.PARETO_PLOT):
        os.remove(os.path.join(out, name))
    assert report.main([out]) == 0
    _assert_report_files(out, records)
    second = str(tmp_path / "second")
    shutil.copytree(out, second)
    merged = str(tmp_path / "merged")
    assert report.main([out, second, "--out", merged]) == 0
    assert len(read_results(merged)) == 2 * len(records)
    _assert_report_files(merged, records)


def _tiny_graphopt_inference_row(tmp_path, flag: str) -> dict:
    """The record of a run of one row, tiny model inference through graphopt on the CPU, with `flag`."""
    out = str(tmp_path / "run")
    argv = ["--models", "tiny", "--modes", "infer", "--backends", "graphopt", "--device", "cpu", flag]
    assert run.main([*argv, "--out", out]) == 0
    (record,) = read_results(out)
    assert record["status"] == "ok", record["error"]
    return record


def test_no_warm_compile_skips_the_warm_compiles(tmp_path):
    """What remat_sweep asks for: its rows measure steps and memory only."""
    record = _tiny_graphopt_inference_row(tmp_path, "--no-warm-compile")
    assert record["warm_compile"] is False and record["compile_s"] > 0
    assert record["warm_compile_s"] is None and record["warm_tuning_only_compile_s"] is None


def test_a_profiled_warm_compile_says_which_packages_took_the_time(tmp_path):
    record = _tiny_graphopt_inference_row(tmp_path, "--profile-warm-compile")
    profile = record["warm_compile_profile"]
    assert profile["by_package"]["dynamo"] > 0 and profile["by_package"]["graphopt"] > 0
    assert abs(sum(profile["by_package"].values()) - profile["total_s"]) < 1e-6
    assert record["warm_compile_s"] is not None  # measured without the profiler, before it


def test_profiled_functions_are_told_apart_by_package():
    import graphopt.runtime
    from benchmarks.compile_profile import package_of

    assert package_of(graphopt.runtime.__file__) == "graphopt"
    assert package_of("<graphopt launcher fused_0>") == "graphopt"
    assert package_of(torch._dynamo.convert_frame.__file__) == "dynamo"
    assert package_of(torch.fx.graph.__file__) == "fx"
    assert package_of(torch.nn.modules.module.__file__) == "torch (other)"
    assert package_of("~") == "C builtins"


def test_hung_rows_are_killed_recorded_and_the_run_goes_on(tmp_path):
    out = str(tmp_path / "run")
    argv = ["--models", "tiny", "--modes", "infer", "--backends", "eager,graphopt", "--device", "cpu"]
    assert run.main([*argv, "--row-timeout-s", "0.5", "--out", out]) == 0
    records = read_results(out)
    assert [r["status"] for r in records] == ["error", "error"]
    assert all(r["error"].startswith("killed after") for r in records)
    assert sorted(os.listdir(os.path.join(out, "logs"))) == sorted(f"{r['key']}.log" for r in records)
    _assert_report_files(out, records)


def test_a_row_process_started_ahead_is_cancelled_without_leftovers(tmp_path):
    row = Row("tiny", "infer", "eager")
    process = RowProcess(row, new_record(row.as_dict(), row.key, row.label, _RUN, _SETTINGS, {}), "cpu", str(tmp_path))
    assert os.path.exists(process.job_path)
    process.cancel()
    assert process._child.returncode is not None
    assert os.listdir(tmp_path / "logs") == []


def test_time_budget_skips_rows_without_starting_them(tmp_path):
    out = str(tmp_path / "run")
    argv = ["--models", "tiny", "--modes", "train", "--backends", "eager,graphopt", "--memory-budgets", "0.5"]
    assert run.main([*argv, "--device", "cpu", "--time-budget-s", "0", "--out", out]) == 0
    records = read_results(out)
    assert [r["label"] for r in records] == ["eager", "graphopt", "graphopt-budget50"]
    assert all(r["status"] == "skipped" for r in records)
    assert records[0]["error"] == "time budget of 0 s used up"
    if "memory_budget" not in graphopt_option_names():
        assert records[2]["error"] == "graphopt has no option memory_budget"
    assert not os.path.exists(os.path.join(out, "logs"))
    _assert_report_files(out, records)


def test_a_failing_row_records_its_error(tmp_path):
    row = Row("no-such-model", "train", "eager")
    record = new_record(row.as_dict(), row.key, row.label, _RUN, _SETTINGS, {})
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"row": row.as_dict(), "device": "cpu", "record": record}))
    assert measure.main([str(job)]) == 0
    result = json.loads(job.read_text())["record"]
    assert schema_errors(result) == []
    assert result["status"] == "error" and "unknown benchmark model 'no-such-model'" in result["error"]
    assert result["device_name"] is not None and result["step_ms_median"] is None


_RUN = {"run_id": "r1", "date": "2026-01-01T00:00:00+00:00", "command": "python -m benchmarks.run", "git_commit": None}
_SETTINGS = {"steps": 20, "warmup": 3, "input_sets": 3, "warm_compile": True, "profile_warm_compile": False}


def _gpu_record(mode: str, backend: str, step_ms: float, peak_gib: float, budget: float | None = None) -> dict:
    row = Row("gpt2", mode, backend, memory_budget=budget)
    record = new_record(row.as_dict(), row.key, row.label, _RUN, _SETTINGS, {})
    record.update(
        status="ok",
        device="cuda",
        device_name="NVIDIA H100 80GB HBM3",
        versions={"torch": "2.11.0+cu130", "triton": "3.6.0", "graphopt": "0.1.0"},
        step_ms=[step_ms] * 20,
        step_ms_median=step_ms,
        peak_bytes=int(peak_gib * 2**30),
        compile_s=30.0,
    )
    return record


def test_report_speedups_are_against_inductor_of_the_same_run(tmp_path):
    # BENCHMARKING.md's reference figures, plus a made-up graphopt sweep
    records = [
        _gpu_record("train", "eager", 64.9, 9.44),
        _gpu_record("train", "inductor", 32.7, 6.09),
        _gpu_record("train", "inductor", 39.3, 4.51, budget=0.5),
        _gpu_record("train", "graphopt", 30.0, 6.0),
        _gpu_record("train", "graphopt", 31.0, 4.4, budget=0.5),
        _gpu_record("infer", "eager", 23.1, 1.86),
    ]
    other_run = {**_gpu_record("infer", "inductor", 7.96, 1.66), "run_id": "r2"}
    records.append(other_run)
    for r in records:
        assert schema_errors(r) == []
    ratios = report.speedup_vs_inductor(records)
    assert ratios[("r1", "gpt2-train-eager")] == pytest.approx(32.7 / 64.9)
    assert ratios[("r1", "gpt2-train-graphopt-budget50")] == pytest.approx(32.7 / 31.0)
    assert ("r1", "gpt2-infer-eager") not in ratios  # its inductor row belongs to another run
    table = report.markdown_table(records)
    assert "| gpt2 | train | inductor-budget50 | 39.30 | 4.51 | 0.83x | 30.0 |" in table
    folder = str(tmp_path / "gpu")
    write_results(folder, records)
    assert report.main([folder]) == 0
    _assert_report_files(folder, records)


def test_malformed_results_are_rejected(tmp_path):
    record = _gpu_record("train", "eager", 1.0, 1.0)
    del record["peak_bytes"]
    record["status"] = "fine"
    errors = schema_errors(record)
    assert "missing field 'peak_bytes'" in errors and any("status 'fine'" in e for e in errors)
    write_results(str(tmp_path), [record])
    with pytest.raises(ValueError, match="peak_bytes"):
        read_results(str(tmp_path))


def test_host_profile_ranks_functions_by_their_own_time_per_step():
    from benchmarks.profile_kernels import _host_profile

    def slow_helper():
        return sum(i * i for i in range(20000))

    def step(i):
        slow_helper()

    top = _host_profile(step, 5, torch.device("cpu"))
    assert any("slow_helper" in row["function"] or "genexpr" in row["function"] for row in top[:2])
    assert all(row["own_us_per_step"] >= 0 for row in top)
    assert max(row["calls_per_step"] for row in top if "slow_helper" in row["function"]) == 1


def test_host_ms_times_each_step_on_its_own():
    import time

    from benchmarks.timing import host_ms

    seen = []

    def step(i):
        seen.append(i)
        time.sleep(0.2 if i == 3 else 0.0)

    times = host_ms(step, 2, 3, torch.device("cpu"))
    assert seen == [2, 3, 4]
    # margins wide enough for a loaded 2-core machine (an empty step once took 4.4 ms there)
    assert times[1] >= 200.0 and times[0] < 100.0 and times[2] < 100.0


@pytest.mark.parametrize(
    "row",
    [
        Row("gpt2", "train", "inductor"),
        Row("gpt2", "train", "graphopt", cuda_graphs=True),
        Row("gpt2", "infer", "graphopt", graphopt_off="pad_matmuls"),
        Row("gpt2", "train", "graphopt", graphopt_on="remat_compress"),
        Row("llama", "train", "inductor", precision="fp32", memory_budget=0.5),
    ],
    ids=lambda row: row.label,
)
def test_a_row_label_names_its_row(row):
    assert Row.from_label(row.model, row.mode, row.label) == row


@pytest.mark.parametrize("label", ["inductr", "graphopt-fast", "graphopt-budgetx"])
def test_a_label_that_names_no_row_is_refused(label):
    with pytest.raises(ValueError, match="unknown"):
        Row.from_label("gpt2", "train", label)
