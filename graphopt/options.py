"""Every user option of graphopt, parsed from `torch.compile(..., options={...})`.

One frozen dataclass so a compiled graph's behaviour is a value: it can be hashed
into the tuning-cache key and printed in a report. Each field carries its own
parser and a one-line description in its metadata; the README's options table and
the error messages are made from the same metadata, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


class OptionsError(ValueError):
    """A malformed `options={...}` entry or `mode=`: says what is valid."""


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise OptionsError(f"expected True or False, got {value!r}")


def _as_optional_path(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value:
        return value
    import os

    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise OptionsError(f"expected a directory path (str) or None, got {value!r}")


_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _as_memory_budget(value: Any) -> float | int | None:
    """None; a fraction 0.0..1.0 (kept as float); or a size string like "12GiB" (kept as int bytes)."""
    import re

    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
        return float(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*", value, flags=re.IGNORECASE)
        if match:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    raise OptionsError(f"expected None, a fraction between 0.0 and 1.0, or a size like '12GiB', got {value!r}")


def _as_positive_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    raise OptionsError(f"expected a positive number, got {value!r}")


def _option(default: Any, parse: Callable[[Any], Any], valid: str, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"parse": parse, "valid": valid, "help": help})


@dataclasses.dataclass(frozen=True)
class Options:
    """The options of one `torch.compile(..., backend="graphopt")` call."""

    fusion: bool = _option(
        True, _as_bool, "True | False", "fuse pointwise/reduction regions into generated Triton kernels"
    )
    channels_last: bool = _option(
        True,
        _as_bool,
        "True | False",
        "run 2-D convolutions (forward and backward) channels-last where the device's convolutions prefer it (CUDA)",
    )
    pad_matmuls: bool = _option(
        True,
        _as_bool,
        "True | False",
        "zero-pad matrix products whose sizes break cuBLAS's 16-byte alignment (CUDA), when the roofline says it pays",
    )
    recompute_prologues: bool = _option(
        True,
        _as_bool,
        "True | False",
        "give reductions across rows (bias and norm-weight gradients) their own copy of the pointwise work they"
        " read instead of reading it from memory, and merge kernels that read the same inputs or outputs of"
        " the same kernel (fewer launches and bytes)",
    )
    batch_casts: bool = _option(
        True,
        _as_bool,
        "True | False",
        "make the generated kernels that only cast a graph input (autocast's parameter casts) or a returned value"
        " (gradients) to another dtype with one multi-tensor ATen call per graph, where that does not raise the"
        " estimated peak memory (fewer launches)",
    )
    fuse_batch_norm: bool = _option(
        False,
        _as_bool,
        "True | False",
        "run training batch norm, forward and backward, as per-channel reductions and pointwise work that fuse"
        " with the ReLU, residual add and running-statistics updates around them, instead of cuDNN's kernels"
        " (off until measured on a GPU)",
    )
    batch_write_backs: bool = _option(
        False,
        _as_bool,
        "True | False",
        "make the copies that write a graph's updated inputs back at its end (batch norm's running statistics)"
        " with one multi-tensor ATen call per dtype pair (fewer launches; off until measured on a GPU)",
    )
    planned_views: bool = _option(
        True,
        _as_bool,
        "True | False",
        "run views whose layout is static as a stride check and an alias instead of an ATen call (less host time)",
    )
    reuse_buffers: bool = _option(
        True,
        _as_bool,
        "True | False",
        "write generated kernels' outputs into buffers that died earlier in the graph when that does not raise the estimated peak (fewer allocations)",
    )
    debug_dir: str | None = _option(
        None,
        _as_optional_path,
        "a directory path | None",
        "write every compiled graph, before and after each pass, as readable files under this folder",
    )
    cache_dir: str | None = _option(
        None,
        _as_optional_path,
        "a directory path | None",
        "folder of the tuning cache (remat, min-cut and fusion decisions, reused by the next compile of the same"
        " graph); None: $GRAPHOPT_CACHE_DIR, else the user cache dir (platformdirs)",
    )
    memory_budget: float | int | None = _option(
        None,
        _as_memory_budget,
        "None | a fraction 0.0..1.0 | a size such as '12GiB'",
        "activation memory allowed during the backward: a fraction of what saving every activation needs, or a"
        " size; the rematerialization pass (CP-SAT) picks the fastest plan within it. None: runtime-optimal min-cut",
    )
    remat_compress: bool = _option(
        False,
        _as_bool,
        "True | False",
        "let rematerialization also store activations compressed (fp32 as bf16, bf16/fp16 as scaled fp8): lossy",
    )
    remat_time_limit_s: float = _option(
        3.0, _as_positive_float, "a positive number of seconds", "time limit of the rematerialization solver per graph"
    )
    cuda_graphs: bool = _option(
        False,
        _as_bool,
        "True | False",
        "record each compiled graph as one CUDA graph and replay it (static shapes, CUDA inputs; else runs without)",
    )

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> Options:
        """Validate a user dict: unknown keys and bad values raise OptionsError naming what is valid."""
        raw = _as_dict(raw)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise OptionsError(f"unknown graphopt option(s) {', '.join(map(repr, unknown))}; valid options: {_valid_options()}")
        parsed = {}
        for name, value in raw.items():
            field = fields[name]
            try:
                parsed[name] = field.metadata["parse"](value)
            except OptionsError as e:
                raise OptionsError(f"graphopt option {name!r}: {e}; valid values: {field.metadata['valid']}") from None
        return cls(**parsed)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _valid_options() -> str:
    return "; ".join(f"{f.name} ({f.metadata['valid']})" for f in dataclasses.fields(Options))


def _as_dict(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise OptionsError(f"graphopt options must be a dict of option name to value, got {raw!r}; valid options: {_valid_options()}")
    return dict(raw)


def options_table() -> list[tuple[str, str, str, str]]:
    """(name, default, valid values, description) for every option: the README table's source."""
    return [
        (f.name, repr(f.default), f.metadata["valid"], f.metadata["help"]) for f in dataclasses.fields(Options)
    ]


# torch.compile(mode=...) values graphopt honours, and the options each one implies.
MODES: dict[str, dict[str, Any]] = {"default": {}, "reduce-overhead": {"cuda_graphs": True}}


def options_for(mode: str | None, options: Mapping[str, Any] | None) -> Options:
    """Merge torch.compile's `mode` and `options` into one Options (explicit options win)."""
    mode = mode or "default"
    if mode not in MODES:
        raise OptionsError(f"graphopt does not support mode={mode!r}; supported modes: {', '.join(map(repr, MODES))}")
    return Options.parse({**MODES[mode], **_as_dict(options)})
