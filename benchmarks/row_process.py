"""The process that measures one row: started ahead, released with `go`, bounded by a timeout.

`run` starts the next row's process while the current one measures: it imports
torch, the model library and the compiler (seconds), then waits on stdin before
touching the device, so the imports cost the run no time and the measured row
has the GPU to itself. Each process gets empty inductor and Triton cache folders
(cold compiles) and its own process group, so a timeout also ends the compile
workers it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.rows import Row

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOG_TAIL_CHARS = 1500


class RowProcess:
    def __init__(self, row: Row, record: dict[str, Any], device: str, out: str):
        self.row = row
        logs = os.path.join(out, "logs")
        os.makedirs(logs, exist_ok=True)
        self.job_path = os.path.join(logs, f"{row.key}.job.json")
        self.log_path = os.path.join(logs, f"{row.key}.log")
        with open(self.job_path, "w") as f:
            json.dump({"row": row.as_dict(), "device": device, "record": record}, f)
        self._caches = tempfile.TemporaryDirectory(prefix="bench-compile-caches-")
        cold_caches = {
            "TORCHINDUCTOR_CACHE_DIR": os.path.join(self._caches.name, "inductor"),
            "TRITON_CACHE_DIR": os.path.join(self._caches.name, "triton"),
        }
        with open(self.log_path, "w") as log:  # the child keeps its own copy of the descriptor
            self._child = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.measure", self.job_path, "--wait-for-go"],
                cwd=_REPO,
                env={**os.environ, **cold_caches},
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def measure(self, timeout_s: float) -> dict[str, Any]:
        """Let the row run; returns its record, with the error if the process failed or timed out."""
        begin = time.monotonic()
        try:
            self._child.stdin.write(b"go\n")
            self._child.stdin.close()
        except BrokenPipeError:  # it ended before its turn (an import failed); its record says why
            pass
        try:
            self._child.wait(timeout=timeout_s)
            ended = None
        except subprocess.TimeoutExpired:
            self._kill()
            ended = f"killed after {timeout_s:.0f} s (row timeout or the run's time budget)"
        with open(self.job_path) as f:
            record = json.load(f)["record"]
        self._release()
        if ended or record["status"] not in ("ok", "error"):
            with open(self.log_path, errors="replace") as f:
                tail = f.read()[-_LOG_TAIL_CHARS:].strip()
            record["status"] = "error"
            record["error"] = (ended or f"row process exited with code {self._child.returncode}") + "\n" + tail
        record["wall_s"] = time.monotonic() - begin
        return record

    def cancel(self) -> None:
        """The row will not run after all: end its waiting process and remove its files."""
        self._kill()
        self._release()
        os.remove(self.log_path)

    def _kill(self) -> None:
        if self._child.poll() is None:
            os.killpg(self._child.pid, signal.SIGKILL)
        self._child.wait()

    def _release(self) -> None:
        if not self._child.stdin.closed:
            try:
                self._child.stdin.close()
            except BrokenPipeError:
                pass
        self._caches.cleanup()
        for path in (self.job_path, self.job_path + ".partial"):
            if os.path.exists(path):
                os.remove(path)
