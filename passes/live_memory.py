"""Which storages a graph's values live in, and the bytes alive while each node runs.

Passes that change when memory is allocated or freed (buffer_reuse writes kernel outputs into
dead buffers, batch_casts moves casts) must not raise the graph's peak. They estimate it the
same way: values are followed to storages through what the nodes do (views, in-place ops,
kernels' eager subgraphs), a storage lives from the node that makes it to its last reader, or
to the end when the graph returns it or its owner holds it, and its bytes are its size at the
sizes seen when compiling.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx

from graphopt.cost_model.roofline import nbytes_hint
from graphopt.passes.planned_views import PlannedView, alias
from graphopt.pipeline import GraphKind
from graphopt.runtime import GuardedCall

aten = torch.ops.aten

# ATen ops whose result is always a new dense tensor of the layout their meta function gives,
# on every device: their buffers may be donors too (GPT-2's dead buffers are mostly these)
FRESH_PRODUCTS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


Ids = tuple[int, ...]  # the storages a value may live in


def _returns_alias(op: torch._ops.OpOverload) -> bool:
    """Whether an op's result may live in its inputs' storage (a view, an in-place or out= op).
    _unsafe_view's schema says it makes a new tensor, but it is a view of its input."""
    schema = op._schema
    return op is aten._unsafe_view.default or schema.is_mutable or any(r.alias_info is not None for r in schema.returns)


class Storages:
    """Which storages each value of a graph may live in, from what its nodes do (op schemas,
    graphopt's own targets), not from meta['val']: a pass that replaces a node leaves its users'
    fake tensors on the replaced node's storage, so their aliasing no longer says what runs.

    A result that is not a view makes a new storage; a view or an in-place result lives in its
    inputs'; a kernel's output where its eager subgraph's output lives (whichever ran); a node
    graphopt cannot read is taken to put its result in every input's storage, and those
    storages are `unknown`. `owned`: the storages one value fills alone, a kernel output made
    by its subgraph's own computation or a matrix product, whatever ran."""

    def __init__(self, inputs: list[Ids] | None = None, count: int = 0):
        self.inputs = list(inputs) if inputs is not None else None  # a subgraph's, in order
        self.count = count  # storages made here are numbered after it
        self.of: dict[fx.Node, Ids] = {}
        self.elements: dict[fx.Node, list[Ids]] = {}  # per element of a tuple value
        self.made_at: dict[int, fx.Node] = {}
        self.owned: set[int] = set()
        self.unknown: set[int] = set()

    def new(self, node: fx.Node) -> Ids:
        self.count += 1
        self.made_at[self.count] = node
        return (self.count,)

    def read(self, node: fx.Node) -> Ids:
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
                if target in FRESH_PRODUCTS:
                    self.owned.update(self.of[node])
        elif isinstance(target, torch._ops.OpOverload):
            self.of[node] = self.read(node)
        elif isinstance(target, PlannedView) or target is alias:
            self.of[node] = self.of.get(node.args[0], ())
        elif isinstance(target, GuardedCall):
            self._kernel(node, target.fallback)
        elif getattr(target, "makes_new_storages", False):  # graphopt's own targets that allocate each result
            self.elements[node] = [self.new(node) for _ in node.meta.get("val", ())]
            self.of[node] = tuple(i for ids in self.elements[node] for i in ids)
        else:
            self.of[node] = self.read(node)
            self.unknown.update(self.of[node])

    def _kernel(self, node: fx.Node, sub_gm: fx.GraphModule) -> None:
        """Outputs live where the eager subgraph's do: in the node's inputs' storages, or in ones
        made inside it, which become new storages of this node (one per storage inside)."""
        args = [self.of.get(a, ()) if isinstance(a, fx.Node) else () for a in node.args]
        inner = Storages(args, self.count)  # numbered apart: one made inside is never taken for an input's
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
class Lifetimes:
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


def lifetimes(nodes: list[fx.Node], storages: Storages, kind: GraphKind) -> Lifetimes:
    pos_of = {node: pos for pos, node in enumerate(nodes)}
    life = Lifetimes({}, {}, {}, set(), set(storages.unknown))
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


def live_profile(count: int, life: Lifetimes) -> list[int]:
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


def storages_of(nodes: list[fx.Node]) -> Storages:
    """The storages each of a graph's `nodes` (all of them, in order) may live in."""
    storages = Storages()
    for node in nodes:
        storages.add(node)
    return storages


def estimate(nodes: list[fx.Node], kind: GraphKind) -> tuple[Storages, Lifetimes, list[int]]:
    """The graph's storages, their lifetimes, and the bytes alive while each of `nodes` runs."""
    storages = storages_of(nodes)
    life = lifetimes(nodes, storages, kind)
    return storages, life, live_profile(len(nodes), life)


def writes_in_place(node: fx.Node) -> bool:
    """Whether a node may write to an input (an in-place or out= op): values read across it may change."""
    return isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable
