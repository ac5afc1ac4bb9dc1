"""What the rematerialization solver decides about: the joint graph seen as candidates.

AOTAutograd's joint graph holds the forward and the backward in one graph. Every
node that does not depend on a tangent can run in the forward (and be saved for
the backward) or in the backward (recomputed there); those feeding the backward
are the candidates. For each one this module records what the solver weighs:
its size, what recomputing it costs (roofline seconds; zero for a node the
forward never needs, since it runs exactly once either way), whether it may be
recomputed or compressed at all, and where in the backward it is used. The
backward's order is the joint graph's order of the tangent-dependent nodes,
which is the order autograd runs them in.

`activation_peak` replays a plan over that order: the memory the plan's forward
values take during the backward, which is what a memory budget bounds.
"""

from __future__ import annotations

import bisect
import dataclasses
import operator
from collections.abc import Callable, Collection

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import py_sym_types

from graphopt.cost_model.roofline import DeviceSpec, nbytes_hint, node_cost

# dtypes a saved activation may be compressed to, by its own dtype (fp8 carries a scale).
COMPRESSED_DTYPE: dict[torch.dtype, torch.dtype] = {
    torch.float32: torch.bfloat16,
    torch.bfloat16: torch.float8_e4m3fn,
    torch.float16: torch.float8_e4m3fn,
}


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A forward value the backward may need, and what keeping it costs."""

    node: fx.Node
    bytes: int  # memory while it is held; 0 for parameters and symbolic sizes
    in_forward: bool  # the forward's outputs need it (else it runs only for the backward)
    recompute_s: float  # extra time if it is recomputed in the backward
    may_recompute: bool
    may_save: bool  # False for tuple-valued nodes (their getitems are saved) and views (recomputed free)
    compress_to: torch.dtype | None  # None: cannot be stored compressed
    compress_s: float  # compress in the forward + decompress in the backward
    direct_uses: tuple[int, ...]  # backward positions of the backward nodes that read it
    inputs: tuple[fx.Node, ...]  # candidate inputs a recomputation needs

    @property
    def compressed_bytes(self) -> int:
        if self.compress_to is None:
            return self.bytes
        return self.bytes * self.compress_to.itemsize // self.node.meta["val"].dtype.itemsize


@dataclasses.dataclass(frozen=True)
class JointAnalysis:
    """The candidates of one joint graph, in graph (topological) order, and the backward length."""

    candidates: dict[fx.Node, Candidate]
    users: dict[fx.Node, tuple[fx.Node, ...]]  # candidate users of each candidate
    backward: frozenset[fx.Node]  # nodes that depend on a tangent (and the output)
    backward_length: int  # positions 0 .. backward_length - 1: the backward nodes that read candidates


def is_backward_input(node: fx.Node) -> bool:
    """Placeholders only the backward receives: tangents and the backward's RNG seed/offset."""
    name = str(node.target)
    return node.op == "placeholder" and ("tangents" in name or "bwd_seed" in name or "bwd_base_offset" in name)


def _is_sym(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), py_sym_types)


def _dropout_free(node: fx.Node) -> bool:
    """Attention kernels are tagged random for their dropout; with dropout_p == 0 they are
    deterministic, so recomputing them replays exactly."""
    schema = node.target._schema
    for i, arg in enumerate(schema.arguments):
        if arg.name == "dropout_p":
            value = node.kwargs.get("dropout_p", node.args[i] if i < len(node.args) else arg.default_value)
            return isinstance(value, (int, float)) and value == 0
    return False


def _recompute_ban(node: fx.Node) -> str | None:
    """Why `node` must not run twice, or None. Random ops would draw new numbers; ops
    with effects (mutation, collectives, opaque calls) must happen exactly once."""
    if node.op == "placeholder":
        return "input"
    if node.op != "call_function":
        return node.op
    target = node.target
    if target is operator.getitem or _is_sym(node):
        return None
    if not isinstance(target, torch._ops.OpOverload):
        return "not an ATen op"
    if torch.Tag.nondeterministic_seeded in target.tags and not _dropout_free(node):
        return "random"
    if target._schema.is_mutable:
        return "mutates"
    if target.namespace in ("_c10d_functional", "c10d_functional", "_dtensor"):
        return "collective"
    policy = node.meta.get("recompute")
    if policy is not None and "MUST_SAVE" in str(policy):
        return "checkpoint policy MUST_SAVE"
    return None


def _is_view(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and node.target.is_view


def _aliases_static_input(node: fx.Node, static_inputs: Collection[fx.Node]) -> bool:
    """A parameter, or a view of one: holding it costs no memory the model does not hold anyway."""
    while _is_view(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node in static_inputs


def _held_bytes(node: fx.Node, static_inputs: Collection[fx.Node]) -> int:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor) or _is_view(node) or _aliases_static_input(node, static_inputs):
        return 0
    return nbytes_hint(value)


def _may_save(node: fx.Node) -> bool:
    """Tuple-valued nodes are saved as their getitems. Views are never saved: recomputing
    one is free and its base's memory is then counted once, where the base is held."""
    if node.op == "placeholder":
        return True
    return isinstance(node.meta.get("val"), (torch.Tensor, *py_sym_types)) and not _is_view(node)


def _compress_target(node: fx.Node) -> torch.dtype | None:
    value = node.meta.get("val")
    if node.op != "call_function" or not isinstance(value, torch.Tensor) or _is_sym(node):
        return None
    return COMPRESSED_DTYPE.get(value.dtype)


def _compress_seconds(node: fx.Node, spec: DeviceSpec) -> float:
    """Two elementwise passes (compress in the forward, decompress in the backward),
    each reading and writing the tensor: a roofline estimate of the pair."""
    value = node.meta["val"]
    target = COMPRESSED_DTYPE[value.dtype]
    full, small = nbytes_hint(value), nbytes_hint(value) * target.itemsize // value.dtype.itemsize
    return 2 * ((full + small) / spec.bytes_per_s + spec.launch_overhead_s)


def _recompute_seconds(node: fx.Node, spec: DeviceSpec, fused: bool) -> float:
    """Roofline time of running `node` again in the backward.

    With fusion on, a recomputed pointwise op joins the kernel of its backward reader:
    no launch of its own, and its traffic is the inputs read instead of the output;
    it costs its arithmetic or that extra traffic, whichever bounds. Anything else
    (matmuls, reductions, ...) is its own kernel at its full roofline time."""
    cost = node_cost(node, spec)
    target = node.target
    if not (fused and isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags):
        return cost.seconds
    written = sum(nbytes_hint(t) for t in _tensor_values(node))
    extra_read = max(0.0, cost.bytes - 2 * written)  # inputs beyond one output-sized read
    return max(cost.flops / spec.vector_flops_per_s, extra_read / spec.bytes_per_s)


def _tensor_values(node: fx.Node) -> list[torch.Tensor]:
    value = node.meta.get("val")
    return [value] if isinstance(value, torch.Tensor) else []


def analyze_joint(
    joint: fx.GraphModule,
    spec: DeviceSpec,
    static_inputs: Collection[fx.Node],
    num_fwd_outputs: int,
    *,
    fused: bool,
) -> JointAnalysis:
    """Classify the joint graph's nodes into backward nodes and candidates (see module doc).

    `fused`: the fusion pass will run, so recomputed pointwise ops are priced fused."""
    nodes = list(joint.graph.nodes)
    backward: set[fx.Node] = set()
    for node in nodes:
        if is_backward_input(node) or any(a in backward for a in node.all_input_nodes):
            backward.add(node)
    output = nodes[-1]
    backward.add(output)
    backward_order = [n for n in nodes if n in backward and not is_backward_input(n)]
    position = {n: i for i, n in enumerate(backward_order)}

    fwd_outputs = [a for a in _output_args(output)[:num_fwd_outputs] if isinstance(a, fx.Node)]
    forward_needed: set[fx.Node] = set()
    stack = list(fwd_outputs)
    while stack:
        n = stack.pop()
        if n not in forward_needed:
            forward_needed.add(n)
            stack.extend(n.all_input_nodes)

    # Candidates: non-backward values the backward reads, closed over their inputs.
    uses: dict[fx.Node, list[int]] = {}
    for b in backward_order[:-1]:
        for a in b.all_input_nodes:
            if a not in backward:
                uses.setdefault(a, []).append(position[b])
    for a in _output_args(output)[num_fwd_outputs:]:  # gradients that need no tangent
        if isinstance(a, fx.Node) and a not in backward:
            uses.setdefault(a, []).append(position[output])
    # Only positions where a candidate is read matter to memory: renumber those 0..k-1.
    steps = {p: i for i, p in enumerate(sorted({p for ps in uses.values() for p in ps}))}
    uses = {n: [steps[p] for p in ps] for n, ps in uses.items()}
    needed: set[fx.Node] = set()
    stack = list(uses)
    while stack:
        n = stack.pop()
        if n not in needed and n.op not in ("get_attr",):
            needed.add(n)
            stack.extend(a for a in n.all_input_nodes if a not in backward)

    candidates: dict[fx.Node, Candidate] = {}
    users: dict[fx.Node, list[fx.Node]] = {}
    for node in nodes:
        if node not in needed:
            continue
        ban = _recompute_ban(node)
        compress_to = _compress_target(node)
        inputs = tuple(a for a in node.all_input_nodes if a in needed)
        for a in inputs:
            users.setdefault(a, []).append(node)
        candidates[node] = Candidate(
            node=node,
            bytes=_held_bytes(node, static_inputs),
            in_forward=node in forward_needed,
            recompute_s=_recompute_seconds(node, spec, fused) if node in forward_needed else 0.0,
            may_recompute=ban is None,
            may_save=_may_save(node),
            compress_to=compress_to,
            compress_s=_compress_seconds(node, spec) if compress_to is not None else 0.0,
            direct_uses=tuple(sorted(uses.get(node, ()))),
            inputs=inputs,
        )
    return JointAnalysis(
        candidates=candidates,
        users={n: tuple(users.get(n, ())) for n in candidates},
        backward=frozenset(backward),
        backward_length=max(len(steps), 1),
    )


def _output_args(output: fx.Node) -> list:
    from torch.utils._pytree import tree_leaves

    return tree_leaves(output.args)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which candidates the backward recomputes and which are stored compressed;
    every other needed candidate is saved as is."""

    recomputed: frozenset[fx.Node]
    compressed: frozenset[fx.Node] = frozenset()


def valid_plan(analysis: JointAnalysis, recompute: Collection[fx.Node]) -> Plan:
    """The plan recomputing `recompute` (plus what cannot be saved) where the closure allows:
    a node is recomputed only if each of its inputs can be saved or is recomputed too."""
    recompute = set(recompute)
    recomputed: set[fx.Node] = set()
    for node, cand in analysis.candidates.items():
        wanted = node in recompute or not cand.may_save
        if wanted and cand.may_recompute and all(analysis.candidates[a].may_save or a in recomputed for a in cand.inputs):
            recomputed.add(node)
    return Plan(recomputed=frozenset(recomputed))


def plan_saving(analysis: JointAnalysis, saved: Collection[str]) -> Plan:
    """The plan of a partition that saves the nodes named `saved` (min-cut's choice):
    the backward recomputes every other candidate it needs. A saved view keeps its
    base's storage, so it counts as saving the base (views themselves are recomputed)."""
    saved = set(saved)
    kept: set[fx.Node] = set()
    for node in analysis.candidates:
        if node.name in saved:
            kept.add(node)
            while _is_view(node) and node.args and isinstance(node.args[0], fx.Node):
                node = node.args[0]
                kept.add(node)
    return valid_plan(analysis, [n for n in analysis.candidates if n not in kept])


def save_everything_plan(analysis: JointAnalysis) -> Plan:
    """Save every value the backward reads (recomputing only what cannot be saved: views, tuples)."""
    return valid_plan(analysis, ())


def needed_nodes(analysis: JointAnalysis, plan: Plan) -> list[fx.Node]:
    """Candidates the backward needs under `plan`: read directly, or by a recomputation."""
    needed: set[fx.Node] = set()
    for node in reversed(list(analysis.candidates)):
        cand = analysis.candidates[node]
        if cand.direct_uses or any(u in plan.recomputed and u in needed for u in analysis.users[node]):
            needed.add(node)
    return [n for n in analysis.candidates if n in needed]


def saved_nodes(analysis: JointAnalysis, plan: Plan) -> list[fx.Node]:
    """What the forward hands to the backward under `plan` (compressed ones as their originals)."""
    return [n for n in needed_nodes(analysis, plan) if n not in plan.recomputed]


def lifetimes(analysis: JointAnalysis, plan: Plan) -> dict[fx.Node, tuple[int, int]]:
    """(first, last) backward position at which each needed candidate must exist.

    A recomputed value is made just before its first reader (AOTAutograd reorders
    the backward that way) and a value is freed after its last reader; a recomputed
    user reads its inputs once, at its own first position."""
    needed = set(needed_nodes(analysis, plan))
    span: dict[fx.Node, tuple[int, int]] = {}
    for node in reversed(list(analysis.candidates)):
        if node not in needed:
            continue
        points = list(analysis.candidates[node].direct_uses)
        for u in analysis.users[node]:
            if u in plan.recomputed and u in span:
                points.append(span[u][0])  # read once, when u is recomputed
        span[node] = (min(points), max(points))
    return span


def activation_peak(analysis: JointAnalysis, plan: Plan, size: Callable[[int], int] = int) -> int:
    """Peak bytes of forward values held during the backward under `plan`.

    Saved values are held from the start of the backward to their last reader;
    recomputed ones from their first reader to their last; a compressed one is
    held small until it is decompressed at its first reader, then full size. `size`
    maps byte counts to the unit they are summed in (the solver's rounding)."""
    delta = [0] * (analysis.backward_length + 2)
    for node, (first, last) in lifetimes(analysis, plan).items():
        cand = analysis.candidates[node]
        full = size(cand.bytes)
        if node in plan.recomputed:
            delta[first] += full
        elif node in plan.compressed:
            small = size(cand.compressed_bytes)
            delta[0] += small
            delta[first + 1] -= small
            delta[first] += full
        else:
            delta[0] += full
        delta[last + 1] -= full
    peak = running = 0
    for d in delta:
        running += d
        peak = max(peak, running)
    return peak


def recompute_seconds(analysis: JointAnalysis, plan: Plan) -> float:
    """The plan's predicted extra time: recomputations plus compress/decompress pairs."""
    needed = set(needed_nodes(analysis, plan))
    return sum(analysis.candidates[n].recompute_s for n in plan.recomputed if n in needed) + sum(
        analysis.candidates[n].compress_s for n in plan.compressed
    )


def greedy_plans(analysis: JointAnalysis, steps: int) -> list[Plan]:
    """Plans along a cheap frontier: recompute the values that free the most bytes per
    second of recomputation first, in `steps` growing prefixes. Seeds for the solver,
    so it starts near a good plan at any budget."""
    order = sorted(
        (n for n, c in analysis.candidates.items() if c.may_recompute and c.bytes > 0),
        key=lambda n: analysis.candidates[n].recompute_s / analysis.candidates[n].bytes,
    )
    free = [n for n, c in analysis.candidates.items() if c.may_recompute and c.recompute_s == 0]
    sizes = sorted({round(len(order) * i / steps) for i in range(steps + 1)})
    return [valid_plan(analysis, [*free, *order[:k]]) for k in sizes]


def checkpoint_plans(analysis: JointAnalysis, segment_counts: Collection[int]) -> list[Plan]:
    """Segment checkpointing (Chen et al.) as seeds for small budgets, on any DAG.

    The forward (candidates in graph order) is cut into `k` segments of equal bytes;
    each cut sits where the values crossing it (defined before, read after) weigh
    least: a transformer's residual stream, a CNN's block output. Those crossing
    values are saved, everything else the backward needs is recomputed."""
    order = [n for n, c in analysis.candidates.items() if c.in_forward]
    position = {n: i for i, n in enumerate(order)}
    crossing = [0] * (len(order) + 1)  # bytes of values live across the gap after position i
    last_read = {n: max((position[u] for u in analysis.users[n] if u in position), default=position[n]) for n in order}
    for n in order:
        crossing[position[n]] += analysis.candidates[n].bytes
        crossing[last_read[n]] -= analysis.candidates[n].bytes
    for i in range(1, len(crossing)):
        crossing[i] += crossing[i - 1]
    cumulative, total = [], 0
    for n in order:
        total += analysis.candidates[n].bytes
        cumulative.append(total)
    plans = []
    for k in segment_counts:
        cuts = []
        for segment in range(1, k):
            lo, hi = (bisect.bisect_left(cumulative, total * (segment + f) / k) for f in (-0.5, 0.5))
            if lo < hi:
                cuts.append(min(range(lo, hi), key=crossing.__getitem__))
        kept = {n for n in order if any(position[n] <= cut < last_read[n] for cut in cuts)}
        plans.append(valid_plan(analysis, [n for n in analysis.candidates if n not in kept]))
    return plans
