"""The callable a fused graph node runs: sizes, output buffers, launch.

`FusedKernel` is the primary of a fused node's GuardedCall. It carries what the
fusion report and the CLI show (Triton source, original nodes, cost estimate)
and a small generated Python function, `launch`, that per call reads the size
symbols off its inputs, allocates outputs with exactly the layout the graph's
meta['val'] promised (or makes them as aliases of dead buffers the graph passes as
`reuse=`, passes/buffer_reuse.py), and launches the kernel. The first call at given sizes and
argument specializations goes through Triton's JIT with a configuration chosen
for those sizes (kernel variants, persistent or looped reduction, 32- or 64-bit
indexing, are rendered and compiled on first use, once per process); later calls
launch the compiled binary directly.
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
    """Launches one generated kernel; `triton_source` is its default variant.

    `launch` is the generated per-kernel function the graph calls (through its GuardedCall):
    sizes, relayout of inputs, output allocation and the launch itself in one Python frame,
    since on a GPU host every Python call on this path costs as much as a small kernel."""

    def __init__(self, spec: KernelSpec, cost: KernelCost | None):
        self.spec = spec
        self.name = spec.name
        self.cost = cost
        self.original_nodes = tuple(describe_node(n) for n in spec.nodes)
        self.inner_reduction = spec.domain.is_reduction and spec.inner
        self.launcher_source = _launcher_source(spec)
        self._variants: dict[tuple[bool, bool], Any] = {}
        self._binaries: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        self.launches = 0
        namespace = {
            "torch": torch,
            "relayout": relayout,
            "empty": allocator(_device(spec)),
            "reinterpret": torch._C._dynamo.guards._reinterpret_tensor,
            "kernel": self,
            "binaries": self._binaries,
            "first_launch": self._first_launch,
            "jit_only": _JIT_ONLY,
            "stream": torch._C._cuda_getCurrentRawStream if torch.cuda.is_available() else None,
            "specialization": _specialization,
            "span": _span,
        }
        exec(compile(self.launcher_source, f"<graphopt launcher {self.name}>", "exec"), namespace)
        self.launch = namespace["launch"]

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

    def _first_launch(self, key: tuple[Any, ...], args: tuple[Any, ...], xnumel: int, rnumel: int, index64: bool) -> None:
        """Launch through Triton's JIT (which compiles the variant on first use) and keep the binary
        it returns, so later calls with the same `key` (sizes, whether 64-bit indexing is needed, and
        what Triton specializes the arguments on) call the binary's launcher directly, as inductor's
        launchers do. Under the interpreter, and while a Triton launch hook is installed (proton),
        every launch comes here."""
        if self.spec.domain.is_reduction:
            config = heuristics.reduction_config(xnumel, rnumel, self.inner_reduction)
            blocks = {"XBLOCK": config.xblock, "RBLOCK": config.rblock}
        else:
            config = heuristics.pointwise_config(xnumel)
            blocks = {"XBLOCK": config.xblock}
        kernel = self._kernel(config.persistent or not self.spec.domain.is_reduction, index64)
        grid = (triton.cdiv(xnumel, config.xblock), 1, 1)
        binary = kernel[grid](*args, **blocks, num_warps=config.num_warps)
        if compiler.interpreting() or _JIT_ONLY[0] or not hasattr(binary, "packed_metadata"):
            return
        device = torch.cuda.current_device()
        self._binaries[key] = (binary.run, *grid, device, binary.function, binary.packed_metadata, *blocks.values())

    def __call__(self, *args: Any) -> Any:
        return self.launch(*args)

    def __repr__(self) -> str:
        return f"FusedKernel({self.name}, {len(self.spec.nodes)} nodes)"


def _specialization(arg: Any) -> Any:
    """What Triton's JIT specializes a non-tensor kernel argument on: an integer's type width,
    being 1 or a multiple of 16 (a tensor's is its pointer's 16-byte alignment, tested inline
    by the launcher). Equal values here mean the same binary."""
    if type(arg) is int:
        return (arg == 1, arg % 16 == 0, -_INT32_LIMIT <= arg < _INT32_LIMIT)
    return type(arg)


# [True] while launches must go through Triton's JIT, so that a Triton launch hook (a HookChain
# with hooks, or a plain callable: proton) sees every one. Refreshed once per graph call by
# runtime.CompiledGraph (update_launch_mode), not per launch: reading Triton's knobs costs ~1 us.
_JIT_ONLY = [False]


def update_launch_mode() -> None:
    runtime = knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    _JIT_ONLY[0] = bool(
        (enter is not None and getattr(enter, "calls", True)) or (leave is not None and getattr(leave, "calls", True))
    )


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


def _index64(spec: KernelSpec, names: dict[Any, str], sources: dict[sympy.Symbol, str]) -> tuple[str, set[sympy.Symbol]]:
    """A Python expression over the launcher's names saying whether the kernel needs 64-bit
    indexing: its domain, or a tensor argument, reaching 2**31 elements or element offsets (a
    strided tensor's span, 1 + sum((size - 1) * stride), can exceed its numel); and the size
    symbols it reads. Static terms, and those equal to the domain's size, are decided here; an
    input size with no symbol of its own to read is measured on the tensor (`span`)."""
    domain = sympy.expand(sympy.sympify(spec.domain.xnumel) * sympy.sympify(spec.domain.rnumel))
    checks: dict[str, None] = {}
    symbols: set[sympy.Symbol] = set()
    for node in [None, *spec.tensor_inputs, *spec.outputs]:
        if node is None:
            exprs = [domain]
        else:
            shape, strides = [sympy.sympify(v) for v in shape_of(node)], [sympy.sympify(v) for v in strides_of(node)]
            numel = sympy.expand(sympy.Mul(*shape))
            extent = sympy.expand(1 + sum(((n - 1) * st for n, st in zip(shape, strides)), sympy.Integer(0)))
            exprs = [numel, extent]
            if any(not e.free_symbols <= sources.keys() for e in exprs):
                name = names[node] if node in names else f"o{spec.outputs.index(node)}"
                checks[f"span({name}) >= {_INT32_LIMIT}"] = None
                continue
        for expr in exprs:
            if not expr.free_symbols:
                if int(expr) >= _INT32_LIMIT:
                    return "True", set()
            elif expr == domain:
                checks[f"xnumel * rnumel >= {_INT32_LIMIT}"] = None
            else:
                checks[f"{print_index(expr)} >= {_INT32_LIMIT}"] = None
                symbols |= expr.free_symbols
    return " or ".join(checks) or "False", symbols


def _span(t: torch.Tensor) -> int:
    """The larger of a tensor's numel and the element offsets it spans."""
    return max(t.numel(), 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())))


def _launcher_source(spec: KernelSpec) -> str:
    """The `launch` function of a kernel, written out for its arguments (see FusedKernel)."""
    names = {node: f"a{i}" for i, node in enumerate(spec.inputs)}
    sources = _symbol_sources(spec, names)
    lines = [f"def launch({''.join(f'{n}, ' for n in names.values())}reuse=None):"]
    index64, index64_symbols = _index64(spec, names, sources)
    for symbol in sorted(needed_symbols(spec) | index64_symbols, key=str):
        lines.append(f"    {symbol} = {sources[symbol]}")
    for node in spec.tensor_inputs:
        if len(shape_of(node)) >= 1:
            name, stride = names[node], _tuple(strides_of(node))
            lines.append(f"    if {name}.stride() != {stride}: {name} = relayout({name}, {stride})")
    outs = [f"o{i}" for i in range(len(spec.outputs))]
    layouts = [f"{_tuple(shape_of(n))}, {_tuple(strides_of(n))}" for n in spec.outputs]
    allocations = [f"empty({layout}, {n.meta['val'].dtype})" for layout, n in zip(layouts, spec.outputs)]
    # reuse: per output, a dead buffer of its size to write into, or None (passes/buffer_reuse.py)
    lines.append("    if reuse is None:")
    lines += [f"        {o} = {alloc}" for o, alloc in zip(outs, allocations)]
    lines.append("    else:")
    lines.append(f"        {_tuple_names([f'r{i}' for i in range(len(outs))])} = reuse")
    for i, (o, alloc, layout) in enumerate(zip(outs, allocations, layouts)):
        lines.append(f"        {o} = {alloc} if r{i} is None else reinterpret(r{i}, {layout}, 0)")
    result = outs[0] if len(outs) == 1 else _tuple_names(outs)
    xnumel, rnumel = print_index(spec.domain.xnumel), print_index(spec.domain.rnumel)
    lines.append(f"    xnumel, rnumel = {xnumel}, {rnumel}")
    lines.append(f"    if xnumel == 0: return {result}")
    lines.append("    kernel.launches += 1")
    tensor_args = [names[n] for n in spec.tensor_inputs]
    other_args = [names[n] for n in spec.scalar_inputs] + [str(s) for s in spec.symbols]
    # The compiled binary takes raw device pointers: given a tensor, Triton's C launcher calls its
    # data_ptr() and asks the driver about the address (cuPointerGetAttribute) for every argument.
    pointers = [f"p{i}" for i in range(len(tensor_args) + len(outs))]
    lines.append(f"    {_tuple_names(pointers)} = {_tuple_names([f'{t}.data_ptr()' for t in tensor_args + outs])}")
    # part of the key: a tensor's size symbols can take it past 32-bit offsets at the same xnumel/rnumel
    lines.append(f"    index64 = {index64}")
    # outputs come from the caching allocator, or are a dead buffer's storage from its start
    # (passes/buffer_reuse.py): always 16-byte aligned, left out of the key
    key = ["xnumel", "rnumel", "index64"] + [f"{p} % 16 == 0" for p in pointers[: len(tensor_args)]]
    key += [f"specialization({a})" for a in other_args]
    jit_args = ", ".join(tensor_args + outs + other_args + ["xnumel", "rnumel"])
    binary_args = ", ".join(pointers + other_args + ["xnumel", "rnumel"])
    blocks = "xblock, rblock" if spec.domain.is_reduction else "xblock"
    lines += [
        f"    key = {_tuple_names(key)}",
        "    binary = None if jit_only[0] else binaries.get(key)",
        "    if binary is None:",
        f"        first_launch(key, ({jit_args},), xnumel, rnumel, index64)",
        "    else:",
        f"        run, gx, gy, gz, device, function, metadata, {blocks} = binary",
        # (launch metadata, enter hook, exit hook): None, as Triton passes them when no hook is installed
        f"        run(gx, gy, gz, stream(device), function, metadata, None, None, None, {binary_args}, {blocks})",
        f"    return {result}",
    ]
    return "\n".join(lines) + "\n"


def _device(spec: KernelSpec) -> torch.device:
    """The device of the kernel's outputs (one kernel runs on one device)."""
    (device,) = {node.meta["val"].device for node in spec.outputs}
    return device


def _tuple_names(names: list[str]) -> str:
    return "(" + "".join(f"{n}, " for n in names) + ")"
