"""Kernel outputs written into buffers that died earlier in the graph, instead of new allocations.

Every generated kernel allocates its outputs per call. On a GPU host each allocation is a
caching-allocator round trip on the path that bounds small steps, and a GPT-2 inference
step made ~176 of them (inductor's 18: its wrapper reuses dead buffers). This pass plans
the same reuse as inductor's wrapper memory planning: walking the graph in order, a buffer
whose last reader has run goes into a pool keyed by device, dtype and size; a later kernel
output with the same key takes the most recently freed one, if keeping that buffer alive
until then does not raise the graph's estimated peak memory. The kernel's launcher then
makes its output as an alias of the donor (codegen/launcher.py, `reuse=`).

Aliasing comes from meta['val']: fake tensors share a storage exactly where eager's
results would, so a buffer is dead only when every view of it is. A donor must own its
whole storage whichever way it was made (a kernel's generated code or its eager fallback):
a kernel output or matrix product that is dense, at offset 0, fills its storage, and is
neither a graph input nor read by the graph's output. Sizes are compared as sympy expressions, so a dynamic size
never borrows a buffer that only happened to have the same size when traced.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import sympy
import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten

from graphopt.codegen.indexing import product, same, size_expr
from graphopt.cost_model.roofline import size_hint
from graphopt.pipeline import PassContext, PassReport
from graphopt.runtime import GuardedCall

_PoolKey = tuple[torch.device, torch.dtype, str]

aten = torch.ops.aten

# ATen ops whose result is always a new dense tensor of the layout their meta function gives,
# on every device: their buffers may be donors too (GPT-2's dead buffers are mostly these)
_FRESH_PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


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


@dataclasses.dataclass
class _Buffer:
    """A storage that a kernel output or product owns: who holds it now, and when its last reader runs."""

    key: _PoolKey
    holder: fx.Node
    free_after: int
    nbytes: int


def _storages(value: Any) -> list[StorageWeakRef]:
    leaves = tree_flatten(value)[0]
    return [StorageWeakRef(t.untyped_storage()) for t in leaves if isinstance(t, torch.Tensor)]


def _node_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in tree_flatten((node.args, node.kwargs))[0] if isinstance(a, fx.Node)]


@dataclasses.dataclass
class _Lifetimes:
    """Per storage (of meta['val']): where it is made, where it is last read, its bytes; those the
    graph returns, and those it may not give away (inputs, constants, outputs, reads by nodes
    without meta, whose aliasing is unknown)."""

    created: dict[StorageWeakRef, int]
    last_use: dict[StorageWeakRef, int]
    nbytes: dict[StorageWeakRef, int]
    returned: set[StorageWeakRef]
    pinned: set[StorageWeakRef]


def _lifetimes(nodes: list[fx.Node]) -> _Lifetimes:
    life = _Lifetimes({}, {}, {}, set(), set())
    storages_of: dict[fx.Node, list[StorageWeakRef]] = {}
    for pos, node in enumerate(nodes):
        val = node.meta.get("val")
        inputs = _node_inputs(node)
        read = [s for a in inputs for s in storages_of.get(a, ())]
        if node.op in ("placeholder", "get_attr", "output") or val is None:
            life.pinned.update(read)
        if node.op == "output":
            life.returned.update(read)
        for s in read:
            life.last_use[s] = pos
        own = _storages(val)
        storages_of[node] = own
        for s, t in zip(own, (t for t in tree_flatten(val)[0] if isinstance(t, torch.Tensor))):
            if s not in life.created:
                life.created[s] = pos
                life.last_use.setdefault(s, pos)
                life.nbytes[s] = size_hint(t.untyped_storage().nbytes())
        if node.op in ("placeholder", "get_attr"):
            life.pinned.update(own)
    return life


def _peak_profile(nodes: list[fx.Node], life: _Lifetimes) -> list[int]:
    """Estimated bytes alive while each node runs: every storage from its making to its last read
    (returned ones to the end), as the runtime frees each value, inputs too, after its last use."""
    delta = [0] * (len(nodes) + 1)
    end = len(nodes) - 1
    for s, start in life.created.items():
        stop = end if s in life.returned else life.last_use[s]
        delta[start] += life.nbytes[s]
        delta[stop + 1] -= life.nbytes[s]
    live, total = [], 0
    for d in delta[:-1]:
        total += d
        live.append(total)
    return live


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


def _owned_key(val: Any, storage: StorageWeakRef, life: _Lifetimes, pos: int) -> _PoolKey | str:
    """The pool key of a kernel output that owns its whole storage, or why it does not."""
    if not isinstance(val, torch.Tensor):
        return "no tensor meta"
    if life.created.get(storage) != pos:
        return "aliases an earlier value"
    numel = sympy.expand(product([size_expr(s) for s in val.shape]))
    if numel == 0 or not _dense(val) or size_expr(val.storage_offset()) != 0:
        return "not dense"
    if not same(size_expr(val.untyped_storage().nbytes()), numel * val.dtype.itemsize):
        return "does not fill its storage"
    return (val.device, val.dtype, str(numel))


def _outputs(node: fx.Node) -> list[tuple[fx.Node | None, Any]]:
    """(the node holding it, its meta) per output of a kernel node or a matrix product."""
    val = node.meta.get("val")
    if not isinstance(val, tuple):
        return [(node, val)]
    holders = {u.args[1]: u for u in node.users if u.op == "call_function" and u.target is operator.getitem}
    return [(holders.get(i), v) for i, v in enumerate(val)]


def _is_kernel(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, GuardedCall) and hasattr(node.target.primary, "launch")


class _Planner:
    """The walk over the graph: the pool of dead buffers, and the live-bytes estimate it must not raise."""

    def __init__(self, nodes: list[fx.Node]):
        self.life = _lifetimes(nodes)
        self.live = _peak_profile(nodes, self.life)
        self.peak = max(self.live, default=0)
        self.pool: dict[_PoolKey, list[_Buffer]] = {}
        self.freed_after: dict[int, list[_Buffer]] = {}
        self.kept: dict[str, int] = {}
        self.reused = self.reused_bytes = 0

    def advance(self, pos: int) -> None:
        """Buffers whose last reader ran just before `pos` join the pool."""
        for buffer in self.freed_after.pop(pos - 1, ()):
            self.pool.setdefault(buffer.key, []).append(buffer)

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

    def offer(self, holder: fx.Node | None, val: Any, pos: int) -> _PoolKey | str:
        """Register an output made at `pos` as a future donor, if it owns its storage; its pool key."""
        if holder is None:
            return "unused"
        if not isinstance(val, torch.Tensor):
            return "no tensor meta"
        storage = StorageWeakRef(val.untyped_storage())
        key = _owned_key(val, storage, self.life, pos)
        if not isinstance(key, str) and storage not in self.life.pinned:
            free_after = self.life.last_use[storage]
            buffer = _Buffer(key, holder, free_after, self.life.nbytes[storage])
            self.freed_after.setdefault(free_after, []).append(buffer)
        return key


def run(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, BufferReuseReport]:
    nodes = list(gm.graph.nodes)
    planner = _Planner(nodes)
    kernel_outputs = 0
    for pos, node in enumerate(nodes):
        planner.advance(pos)
        if node.op == "call_function" and node.target in _FRESH_PRODUCTS:
            planner.offer(node, node.meta.get("val"), pos)
        if not _is_kernel(node):
            continue
        reuse = []
        for holder, val in _outputs(node):
            kernel_outputs += 1
            donor = planner.take(planner.offer(holder, val, pos), pos)
            reuse.append(donor.holder if donor is not None else None)
        if any(r is not None for r in reuse):
            node.kwargs = {**node.kwargs, "reuse": tuple(reuse)}
    gm.recompile()
    report = BufferReuseReport(kernel_outputs, planner.reused, planner.reused_bytes, planner.kept)
    return gm, report
