"""The ATen decomposition table AOTAutograd applies before graphopt's passes.

With fusion on, composite ops (layer_norm, softmax, gelu, their backwards, ...)
become the pointwise and reduction primitives that codegen fuses. With fusion
off, nothing is decomposed beyond what AOTAutograd requires, since primitives
run one ATen kernel each and would be slower than the composite.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._decomp import core_aten_decompositions, get_decompositions

from graphopt.options import Options

aten = torch.ops.aten

# Composite ops that core ATen keeps but that graphopt wants as fusable primitives.
_EXTRA_FOR_FUSION = [
    aten._softmax,
    aten._log_softmax,
    aten.native_layer_norm,
    aten.gelu,
    aten.var_mean,
]


# Attention stays one extern call (flash/efficient kernels beat any decomposition), and
# torch 2.13's decomposition of the CPU flash op gives wrong gradients under a causal mask.
_KEEP_EXTERN = [
    aten._scaled_dot_product_flash_attention_for_cpu,
]


def decomposition_table(options: Options) -> dict[Any, Any]:
    if not options.fusion:
        return {}
    table = dict(core_aten_decompositions())
    table.update(get_decompositions(_EXTRA_FOR_FUSION))
    for op in get_decompositions(_KEEP_EXTERN):
        table.pop(op, None)
    return table
