"""Kernel outputs written into buffers that died earlier in the graph, instead of new allocations.

Every generated kernel allocates its outputs per call. On a GPU host each allocation is a
caching-allocator round trip on the path that bounds small steps, and a GPT-2 inference
step made ~176 of them (inductor's 18: its wrapper reuses dead buffers). This pass plans
the same reuse as inductor's wrapper memory planning: walking the graph in order, a buffer
whose last reader has run goes into a pool keyed by device, dtype and size; a later kernel
output with the same key takes the most recently freed one, if keeping that buffer alive
until then does not raise the graph's estimated peak memory. The kernel's launcher then
makes its output as an alias of the donor (codegen/launcher.py, `reuse=`).

A buffer is dead only when every value living in its storage is (views, in-place results).
Which storages a value lives in comes from passes/live_memory.py, as does the live-bytes estimate. A donor
must own its whole storage whichever way it was made (a kernel's generated code or its eager
fallback): a kernel output or matrix product, dense, that is neither a graph input nor read
by the graph's output. Sizes are compared as sympy expressions, so a dynamic size never
borrows a buffer that only happened to have the same size when traced.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import sympy
import torch
from torch import fx

from graphopt.codegen.indexing import product, same, size_expr
from graphopt.cost_model.roofline import size_hint
from graphopt.passes.live_memory import FRESH_PRODUCTS, Ids, Storages, estimate
from graphopt.pipeline import GraphKind, PassContext, PassReport
from graphopt.runtime import GuardedCall

_PoolKey = tuple[torch.device, torch.dtype, str]


@dataclasses.dataclass(frozen=True)
class BufferReuseReport(PassReport):
    kernel_outputs: int  # outputs of generated kernels, each an allocation per call without reuse
    reused: int
    reused_bytes: int  # at the sizes seen when compiling
    kept: dict[str, int]  # why the other outputs allocate, with counts

    def summary(self) -> str:
        kept = "; ".join(f"{n} {why}" for why, n in sorted(self.kept.items()))
        return (
            f"{self.reused} of {self.kernel_outputs} kernel outputs written into dead buffers "
            f"({self.reused_bytes / 2**20:.1f} MiB)" + (f"; kept: {kept}" if kept else "")
        )


def _dense(val: torch.Tensor) -> bool:
    """Non-overlapping and without gaps: ordered by stride, each dim's stride is the product of
    the sizes of the dims inside it (sizes compared symbolically, ordered by their hints)."""
    dims = sorted((d for d in range(val.dim()) if size_expr(val.shape[d]) != 1), key=lambda d: size_hint(val.stride()[d]))
    inner = sympy.Integer(1)
    for d in dims:
        if not same(size_expr(val.stride()[d]), inner):
            return False
        inner = inner * size_expr(val.shape[d])
    return True


@dataclasses.dataclass
class _Buffer:
    """A storage that a kernel output or product owns: who holds it now, and when its last reader runs."""

    key: _PoolKey
    holder: fx.Node
    free_after: int
    nbytes: int


class _Planner:
    """The walk over the graph: the pool of dead buffers, and the live-bytes estimate it must not raise."""

    def __init__(self, nodes: list[fx.Node], kind: GraphKind):
        self.storages, self.life, self.live = estimate(nodes, kind)
        self.peak = max(self.live, default=0)
        self.pool: dict[_PoolKey, list[_Buffer]] = {}
        self.freed_after: dict[int, list[_Buffer]] = {}
        self.kept: dict[str, int] = {}
        self.reused = self.reused_bytes = 0

    def advance(self, pos: int) -> None:
        """Buffers whose last reader ran just before `pos` join the pool."""
        for buffer in self.freed_after.pop(pos - 1, ()):
            self.pool.setdefault(buffer.key, []).append(buffer)

    def key(self, holder: fx.Node | None, val: Any) -> _PoolKey | str:
        """The pool key of an output (by device, dtype, size), or why it has none."""
        if holder is None:
            return "unused"
        if not isinstance(val, torch.Tensor):
            return "no tensor meta"
        if not _dense(val) or size_expr(val.storage_offset()) != 0:
            return "not dense"
        numel = sympy.expand(product([size_expr(s) for s in val.shape]))
        return "empty" if numel == 0 else (val.device, val.dtype, str(numel))

    def offer(self, holder: fx.Node, key: _PoolKey | str, ids: Ids) -> None:
        """Register a value as a future donor if it owns its storage: pooled after its last reader."""
        if isinstance(key, str) or len(ids) != 1:
            return
        (i,) = ids
        if i in self.storages.owned and i not in self.life.pinned:
            free_after = self.life.last_use[i]
            self.freed_after.setdefault(free_after, []).append(_Buffer(key, holder, free_after, self.life.nbytes[i]))

    def take(self, key: _PoolKey | str, pos: int) -> _Buffer | None:
        """A dead buffer for an output with `key` allocated at `pos`, or None (the reason is counted)."""
        if isinstance(key, str):
            return self._keep(key)
        if not self.pool.get(key):
            return self._keep("no dead buffer of its size")
        # the most recently freed buffer is kept alive the shortest; if it would raise the peak,
        # every older one (alive over a longer stretch ending here) would too
        candidate = self.pool[key][-1]
        between = self.live[candidate.free_after + 1 : pos]
        if between and max(between) + candidate.nbytes > self.peak:
            return self._keep("would raise the estimated peak")
        self.pool[key].pop()
        for i in range(candidate.free_after + 1, pos):
            self.live[i] += candidate.nbytes
        self.reused += 1
        self.reused_bytes += candidate.nbytes
        return candidate

    def _keep(self, why: str) -> None:
        self.kept[why] = self.kept.get(why, 0) + 1


def _outputs(node: fx.Node, storages: Storages) -> list[tuple[fx.Node | None, Any, Ids]]:
    """(the node holding it, its meta, its storages) per output of a kernel node."""
    val = node.meta.get("val")
    if node not in storages.elements:
        return [(node, val, storages.of[node])]
    holders = {u.args[1]: u for u in node.users if u.op == "call_function" and u.target is operator.getitem}
    return [(holders.get(i), v, ids) for i, (v, ids) in enumerate(zip(val, storages.elements[node]))]


def _is_kernel(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, GuardedCall) and hasattr(node.target.primary, "launch")


def run(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, BufferReuseReport]:
    nodes = list(gm.graph.nodes)
    planner = _Planner(nodes, ctx.kind)
    kernel_outputs = 0
    for pos, node in enumerate(nodes):
        planner.advance(pos)
        if node.op == "call_function" and node.target in FRESH_PRODUCTS:
            planner.offer(node, planner.key(node, node.meta.get("val")), planner.storages.of[node])
        if not _is_kernel(node):
            continue
        reuse = []
        for holder, val, ids in _outputs(node, planner.storages):
            kernel_outputs += 1
            key = planner.key(holder, val)
            planner.offer(holder, key, ids)
            donor = planner.take(key, pos)
            reuse.append(donor.holder if donor is not None else None)
        if any(r is not None for r in reuse):
            node.kwargs = {**node.kwargs, "reuse": tuple(reuse)}
    gm.recompile()
    report = BufferReuseReport(kernel_outputs, planner.reused, planner.reused_bytes, planner.kept)
    return gm, report
