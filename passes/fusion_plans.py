"""codegen's plans of one graph's kernel groups, each structure planned once.

`plan_kernel` is a function of a group's structure: the ops of its nodes and their
other arguments, how nodes and inputs connect, and the dtype, device, shape and
strides of every value. A transformer repeats its groups once per layer, so
`Plans` plans a structure the first time it meets it and hands each later group of
that structure the same plan with the group's own nodes in it (GPT-2 small,
training: 2141 plans asked for while forming groups, 350 made; 480 kernels of a
warm compile, 48 made). Only plans that succeed are shared (a CannotGenerate
reason names the node it failed on), and only plans that name nodes nowhere but
in their nodes, inputs and outputs. A group with an argument of a type not
described exactly here is planned on its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from graphopt import codegen
from graphopt.codegen.kernel import external_inputs

_NODE_FIELDS = ("nodes", "inputs", "outputs")
_OPAQUE = (torch.dtype, torch.device, torch.layout, torch.memory_format)


class Plans:
    """`codegen.plan_kernel`, shared by the groups of one structure (see module doc)."""

    def __init__(self) -> None:
        self._plans: dict[tuple[Any, ...], tuple[codegen.KernelSpec, dict[fx.Node, int]]] = {}

    def plan(self, name: str, members: Sequence[fx.Node], outputs: Sequence[fx.Node]) -> codegen.KernelSpec:
        """`codegen.plan_kernel(name, members, outputs)`, or the same plan made for a group built alike."""
        inputs = external_inputs(members)
        order = [*inputs, *members]
        key = structure(inputs, members, outputs)
        shared = self._plans.get(key) if key is not None else None
        if shared is not None:
            spec, position = shared

            def own(nodes: tuple[fx.Node, ...]) -> tuple[fx.Node, ...]:
                return tuple(order[position[n]] for n in nodes)

            return dataclasses.replace(
                spec, name=name, nodes=own(spec.nodes), inputs=own(spec.inputs), outputs=own(spec.outputs)
            )
        spec = codegen.plan_kernel(name, members, outputs)
        if key is not None and not any(
            _holds_node(getattr(spec, f.name)) for f in dataclasses.fields(spec) if f.name not in _NODE_FIELDS
        ):
            self._plans[key] = (spec, {n: i for i, n in enumerate(order)})
        return spec


def structure(
    inputs: Sequence[fx.Node], members: Sequence[fx.Node], outputs: Sequence[fx.Node]
) -> tuple[Any, ...] | None:
    """What planning reads of a group, with nodes as positions among its inputs and members:
    equal for groups built alike, None if an argument cannot be described exactly."""
    position = {n: i for i, n in enumerate([*inputs, *members])}
    try:
        return (
            tuple(_exact(n.meta.get("val"), position) for n in inputs),
            tuple(
                (n.target, _exact(n.args, position), _exact(n.kwargs, position), _exact(n.meta.get("val"), position))
                for n in members
            ),
            tuple(position[o] for o in outputs),
        )
    except _Inexact:
        return None


class _Inexact(Exception):
    pass


def _exact(value: Any, position: dict[fx.Node, int]) -> Any:
    """`value` as a hashable description that is equal only for values planning treats alike
    (tagged by type, so that 1, 1.0 and True, or 0.0 and -0.0, stay apart)."""
    if isinstance(value, fx.Node):
        if value not in position:
            raise _Inexact(f"{value.name} is outside the group")
        return ("node", position[value])
    if isinstance(value, torch.Tensor):
        sizes = tuple(_size(s) for s in value.shape)
        strides = tuple(_size(s) for s in value.stride()) if value.layout == torch.strided else None
        return ("tensor", value.dtype, str(value.device), str(value.layout), sizes, strides)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", type(value).__name__, str(value.node.expr))
    if value is None or type(value) in (bool, int, float, str):
        return (type(value).__name__, repr(value))
    if isinstance(value, _OPAQUE):
        return (type(value).__name__, str(value))
    if isinstance(value, (list, tuple)):  # FX's immutable_list and torch.Size too
        return (type(value).__name__, tuple(_exact(v, position) for v in value))
    if isinstance(value, dict):
        return (type(value).__name__, tuple((_exact(k, position), _exact(v, position)) for k, v in value.items()))
    raise _Inexact(type(value).__qualname__)


def _size(size: int | torch.SymInt) -> Any:
    return str(size.node.expr) if isinstance(size, torch.SymInt) else int(size)


def _holds_node(value: Any) -> bool:
    if isinstance(value, fx.Node):
        return True
    if isinstance(value, (tuple, list, set, frozenset)):
        return any(_holds_node(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_node(k) or _holds_node(v) for k, v in value.items())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_holds_node(getattr(value, f.name)) for f in dataclasses.fields(value))
    return False
