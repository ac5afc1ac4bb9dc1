"""The JSON record of one benchmark row: its fields, their types, and the file that holds them.

`run` writes these records, `report` reads them back (possibly from several run
folders), and the tests check them: all three use the schema below, so a renamed
field breaks loudly in one place.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

RESULTS_FILE = "results.json"
FORMAT_VERSION = 1

STATUSES = ("ok", "error", "skipped")

_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))
_OPTIONAL_STR = (str, type(None))

# field -> accepted Python types after json.load
SCHEMA: dict[str, tuple[type, ...]] = {
    # the run this row belongs to: speedups are ratios within one run
    "run_id": (str,),
    "date": (str,),
    "command": (str,),
    "git_commit": _OPTIONAL_STR,
    # the row
    "key": (str,),
    "label": (str,),
    "model": (str,),
    "mode": (str,),
    "backend": (str,),
    "precision": (str,),
    "memory_budget": _OPTIONAL_NUMBER,
    "cuda_graphs": (bool,),
    "graphopt_off": _OPTIONAL_STR,
    "graphopt_on": _OPTIONAL_STR,
    "status": (str,),
    "error": _OPTIONAL_STR,
    # where it ran (null when the row never started)
    "device": _OPTIONAL_STR,
    "device_name": _OPTIONAL_STR,
    "versions": (dict,),
    # how it was measured
    "steps": (int,),
    "warmup": (int,),
    "input_sets": (int,),
    "warm_compile": (bool,),  # whether the row measured warm compiles after its steps
    "profile_warm_compile": (bool,),  # whether the last warm compile ran under cProfile
    "timer": _OPTIONAL_STR,
    "compile_options": (dict,),
    # what was measured (null when the row did not get that far)
    "step_ms_median": _OPTIONAL_NUMBER,
    "step_ms": (list,),
    "peak_bytes": _OPTIONAL_NUMBER,
    "allocations_per_step": _OPTIONAL_NUMBER,  # caching-allocator allocations (CUDA), host work per step
    "host_ms_median": _OPTIONAL_NUMBER,  # the host's time to issue one step from an idle GPU (CUDA)
    "compile_s": _OPTIONAL_NUMBER,
    "warm_tuning_only_compile_s": _OPTIONAL_NUMBER,
    "warm_compile_s": _OPTIONAL_NUMBER,
    "warm_aot_cache": (dict, type(None)),
    "warm_compile_profile": (dict, type(None)),  # benchmarks.compile_profile.summarize of the last warm compile
    "warm_cache_hits": _OPTIONAL_NUMBER,
    "warm_cache_misses": _OPTIONAL_NUMBER,
    "graph_breaks": _OPTIONAL_NUMBER,
    "pass_seconds": (dict,),
    "fallbacks": (list,),
    "wall_s": _NUMBER,
}
# Fields added after results were first committed: absent from older files, read as these values.
ADDED_FIELDS: dict[str, Any] = {
    "graphopt_off": None,
    "graphopt_on": None,
    "warm_tuning_only_compile_s": None,
    "warm_aot_cache": None,
    "allocations_per_step": None,
    "warm_compile": True,
    "host_ms_median": None,
    "profile_warm_compile": False,
    "warm_compile_profile": None,
}


def new_record(
    row_fields: dict[str, Any], key: str, label: str, run: dict[str, Any], settings: dict[str, Any], compile_options: dict
) -> dict[str, Any]:
    """A record with every measured field empty: what a row that never got to run reports."""
    record: dict[str, Any] = {name: None for name in SCHEMA}
    record.update(run, **row_fields, **settings)
    record.update(
        key=key,
        label=label,
        status="skipped",
        versions={},
        compile_options=compile_options,
        pass_seconds={},
        step_ms=[],
        fallbacks=[],
        wall_s=0.0,
    )
    return record


def schema_errors(record: dict[str, Any]) -> list[str]:
    """What is wrong with a record (missing/unknown fields, wrong types, bad status); empty if valid."""
    errors = [f"missing field {name!r}" for name in SCHEMA if name not in record and name not in ADDED_FIELDS]
    errors += [f"unknown field {name!r}" for name in record if name not in SCHEMA]
    for name, types in SCHEMA.items():
        if name in record and not isinstance(record[name], types):
            errors.append(f"field {name!r} is {type(record[name]).__name__}, expected {'|'.join(t.__name__ for t in types)}")
    if record.get("status") not in STATUSES:
        errors.append(f"status {record.get('status')!r} is not one of {STATUSES}")
    if record.get("status") == "ok" and record.get("step_ms_median") is None:
        errors.append("status ok without step_ms_median")
    return errors


def write_results(folder: str, records: list[dict[str, Any]]) -> str:
    """Write (atomically, so a killed run leaves the last complete version) DIR/results.json."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, RESULTS_FILE)
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"format": FORMAT_VERSION, "records": records}, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def read_results(folder: str) -> list[dict[str, Any]]:
    """The records of DIR/results.json; raises ValueError naming the file if one is malformed."""
    path = os.path.join(folder, RESULTS_FILE)
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {data.get('format')!r}, expected {FORMAT_VERSION}")
    for i, record in enumerate(data["records"]):
        if errors := schema_errors(record):
            raise ValueError(f"{path}: record {i}: " + "; ".join(errors))
    return [{**ADDED_FIELDS, **record} for record in data["records"]]
