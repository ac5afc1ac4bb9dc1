"""Triton code generation for the fusion groups that passes/fusion.py forms.

indexing.py   index math as sympy (views are index maps), printing to Triton
lowerings.py  the table from ATen ops to Triton expressions
kernel.py     a group -> its iteration space (analyze) and Triton source (render)
heuristics.py block sizes and warps per launch
compiler.py   source -> jit function, cached in-process
launcher.py   the callable a fused node runs: sizes, output buffers, launch
interpreter_libdevice.py  libdevice stand-ins for Triton's CPU interpreter (tests)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import fx

from graphopt.codegen.kernel import CannotGenerate, KernelSpec, analyze, node_kind
from graphopt.codegen.launcher import FusedKernel, KernelCost, missing_symbols


def plan_kernel(name: str, nodes: Sequence[fx.Node], outputs: Sequence[fx.Node]) -> KernelSpec:
    """The kernel `nodes` would become, or CannotGenerate with the reason they cannot."""
    spec = analyze(name, nodes, outputs)
    missing = missing_symbols(spec)
    if missing:
        raise CannotGenerate(f"size symbols {', '.join(missing)} cannot be read off the kernel's inputs")
    return spec


__all__ = ["CannotGenerate", "FusedKernel", "KernelCost", "KernelSpec", "node_kind", "plan_kernel"]
