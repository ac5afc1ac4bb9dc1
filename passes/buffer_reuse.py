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
Which storages a value lives in is worked out from what the nodes do (`_Storages`). A donor
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
from graphopt.cost_model.roofline import nbytes_hint, size_hint
from graphopt.passes.planned_views import PlannedView, alias
from graphopt.pipeline import GraphKind, PassContext, PassReport
from graphopt.runtime import GuardedCall

aten = torch.ops.aten

# ATen ops whose result is always a new dense tensor of the layout their meta function gives,
# on every device: their buffers may be donors too (GPT-2's dead buffers are mostly these)
_FRESH_PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}

_PoolKey = tuple[torch.device, torch.dtype, str]
_Ids = tuple[int, ...]  # the storages a value may live in


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


def _returns_alias(op: torch._ops.OpOverload) -> bool:
    """Whether an op's result may live in its inputs' storage (a view, an in-place or out= op).
    _unsafe_view's schema says it makes a new tensor, but it is a view of its input."""
    schema = op._schema
    return op is aten._unsafe_view.default or schema.is_mutable or any(r.alias_info is not None for r in schema.returns)


class _Storages:
    """Which storages each value of a graph may live in, from what its nodes do (op schemas,
    graphopt's own targets), not from meta['val']: a pass that replaces a node leaves its users'
    fake tensors on the replaced node's storage, so their aliasing no longer says what runs.

    A result that is not a view makes a new storage; a view or an in-place result lives in its
    inputs'; a kernel's output where its eager subgraph's output lives (whichever ran); a node
    graphopt cannot read is taken to put its result in every input's storage, and those
    storages are `unknown`. `owned`: the storages one value fills alone, a kernel output made
    by its subgraph's own computation or a matrix product, whatever ran."""

    def __init__(self, inputs: list[_Ids] | None = None, count: int = 0):
        self.inputs = list(inputs) if inputs is not None else None  # a subgraph's, in order
        self.count = count  # storages made here are numbered after it
        self.of: dict[fx.Node, _Ids] = {}
        self.elements: dict[fx.Node, list[_Ids]] = {}  # per element of a tuple value
        self.made_at: dict[int, fx.Node] = {}
        self.owned: set[int] = set()
        self.unknown: set[int] = set()

    def new(self, node: fx.Node) -> _Ids:
        self.count += 1
        self.made_at[self.count] = node
        return (self.count,)

    def read(self, node: fx.Node) -> _Ids:
        return tuple(dict.fromkeys(i for a in node.all_input_nodes for i in self.of.get(a, ())))

    def add(self, node: fx.Node) -> None:
        target = node.target
        if node.op == "placeholder" and self.inputs is not None:
            self.of[node] = self.inputs.pop(0)
        elif node.op in ("placeholder", "get_attr"):
            self.of[node] = self.new(node)
        elif node.op != "call_function":
            self.of[node] = self.read(node)
        elif target is operator.getitem and node.args[0] in self.elements:
            self.of[node] = self.elements[node.args[0]][node.args[1]]
        elif target is operator.getitem:  # an element of views (split, unbind): in their storages
            self.of[node] = self.of.get(node.args[0], ())
        elif isinstance(target, torch._ops.OpOverload) and not _returns_alias(target):
            val = node.meta.get("val")
            if isinstance(val, (tuple, list)):
                self.elements[node] = [self.new(node) for _ in val]
                self.of[node] = tuple(i for ids in self.elements[node] for i in ids)
            else:
                self.of[node] = self.new(node)
                if target in _FRESH_PRODUCTS:
                    self.owned.update(self.of[node])
        elif isinstance(target, torch._ops.OpOverload):
            self.of[node] = self.read(node)
        elif isinstance(target, PlannedView) or target is alias:
            self.of[node] = self.of.get(node.args[0], ())
        elif isinstance(target, GuardedCall):
            self._kernel(node, target.fallback)
        else:
            self.of[node] = self.read(node)
            self.unknown.update(self.of[node])

    def _kernel(self, node: fx.Node, sub_gm: fx.GraphModule) -> None:
        """Outputs live where the eager subgraph's do: in the node's inputs' storages, or in ones
        made inside it, which become new storages of this node (one per storage inside)."""
        args = [self.of.get(a, ()) if isinstance(a, fx.Node) else () for a in node.args]
        inner = _Storages(args, self.count)  # numbered apart: one made inside is never taken for an input's
        for sub_node in sub_gm.graph.nodes:
            inner.add(sub_node)
        (output,) = sub_gm.graph.find_nodes(op="output")
        results = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
        outer = {i for ids in args for i in ids}
        renamed: dict[int, int] = {}
        per_output = []
        for result in results:
            ids = inner.of.get(result, ()) if isinstance(result, fx.Node) else ()
            mapped = []
            for i in ids:
                if i not in outer and i not in renamed:
                    renamed[i] = self.new(node)[0]
                mapped.append(i if i in outer else renamed[i])
            per_output.append(tuple(mapped))
            # a value the subgraph computed itself (no view), alone in its storage
            if len(ids) == 1 and ids[0] not in outer and inner.made_at[ids[0]] is result:
                self.owned.add(renamed[ids[0]])
        self.unknown.update(i for i in inner.unknown if i in outer)
        if isinstance(output.args[0], (tuple, list)):
            self.elements[node] = per_output
        self.of[node] = tuple(dict.fromkeys(i for ids in per_output for i in ids))


@dataclasses.dataclass
class _Lifetimes:
    """Per storage: the position of the node that made it, of its last reader, its bytes (as
    made, sizes hinted); the storages alive until the graph returns (returned, or inputs their
    owners hold); those it may not give away (inputs, constants, returned, read by nodes
    graphopt cannot read)."""

    created: dict[int, int]
    last_use: dict[int, int]
    nbytes: dict[int, int]
    to_end: set[int]
    pinned: set[int]


def _nbytes(val: Any) -> int:
    return nbytes_hint(val) if isinstance(val, torch.Tensor) else 0


def _held(node: fx.Node, kind: GraphKind) -> bool:
    """Whether an input stays alive through the whole graph: the runtime drops its reference after
    the last read (boxed), but the caller of a forward or inference graph holds its arguments and
    the module its parameters and constants. A backward graph's saved activations and tangents are
    AOTAutograd's alone; the forward inputs it saved as they came (AOTAutograd names them
    primals_*) are still held by their owners."""
    return node.op == "get_attr" or kind != "backward" or str(node.target).startswith("primals")


def _lifetimes(nodes: list[fx.Node], storages: _Storages, kind: GraphKind) -> _Lifetimes:
    pos_of = {node: pos for pos, node in enumerate(nodes)}
    life = _Lifetimes({}, {}, {}, set(), set(storages.unknown))
    for i, node in storages.made_at.items():
        life.created[i] = life.last_use[i] = pos_of[node]
        vals = node.meta.get("val")
        elements = storages.elements.get(node)
        if elements is not None and isinstance(vals, (tuple, list)):
            life.nbytes[i] = next((_nbytes(v) for ids, v in zip(elements, vals) if i in ids), 0)
        else:
            life.nbytes[i] = _nbytes(vals)
        if node.op in ("placeholder", "get_attr"):
            life.pinned.add(i)
            if _held(node, kind):
                life.to_end.add(i)
    for pos, node in enumerate(nodes):
        read = storages.read(node)
        for i in read:
            life.last_use[i] = pos
        if node.op == "output":
            life.to_end.update(read)
            life.pinned.update(read)
    return life


def _peak_profile(count: int, life: _Lifetimes) -> list[int]:
    """Estimated bytes alive while each node runs: every storage from its making to its last read,
    as the runtime frees each value after its last use, or to the end (returned, or held: `_held`)."""
    delta = [0] * (count + 1)
    for i, start in life.created.items():
        stop = count - 1 if i in life.to_end else life.last_use[i]
        delta[start] += life.nbytes[i]
        delta[stop + 1] -= life.nbytes[i]
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
        self.storages = _Storages()
        for node in nodes:
            self.storages.add(node)
        self.life = _lifetimes(nodes, self.storages, kind)
        self.live = _peak_profile(len(nodes), self.life)
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

    def offer(self, holder: fx.Node, key: _PoolKey | str, ids: _Ids) -> None:
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


def _outputs(node: fx.Node, storages: _Storages) -> list[tuple[fx.Node | None, Any, _Ids]]:
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
        if node.op == "call_function" and node.target in _FRESH_PRODUCTS:
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
