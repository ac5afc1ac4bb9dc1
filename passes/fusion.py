"""Fusion: group pointwise, view and reduction nodes into kernels that codegen writes.

Greedy, in the graph's order. Every codegen-able node starts as its own group
and is merged into the group of each producer (vertical fusion: the producer's
result never goes to memory), then groups that read the same tensor are merged
(horizontal fusion: the tensor is read once). A merge happens only if

  - it creates no cycle between groups (checked on ancestor bit sets),
  - no mutating node lies inside the group's span (reads stay before writes),
  - codegen can write the merged group as one kernel (`plan_kernel`), which is
    where iteration spaces must match (same shape, or a reduction boundary
    whose epilogue reads per-row results).

mm/bmm/addmm/convolution/attention and anything else codegen has no lowering
for stay ATen calls between groups. Views are pure index math and fills are
constants: each fusable consumer gets its own copy of the view chains and fills
it reads, so a view is never materialized and neither ties two kernels together.

Each group becomes one `call_function` node whose target is a GuardedCall:
primary the generated kernel (graphopt.codegen.FusedKernel), fallback the
group's original subgraph as a GraphModule of ATen calls.

The grouping is kept in the tuning cache (`fusion_cache.py`): a warm compile
replays it instead of trying every merge, and then writes the same kernels.
Groups built alike (a transformer's layers) are planned by codegen once per graph
(`fusion_plans.py`).
"""

from __future__ import annotations

import dataclasses
import heapq
import operator
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from graphopt import codegen
from graphopt.codegen import compiler, heuristics, lowerings
from graphopt.codegen.kernel import CannotGenerate, external_inputs, node_kind
from graphopt.cost_model import roofline
from graphopt.fallback import warn_fallback
from graphopt.passes import fusion_cache, reduction_prologues
from graphopt.passes.fusion_plans import Plans
from graphopt.passes.graph_edit import call_with_meta
from graphopt.passes.live_memory import writes_in_place
from graphopt.pipeline import PassContext, PassReport, node_op_name
from graphopt.runtime import GuardedCall

aten = torch.ops.aten

_COMPUTE_KINDS = {"pointwise", "reduction", "cast"}


@dataclasses.dataclass(frozen=True)
class FusedGroup:
    """One generated kernel: its nodes, how it was formed, and the cost estimate."""

    name: str
    nodes: tuple[str, ...]
    kind: str  # "pointwise" or "reduction"
    merges: tuple[str, ...]  # each merge that built it, with the reason
    bytes_moved: int  # roofline (cost_model/roofline.py) of the kernel: inputs read and outputs written once
    estimated_seconds: float
    unfused_seconds: float  # the same nodes as one ATen kernel each


@dataclasses.dataclass(frozen=True)
class RejectedMerge:
    first: tuple[str, ...]
    second: tuple[str, ...]
    reason: str


@dataclasses.dataclass(frozen=True)
class FusionReport(PassReport):
    groups: list[FusedGroup]
    rejected: list[RejectedMerge]
    not_fused: dict[str, str]  # node -> why it stays an ATen call (only for pointwise-like ops)
    split_reductions: list[str] = dataclasses.field(default_factory=list)
    recomputed_prologues: list[str] = dataclasses.field(default_factory=list)
    skipped: str | None = None

    def summary(self) -> str:
        if self.skipped:
            return f"fusion skipped: {self.skipped}"
        fused = sum(len(g.nodes) for g in self.groups)
        saved = sum(g.unfused_seconds - g.estimated_seconds for g in self.groups)
        recomputed = f"; {len(self.recomputed_prologues)} reductions recompute their prologue" if self.recomputed_prologues else ""
        return (
            f"{len(self.groups)} kernels from {fused} nodes (roofline: {saved * 1e6:.1f} us saved); "
            f"{len(self.rejected)} merges rejected; {len(self.not_fused)} pointwise nodes left to ATen{recomputed}"
        )


def _fusable(node: fx.Node, device: torch.device) -> tuple[bool, str | None]:
    """(can join a group, why not — only for ops one would expect to fuse)."""
    kind = node_kind(node)
    if kind == "extern" or writes_in_place(node):
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            if torch.Tag.pointwise in node.target.tags and not writes_in_place(node):
                return False, f"no Triton lowering for {node.target}"
        return False, None
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return False, None
    if val.device != device:
        return False, f"tensor on {val.device}, graph on {device}"
    if any(isinstance(size, int) and size == 0 for size in val.shape):
        return False, None  # empty: nothing to compute, so ATen's call is not a fallback worth a warning
    try:
        codegen.kernel._check_dtype(node)
    except CannotGenerate as e:
        return False, e.reason
    return True, None


_SPLITTABLE = {aten.sum.dim_IntList, aten.amax.default, aten.amin.default}


def _static_sizes(val: torch.Tensor) -> list[int] | None:
    sizes = list(val.shape)
    return sizes if all(isinstance(s, int) for s in sizes) else None


def _split_long_reductions(graph: fx.Graph) -> list[str]:
    """Reduce few long rows in two steps: chunks of each row first (many parallel blocks), then the chunks.

    `sum(x, dims)` over the adjacent dims a..b becomes `sum(sum(view(x, [.., S, R/S, ..]), a+1), a)`:
    the reduced extent R is cut into S chunks in place, so memory order is kept (a split row
    reduction stays one over adjacent elements, a split column reduction one across rows), and
    the first step (with x's producers fused in front) runs on S times as many blocks.
    Low-precision partial sums are kept in fp32. Static shapes only (S must divide R)."""
    split = []
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _SPLITTABLE or node.kwargs.get("dtype") is not None:
            continue
        source = node.args[0]
        val = source.meta.get("val") if isinstance(source, fx.Node) else None
        sizes = _static_sizes(val) if isinstance(val, torch.Tensor) else None
        if not sizes or not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        dims, keepdim = lowerings.reduction_dims(node.target, node.args, node.kwargs, len(sizes))
        if not dims or list(dims) != list(range(dims[0], dims[-1] + 1)):
            continue  # nothing reduced, or reduced dims not adjacent
        first, last = dims[0], dims[-1]
        rnumel = 1
        for d in dims:
            rnumel *= sizes[d]
        inner = last == len(sizes) - 1
        factor = heuristics.split_reduction_factor(val.numel() // max(rnumel, 1), rnumel, inner)
        if factor == 1:
            continue
        low = node.target == aten.sum.dim_IntList and val.dtype in (torch.float16, torch.bfloat16)
        with graph.inserting_before(node):
            shape = sizes[:first] + [factor, rnumel // factor] + sizes[last + 1 :]
            chunks = call_with_meta(graph, aten.reshape.default, source, shape)
            extra = {"dtype": torch.float32} if low else {}
            partial = call_with_meta(graph, node.target, chunks, [first + 1], False, **extra)
            total = call_with_meta(graph, node.target, partial, [first], False)
            if low:
                total = call_with_meta(graph, torch.ops.prims.convert_element_type.default, total, val.dtype)
            if keepdim:
                total = call_with_meta(graph, aten.reshape.default, total, list(node.meta["val"].shape))
        node.replace_all_uses_with(total)
        graph.erase_node(node)
        split.append(f"{node.name}: {val.numel() // rnumel} rows of {rnumel} -> {factor} chunks each")
    return split


def _is_free(node: fx.Node) -> bool:
    """Views (index math) and fills (constants): free to duplicate into every kernel that reads them."""
    return node_kind(node) in ("view", "constant")


def _private_free_chains(graph: fx.Graph, fusable: set[fx.Node]) -> None:
    """Give every fusable consumer its own copy of each view chain and fill it reads."""

    def privatize(user: fx.Node, node: fx.Node) -> None:
        if len(node.users) > 1:
            with graph.inserting_before(user):
                clone = graph.node_copy(node)
            user.replace_input_with(node, clone)
            fusable.add(clone)
            node = clone
        for arg in node.all_input_nodes:
            if arg in fusable and _is_free(arg):
                privatize(node, arg)

    for node in list(graph.nodes):
        if node in fusable and not _is_free(node):
            for arg in node.all_input_nodes:
                if arg in fusable and _is_free(arg):
                    privatize(node, arg)


class _Group:
    def __init__(self, members: list[fx.Node], bits: int):
        self.members = members
        self.bits = bits
        self.anc = 0  # bit set of every node this group depends on, through other groups too
        self.merges: list[str] = []


class _Grouping:
    """The current partition of the graph into groups, with contracted-graph ancestor sets."""

    def __init__(self, nodes: list[fx.Node]):
        self.pos = {n: i for i, n in enumerate(nodes)}
        self.group: dict[fx.Node, _Group] = {}
        self.mutations = [self.pos[n] for n in nodes if writes_in_place(n)]

    def unit(self, node: fx.Node) -> _Group:
        g = self.group.get(node)
        if g is None:
            g = self.group[node] = _Group([node], 1 << self.pos[node])
            g.anc = self._ancestors(g)
        return g

    def _ancestors(self, g: _Group) -> int:
        anc = 0
        for m in g.members:
            for arg in m.all_input_nodes:
                if arg not in g.members:
                    u = self.unit(arg)
                    anc |= u.anc | u.bits
        return anc & ~g.bits

    def input_units(self, g: _Group) -> list[_Group]:
        units = {}
        for m in g.members:
            for arg in m.all_input_nodes:
                u = self.unit(arg)
                if u is not g:
                    units[id(u)] = u
        return list(units.values())

    def would_cycle(self, a: _Group, b: _Group) -> bool:
        """A path a -> (other groups) -> b or b -> ... -> a: merging would make a cycle."""
        for x, y in ((a, b), (b, a)):
            for u in self.input_units(y):
                if u is not x and u.anc & x.bits:
                    return True
        return False

    def spans_mutation(self, members: Iterable[fx.Node]) -> bool:
        positions = [self.pos[m] for m in members]
        lo, hi = min(positions), max(positions)
        return any(lo < p < hi for p in self.mutations)

    def merge(self, a: _Group, b: _Group, why: str) -> _Group:
        members = sorted(a.members + b.members, key=self.pos.__getitem__)
        merged = _Group(members, a.bits | b.bits)
        merged.merges = a.merges + b.merges + [why]
        for m in members:
            self.group[m] = merged
        merged.anc = (a.anc | b.anc) & ~merged.bits
        # every group that depended on a or b now depends on all of the merged group's ancestors
        # (a group that already has them all passes nothing new on: ancestor sets are closed)
        gained = merged.anc | merged.bits
        seen: set[int] = {id(merged)}
        frontier = [u for m in members for u in m.users]
        while frontier:
            node = frontier.pop()
            g = self.group.get(node)
            if g is None or id(g) in seen:
                continue
            seen.add(id(g))
            if g.anc | gained == g.anc:
                continue
            g.anc |= gained
            frontier.extend(u for m in g.members for u in m.users)
        return merged


def _outputs(members: list[fx.Node]) -> list[fx.Node]:
    inside = set(members)
    return [m for m in members if any(u not in inside for u in m.users)]


def _has_compute(members: Iterable[fx.Node]) -> bool:
    return any(node_kind(m) in _COMPUTE_KINDS for m in members)


def _names(nodes: Iterable[fx.Node]) -> tuple[str, ...]:
    return tuple(n.name for n in nodes)


def _try_merge(
    grouping: _Grouping, plans: Plans, a: _Group, b: _Group, why: str, rejected: list[RejectedMerge]
) -> _Group | None:
    if a is b:
        return a
    reason = None
    members = sorted(a.members + b.members, key=grouping.pos.__getitem__)
    if grouping.would_cycle(a, b):
        reason = "would create a cycle between kernels"
    elif grouping.spans_mutation(members):
        reason = "would move a read across an in-place write"
    elif _has_compute(members):
        try:
            plans.plan("candidate", members, _outputs(members))
        except CannotGenerate as e:
            reason = e.reason
        except Exception as e:  # a codegen bug must cost a merge, never the graph
            reason = f"codegen raised {type(e).__name__}: {e}"[:300]
    if reason is not None:
        if _has_compute(a.members) and _has_compute(b.members):
            rejected.append(RejectedMerge(_names(a.members), _names(b.members), reason))
        return None
    return grouping.merge(a, b, why)


def _form_groups(
    nodes: list[fx.Node], fusable: set[fx.Node], plans: Plans, rejected: list[RejectedMerge], clusters: bool
) -> _Grouping:
    grouping = _Grouping(nodes)
    for node in nodes:
        grouping.unit(node)
    for node in nodes:
        if node not in fusable or _is_free(node):
            continue
        current = grouping.unit(node)
        # the private views and fills this node reads join its group first
        for free in _free_chain(node, fusable):
            current = grouping.merge(current, grouping.unit(free), f"{free.name} read by {node.name}")
        producers = sorted(
            {a for m in current.members for a in m.all_input_nodes if a in fusable and a not in current.members},
            key=grouping.pos.__getitem__,
            reverse=True,
        )
        for producer in producers:
            if producer in current.members:
                continue
            why = f"vertical: {producer.name} into {node.name}"
            merged = _try_merge(grouping, plans, grouping.unit(producer), current, why, rejected)
            current = merged or current
    _horizontal(nodes, fusable, grouping, plans, rejected, clusters)
    return grouping


def _free_chain(node: fx.Node, fusable: set[fx.Node]) -> list[fx.Node]:
    chain, stack = [], [a for a in node.all_input_nodes if a in fusable and _is_free(a)]
    while stack:
        free = stack.pop()
        chain.append(free)
        stack.extend(a for a in free.all_input_nodes if a in fusable and _is_free(a))
    return chain


def _horizontal(
    nodes: list[fx.Node],
    fusable: set[fx.Node],
    grouping: _Grouping,
    plans: Plans,
    rejected: list[RejectedMerge],
    clusters: bool,
) -> None:
    """Merge groups that read the same tensor, so it is read once. Each reader merges into the first
    reader; with `clusters`, a reader that cannot (another iteration space) tries the other readers
    that could not either (a layer norm's weight and bias gradients, beside its input gradient), and
    then groups that read outputs of the same kernel merge too (the two gradients' second steps,
    each reading its own partial sums of one kernel): one launch instead of several."""
    for node in nodes:
        if isinstance(node.meta.get("val"), torch.Tensor):
            readers = _reader_groups(grouping, fusable, [node])
            _merge_readers(grouping, plans, readers, f"horizontal: both read {node.name}", rejected, clusters)
    if not clusters:
        return
    done: set[int] = set()
    for node in nodes:
        producer = grouping.group.get(node)
        if node in fusable and _has_compute(producer.members) and id(producer) not in done:
            done.add(id(producer))
            readers = _reader_groups(grouping, fusable, producer.members)
            why = f"horizontal: both read outputs of the kernel of {producer.members[0].name}"
            _merge_readers(grouping, plans, readers, why, rejected, clusters)


def _reader_groups(grouping: _Grouping, fusable: set[fx.Node], sources: list[fx.Node]) -> list[_Group]:
    """The kernel groups that read one of `sources`, other than the sources' own, in graph order."""
    readers: list[_Group] = []
    for source in sources:
        for user in source.users:
            g = grouping.group.get(user)
            if g is not None and user in fusable and _has_compute(g.members) and not any(s in g.members for s in sources):
                if all(g is not r for r in readers):
                    readers.append(g)
    return readers


def _merge_readers(
    grouping: _Grouping, plans: Plans, readers: list[_Group], why: str, rejected: list[RejectedMerge], clusters: bool
) -> None:
    if len(readers) < 2:
        return
    merged_into = [readers[0]]
    for other in readers[1:]:
        for i, current in enumerate(merged_into if clusters else merged_into[:1]):
            merged = _try_merge(grouping, plans, current, other, why, rejected)
            if merged is not None:
                merged_into[i] = merged
                break
        else:
            merged_into.append(other)


def _subgraph(name: str, members: list[fx.Node], inputs: list[fx.Node], outputs: list[fx.Node]):
    """The group's original nodes as their own GraphModule (the eager fallback), and the node map.

    Lazy: its Python code is generated on its first call, which only a failing kernel makes
    (generating it for every group took a third of the pass on a warm compile of GPT-2)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for node in members:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[outputs[0]] if len(outputs) == 1 else tuple(env[o] for o in outputs))
    return _LazyGraphModule(torch.nn.Module(), graph, name), env


def _kernel_groups(grouping: _Grouping, fusable: set[fx.Node]) -> list[_Group]:
    """The groups that become kernels, in graph order."""
    groups = {
        id(g): g
        for g in grouping.group.values()
        if _has_compute(g.members) and all(m in fusable for m in g.members)
    }
    return sorted(groups.values(), key=lambda g: grouping.pos[g.members[0]])


def _replay(nodes: list[fx.Node], fusable: set[fx.Node], stored: list[fusion_cache.StoredGroup]) -> _Grouping:
    """The grouping a cached decision describes, merged again under the checks that formed it;
    ValueError where one fails (the entry does not fit this graph).

    Members merge in graph order, so a group that formed without a cycle replays without one."""
    grouping = _Grouping(nodes)
    for node in nodes:
        grouping.unit(node)
    for group in stored:
        members = sorted(group.members, key=grouping.pos.__getitem__)
        if not all(m in fusable for m in members) or not _has_compute(members):
            raise ValueError(f"group of {members[0].name} holds nodes that do not fuse")
        # reads move only with their kernel's computation, so that is where a write must not lie
        if grouping.spans_mutation([m for m in members if not _is_free(m)]):
            raise ValueError(f"group of {members[0].name} spans an in-place write")
        current = grouping.unit(members[0])
        for member in members[1:]:
            other = grouping.unit(member)
            if grouping.would_cycle(current, other):
                raise ValueError(f"group of {members[0].name} makes a cycle between kernels")
            current = grouping.merge(current, other, "")
        current.merges = list(group.merges)
    grouped = {m for group in stored for m in group.members}
    left = [n for n in nodes if n in fusable and _has_compute([n]) and n not in grouped]
    if left:
        raise ValueError(f"{left[0].name} is in no group")
    return grouping


@dataclasses.dataclass(frozen=True)
class _Planned:
    """A kernel group planned by codegen on a copy of its nodes, before the graph changes."""

    group: _Group
    name: str
    sub_gm: fx.GraphModule  # the group's original nodes: the eager fallback
    spec: codegen.KernelSpec | None  # None: codegen cannot write it, it stays ATen calls
    failure: str | None


def _plan_kernels(grouping: _Grouping, fusable: set[fx.Node], plans: Plans, ctx: PassContext) -> list[_Planned]:
    prefix = ctx.graph_name.split("_frame")[0]
    planned = []
    for index, g in enumerate(_kernel_groups(grouping, fusable)):
        name = f"fused_{prefix}_{ctx.kind}_{index}"
        outputs = _outputs(g.members)
        sub_gm, env = _subgraph(name, g.members, external_inputs(g.members), outputs)
        try:
            spec = plans.plan(name, [env[m] for m in g.members], [env[o] for o in outputs])
        except Exception as e:  # e.g. a lone node codegen cannot write: it stays an ATen call
            reason = e.reason if isinstance(e, CannotGenerate) else f"codegen raised {type(e).__name__}: {e}"[:300]
            planned.append(_Planned(g, name, sub_gm, None, reason))
            continue
        planned.append(_Planned(g, name, sub_gm, spec, None))
    return planned


def _decide(
    nodes: list[fx.Node], fusable: set[fx.Node], ctx: PassContext, key: str | None, plans: Plans
) -> tuple[_Grouping, list[RejectedMerge], list[_Planned]]:
    """The groups, the rejected merges and the planned kernels: from the tuning cache's entry for
    this graph if codegen plans its groups as it did when they were stored, else formed here and stored."""
    cache = ctx.cache
    if cache is not None:

        def decode(value: Any) -> tuple[_Grouping, list[RejectedMerge], list[_Planned]]:
            stored = fusion_cache.parse(value, nodes)
            grouping = _replay(nodes, fusable, stored.groups)
            planned = _plan_kernels(grouping, fusable, plans, ctx)
            if [p.spec is not None for p in planned] != [g.kernel for g in stored.groups]:
                raise ValueError("codegen plans its groups differently now")
            return grouping, [RejectedMerge(*r) for r in stored.rejected], planned

        hit = cache.get(fusion_cache.CACHE_NAMESPACE, key, decode)
        if hit is not None:
            return hit
    rejected: list[RejectedMerge] = []
    grouping = _form_groups(nodes, fusable, plans, rejected, clusters=ctx.options.recompute_prologues)
    planned = _plan_kernels(grouping, fusable, plans, ctx)
    if cache is not None:
        groups = [(p.group.members, p.group.merges, p.spec is not None) for p in planned]
        value = fusion_cache.encode(nodes, groups, [(r.first, r.second, r.reason) for r in rejected])
        cache.put(fusion_cache.CACHE_NAMESPACE, key, value)
    return grouping, rejected, planned


def _guarded_kernel(name: str, spec: codegen.KernelSpec, sub_gm: fx.GraphModule) -> GuardedCall:
    """A kernel node's target: the generated kernel, and its group's original subgraph if it fails."""
    return GuardedCall(name, codegen.FusedKernel(spec, None), sub_gm)


def kernel_call(name: str, sub_gm: fx.GraphModule, plans: Plans) -> GuardedCall:
    """A kernel node's target made again from its eager fallback subgraph alone (a compiled graph
    loaded from a cache keeps only that, graphopt/artifact.py): codegen plans the subgraph's own
    nodes, as `_plan_kernels` planned them when the group was fused; CannotGenerate if it cannot."""
    members = [n for n in sub_gm.graph.nodes if n.op == "call_function"]
    (output,) = sub_gm.graph.find_nodes(op="output")
    result = output.args[0]
    outputs = list(result) if isinstance(result, tuple) else [result]
    return _guarded_kernel(name, plans.plan(name, members, outputs), sub_gm)


def _rewrite(gm: fx.GraphModule, grouping: _Grouping, planned: list[_Planned], ctx: PassContext) -> list[FusedGroup]:
    graph = gm.graph
    order_key: dict[fx.Node, float] = {n: float(p) for n, p in grouping.pos.items()}
    fused: list[FusedGroup] = []
    spec_of_device = roofline.device_spec(ctx.device)
    for plan in planned:
        members, spec = plan.group.members, plan.spec
        if spec is None:
            warn_fallback(", ".join(sorted({node_op_name(m) for m in members})), plan.failure)
            continue
        outputs = _outputs(members)
        # earlier kernels replaced some inputs by their own outputs, one for one and in the same order
        inputs = external_inputs(members)
        assert len(spec.inputs) == len(inputs)
        target = _guarded_kernel(plan.name, spec, plan.sub_gm)
        kernel = target.primary
        # placed where its first computation was; the sort below moves it after its inputs
        first = next(m for m in members if node_kind(m) in _COMPUTE_KINDS)
        with graph.inserting_before(first):
            call = graph.call_function(target, tuple(inputs))
        order_key[call] = order_key[first]
        vals = [o.meta.get("val") for o in outputs]
        call.meta["val"] = vals[0] if len(outputs) == 1 else tuple(vals)
        fused_cost = roofline.node_cost(call, spec_of_device)
        unfused_seconds = sum(roofline.node_cost(m, spec_of_device).seconds for m in members)
        kernel.cost = codegen.KernelCost(int(fused_cost.bytes), fused_cost.seconds, unfused_seconds)
        replacements = [call]
        if len(outputs) > 1:
            replacements = []
            for i, out in enumerate(outputs):
                with graph.inserting_after(call):
                    item = graph.call_function(operator.getitem, (call, i))
                item.meta["val"] = out.meta.get("val")
                order_key[item] = order_key[first] + 0.5
                replacements.append(item)
        inside = set(members)
        for out, new in zip(outputs, replacements):
            out.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inside)
        for m in reversed(members):
            graph.erase_node(m)
        kind = "reduction" if spec.domain.is_reduction else "pointwise"
        fused.append(
            FusedGroup(
                plan.name,
                _names(members),
                kind,
                tuple(plan.group.merges),
                kernel.cost.bytes_moved,
                kernel.cost.seconds,
                unfused_seconds,
            )
        )
    _stable_topological_sort(graph, order_key)
    return fused


def _stable_topological_sort(graph: fx.Graph, order_key: dict[fx.Node, float]) -> None:
    """Reorder so every node follows its inputs, keeping the original order wherever it can.

    In-place writes keep their place relative to the reads of the tensor they write."""
    nodes = list(graph.nodes)
    key = {n: (order_key.get(n, float(i)), i) for i, n in enumerate(nodes)}
    deps: dict[fx.Node, set[fx.Node]] = {n: set(n.all_input_nodes) for n in nodes}
    for node in nodes:
        if writes_in_place(node) and node.args and isinstance(node.args[0], fx.Node):
            for reader in node.args[0].users:
                if reader is node:
                    continue
                if key[reader] < key[node]:
                    deps[node].add(reader)
                else:
                    deps[reader].add(node)
    users: dict[fx.Node, list[fx.Node]] = {n: [] for n in nodes}
    for node, ds in deps.items():
        for d in ds:
            users[d].append(node)
    waiting = {n: len(ds) for n, ds in deps.items()}
    ready = [(key[n], n.name, n) for n in nodes if waiting[n] == 0 and n.op != "output"]
    heapq.heapify(ready)
    order = []
    while ready:
        _, _, node = heapq.heappop(ready)
        order.append(node)
        for user in users[node]:
            waiting[user] -= 1
            if waiting[user] == 0 and user.op != "output":
                heapq.heappush(ready, (key[user], user.name, user))
    if len(order) != len(nodes) - 1:
        raise RuntimeError("fusion produced a cyclic graph")
    previous = None
    for node in order:
        if previous is not None:
            previous.append(node)
        previous = node


def run(gm: fx.GraphModule, ctx: PassContext) -> tuple[fx.GraphModule, FusionReport]:
    if not ctx.options.fusion:
        return gm, FusionReport([], [], {}, skipped="the fusion option is off")
    if not compiler.can_run_on(ctx.device):
        reason = f"Triton cannot run on {ctx.device} here (on CPU set TRITON_INTERPRET=1)"
        warn_fallback("fusion", reason)
        return gm, FusionReport([], [], {}, skipped=reason)
    key = fusion_cache.key(gm, ctx) if ctx.cache is not None else None  # of the graph as it came in
    split = _split_long_reductions(gm.graph)
    fusable: set[fx.Node] = set()
    not_fused: dict[str, str] = {}
    for node in gm.graph.nodes:
        ok, why = _fusable(node, ctx.device)
        if ok:
            fusable.add(node)
        elif why is not None:
            not_fused[node.name] = why
            warn_fallback(str(node.target), why)
    plans = Plans()
    recomputed = []
    if ctx.options.recompute_prologues:
        recomputed = reduction_prologues.privatize(gm.graph, fusable, plans)
        gm.graph.eliminate_dead_code()  # chain nodes only the reductions read are now read by no one
        fusable &= set(gm.graph.nodes)
    _private_free_chains(gm.graph, fusable)
    nodes = list(gm.graph.nodes)
    grouping, rejected, planned = _decide(nodes, fusable, ctx, key, plans)
    groups = _rewrite(gm, grouping, planned, ctx)
    gm.graph.eliminate_dead_code()
    return gm, FusionReport(groups, rejected, not_fused, split, recomputed)
