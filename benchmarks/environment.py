"""Where and with what a benchmark ran: device, package versions, git commit, command line, date.

A number without its device and versions cannot be compared with anything, so
every record carries these.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys

import torch

_PACKAGES = ("triton", "graphopt", "transformers", "torchvision", "timm")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on (None: not installed). torch's is its
    build's (`2.11.0+cu130`), which the package metadata shortens to `2.11.0`."""
    found: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in _PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    return found


def git_commit() -> str | None:
    """HEAD of the checkout the benchmark runs from, with `+dirty` for local changes; None outside git."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def command_line(argv: list[str]) -> str:
    """The `benchmarks.run` command with these arguments, as one would type it again."""
    return shlex.join([os.path.basename(sys.executable), "-m", __package__ + ".run", *argv])


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
