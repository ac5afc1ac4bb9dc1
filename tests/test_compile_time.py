"""A compile does only the work its result needs, and what it skips changes nothing:

- groups built alike are planned once per graph, and each gets the plan codegen makes for it;
- a kernel's eager fallback generates its Python code only when it runs;
- the objects that exist before a compile stay out of the cyclic GC's collections during it."""

import gc

import pytest
import torch
from fusion_helpers import fuse, kernels
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.fx.experimental.proxy_tensor import make_fx

from graphopt import codegen, pipeline
from graphopt.codegen.kernel import render
from graphopt.passes import fusion_plans


def _blocks(x, *weights):
    """Layers alike: an RMS norm before each matrix product, a tanh and a residual after it
    (fused with the next layer's norm: the middle layers make kernels alike)."""
    for w in weights:
        h = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-5)
        x = x + torch.tanh(h @ w) * 0.5
    return x


def _inputs(batch=4):
    return (torch.randn(batch, 16), *(torch.randn(16, 16) for _ in range(4)))


@pytest.fixture
def analyses(monkeypatch):
    """The names of the groups codegen really analyzed (not handed a shared plan)."""
    names = []
    plan_kernel = codegen.plan_kernel

    def counting(name, members, outputs):
        names.append(name)
        return plan_kernel(name, members, outputs)

    monkeypatch.setattr(codegen, "plan_kernel", counting)
    return names


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_groups_built_alike_are_planned_once_and_get_their_own_plan(analyses, dynamic):
    gm, _ = fuse(_blocks, *_inputs(), dynamic=dynamic)
    calls = kernels(gm)
    planned = [name for name in analyses if name.startswith("fused_")]
    assert len(calls) == 5 and len(planned) < len(calls)
    for call in calls:
        spec = call.primary.spec
        own = codegen.plan_kernel(spec.name, spec.nodes, spec.outputs)
        assert own == spec  # the same nodes, iteration space, symbols: hence the same sources
        for persistent in (True, False):
            assert render(own, persistent, False) == render(spec, persistent, False)
    for batch in (4, 7) if dynamic else (4,):
        inputs = _inputs(batch)
        torch.testing.assert_close(gm(*inputs), _blocks(*inputs), rtol=1e-4, atol=1e-5)


def _single_node_groups(fn, *inputs):
    gm = make_fx(fn)(*inputs)
    (x,) = gm.graph.find_nodes(op="placeholder")
    return x, [n for n in gm.graph.nodes if n.op == "call_function"]


def test_groups_that_differ_in_a_scalar_its_type_or_its_sign_are_planned_apart(analyses):
    x, nodes = _single_node_groups(
        lambda x: (x * 2, x * 2.0, x * True, x + 0.0, x + -0.0, x * 2), torch.randn(8)
    )
    keys = [fusion_plans.structure([x], [n], [n]) for n in nodes]
    assert len(set(keys[:5])) == 5 and keys[5] == keys[0]
    plans = fusion_plans.Plans()
    specs = [plans.plan(f"k{i}", [n], [n]) for i, n in enumerate(nodes)]
    assert analyses == ["k0", "k1", "k2", "k3", "k4"]  # x * 2 again: the plan of k0, with its own node
    assert specs[5].nodes == (nodes[5],) and specs[5].inputs == (x,) and specs[5].name == "k5"


def test_a_plan_that_names_nodes_in_another_field_is_not_shared(analyses, monkeypatch):
    monkeypatch.setattr(fusion_plans, "_NODE_FIELDS", ("nodes", "inputs"))  # as if `outputs` were such a field
    x, nodes = _single_node_groups(lambda x: (x.sin(), x.sin()), torch.randn(8))
    plans = fusion_plans.Plans()
    for i, n in enumerate(nodes):
        plans.plan(f"k{i}", [n], [n])
    assert analyses == ["k0", "k1"]


def test_fallback_subgraphs_generate_their_code_only_when_they_run():
    inputs = _inputs()
    gm, _ = fuse(_blocks, *inputs)
    calls = kernels(gm)
    assert calls and all(isinstance(c.fallback, _LazyGraphModule) and c.fallback._needs_recompile() for c in calls)
    for call in calls:  # every kernel failing: the graph runs its fallbacks, generated now
        call.failed_reason = "test"
    torch.testing.assert_close(gm(*inputs), _blocks(*inputs), rtol=1e-4, atol=1e-5)
    assert not any(c.fallback._needs_recompile() for c in calls)


@pytest.fixture
def freeze_counts(monkeypatch):
    """gc.get_freeze_count() as each compiled graph's passes see it, by graph kind."""
    seen = {}
    graph_passes = pipeline.graph_passes

    def probe(gm, ctx):
        seen[ctx.kind] = gc.get_freeze_count()
        return gm, pipeline.PassReport()

    monkeypatch.setattr(pipeline, "graph_passes", lambda options: [("probe", probe), *graph_passes(options)])
    return seen


def _train_step():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    compiled = torch.compile(model, backend="graphopt")
    compiled(torch.randn(4, 8)).sum().backward()  # the backward graph compiles here


def test_a_compile_keeps_the_heap_before_it_out_of_collections_and_thaws_it_after(freeze_counts):
    assert gc.get_freeze_count() == 0
    _train_step()
    assert freeze_counts.keys() == {"forward", "backward"}
    assert all(count > 0 for count in freeze_counts.values())
    assert gc.get_freeze_count() == 0


def test_a_heap_frozen_by_someone_else_is_left_frozen(freeze_counts):
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()  # frozen objects freed meanwhile leave the count, none join it
        _train_step()
        assert all(0 < count <= frozen for count in freeze_counts.values())  # neither frozen again nor thawed
        assert 0 < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
