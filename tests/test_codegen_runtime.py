"""The runtime of generated code: output layouts, CUDA-graph mode's fallbacks on a CPU machine."""

from __future__ import annotations

import warnings

import torch
from fusion_helpers import run_fused

from graphopt.fallback import GraphoptFallbackWarning, reset_fallbacks
from graphopt.options import options_for

aten = torch.ops.aten


def test_outputs_have_the_layout_the_graph_promised():
    """A channels-last input gives a channels-last result in eager; the kernel's output must match."""
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)

    def fn(x):
        return aten.relu.default(aten.mul.Tensor(x, 2))

    result, _ = run_fused(fn, x)
    assert result.stride() == fn(x).stride()
    torch.testing.assert_close(result, fn(x))


def test_channels_last_kernels_walk_memory_in_order():
    """A channels-last output is walked channels innermost: loads and stores at plain xindex
    (coalesced), not at a stride of C; mixed layouts and broadcast operands still match eager."""
    x = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    scale = torch.randn(1, 3, 1, 1)
    nchw = torch.randn(2, 3, 4, 5)

    def fn(x, scale, nchw):
        return aten.add.Tensor(aten.relu.default(aten.mul.Tensor(x, scale)), nchw)

    result, calls = run_fused(fn, x, scale, nchw)
    expected = fn(x, scale, nchw)
    assert result.stride() == expected.stride() == x.stride()
    torch.testing.assert_close(result, expected, rtol=1e-6, atol=1e-6)
    source = calls[0].primary.triton_source
    assert "tl.load(in_ptr0 + xindex," in source and "tl.store(out_ptr0 + xindex," in source, source


def test_inputs_with_other_strides_than_traced_are_relaid_out():
    """Meta said contiguous; a strided tensor arriving at run time is copied to that layout first."""
    x = torch.randn(6, 8)

    def fn(x):
        return aten.exp.default(x)

    from fusion_helpers import fuse

    gm, _ = fuse(fn, x)
    strided = torch.randn(8, 6).t()
    torch.testing.assert_close(gm(strided), strided.exp())


def test_reduce_overhead_mode_means_cuda_graphs():
    assert options_for("reduce-overhead", None).cuda_graphs is True
    assert options_for("reduce-overhead", {"cuda_graphs": False}).cuda_graphs is False


def test_cuda_graphs_on_cpu_inputs_warn_once_and_run_normally():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU())
    compiled = torch.compile(model, backend="graphopt", mode="reduce-overhead")
    reset_fallbacks()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            x = torch.randn(4, 8)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    cuda_warnings = [w for w in caught if issubclass(w.category, GraphoptFallbackWarning) and "CUDA graph" in str(w.message)]
    assert len(cuda_warnings) == 1 and "CUDA tensor" in str(cuda_warnings[0].message)


def test_compiled_graph_frees_each_input_at_its_last_use():
    """A backward's saved activations must not live until the graph returns (peak memory)."""
    import weakref

    from torch import fx

    from graphopt.runtime import CompiledGraph

    first = torch.randn(8)
    first_ref = weakref.ref(first)
    freed_when_probed: list[bool] = []

    def probe(x: torch.Tensor) -> torch.Tensor:
        freed_when_probed.append(first_ref() is None)
        return x

    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    doubled = graph.call_function(torch.mul, (a, 2))  # the last use of `a`
    probed = graph.call_function(probe, (b,))
    graph.output(graph.call_function(torch.add, (doubled, probed)))
    args = [first, torch.ones(8)]
    expected = first * 2 + 1
    del first
    out = CompiledGraph(fx.GraphModule(torch.nn.Module(), graph), "probe")(args)
    assert args == [], "boxed convention: the callee clears the argument list"
    assert freed_when_probed == [True]
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_a_kept_binary_is_not_launched_for_arguments_that_need_64_bit_indexing(monkeypatch):
    """The launcher keeps the binary of a first launch per sizes and argument specializations. A
    sliced input whose row stride is a size symbol spans 2**32 elements at the same kernel sizes as
    a small one: it needs the 64-bit-index variant, not the 32-bit binary the small one kept.
    (GPU launch path, stubbed: the Triton JIT and the binary's launcher record the variant they run.)"""
    from fusion_helpers import fuse, kernels

    from graphopt.codegen import compiler

    gm, _ = fuse(lambda x: (x[:, :2] * 2).sum(), torch.randn(16, 64), dynamic=True)
    (call,) = kernels(gm)
    kernel = call.primary
    launched = []  # index64 of the variant each launch ran

    class Binary:
        def __init__(self, index64):
            self.packed_metadata = self.function = None
            self.run = lambda *args: launched.append(index64)

    class Jit:
        def __init__(self, index64):
            self.index64 = index64

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(self.index64)
                return Binary(self.index64)

            return launch

    monkeypatch.setattr(compiler, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(kernel, "_kernel", lambda persistent, index64: Jit(index64))
    monkeypatch.setitem(kernel.launch.__globals__, "stream", lambda device: 0)
    small = torch.randn(16, 1024)
    # 16 rows 2**28 apart over a small storage (never read: the launch is stubbed)
    huge = torch._C._dynamo.guards._reinterpret_tensor(torch.empty(16), (16, 2**28), (2**28, 1), 0)
    kernel.launch(small)
    kernel.launch(small)
    kernel.launch(huge)
    assert launched == [False, False, True]
