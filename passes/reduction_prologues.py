"""Reductions across rows get their own copy of the pointwise work they read.

A reduction across rows (a bias or layer-norm weight gradient: a column sum, or the
first step of a split one) cannot share a kernel with a reduction along rows: their
iteration spaces differ. When both read the same pointwise values (a layer norm's
backward: the cast output gradient and its product with the normalized input feed
the row sums of the input gradient and the column sums of the weight and bias
gradients), greedy vertical fusion puts those values in the row kernel, which then
writes them to memory for the column kernels to read back: per GPT-2 layer norm, two
fp32 tensors of the activation's size written and read.

Here each such reduction gets a private copy of the pointwise chain it reads, back
to values that come from memory anyway (graph inputs, extern ops' results), when
reading those costs fewer bytes than writing and reading the chain's result, and
codegen can write the chain and the reduction as one kernel. Fusion's horizontal
step then merges the reductions that read the same inputs (the weight and the bias
gradient of one layer norm) into one kernel, and the second steps of split ones,
which read outputs of that kernel, into another. Recomputing is inductor's behaviour
(it inlines pointwise producers into every consumer unless they are costly).
"""

from __future__ import annotations

import torch
from torch import fx

from graphopt.codegen import lowerings
from graphopt.codegen.kernel import memory_order, node_kind
from graphopt.cost_model.roofline import nbytes_hint
from graphopt.passes.fusion_plans import Plans

_CHAIN_KINDS = ("pointwise", "cast", "view", "constant")
# longer chains are left alone: recomputing them would cost more than it saves
MAX_CHAIN_NODES = 16


def privatize(graph: fx.Graph, fusable: set[fx.Node], plans: Plans) -> list[str]:
    """Copy the shared pointwise chains that reductions across rows read (see the module doc);
    the copies join `fusable`. Returns one line per reduction that got its own chain."""
    done = []
    for node in list(graph.nodes):
        if node in fusable and _across_rows(node):
            chain = _chain(node, fusable)
            if chain is not None and _pays(node, chain) and _plannable(node, chain, plans):
                shared = _copy_shared(graph, node, chain, fusable)
                if shared:
                    done.append(f"{node.name}: recomputes {', '.join(n.name for n in shared)}")
    return done


def _across_rows(node: fx.Node) -> bool:
    """A reduction whose reduced dims leave out its input's innermost dim in memory (the last,
    or the channels of a channels-last activation: batch norm's per-channel sums)."""
    if node_kind(node) != "reduction" or not isinstance(node.args[0], fx.Node):
        return False
    val = node.args[0].meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return False
    dims, _ = lowerings.reduction_dims(node.target, node.args, node.kwargs, val.dim())
    order = memory_order(node.args[0])
    return bool(dims) and (val.dim() - 1 if order is None else order[-1]) not in dims


def _sibling_statistic(node: fx.Node, reduction: fx.Node) -> bool:
    """A reduction across rows over an input of the same shape as `reduction`'s (a mean that the
    variance's sum reads): both become one kernel, so it bounds the chain instead of ending it."""
    if not _across_rows(node):
        return False
    return tuple(node.args[0].meta["val"].shape) == tuple(reduction.args[0].meta["val"].shape)


def _chain(reduction: fx.Node, fusable: set[fx.Node]) -> list[fx.Node] | None:
    """The pointwise, cast, view and constant nodes the reduction reads, back to nodes of other
    kinds, in graph order; None if it is too long or ends at a reduction that could be fused (its
    readers would then join that reduction's kernel)."""
    chain: set[fx.Node] = set()
    computing = 0
    stack = [a for a in reduction.all_input_nodes]
    while stack:
        node = stack.pop()
        if node in chain:
            continue
        if node not in fusable or node_kind(node) not in _CHAIN_KINDS or _seeded(node):
            if node in fusable and node_kind(node) == "reduction" and not _sibling_statistic(node, reduction):
                return None
            continue
        chain.add(node)
        computing += node_kind(node) in ("pointwise", "cast")
        if computing > MAX_CHAIN_NODES:
            return None
        stack.extend(node.all_input_nodes)
    order = {n: i for i, n in enumerate(reduction.graph.nodes)}
    return sorted(chain, key=order.__getitem__)


def _seeded(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in target.tags


def _bytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    return nbytes_hint(val) if isinstance(val, torch.Tensor) else 0


def _pays(reduction: fx.Node, chain: list[fx.Node]) -> bool:
    """Reading the chain's inputs costs no more bytes than writing its result and reading it back,
    and some of its work is shared (else it is the reduction's alone already)."""
    inside = set(chain)
    shared = any(any(u not in inside and u is not reduction for u in n.users) for n in chain)
    leaves = {a for n in chain for a in n.all_input_nodes if a not in inside}
    return shared and sum(_bytes(leaf) for leaf in leaves) <= 2 * _bytes(reduction.args[0])


def _plannable(reduction: fx.Node, chain: list[fx.Node], plans: Plans) -> bool:
    try:
        plans.plan("candidate", [*chain, reduction], [reduction])
    except Exception:  # CannotGenerate, or a codegen bug: either costs this copy, never the graph
        return False
    return True


def _copy_shared(graph: fx.Graph, reduction: fx.Node, chain: list[fx.Node], fusable: set[fx.Node]) -> list[fx.Node]:
    """Copy each chain node that is read outside the chain and the reduction, and the chain nodes
    it reads (the copies must not share them either), each right after its original (so graph
    order holds); point the rest of the chain and the reduction at the copies."""
    readers = set(chain) | {reduction}
    needed: set[fx.Node] = set()
    for node in reversed(chain):
        if any(u not in readers or u in needed for u in node.users):
            needed.add(node)
    copies: dict[fx.Node, fx.Node] = {}
    for node in chain:
        if node not in needed:
            continue
        with graph.inserting_after(node):
            copy = graph.node_copy(node, lambda arg: copies.get(arg, arg))
        copies[node] = copy
        fusable.add(copy)
    for node in [*chain, reduction]:
        if node in copies:
            continue
        for original, copy in copies.items():
            if original in node.all_input_nodes:
                node.replace_input_with(original, copy)
    return list(copies)
