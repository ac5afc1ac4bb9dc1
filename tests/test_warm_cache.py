"""A warm tuning cache: the second compile of a model reads the min-cut partition and the fusion
grouping from the cache, builds exactly the graphs the first compile built, and computes what
eager computes; an entry that does not fit is a miss that recomputes, never a crash."""

import copy
import re

import pytest
import torch

from graphopt import events
from graphopt.cache import CacheWarning, lookups, open_cache, reset_lookups
from graphopt.options import Options
from graphopt.passes import fusion_cache, min_cut
from graphopt.runtime import GuardedCall

# float32: fused kernels may reassociate reductions.
RTOL, ATOL = 1e-4, 1e-5
NAMESPACES = {min_cut.CACHE_NAMESPACE, fusion_cache.CACHE_NAMESPACE}


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.LayerNorm(32), torch.nn.GELU(), torch.nn.Linear(32, 32),
        torch.nn.ReLU(), torch.nn.Linear(32, 4),
    )


def _unnumbered(text):
    """Without the per-compile graph number that kernel names carry."""
    return re.sub(r"fused_g\d+_", "fused_", text)


def _program(info):
    """A compiled graph's code and kernels."""
    gm = info.output_gm
    kernels = [n.target.primary.triton_source for n in gm.graph.nodes if isinstance(n.target, GuardedCall)]
    return _unnumbered(gm.code), kernels


def _reports(info):
    return [(r.name, _unnumbered(repr(r.report))) for r in info.records]


def _compile_and_step(model, x, cache_dir, train=True):
    """One step of a fresh compile: (graphs, output, gradients, this compile's cache lookups)."""
    torch._dynamo.reset()
    reset_lookups()
    model = copy.deepcopy(model)
    compiled = torch.compile(model, backend="graphopt", options={"cache_dir": str(cache_dir)})
    with events.capture() as graphs, torch.set_grad_enabled(train):
        out = compiled(x)
        if train:
            out.square().sum().backward()
    grads = [p.grad for p in model.parameters()] if train else []
    return graphs, out.detach(), grads, [lk for lk in lookups() if lk.namespace in NAMESPACES]


def _eager(model, x, train=True):
    model = copy.deepcopy(model)
    with torch.set_grad_enabled(train):
        out = model(x)
        if train:
            out.square().sum().backward()
    return out.detach(), [p.grad for p in model.parameters()] if train else []


def _assert_like_eager(model, x, out, grads, train=True):
    eager_out, eager_grads = _eager(model, x, train)
    torch.testing.assert_close(out, eager_out, rtol=RTOL, atol=ATOL)
    for grad, eager_grad in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, eager_grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("train", [True, False], ids=["train", "infer"])
def test_a_warm_compile_reads_partition_and_fusion_and_builds_the_same_graphs(tmp_path, train):
    model, x = _mlp(), torch.randn(8, 16)
    cold, cold_out, cold_grads, cold_lookups = _compile_and_step(model, x, tmp_path, train)
    warm, warm_out, warm_grads, warm_lookups = _compile_and_step(model, x, tmp_path, train)

    expected = {fusion_cache.CACHE_NAMESPACE} | ({min_cut.CACHE_NAMESPACE} if train else set())
    assert {lk.namespace for lk in cold_lookups} == expected and not any(lk.hit for lk in cold_lookups)
    assert {lk.namespace for lk in warm_lookups} == expected and all(lk.hit for lk in warm_lookups)
    assert len(warm_lookups) == len(cold_lookups) == (3 if train else 1)  # partition, forward, backward
    assert [g.kind for g in warm] == [g.kind for g in cold]
    assert [_program(g) for g in warm] == [_program(g) for g in cold]
    assert any(_program(g)[1] for g in warm)  # something was fused
    # the same decisions, merges and rejections reported
    assert [_reports(g) for g in warm] == [_reports(g) for g in cold]
    _assert_like_eager(model, x, warm_out, warm_grads, train)
    _assert_like_eager(model, x, cold_out, cold_grads, train)


def _rewrite_entries(cache_dir, namespace, edit):
    cache = open_cache(Options(cache_dir=str(cache_dir)))
    entries = cache.entries(namespace)
    assert entries
    for entry in entries:
        cache.put(namespace, entry.key, edit(entry.value))


def _merge_first_two_groups(value):
    """Two kernels fused into one across the matmul between them: a cycle between kernels."""
    first, second, *rest = value["groups"]
    merged = {**first, "members": first["members"] + second["members"], "merges": first["merges"] + second["merges"]}
    return {**value, "groups": [merged, *rest]}


@pytest.mark.parametrize(
    "namespace, edit",
    [
        (min_cut.CACHE_NAMESPACE, lambda v: {"saved": [[10**6, "aten.mm.default"]]}),
        (min_cut.CACHE_NAMESPACE, lambda v: {"saved": [[p, "aten.sin.default"] for p, _ in v["saved"]]}),
        (min_cut.CACHE_NAMESPACE, lambda v: "not a plan"),
        (fusion_cache.CACHE_NAMESPACE, lambda v: {**v, "groups": [{**v["groups"][0], "members": [[3, "placeholder"]]}]}),
        (fusion_cache.CACHE_NAMESPACE, lambda v: {**v, "groups": v["groups"][1:]}),
        (fusion_cache.CACHE_NAMESPACE, _merge_first_two_groups),
        (fusion_cache.CACHE_NAMESPACE, lambda v: {"groups": None}),
    ],
    ids=["min-cut out of range", "min-cut other op", "min-cut malformed", "fusion placeholder",
         "fusion group missing", "fusion cycle", "fusion malformed"],
)
def test_an_entry_that_does_not_fit_is_a_miss_that_recomputes_the_same_graphs(tmp_path, namespace, edit):
    model, x = _mlp(), torch.randn(8, 16)
    cold, *_ = _compile_and_step(model, x, tmp_path)
    _rewrite_entries(tmp_path, namespace, edit)
    with pytest.warns(CacheWarning, match="does not fit the graph"):
        stale, out, grads, stale_lookups = _compile_and_step(model, x, tmp_path)
    assert not any(lk.hit for lk in stale_lookups if lk.namespace == namespace)
    assert [_program(g) for g in stale] == [_program(g) for g in cold]
    _assert_like_eager(model, x, out, grads)
    # the recomputed decision replaced the bad entry
    *_, again = _compile_and_step(model, x, tmp_path)
    assert again and all(lk.hit for lk in again)
