"""Test-wide setup: Triton runs in its interpreter on the CPU (set before triton is imported)."""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# torch's AOTAutograd cache (which keeps graphopt's compiled graphs) writes here, not in the user's folder
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="graphopt-tests-torch-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cached frames or recompilation counts from earlier tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _private_tuning_cache(tmp_path_factory, monkeypatch):
    """Each test starts with an empty tuning cache of its own, never the user's."""
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path_factory.mktemp("graphopt-cache")))
