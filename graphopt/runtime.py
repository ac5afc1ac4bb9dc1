"""The compiled callable that AOTAutograd runs, and the per-node eager fallback.

The final GraphModule's generated Python is the program: ATen calls for extern
ops, and `call_function` nodes whose target is a `GuardedCall` for anything
graphopt compiled itself (a fused kernel's launcher, which allocates its
outputs per call with the layout the graph promised). A GuardedCall that fails
(a Triton compile error, a launch failure) warns once naming the op and the
reason, then runs its eager subgraph for good, so the model still runs.

With `cuda_graphs` on, CompiledGraph records the whole graph in one CUDA graph
and replays it, which removes the per-kernel launch cost (what
torch.compile(mode="reduce-overhead") asks for).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from graphopt.codegen.launcher import relayout, update_launch_mode
from graphopt.fallback import warn_fallback
from graphopt.pipeline import copy_graph_module


class GuardedCall:
    """A graph node target: `primary(*args)`, or `fallback(*args)` once primary has failed.

    FX codegen needs `__name__`/`__module__` on call_function targets; they also name
    the node in dumps and fallback warnings. A primary with a `launch` function (a
    FusedKernel's generated launcher) is called through it: one Python frame less per
    kernel call, which on a GPU host is a measurable share of a small kernel's launch.
    `reuse` (dead buffers for the outputs, passes/buffer_reuse.py) goes to a launcher only:
    any other primary, and the eager fallback, allocate their own outputs.

    When `fallback` is the group's subgraph with static output strides (`output_strides`), every
    call returns outputs with exactly those: a launcher allocates them, and what another primary or the
    fallback returns is copied into them where its strides differ. Views of the outputs
    can then be made without checking strides (passes/planned_views.py).
    """

    __module__ = "graphopt.runtime"

    def __init__(self, name: str, primary: Callable[..., Any], fallback: Callable[..., Any]):
        self.__name__ = name
        self.__qualname__ = name
        self.primary = primary
        self.fallback = fallback
        self.output_strides = _static_output_strides(fallback)
        launch = getattr(primary, "launch", None)
        self._call_primary = launch or self._conforming(_without_reuse(primary))
        self._call_fallback = self._conforming(fallback)
        self.failed_reason: str | None = None

    def __call__(self, *args: Any, reuse: tuple[Any, ...] | None = None) -> Any:
        if self.failed_reason is None:
            try:
                return self._call_primary(*args, reuse=reuse)
            except Exception as e:  # any failure of generated code must not kill the model
                self.failed_reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                warn_fallback(self.__name__, self.failed_reason)
        return self._call_fallback(*args)

    def _conforming(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """`fn` with its outputs in `output_strides`."""
        strides = self.output_strides
        if strides is None:
            return fn

        def call(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            if isinstance(result, tuple):
                return tuple(relayout(t, stride) for t, stride in zip(result, strides))
            return relayout(result, strides[0])

        return call

    def __repr__(self) -> str:
        return f"GuardedCall({self.__name__})"


def _without_reuse(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, reuse: tuple[Any, ...] | None = None) -> Any:
        return fn(*args)

    return call


def _static_output_strides(fallback: Any) -> list[tuple[int, ...]] | None:
    """The strides of each output of a fallback subgraph, if all are tensors of static layout."""
    if not isinstance(fallback, fx.GraphModule):
        return None
    (output,) = fallback.graph.find_nodes(op="output")
    results = output.args[0] if isinstance(output.args[0], tuple) else (output.args[0],)
    strides = []
    for result in results:
        val = result.meta.get("val") if isinstance(result, fx.Node) else None
        if not isinstance(val, torch.Tensor):
            return None
        stride = tuple(val.stride())
        if not all(type(v) is int for v in (*val.shape, *stride)):
            return None
        strides.append(stride)
    return strides


class CudaGraphRunner:
    """Replays one graph as a CUDA graph.

    Call 1 runs normally (compiles and warms up every kernel). Call 2 records the graph:
    inputs that were the same tensor at the same address in calls 1 and 2 (parameters,
    buffers) are read in place; the others are copied into static buffers before each replay. Outputs are
    copied out of the graph's memory, since the next replay overwrites it. If a graph
    cannot be recorded (dynamic sizes, non-CUDA inputs) or a stable input moves, it warns
    once and runs without CUDA graphs from then on.
    """

    def __init__(self, forward: Callable[..., Any], name: str, dynamic: bool):
        self.forward = forward
        self.name = name
        self.disabled = dynamic
        if dynamic:
            warn_fallback(f"CUDA graph of {name}", "the graph has dynamic sizes")
        self.calls = 0
        self.first_identities: list[tuple[int, int] | None] = []
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: list[Any] = []
        self.recorded_ptrs: list[int | None] = []
        self.copied: list[int] = []
        self.outputs: Any = None

    @staticmethod
    def _ptrs(inputs: list[Any]) -> list[int | None]:
        return [t.data_ptr() if isinstance(t, torch.Tensor) else None for t in inputs]

    @staticmethod
    def _identities(inputs: list[Any]) -> list[tuple[int, int] | None]:
        """(object id, address) per tensor: a parameter is the same object at the same address every call,
        an activation that merely lands where the last one was is a different object."""
        return [(id(t), t.data_ptr()) if isinstance(t, torch.Tensor) else None for t in inputs]

    def _disable(self, reason: str) -> None:
        self.disabled = True
        self.graph = None
        self.static_inputs = []
        warn_fallback(f"CUDA graph of {self.name}", reason)

    def __call__(self, inputs: list[Any]) -> Any:
        if self.disabled:
            return self.forward(*inputs)
        self.calls += 1
        if self.calls == 1:
            tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
            if not torch.cuda.is_available() or not all(t.is_cuda for t in tensors):
                self._disable("not every input is a CUDA tensor")
                return self.forward(*inputs)
            self.first_identities = self._identities(inputs)
            return self.forward(*inputs)
        if self.graph is None:
            return self._record(inputs)
        return self._replay(inputs)

    def _record(self, inputs: list[Any]) -> Any:
        identities = self._identities(inputs)
        self.copied = [
            i for i, (a, b) in enumerate(zip(identities, self.first_identities)) if a is not None and a != b
        ]
        self.static_inputs = list(inputs)
        for i in self.copied:
            self.static_inputs[i] = inputs[i].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on the capture stream, as CUDA graphs require
            self.forward(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = self.forward(*self.static_inputs)
        self.graph = graph
        self.recorded_ptrs = self._ptrs(self.static_inputs)
        return self._replay(inputs)

    def _replay(self, inputs: list[Any]) -> Any:
        copied = set(self.copied)
        for i, (t, ptr) in enumerate(zip(inputs, self.recorded_ptrs)):
            if i in copied:
                self.static_inputs[i].copy_(t)
            elif isinstance(t, torch.Tensor) and t.data_ptr() != ptr:
                self._disable(f"input {i} moved in memory after the graph was recorded")
                return self.forward(*inputs)
        self.graph.replay()
        return _copy_out(self.outputs)


def _is_symbolic(value: Any) -> bool:
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape)


def _copy_out(outputs: Any) -> Any:
    if isinstance(outputs, torch.Tensor):
        return outputs.clone()
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_copy_out(o) for o in outputs)
    return outputs


class CompiledGraph:
    """Runs one final GraphModule with AOTAutograd's boxed calling convention.

    Boxed: AOTAutograd passes the inputs as one list that the callee clears, so an
    input can be freed at its last use rather than when the graph returns; for a
    backward graph whose inputs are the saved activations this is most of its peak
    memory. The graph runs through a copy of `gm` generated by FX's boxed codegen,
    which takes the list and drops every value (inputs too) right after its last use.
    The flag is an instance attribute because Dynamo's `disable` wrapper around the
    backward copies the instance `__dict__` (functools.wraps), not class attributes.

    A graph on a CUDA device runs with that device current, as generated kernels allocate
    their outputs on, and launch to, the current device (codegen/launcher.py).
    """

    def __init__(self, gm: fx.GraphModule, name: str, cuda_graphs: bool = False, cuda_device: torch.device | None = None):
        self._boxed_call = True
        self.gm = gm
        self.name = name
        self._boxed_forward = _boxed(gm).forward
        # given when `gm` comes from a cache without the meta of its inner nodes (graphopt/artifact.py)
        self.cuda_device = cuda_device or _cuda_device(gm)
        self.cuda_graph: CudaGraphRunner | None = None
        if cuda_graphs:
            dynamic = any(_is_symbolic(n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder")
            self.cuda_graph = CudaGraphRunner(gm.forward, name, dynamic)

    def __call__(self, args: list[Any]) -> Any:
        update_launch_mode()
        if self.cuda_device is None:
            return self._run(args)
        with torch.cuda.device(self.cuda_device):
            return self._run(args)

    def _run(self, args: list[Any]) -> Any:
        if self.cuda_graph is not None:
            inputs = list(args)
            args.clear()
            return self.cuda_graph(inputs)
        return self._boxed_forward(args)


def _cuda_device(gm: fx.GraphModule) -> torch.device | None:
    """The CUDA device the graph's tensors live on, if any."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.device.type == "cuda":
            return val.device
    return None


def _boxed(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` whose forward takes its inputs as one list and clears it."""
    boxed = copy_graph_module(gm)
    boxed.graph.set_codegen(fx.graph._BoxedCodeGen())
    _LazyGraphModule.force_recompile(boxed)  # code now: its forward is called directly, without the lazy check
    return boxed
