"""Storing a saved activation compressed: rewrite the joint graph so the forward
saves a smaller copy and the backward reads a decompressed one.

float32 is stored as bfloat16; bfloat16/float16 as float8 (e4m3) with one
per-tensor scale (amax / largest e4m3 value), saved alongside. The forward
computes the small copy right after the value; the backward decompresses it
just before its first reader and every reader that runs only for the backward
uses the decompressed value, so torch's own fw/bw extraction sees an ordinary joint graph whose saved
values are the small copies. Lossy by design: the gradients change by the
rounding error of the stored dtype, which is what the option asks for.
"""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import fx

from graphopt.passes.graph_edit import call_with_meta
from graphopt.passes.remat_graph import COMPRESSED_DTYPE

aten = torch.ops.aten
prims = torch.ops.prims


def compress_saved_values(
    joint: fx.GraphModule, compressed: Collection[fx.Node], backward_only: Collection[fx.Node]
) -> list[fx.Node]:
    """Rewrite `joint` in place; return the nodes the forward must save instead of `compressed`.

    `backward_only`: nodes that run only for the backward (the backward itself and the
    values recomputed for it that the forward does not need); they read the
    decompressed copy."""
    graph = joint.graph
    order = {n: i for i, n in enumerate(joint.graph.nodes)}
    saved: list[fx.Node] = []
    for value in compressed:
        dtype = value.meta["val"].dtype
        small = COMPRESSED_DTYPE[dtype]
        readers = sorted((u for u in value.users if u in backward_only), key=order.__getitem__)
        with graph.inserting_before(value.next):
            if small.itemsize == 1:
                amax = call_with_meta(graph, aten.max.default, call_with_meta(graph, aten.abs.default, value))
                ratio = call_with_meta(graph, aten.div.Tensor, amax, torch.finfo(small).max)
                scale = call_with_meta(graph, aten.clamp_min.default, ratio, 1e-12)
                scaled = call_with_meta(graph, aten.div.Tensor, value, scale)
                stored = call_with_meta(graph, prims.convert_element_type.default, scaled, small)
                saved += [stored, scale]
            else:
                scale = None
                stored = call_with_meta(graph, prims.convert_element_type.default, value, small)
                saved.append(stored)
        with graph.inserting_before(readers[0]):
            restored = call_with_meta(graph, prims.convert_element_type.default, stored, dtype)
            if scale is not None:
                restored = call_with_meta(graph, aten.mul.Tensor, restored, scale)
        for reader in readers:
            reader.replace_input_with(value, restored)
    return saved
