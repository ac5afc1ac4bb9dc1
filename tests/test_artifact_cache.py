"""Compiled graphs kept in torch's AOTAutograd cache (graphopt/artifact_cache.py): a second
process loads them instead of tracing and compiling, and computes what the model computes; an
entry that cannot be loaded is compiled again, with a warning; a torch without the API, or a
compile someone listens to, compiles as before."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from fusion_helpers import fuse, kernels
from torch._dynamo.utils import counters

from graphopt import artifact, artifact_cache, events
from graphopt.artifact import GraphoptOutputCode
from graphopt.cache import FILE_NAME, CacheWarning, TuningCache

SCRIPT = Path(__file__).with_name("artifact_cache_script.py")
# against the model in float64, relative to its largest value: float32 (generated kernels may
# reassociate reductions), and bf16 autocast
TOLERANCE = 1e-4
BF16_TOLERANCE = 2e-2


def _process(tmp_path, mode, *flags):
    """One fresh process compiling a model of the script (the MLP by default): (its JSON report, its stderr)."""
    env = {
        **os.environ,
        "GRAPHOPT_CACHE_DIR": str(tmp_path / "graphopt"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "TRITON_INTERPRET": "1",
    }
    command = [sys.executable, str(SCRIPT), mode, *flags]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _entries(tmp_path):
    return sorted((tmp_path / "inductor" / "aotautograd").glob("*/*"))


@pytest.mark.parametrize(
    "mode, model, kinds, tolerance",
    [
        ("train", "mlp", ["forward", "backward"], TOLERANCE),
        ("infer", "mlp", ["inference"], TOLERANCE),
        ("train", "gpt2", ["forward", "backward"], TOLERANCE),
        # graphs in which passes added views and a prims op, which torch's pickler could not write
        ("train", "split-sums", ["forward", "backward"], BF16_TOLERANCE),
    ],
)
def test_a_second_process_loads_the_compiled_graphs_without_tracing_them(tmp_path, mode, model, kinds, tolerance):
    cold, cold_stderr = _process(tmp_path, mode, model)
    warm, _ = _process(tmp_path, mode, model)
    assert cold["compiled"] == kinds
    assert cold["aot"].get("autograd_cache_saved") == 1, cold_stderr[-3000:]  # graphopt warns why not
    assert warm["compiled"] == [] and warm["aot"].get("autograd_cache_hit") == 1  # no AOTAutograd trace, no passes
    assert warm["kernel_sources"] > 0  # the generated kernels were made again and ran
    assert cold["worst_relative_error"] < tolerance and warm["worst_relative_error"] < tolerance


def test_after_the_tuning_cache_is_cleared_a_process_compiles_again(tmp_path):
    """A cleared (or imported-into) tuning cache is a new generation: graphs kept with the old one
    are not loaded, so the next compile plans again from what the cache now holds."""
    _process(tmp_path, "train")
    assert _process(tmp_path, "train")[0]["compiled"] == []
    TuningCache(str(tmp_path / "graphopt" / FILE_NAME)).clear()
    again, _ = _process(tmp_path, "train")
    assert again["compiled"] == ["forward", "backward"] and again["worst_relative_error"] < TOLERANCE


@pytest.mark.skipif(
    not hasattr(torch._dynamo.config, "caching_precompile") or not hasattr(torch.compiler, "save_cache_artifacts"),
    reason="this torch has no caching precompile",
)
def test_under_torchs_caching_precompile_a_second_process_skips_dynamo_too(tmp_path):
    """torch's caching precompile (the user's opt-in) keeps the Dynamo trace with graphopt's compiled
    graphs; it deep-copies them, which must neither load them again nor lose the entry."""
    cold, cold_stderr = _process(tmp_path, "train", "precompile")
    warm, _ = _process(tmp_path, "train", "precompile")
    assert cold["compiled"] == ["forward", "backward"] and cold["aot"].get("autograd_cache_saved") == 1
    assert "cannot load compiled graph" not in cold_stderr
    assert cold["dynamo_cache"] == {"dynamo_cache_miss": 1} and cold["dynamo_graphs"] == 1
    # no Dynamo trace, no AOTAutograd lookup, no passes: the saved package is installed whole
    assert warm["dynamo_cache"] == {"dynamo_cache_hit": 1} and warm["dynamo_graphs"] == 0
    assert warm["compiled"] == [] and warm["aot"] == {}
    assert warm["kernel_sources"] > 0  # graphopt's generated kernels ran, not an eager graph
    assert cold["worst_relative_error"] < TOLERANCE and warm["worst_relative_error"] < TOLERANCE


def _damage_payload(path):
    """The graph's bytes changed inside an entry that still unpickles."""
    raw = mock.patch.object(GraphoptOutputCode, "__setstate__", lambda self, state: self.__dict__.update(state))
    with raw:  # the stored bytes as they are, not loaded
        entry = pickle.loads(path.read_bytes())
    code = entry.compiled_fw.result
    code.payload = code.payload[:-64] + bytes(64)
    path.write_bytes(pickle.dumps(entry))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("damage", [_damage_payload, _truncate], ids=["payload damaged", "file truncated"])
def test_an_entry_that_cannot_be_loaded_is_compiled_again(tmp_path, damage):
    _process(tmp_path, "train")
    (entry,) = _entries(tmp_path)
    damage(entry)
    again, stderr = _process(tmp_path, "train")
    assert again["compiled"] == ["forward", "backward"] and again["aot"].get("autograd_cache_saved") == 1
    assert again["worst_relative_error"] < TOLERANCE
    if damage is _damage_payload:
        assert "CacheWarning: graphopt: cannot load compiled graph" in stderr and "checksum" in stderr
    else:
        assert "unable to load compiled graph" in stderr  # torch's own warning
    # the fresh entry stored next to the damaged one is found by the next process
    assert len(_entries(tmp_path)) == 2
    third, _ = _process(tmp_path, "train")
    assert third["compiled"] == [] and third["aot"].get("autograd_cache_hit") == 1


def _layers(x, w):
    """Three kernels: the first and the last built alike (tanh, times 2, on the same sizes), the middle
    one the same but for its constant."""
    a = torch.tanh(x) * 2
    b = torch.tanh(a @ w) * 3
    c = torch.tanh(b @ w) * 2
    return c @ w


def test_kernels_built_alike_are_kept_once_and_loaded_as_one_kernel_under_their_own_names():
    x, w = torch.randn(4, 16), torch.randn(16, 16)
    gm, _ = fuse(_layers, x, w)
    loaded = artifact._loads(artifact._dumps(gm))
    first, middle, last = kernels(loaded)
    assert [k.__name__ for k in (first, middle, last)] == [k.__name__ for k in kernels(gm)]
    # one subgraph unpickled, planned and made into a kernel for both; a different constant is not alike
    assert last.primary is first.primary and last.fallback is first.fallback
    assert middle.primary is not first.primary and middle.fallback is not first.fallback
    torch.testing.assert_close(loaded(x, w), _layers(x, w), rtol=1e-4, atol=1e-5)
    assert first.failed_reason is None and first.primary.launches == 2 and middle.primary.launches == 1


def test_a_loaded_graph_generates_its_code_only_when_it_runs():
    """Loading makes the graph's code only where it is run or read, as compiling does: the runtime
    runs its own boxed copy."""
    x, w = torch.randn(4, 16), torch.randn(16, 16)
    gm, _ = fuse(_layers, x, w)
    loaded = artifact._loads(artifact._dumps(gm))
    assert loaded._needs_recompile()
    torch.testing.assert_close(loaded(x, w), _layers(x, w), rtol=1e-4, atol=1e-5)


def test_a_kept_graph_holds_values_of_its_inputs_and_kernel_subgraphs_only():
    """Nothing reads the fake values of a compiled graph's inner nodes again: they are not kept (they
    were most of an entry's bytes and load time); its inputs' and its kernels' subgraphs' are."""
    x, w = torch.randn(4, 16), torch.randn(16, 16)
    gm, _ = fuse(_layers, x, w)
    loaded = artifact._loads(artifact._dumps(gm))
    with_values = {n.op for n in loaded.graph.nodes if "val" in n.meta}
    assert with_values == {"placeholder"}
    for kernel in kernels(loaded):
        assert all("val" in n.meta for n in kernel.fallback.graph.nodes if n.op != "output")
    assert "val" in next(n for n in gm.graph.nodes if n.op == "call_function").meta  # the live graph keeps its own
    torch.testing.assert_close(loaded(x, w), _layers(x, w), rtol=1e-4, atol=1e-5)


def test_a_kept_graph_keeps_the_cuda_device_it_runs_on():
    """The device a graph runs under was found from its nodes' values, which an entry no longer holds."""
    from graphopt.runtime import CompiledGraph

    x, w = torch.randn(4, 16), torch.randn(16, 16)
    compiled = CompiledGraph(fuse(_layers, x, w)[0], "probe")
    compiled.cuda_device = torch.device("cuda", 1)  # as found on a GPU (this test needs no GPU: nothing runs)
    saved = artifact.output_code(compiled)
    saved.prepare_for_serialization()
    assert pickle.loads(pickle.dumps(saved)).compiled.cuda_device == torch.device("cuda", 1)


def _mlp_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(4, 8)
    out = torch.compile(model, backend="graphopt")(x)
    out.sum().backward()
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)


def _cache_events():
    return {k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_cache")}


def test_a_torch_without_the_api_compiles_as_before_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(artifact_cache, "missing_api", lambda: "no SerializableAOTDispatchCompiler")
    artifact_cache._warn_missing.cache_clear()
    counters.clear()
    with pytest.warns(CacheWarning, match="not cached with torch .*no SerializableAOTDispatchCompiler"):
        _mlp_step()
    assert _cache_events() == {}


def test_a_compile_someone_listens_to_really_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    counters.clear()
    with events.capture() as graphs:
        _mlp_step()
    assert [g.kind for g in graphs] == ["forward", "backward"]
    assert _cache_events() == {}


class _LogitsAndTheirView(torch.nn.Module):
    """Residual blocks, then a head whose logits are returned twice: as they are and flattened.
    (With the head alone torch's loaded entry happened to replay correctly.)"""

    def __init__(self):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(24) for _ in range(4))
        self.layers = torch.nn.ModuleList(torch.nn.Linear(24, 24) for _ in range(4))
        self.head = torch.nn.Linear(24, 61, bias=False)

    def forward(self, x):
        for norm, layer in zip(self.norms, self.layers):
            x = x + torch.nn.functional.gelu(layer(norm(x)))
        logits = self.head(x)
        return logits, logits.view(-1, 61)


def test_a_graph_whose_outputs_alias_is_not_kept(monkeypatch, tmp_path):
    """torch rebuilds such outputs by replaying views, which fails after its cache loads the entry
    (inductor alike): the second compile must compile again and compute what the model computes."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model, x, weights = _LogitsAndTheirView(), torch.randn(3, 16, 24), torch.randn(3, 16, 61)
    logits, flat = model(x)
    (logits * weights).sum().backward()
    expected = [logits, flat, *(p.grad.clone() for p in model.parameters())]
    events_of_each_compile = []
    for _ in range(2):
        torch._dynamo.reset()
        counters.clear()
        model.zero_grad()
        logits, flat = torch.compile(model, backend="graphopt")(x)
        (logits * weights).sum().backward()
        for got, want in zip([logits, flat, *(p.grad for p in model.parameters())], expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # float32, fused reductions
        events_of_each_compile.append(_cache_events())
    assert all("autograd_cache_hit" not in e and e.get("autograd_cache_bypass", 0) > 0 for e in events_of_each_compile)
