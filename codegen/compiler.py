"""Triton source -> a launchable `triton.jit` function, cached in-process by source.

Triton reads a kernel's source through `inspect`, so each source is written to
a file (named by its hash, under the user cache directory) and imported from
there. The same source is compiled once per process; Triton's own on-disk cache
then keys the binaries by source and launch configuration.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import tempfile
import threading
from typing import Any

import platformdirs
import torch

_lock = threading.Lock()
_modules: dict[str, Any] = {}


def interpreting() -> bool:
    """Triton runs in its CPU interpreter (TRITON_INTERPRET=1, as in the CPU test suite)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_run_on(device: torch.device) -> bool:
    """Whether generated kernels can run on `device` in this process."""
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreting()


@functools.lru_cache(maxsize=1)
def _kernel_dir() -> str:
    path = os.path.join(platformdirs.user_cache_dir("graphopt"), "kernels")
    os.makedirs(path, exist_ok=True)
    return path


def source_key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:32]


def load_kernel(source: str, name: str) -> Any:
    """The jit function `name` defined by `source` (imported once per process)."""
    key = source_key(source)
    with _lock:
        module = _modules.get(key)
        if module is None:
            path = os.path.join(_kernel_dir(), f"k{key}.py")
            if not os.path.exists(path):
                fd, tmp = tempfile.mkstemp(dir=_kernel_dir(), suffix=".py")
                with os.fdopen(fd, "w") as f:
                    f.write(source)
                os.replace(tmp, path)
            spec = importlib.util.spec_from_file_location(f"graphopt_kernel_{key}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            _modules[key] = module
    return getattr(module, name)


def compiled_sources() -> int:
    """How many distinct kernel sources this process has loaded (tests check reuse with it)."""
    with _lock:
        return len(_modules)
