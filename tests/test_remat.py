"""The remat pass as a pure function on AOTAutograd joint graphs: plans, budgets, warnings, cache,
and min-cut's faster max-flow and seed, which must not change min-cut's choice."""

from __future__ import annotations

import math
import random
import warnings

import networkx
import pytest
import torch
from functorch.compile import aot_function, nop
from torch._functorch.partitioners import min_cut_rematerialization_partition

from graphopt.cache import open_cache
from graphopt.options import Options, OptionsError
from graphopt.passes import min_cut, remat
from graphopt.pipeline import PassContext, copy_graph_module


def _joint_of(fn, *args):
    """The joint graph AOTAutograd builds for `fn(*args)`, and its num_fwd_outputs."""
    captured = {}

    def capture(joint, inputs, *, num_fwd_outputs, **kwargs):
        captured.update(joint=copy_graph_module(joint), num_fwd_outputs=num_fwd_outputs)
        return min_cut_rematerialization_partition(joint, inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)

    aot_function(fn, fw_compiler=nop, bw_compiler=nop, partition_fn=capture)(*args)
    return captured["joint"], captured["num_fwd_outputs"]


def _deep_tanh_mlp(x, *weights):
    for w in weights:
        x = torch.tanh(x @ w)
    return x.sum()


@pytest.fixture(scope="module")
def mlp_joint():
    torch.manual_seed(0)
    x = torch.randn(32, 64, requires_grad=True)
    weights = [torch.randn(64, 64, requires_grad=True) for _ in range(10)]
    return _joint_of(_deep_tanh_mlp, x, *weights)


def _ctx(cache=None, **options) -> PassContext:
    return PassContext(Options.parse(options), "test_joint", "joint", [], torch.device("cpu"), cache)


def _weights(joint) -> list[int]:
    """Every input but the first is a weight: static, as parameters are."""
    return list(range(1, len([p for p in joint.graph.find_nodes(op="placeholder") if "tangents" not in p.name])))


def _run(joint_and_n, cache=None, **options):
    joint, n = joint_and_n
    return remat.run(joint, _ctx(cache, **options), num_fwd_outputs=n, static_lifetime_input_indices=_weights(joint))


def _backward_inputs(bw) -> set[str]:
    return {n.name for n in bw.graph.nodes if n.op == "placeholder" and "tangents" not in n.name}


def test_no_budget_is_torch_min_cut(mlp_joint):
    fw, bw, report = _run(mlp_joint)
    assert report.source == "min-cut"
    joint, n = mlp_joint
    _, bw_ref = min_cut_rematerialization_partition(
        copy_graph_module(joint), None, num_fwd_outputs=n, static_lifetime_input_indices=_weights(joint)
    )
    assert _backward_inputs(bw) == _backward_inputs(bw_ref)


@pytest.mark.parametrize("budget", [1.0, 0.8, 0.6])
def test_plan_fits_the_budget_and_the_backward_reads_exactly_what_is_saved(mlp_joint, budget):
    fw, bw, report = _run(mlp_joint, memory_budget=budget)
    assert report.source == "cp-sat"
    assert report.predicted_peak_bytes <= budget * report.save_everything_peak_bytes
    assert _backward_inputs(bw) == set(report.saved)
    computed_in_backward = {n.name for n in bw.graph.nodes if n.op == "call_function"}
    assert set(report.recomputed) <= computed_in_backward
    fw_outputs = {a.name for a in fw.graph.find_nodes(op="output")[0].args[0] if isinstance(a, torch.fx.Node)}
    assert set(report.saved) - {n.name for n in fw.graph.find_nodes(op="placeholder")} <= fw_outputs


def _replayed_backward_peak(bw, report) -> int:
    """Bytes of the plan's saved and recomputed values alive at once, walking the real
    backward graph node by node (views and weights hold nothing of their own)."""
    names = set(report.saved) | set(report.recomputed)
    nodes = list(bw.graph.nodes)
    last_use = {a: i for i, n in enumerate(nodes) for a in n.all_input_nodes}

    def held(n):
        val = n.meta.get("val")
        if n.name not in names or not isinstance(val, torch.Tensor) or getattr(n.target, "is_view", False):
            return 0
        weight = n.name.startswith("primals_") and n.name != "primals_1"
        return 0 if weight else val.numel() * val.dtype.itemsize

    delta = [0] * (len(nodes) + 1)
    for i, n in enumerate(nodes):
        if held(n) and n in last_use:
            delta[0 if n.op == "placeholder" else i] += held(n)
            delta[last_use[n] + 1] -= held(n)
    live = peak = 0
    for d in delta:
        live += d
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("budget", [1.0, 0.7, 0.6])
def test_predicted_peak_is_what_the_real_backward_graph_holds(mlp_joint, budget):
    _, bw, report = _run(mlp_joint, memory_budget=budget)
    assert _replayed_backward_peak(bw, report) == report.predicted_peak_bytes


def test_tighter_budget_costs_more_time_and_recomputes_matmuls(mlp_joint):
    *_, loose = _run(mlp_joint, memory_budget=1.0)
    *_, tight = _run(mlp_joint, memory_budget=0.6)
    assert loose.predicted_extra_ms == 0.0 and not any(name.startswith("mm") for name in loose.recomputed)
    assert tight.source == "cp-sat" and tight.predicted_extra_ms > 0
    assert any(name.startswith("mm") for name in tight.recomputed)


def test_run_leaves_the_joint_graph_alone(mlp_joint):
    joint, _ = mlp_joint
    before = joint.code
    _run(mlp_joint, memory_budget=0.8)
    assert joint.code == before


def test_size_budget_is_bytes(mlp_joint):
    *_, full = _run(mlp_joint, memory_budget=1.0)
    size = full.save_everything_peak_bytes * 7 // 10
    *_, report = _run(mlp_joint, memory_budget=f"{size}B")
    assert report.source == "cp-sat" and report.predicted_peak_bytes <= size


def test_unreachable_budget_warns_with_the_reachable_fraction_and_still_partitions(mlp_joint):
    with pytest.warns(remat.RematWarning, match=r"not reachable; the smallest found is .* memory_budget=0\.\d+"):
        fw, bw, report = _run(mlp_joint, memory_budget=0.0)
    assert report.source == "smallest reachable peak"
    assert 0 < report.predicted_peak_bytes < report.save_everything_peak_bytes
    assert _backward_inputs(bw) == set(report.saved)


def test_random_ops_are_never_recomputed():
    def dropout_mlp(x, w1, w2):
        return (torch.nn.functional.dropout(torch.relu(x @ w1), 0.5, training=True) @ w2).sum()

    torch.manual_seed(0)
    args = [torch.randn(8, 16, requires_grad=True), torch.randn(16, 32, requires_grad=True), torch.randn(32, 4)]
    joint = _joint_of(dropout_mlp, *args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", remat.RematWarning)
        _, bw, report = _run(joint, memory_budget=0.0)
    random = [n for n in bw.graph.nodes if torch.Tag.nondeterministic_seeded in getattr(n.target, "tags", ())]
    assert random == []
    assert report.recomputed  # it did recompute the rest


def test_attention_without_dropout_may_be_recomputed_but_dropout_may_not():
    from torch.fx.experimental.proxy_tensor import make_fx

    from graphopt.passes.remat_graph import _recompute_ban

    q = torch.randn(1, 2, 8, 4)
    attention = make_fx(lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.0))(q)
    dropout = make_fx(lambda x: torch.ops.aten.native_dropout(x, 0.5, True))(q)
    (sdpa,) = [n for n in attention.graph.nodes if "scaled_dot_product" in str(n.target)]
    (drop,) = [n for n in dropout.graph.nodes if n.target is torch.ops.aten.native_dropout.default]
    assert torch.Tag.nondeterministic_seeded in sdpa.target.tags and _recompute_ban(sdpa) is None
    assert _recompute_ban(drop) == "random"


def _random_flow_graph(rng: random.Random) -> networkx.DiGraph:
    """Small graphs shaped like min-cut's: integral capacities, some infinite (missing), unbounded ones too."""
    graph = networkx.DiGraph()
    nodes = ["source", "sink", *(f"n{i}" for i in range(rng.randint(2, 30)))]
    graph.add_nodes_from(nodes)
    for _ in range(rng.randint(1, 90)):
        u, v = rng.sample(nodes, 2)
        if rng.random() < 0.3:
            graph.add_edge(u, v)
        else:
            graph.add_edge(u, v, capacity=rng.choice([0, 1, 2, 3, 5, 10.0, 10**6, math.inf]))
    return graph


def _cut_or_unbounded(minimum_cut, graph):
    try:
        return minimum_cut(graph, "source", "sink")
    except networkx.NetworkXUnbounded:
        return "unbounded"


def test_or_tools_max_flow_finds_networkx_cut_node_for_node():
    rng = random.Random(0)
    results = []
    for _ in range(300):
        graph = _random_flow_graph(rng)
        expected = _cut_or_unbounded(networkx.minimum_cut, graph)
        assert _cut_or_unbounded(min_cut._minimum_cut, graph) == expected
        results.append(expected)
    assert "unbounded" in results and any(r != "unbounded" and r[0] > 0 for r in results)


def test_min_cut_seed_saves_what_min_cuts_backward_reads(mlp_joint):
    joint, n = mlp_joint
    _, bw = min_cut.partition(joint, n, _weights(joint), None)
    assert set(min_cut.saved_names(joint, n, _weights(joint), None)) == _backward_inputs(bw)


def test_a_failing_plan_falls_back_to_min_cut_with_one_warning(mlp_joint, monkeypatch):
    from graphopt.fallback import GraphoptFallbackWarning

    def broken(*args, **kwargs):
        raise RuntimeError("solver exploded")

    monkeypatch.setattr(remat, "run", broken)
    joint, n = mlp_joint
    partition = remat.Partitioner(Options.parse({"memory_budget": 0.5}), lambda: "test_joint")
    with pytest.warns(GraphoptFallbackWarning, match="remat partition.*solver exploded; using min-cut"):
        fw, bw = partition(copy_graph_module(joint), [], num_fwd_outputs=n)
    assert partition.take_records() == [] and _backward_inputs(bw)


def test_plan_is_stored_in_and_read_from_the_tuning_cache(mlp_joint, tmp_path):
    options = Options.parse({"memory_budget": 0.6, "cache_dir": str(tmp_path)})
    cache = open_cache(options, graph_key="joint-key", graph_name="test_joint")
    *_, first = _run(mlp_joint, cache, memory_budget=0.6, cache_dir=str(tmp_path))
    *_, second = _run(mlp_joint, cache, memory_budget=0.6, cache_dir=str(tmp_path))
    assert first.source == "cp-sat" and second.source == "tuning cache"
    assert (second.saved, second.recomputed) == (first.saved, first.recomputed)
    assert cache.get(remat.CACHE_NAMESPACE, "joint-key")["recomputed"] == sorted(first.recomputed)


def _wide_first_layer(x, w1, w2, w3):
    h = torch.tanh(x @ w1)  # a matmul far dearer to recompute than its small output is to store
    h = torch.tanh(h @ w2)
    return torch.tanh(h @ w3).sum()


def _wide_args(dtype):
    torch.manual_seed(0)
    shapes = [(64, 2048), (2048, 256), (256, 256), (256, 256)]
    return [(torch.randn(*s) / s[0] ** 0.5).to(dtype).requires_grad_() for s in shapes]


def _run_all_static(joint_and_n, **options):
    joint, n = joint_and_n
    return remat.run(joint, _ctx(**options), num_fwd_outputs=n, static_lifetime_input_indices=range(4))


def test_compression_replaces_an_expensive_recomputation_and_keeps_gradients_close():
    args = _wide_args(torch.float32)
    joint = _joint_of(_wide_first_layer, *args)
    *_, plain = _run_all_static(joint, memory_budget=0.8)
    fw, bw, packed = _run_all_static(joint, memory_budget=0.8, remat_compress=True)
    assert "mm" in plain.recomputed
    assert packed.source == "cp-sat" and packed.compressed and "mm" not in packed.recomputed
    assert packed.predicted_extra_ms < plain.predicted_extra_ms
    assert packed.predicted_peak_bytes <= 0.8 * packed.save_everything_peak_bytes
    saved_dtypes = [n.meta["val"].dtype for n in bw.graph.nodes if n.op == "placeholder" and "tangents" not in n.name]
    assert torch.bfloat16 in saved_dtypes

    # Run the two graphs by hand: forward returns (loss, *saved); backward returns the gradients.
    inputs = [a.detach() for a in args]
    loss, *saved = fw(*inputs)
    grads = bw(*saved, torch.ones(()))
    expected = torch.autograd.grad(_wide_first_layer(*args), args)
    torch.testing.assert_close(loss, _wide_first_layer(*inputs))
    for got, want in zip(grads, expected):  # bf16 storage of activations: about 3 significant digits
        assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_bf16_activations_compress_to_scaled_fp8():
    joint = _joint_of(_wide_first_layer, *_wide_args(torch.bfloat16))
    _, bw, report = _run_all_static(joint, memory_budget=0.8, remat_compress=True)
    assert report.compressed
    saved_dtypes = [n.meta["val"].dtype for n in bw.graph.nodes if n.op == "placeholder" and "tangents" not in n.name]
    assert torch.float8_e4m3fn in saved_dtypes
    assert saved_dtypes.count(torch.bfloat16) >= len(report.compressed)  # one scale per compressed value


@pytest.mark.parametrize("bad", [1.5, -0.1, "12 parsecs", True, [0.5]])
def test_memory_budget_option_rejects_bad_values(bad):
    with pytest.raises(OptionsError, match="memory_budget"):
        Options.parse({"memory_budget": bad})


def test_memory_budget_option_parses_sizes_and_fractions():
    assert Options.parse({"memory_budget": "12GiB"}).memory_budget == 12 * 2**30
    assert Options.parse({"memory_budget": "1.5 MB"}).memory_budget == 1_500_000
    assert Options.parse({"memory_budget": 1}).memory_budget == 1.0
    assert isinstance(Options.parse({"memory_budget": 0}).memory_budget, float)
