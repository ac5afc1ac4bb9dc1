"""The fusion pass's grouping, as the tuning cache stores it.

Forming groups plans a kernel (`plan_kernel`) for every merge it tries; what it
decides is small: which nodes form each kernel, whether codegen could write it,
the merges that built it and the merges it rejected (both for the report). That is stored (namespace
"fusion") with nodes as positions in the graph that grouping sees (long
reductions split, views privatized), each with the op found there, under the
key of the graph the pass received plus its node names (which the report's
strings carry). `parse` checks every position and op, so an entry that does
not fit the graph is a miss, and so is one the pass cannot replay under its own
cycle and in-place checks (`fusion._replay`) or whose groups codegen now plans
differently.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

from torch import fx

from graphopt.cache import NodeIndex, graph_key
from graphopt.pipeline import PassContext

CACHE_NAMESPACE = "fusion"


@dataclasses.dataclass(frozen=True)
class StoredGroup:
    members: list[fx.Node]  # in graph order
    merges: list[str]
    kernel: bool  # codegen wrote it (else its nodes stayed ATen calls)


@dataclasses.dataclass(frozen=True)
class StoredGrouping:
    groups: list[StoredGroup]
    rejected: list[tuple[tuple[str, ...], tuple[str, ...], str]]  # RejectedMerge's fields


def key(gm: fx.GraphModule, ctx: PassContext) -> str:
    """The key of the graph as fusion receives it (after the passes before it), names included."""
    names = [n.name for n in gm.graph.nodes]
    material = (graph_key(gm, ctx.example_inputs, ctx.options, ctx.device), names)
    return hashlib.sha256(repr(material).encode()).hexdigest()[:32]


def encode(
    nodes: Sequence[fx.Node],
    groups: Sequence[tuple[Sequence[fx.Node], Sequence[str], bool]],
    rejected: Sequence[tuple[tuple[str, ...], tuple[str, ...], str]],
) -> dict[str, Any]:
    index = NodeIndex(nodes)
    return {
        "groups": [
            {"members": index.refs(members), "merges": list(merges), "kernel": kernel}
            for members, merges, kernel in groups
        ],
        "rejected": [[list(first), list(second), reason] for first, second, reason in rejected],
    }


def parse(value: Any, nodes: Sequence[fx.Node]) -> StoredGrouping:
    """The stored grouping over `nodes`; ValueError (or the KeyError/TypeError of a malformed
    value) if a member is out of range, holds another op, or sits in two groups."""
    index = NodeIndex(nodes)
    seen: set[fx.Node] = set()
    groups = []
    for group in value["groups"]:
        members = index.resolve(group["members"])
        if not members or seen.intersection(members) or len(set(members)) < len(members):
            raise ValueError("an empty group, or a node in two groups")
        seen.update(members)
        groups.append(StoredGroup(members, [str(m) for m in group["merges"]], bool(group["kernel"])))
    rejected = [(tuple(map(str, a)), tuple(map(str, b)), str(reason)) for a, b, reason in value["rejected"]]
    return StoredGrouping(groups, rejected)
