"""Buffer reuse: kernel outputs written into dead buffers give eager's results, and only dead ones are taken."""

from __future__ import annotations

import pytest
import torch
from fusion_helpers import fuse, kernels
from helpers import assert_training_matches_eager

from graphopt import events
from graphopt.options import Options
from graphopt.passes import buffer_reuse
from graphopt.pipeline import PassContext, copy_graph_module
from graphopt.run_record import memory_timeline


def _reused(fn, *inputs, dynamic=False, kind="inference"):
    gm, _ = fuse(fn, *inputs, dynamic=dynamic)
    ctx = PassContext(options=Options(), graph_name="g0_test", kind=kind, example_inputs=inputs)
    gm, report = buffer_reuse.run(gm, ctx)
    gm.graph.lint()
    return gm, report


def _donors(gm):
    """(recipient kernel, donor node name) for each reused output."""
    return [(n.target.__name__, r.name) for n in gm.graph.nodes if "reuse" in n.kwargs for r in n.kwargs["reuse"] if r is not None]


def _chain(x, w):
    a = torch.relu(x) * 2
    b = torch.sigmoid(a @ w) + 1
    c = torch.tanh(b @ w) - 3
    return torch.exp((c @ w) * 0.1)


def test_chain_writes_each_kernel_into_the_previous_ones_buffer_and_matches_eager():
    x, w = torch.randn(8, 16), torch.randn(16, 16)
    gm, report = _reused(_chain, x, w)
    assert (report.kernel_outputs, report.reused) == (4, 3), report
    assert report.reused_bytes == 3 * 8 * 16 * 4
    fresh_x, fresh_w = torch.randn(8, 16), torch.randn(16, 16)
    torch.testing.assert_close(gm(fresh_x, fresh_w), _chain(fresh_x, fresh_w), rtol=1e-5, atol=1e-6)
    assert all(k.failed_reason is None and k.primary.launches for k in kernels(gm))


def test_the_reports_memory_plan_counts_a_reused_buffer_once():
    """The donor's bytes become the recipient's: written into, they are not allocated again."""
    x, w = torch.randn(8, 16), torch.randn(16, 16)
    gm, report = _reused(_chain, x, w)
    assert report.reused == 3, report
    plain = copy_graph_module(gm)
    for node in plain.graph.nodes:
        node.kwargs = {k: v for k, v in node.kwargs.items() if k != "reuse"}
    assert memory_timeline(gm) == memory_timeline(plain)


def _view_read_late(x, w):
    a = torch.relu(x) + 1  # kernel 0
    a_t = a.t()  # a view made now, read by the last product: a's buffer is alive until then
    b = torch.sigmoid(a @ w) * 3  # kernel 1: the same size as a
    return b @ a_t


def _unsafe_view_read_late(x, w):
    a = torch.relu(x) + 1
    a_flat = torch.ops.aten._unsafe_view(a, [8, 8])  # a view although its schema says a new tensor
    b = torch.sigmoid(a @ w) * 3  # the same size as a
    return b @ a_flat


@pytest.mark.parametrize("fn", [_view_read_late, _unsafe_view_read_late], ids=["t", "_unsafe_view"])
def test_a_buffer_read_later_through_a_view_is_not_taken(fn):
    x, w = torch.randn(8, 8), torch.randn(8, 8)
    gm, report = _reused(fn, x, w)
    assert report.reused == 0, (report, gm.code)
    fresh = torch.randn(8, 8)
    torch.testing.assert_close(gm(fresh, w), fn(fresh, w), rtol=1e-5, atol=1e-6)


def test_aliasing_comes_from_what_nodes_do_not_from_stale_fake_storages():
    """A pass that replaces a node leaves its users' meta['val'] on the old node's storage: a view
    whose fake tensor no longer shares its input's storage must still keep that buffer alive."""
    x, w = torch.randn(8, 8), torch.randn(8, 8)
    gm, _ = fuse(_view_read_late, x, w)
    (view,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.t.default]
    val = view.meta["val"]
    view.meta["val"] = val.new_empty_strided(val.shape, val.stride())  # same layout, a storage of its own
    ctx = PassContext(options=Options(), graph_name="g0_test", kind="inference", example_inputs=[x, w])
    gm, report = buffer_reuse.run(gm, ctx)
    assert report.reused == 0, (report, gm.code)
    fresh = torch.randn(8, 8)
    torch.testing.assert_close(gm(fresh, w), _view_read_late(fresh, w), rtol=1e-5, atol=1e-6)


def _first_input_only(x, y):
    a = x * 2  # a kernel that reads only the graph's first input
    c = torch.cumsum(a, 0) + y.sum()  # an ATen op that makes a buffer of its own, not a donor
    return torch.sigmoid(c) * 2


def test_a_kernel_output_is_a_donor_however_the_storages_of_its_inputs_are_numbered():
    """The kernel's eager subgraph numbers the storages it makes apart from the graph's: its
    output is its own, not the first input's storage that happened to have the same number."""
    x, y = torch.randn(8, 8), torch.randn(8, 8)
    gm, report = _reused(_first_input_only, x, y)
    assert _donors(gm) == [("fused_g0_test_inference_1", "fused_g0_test_inference_0")], (report, gm.code)
    torch.testing.assert_close(gm(x, y), _first_input_only(x, y), rtol=1e-5, atol=1e-6)


def _returned_early(x, w):
    a = torch.relu(x) + 1  # a graph output: its buffer never returns to the pool
    b = torch.sigmoid(a @ w) * 3
    return a, b


def test_graph_outputs_and_inputs_are_never_donors():
    x, w = torch.randn(8, 8), torch.randn(8, 8)
    gm, report = _reused(_returned_early, x, w)
    assert report.reused == 0, (report, gm.code)
    fresh = torch.randn(8, 8)
    for got, want in zip(gm(fresh, w), _returned_early(fresh, w)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _big_product_between(x, w1, w2):
    a = torch.relu(x) + 1  # (8, 8); dies in the first product
    big = (a @ w1) @ w2  # (8, 16) then (8, 4096): the graph's peak is while that is made, after a died
    return torch.sigmoid(big.sum(1, keepdim=True).expand(8, 8)) * 2  # (8, 8) again


def test_a_buffer_kept_alive_over_the_peak_is_not_taken():
    x, w1, w2 = torch.randn(8, 8), torch.randn(8, 16) / 8, torch.randn(16, 4096) / 4096
    gm, report = _reused(_big_product_between, x, w1, w2)
    assert report.reused == 0 and report.kept.get("would raise the estimated peak") == 1, report
    torch.testing.assert_close(gm(x, w1, w2), _big_product_between(x, w1, w2), rtol=1e-4, atol=1e-5)


def _input_read_first(big, x, c, w1, w2):
    s = big.sum(0)[:64]  # the largest input's last read: the estimate's peak if inputs died there
    h = (torch.relu(x + s) * 2) @ w1  # (8, 64): dies in the next kernel
    wide = torch.sigmoid(h.sum(1, keepdim=True) * c)  # (8, 2048): the peak while big is still held
    return torch.tanh((wide @ w2).expand(8, 64)) * 3  # (8, 64) again


@pytest.mark.parametrize(
    "kind, big_name, reused",
    [
        ("inference", "big", 0),  # the caller holds every input of a forward or inference graph
        ("backward", "primals_1", 0),  # a forward input saved for the backward: its owner holds it
        ("backward", "getitem_3", 1),  # a saved activation: AOTAutograd drops it at its last use
    ],
)
def test_inputs_their_owners_hold_stay_in_the_peak_estimate(kind, big_name, reused):
    # scaled so that no value is large: the sums of 256 and 2048 terms then agree with eager's to rtol 1e-4
    inputs = torch.randn(256, 256) / 16, torch.randn(8, 64), torch.randn(1, 2048), torch.randn(64, 64) / 8, torch.randn(2048, 1) / 45
    gm, _ = fuse(_input_read_first, *inputs)
    gm.graph.find_nodes(op="placeholder")[0].target = big_name  # as AOTAutograd names its graphs' inputs
    ctx = PassContext(options=Options(), graph_name="g0_test", kind=kind, example_inputs=inputs)
    gm, report = buffer_reuse.run(gm, ctx)
    assert report.reused == reused, (report, gm.code)
    torch.testing.assert_close(gm(*inputs), _input_read_first(*inputs), rtol=1e-4, atol=1e-5)


def test_symbolic_sizes_reuse_by_expression_and_run_at_a_new_size():
    x, w = torch.randn(8, 16), torch.randn(16, 16)
    gm, report = _reused(_chain, x, w, dynamic=True)
    assert report.reused == 3, report
    for rows in (5, 11):
        fresh = torch.randn(rows, 16)
        torch.testing.assert_close(gm(fresh, w), _chain(fresh, w), rtol=1e-5, atol=1e-6)


def test_a_donor_whose_kernel_fell_back_still_gives_eager_results():
    """The eager fallback's output owns its storage as the kernel's did: the recipient may take it."""
    x, w = torch.randn(8, 16), torch.randn(16, 16)
    gm, report = _reused(_chain, x, w)
    first = kernels(gm)[0]
    first.failed_reason = "test: the kernel failed"
    fresh_x = torch.randn(8, 16)
    torch.testing.assert_close(gm(fresh_x, w), _chain(fresh_x, w), rtol=1e-5, atol=1e-6)
    assert all(k.primary.launches for k in kernels(gm)[1:])


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(3))
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        for layer in self.layers:
            x = x + torch.nn.functional.gelu(layer(self.norm(x)))
        return x


def test_training_with_reuse_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    batches = [torch.randn(4, 16) for _ in range(2)]
    with events.capture() as graphs:
        assert_training_matches_eager(_Mlp(), batches, lambda run, x: run(x).square().mean(), rtol=1e-4, atol=1e-5)
    reports = {g.kind: r.report for g in graphs for r in g.records if r.name == "buffer_reuse"}
    assert reports.keys() == {"forward", "backward"}, reports
    assert reports["backward"].reused > 0, reports


@pytest.mark.parametrize("options", [{"reuse_buffers": False}, {"fusion": False}])
def test_reuse_off_runs_no_reuse_pass(options):
    with events.capture() as graphs:
        torch.compile(_Mlp(), backend="graphopt", options=options)(torch.randn(4, 16))
    assert graphs and not any(r.name == "buffer_reuse" for g in graphs for r in g.records)


def _split_product(x, w, w_big):
    h = x + (x @ w_big).sum(1, keepdim=True) * 0.01  # the graph's peak: an (8, 1024) product
    q, k = (h @ w).split(8, dim=1)  # one (8, 16) product read through two views
    s = torch.sigmoid(q) * torch.tanh(k)  # (8, 8): the product dies here
    return torch.relu(s @ w) + 1  # (8, 16): the product's buffer is free again


def test_a_product_read_through_split_views_is_a_donor_once_they_are_dead():
    x, w, w_big = torch.randn(8, 8), torch.randn(8, 16), torch.randn(8, 1024)
    gm, report = _reused(_split_product, x, w, w_big)
    (split,) = [n for n in gm.graph.nodes if n.target is torch.ops.aten.split.Tensor]
    assert split.args[0].name in [donor for _, donor in _donors(gm)], (report, gm.code)
    fresh = torch.randn(8, 8)
    torch.testing.assert_close(gm(fresh, w, w_big), _split_product(fresh, w, w_big), rtol=1e-5, atol=1e-5)
