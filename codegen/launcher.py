"""The callable a fused graph node runs: sizes, output buffers, launch.

`FusedKernel` is the primary of a fused node's GuardedCall. It carries what the
fusion report and the CLI show (Triton source, original nodes, cost estimate)
and a small generated Python function that, per call, reads the size symbols
off its inputs, allocates outputs with exactly the layout the graph's
meta['val'] promised (torch.empty_strided), and launches the kernel with a
configuration chosen for the actual sizes. Kernel variants (persistent or
looped reduction, 32- or 64-bit indexing) are rendered and compiled on first
use, once per process.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import sympy
import torch
import triton
from triton import knobs

from graphopt.codegen import compiler, heuristics
from graphopt.codegen.indexing import print_index, shape_of, strides_of
from graphopt.codegen.kernel import KernelSpec, is_scalar_node, render

_INT32_LIMIT = 2**31


@dataclasses.dataclass(frozen=True)
class KernelCost:
    """The fusion pass's estimate for one kernel, at the sizes seen at compile time
    (cost_model/roofline.py): bytes moved, seconds, and seconds of its nodes run unfused."""

    bytes_moved: int
    seconds: float
    unfused_seconds: float


def relayout(t: torch.Tensor, stride: tuple[int, ...]) -> torch.Tensor:
    """`t` with the strides the kernel was generated for (copied only if they differ where it matters)."""
    actual = t.stride()
    if actual == stride or all(a == s or n == 1 for a, s, n in zip(actual, stride, t.shape)):
        return t
    out = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device)
    out.copy_(t)
    return out


def allocator(device: torch.device) -> Any:
    """How outputs on `device` are allocated: (shape, stride, dtype) -> tensor. Inductor's direct
    allocators skip torch.empty_strided's argument parsing, about half the host cost of every
    kernel call's allocation; the CUDA one allocates on the current device, which
    runtime.CompiledGraph sets to the graph's."""
    if device.type == "cuda":
        return torch._C._dynamo.guards._empty_strided_cuda
    if device.type == "cpu":
        return torch._C._dynamo.guards._empty_strided_cpu
    return lambda shape, stride, dtype: torch.empty_strided(shape, stride, dtype=dtype, device=device)


def describe_node(node: Any) -> str:
    args = ", ".join(str(a) for a in node.args)
    return f"{node.name} = {node.target}({args})"


class FusedKernel:
    """Launches one generated kernel; `triton_source` is its default variant."""

    def __init__(self, spec: KernelSpec, cost: KernelCost | None):
        self.spec = spec
        self.name = spec.name
        self.cost = cost
        self.original_nodes = tuple(describe_node(n) for n in spec.nodes)
        self.inner_reduction = spec.domain.is_reduction and spec.inner
        self.launcher_source = _launcher_source(spec)
        namespace = {"torch": torch, "relayout": relayout, "run": self._run, "empty": allocator(_device(spec))}
        exec(compile(self.launcher_source, f"<graphopt launcher {self.name}>", "exec"), namespace)
        self._launch = namespace["launch"]
        self._variants: dict[tuple[bool, bool], Any] = {}
        self._launch_plans: dict[tuple[Any, ...], _Launch] = {}
        self.launches = 0

    @property
    def triton_source(self) -> str:
        return self.source(persistent=True, index64=False)

    def source(self, persistent: bool, index64: bool) -> str:
        return render(self.spec, persistent, index64)

    def _kernel(self, persistent: bool, index64: bool) -> Any:
        key = (persistent, index64)
        fn = self._variants.get(key)
        if fn is None:
            fn = self._variants[key] = compiler.load_kernel(self.source(persistent, index64), self.spec.kernel_name)
        return fn

    def _run(self, args: tuple[Any, ...], xnumel: int, rnumel: int) -> None:
        if xnumel == 0:
            return
        self.launches += 1
        key = (xnumel, rnumel, *map(_specialization, args))
        launch = self._launch_plans.get(key)
        if launch is None:
            launch = self._launch_plans[key] = self._plan_launch(args, xnumel, rnumel)
        launch(*args, xnumel, rnumel)

    def _plan_launch(self, args: tuple[Any, ...], xnumel: int, rnumel: int) -> _Launch:
        """The kernel variant, grid and block sizes for these sizes (cached by _run per sizes and
        per what Triton specializes the arguments on)."""
        index64 = xnumel * rnumel >= _INT32_LIMIT or any(
            isinstance(a, torch.Tensor) and a.numel() >= _INT32_LIMIT for a in args
        )
        if self.spec.domain.is_reduction:
            config = heuristics.reduction_config(xnumel, rnumel, self.inner_reduction)
        else:
            config = heuristics.pointwise_config(xnumel)
        kernel = self._kernel(config.persistent or not self.spec.domain.is_reduction, index64)
        constexprs = (config.xblock, config.rblock) if self.spec.domain.is_reduction else (config.xblock,)
        return _Launch(kernel, (triton.cdiv(xnumel, config.xblock), 1, 1), constexprs, config.num_warps)

    def __call__(self, *args: Any) -> Any:
        return self._launch(*args)

    def __repr__(self) -> str:
        return f"FusedKernel({self.name}, {len(self.spec.nodes)} nodes)"


def _specialization(arg: Any) -> Any:
    """What Triton's JIT specializes a kernel argument on: a pointer's 16-byte alignment, an
    integer's type width, being 1 or a multiple of 16. Equal values here mean the same binary."""
    if isinstance(arg, torch.Tensor):
        return arg.data_ptr() % 16 == 0
    if type(arg) is int:
        return (arg == 1, arg % 16 == 0, -_INT32_LIMIT <= arg < _INT32_LIMIT)
    return type(arg)


def _launch_hooks_installed() -> bool:
    """Whether a Triton launch hook (a HookChain with hooks, or a plain callable) wants every launch.
    Asked on every launch, so written out (a generator here cost ~1 us per launch on the H200 host)."""
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool((enter is not None and getattr(enter, "calls", True)) or (leave is not None and getattr(leave, "calls", True)))


class _Launch:
    """One kernel binary at one grid: launched straight through the CompiledKernel's launcher.

    Triton's `kernel[grid](...)` binds and specializes every argument again on each call
    (tens of microseconds on the host, more than many kernels take on the GPU). The first
    launch goes through it and keeps the CompiledKernel it returns; later launches with the
    same sizes and argument specializations (the caller's cache key) call the binary's
    launcher directly, as inductor's launchers do. Under the interpreter, and while a
    Triton launch hook is installed (proton), every launch takes the JIT path.
    """

    def __init__(self, kernel: Any, grid: tuple[int, int, int], constexprs: tuple[int, ...], num_warps: int):
        self.kernel = kernel
        self.grid = grid
        self.constexprs = constexprs
        self.num_warps = num_warps
        self.binary: Any = None
        self.device = -1

    def __call__(self, *args: Any) -> None:
        binary = self.binary
        if binary is None or _launch_hooks_installed():
            self._launch_jit(args)
            return
        stream = torch._C._cuda_getCurrentRawStream(self.device)
        # (launch metadata, enter hook, exit hook): None, as Triton passes them when no hook is installed
        binary.run(
            *self.grid, stream, binary.function, binary.packed_metadata, None, None, None, *args, *self.constexprs
        )

    def _launch_jit(self, args: tuple[Any, ...]) -> None:
        blocks = dict(zip(("XBLOCK", "RBLOCK"), self.constexprs))
        binary = self.kernel[self.grid](*args, **blocks, num_warps=self.num_warps)
        if not compiler.interpreting() and binary is not None and hasattr(binary, "packed_metadata"):
            self.device = torch.cuda.current_device()
            self.binary = binary


def _symbol_sources(spec: KernelSpec, names: dict[Any, str]) -> dict[sympy.Symbol, str]:
    """Python expressions (over the launcher's argument names) that give each size symbol's value."""
    sources: dict[sympy.Symbol, str] = {}
    for node in spec.inputs:
        if is_scalar_node(node):
            expr = sympy.sympify(node.meta["val"].node.expr)
            if isinstance(expr, sympy.Symbol):
                sources.setdefault(expr, names[node])
    for node in spec.tensor_inputs:
        for what, values in (("shape", shape_of(node)), ("stride()", strides_of(node))):
            for d, v in enumerate(values):
                if isinstance(v, sympy.Symbol):
                    sources.setdefault(v, f"{names[node]}.{what}[{d}]")
    return sources


def needed_symbols(spec: KernelSpec) -> set[sympy.Symbol]:
    exprs: list[sympy.Expr] = [spec.domain.xnumel, spec.domain.rnumel, *spec.symbols]
    for node in spec.outputs:
        exprs += [*shape_of(node), *strides_of(node)]
    for node in spec.tensor_inputs:
        exprs += list(strides_of(node))
    return set().union(*(sympy.sympify(e).free_symbols for e in exprs))


def missing_symbols(spec: KernelSpec) -> list[str]:
    """Size symbols the launcher could not read off its inputs (the group cannot be a kernel)."""
    names = {node: f"a{i}" for i, node in enumerate(spec.inputs)}
    sources = _symbol_sources(spec, names)
    return sorted(str(s) for s in needed_symbols(spec) if s not in sources)


def _tuple(values: Any) -> str:
    items = [print_index(v) for v in values]
    return "(" + "".join(f"{i}, " for i in items) + ")"


def _launcher_source(spec: KernelSpec) -> str:
    names = {node: f"a{i}" for i, node in enumerate(spec.inputs)}
    sources = _symbol_sources(spec, names)
    lines = [f"def launch({', '.join(names.values())}):"]
    for symbol in sorted(needed_symbols(spec), key=str):
        lines.append(f"    {symbol} = {sources[symbol]}")
    for node in spec.tensor_inputs:
        if len(shape_of(node)) >= 1:
            lines.append(f"    {names[node]} = relayout({names[node]}, {_tuple(strides_of(node))})")
    outs = []
    for i, node in enumerate(spec.outputs):
        lines.append(f"    o{i} = empty({_tuple(shape_of(node))}, {_tuple(strides_of(node))}, {node.meta['val'].dtype})")
        outs.append(f"o{i}")
    kernel_args = [names[n] for n in spec.tensor_inputs] + outs + [names[n] for n in spec.scalar_inputs]
    kernel_args += [str(s) for s in spec.symbols]
    lines.append(f"    run({_tuple_names(kernel_args)}, {print_index(spec.domain.xnumel)}, {print_index(spec.domain.rnumel)})")
    lines.append(f"    return {outs[0]}" if len(outs) == 1 else f"    return {_tuple_names(outs)}")
    return "\n".join(lines) + "\n"


def _device(spec: KernelSpec) -> torch.device:
    """The device of the kernel's outputs (one kernel runs on one device)."""
    (device,) = {node.meta["val"].device for node in spec.outputs}
    return device


def _tuple_names(names: list[str]) -> str:
    return "(" + "".join(f"{n}, " for n in names) + ")"
