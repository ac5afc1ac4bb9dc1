"""The ATen decomposition table AOTAutograd applies before graphopt's passes.

With fusion on, composite ops (layer_norm, softmax, gelu, their backwards, ...)
become the pointwise and reduction primitives that codegen fuses. With fusion
off, nothing is decomposed beyond what AOTAutograd requires, since primitives
run one ATen kernel each and would be slower than the composite.
"""

from __future__ import annotations

import functools
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
    # Inference batch norm is pointwise: it fuses with the ReLU / residual add after it. Its decomposition
    # goes through _native_batch_norm_legit (training=False: functional).
    aten._native_batch_norm_legit_no_training,
    aten._native_batch_norm_legit,
]

# Training batch norm, with option fuse_batch_norm: per-channel reductions over N*H*W and pointwise work
# (the running-statistics updates included) instead of cuDNN's kernels and their write-backs.
_TRAINING_BATCH_NORM = [
    aten._native_batch_norm_legit_functional,
    aten.native_batch_norm_backward,
]


def _reduced_dims(x: torch.Tensor, dim: Any) -> list[int]:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(x.dim()))
    if x.dim() == 0:  # a 0-d tensor "reduced" over dim 0 or -1 is itself: nothing to reduce, count 1
        return []
    dims = [dim] if isinstance(dim, int) else list(dim)
    return [d % x.dim() for d in dims]


def _count(x: torch.Tensor, dims: list[int]) -> Any:
    n = 1
    for d in dims:
        n = n * x.shape[d]
    return n


def _var_mean(x: torch.Tensor, dim: Any = None, *, correction: Any = None, keepdim: bool = False):
    """Two sums (mean, then squared deviations) that codegen fuses into one reduction kernel;
    torch's own decomposition ends in prims.var, which no kernel could absorb."""
    dims = _reduced_dims(x, dim)
    n = _count(x, dims)
    mean = aten.sum.dim_IntList(x, dims, True) / n
    centered = x - mean
    var = aten.sum.dim_IntList(centered * centered, dims, keepdim) / (n - (1 if correction is None else correction))
    return var, (mean if keepdim else aten.squeeze.dims(mean, dims))


def _var(x: torch.Tensor, dim: Any = None, *, correction: Any = None, keepdim: bool = False):
    return _var_mean(x, dim, correction=correction, keepdim=keepdim)[0]


def _mean(x: torch.Tensor, dim: Any = None, keepdim: bool = False, *, dtype: Any = None):
    dims = _reduced_dims(x, dim)
    return aten.sum.dim_IntList(x, dims, keepdim, dtype=dtype) / _count(x, dims)


def _nll_loss_backward(grad_output, x, target, weight, reduction, ignore_index, total_weight):
    """The gradient as a compare with the class index (pointwise, fusable into the softmax
    backward) instead of torch's scatter into a zero tensor of the logits' size."""
    from torch._decomp.decompositions import nll_loss_backward

    if weight is not None or x.dim() != 2:
        return nll_loss_backward(grad_output, x, target, weight, reduction, ignore_index, total_weight)
    keep = target != ignore_index
    hit = torch.arange(x.shape[1], device=x.device).unsqueeze(0) == target.unsqueeze(1)
    scale = grad_output.unsqueeze(1) if reduction == 0 else grad_output
    if reduction == 1:  # mean
        scale = scale / total_weight
    return torch.where(hit & keep.unsqueeze(1), -scale, torch.zeros((), dtype=x.dtype, device=x.device)).to(x.dtype)


_GRAPHOPT_DECOMPOSITIONS = {
    aten.var_mean.correction: _var_mean,
    aten.var.correction: _var,
    aten.mean.dim: _mean,
    aten.mean.default: _mean,
    aten.nll_loss_backward.default: _nll_loss_backward,
}


# Attention stays one extern call (flash/efficient kernels beat any decomposition), and
# torch 2.13's decomposition of the CPU flash op gives wrong gradients under a causal mask.
# Without fuse_batch_norm, training batch norm's backward stays cuDNN's like its forward
# (decomposed on NCHW tensors, resnet50 training ran slower than eager: H200,
# benchmarks/results/2026-12-04-h200, 36.4 vs 28.6 ms, before channels-last kernels walked memory order).
_KEEP_EXTERN = [aten._scaled_dot_product_flash_attention_for_cpu]


def decomposition_table(options: Options) -> dict[Any, Any]:
    if not options.fusion:
        return {}
    return dict(_fusion_table(options.fuse_batch_norm))


@functools.cache
def _fusion_table(fuse_batch_norm: bool) -> dict[Any, Any]:
    """Built once per process and setting: core_aten_decompositions() materializes every composite
    op (~0.4 s), which would otherwise be paid by every compiled graph."""
    table = dict(core_aten_decompositions())
    table.update(get_decompositions(_EXTRA_FOR_FUSION))
    table.update(_GRAPHOPT_DECOMPOSITIONS)
    training_batch_norm = get_decompositions(_TRAINING_BATCH_NORM)
    if fuse_batch_norm:
        table.update(training_batch_norm)
    for op in get_decompositions(_KEEP_EXTERN) | ({} if fuse_batch_norm else training_batch_norm):
        table.pop(op, None)
    return table
