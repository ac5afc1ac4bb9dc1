"""`libdevice` for kernels run by Triton's CPU interpreter (TRITON_INTERPRET=1).

Triton's interpreter leaves triton.language.extra.libdevice unimplemented, so
generated kernels import this module under the same name when interpreting.
It also truncates fp32 -> bf16 where GPUs round to nearest even; kernels
generated for the interpreter round through `round_to_bf16` instead.
Each function applies the numpy function to the interpreter's tensor data,
which is what the interpreter does for the tl.math functions it implements.
Only ever imported under the interpreter; GPU kernels use the real libdevice.
"""

from __future__ import annotations

import numpy as np
import torch
import triton.language as tl
from triton.runtime.interpreter import TensorHandle


def _tensor(value):
    if isinstance(value, tl.tensor):
        return value
    return tl.tensor(TensorHandle(np.array([value], dtype=np.float32), tl.float32), tl.float32)


def _apply(fn, *args):
    tensors = [_tensor(a) for a in args]
    first = tensors[0]
    data = fn(*(t.handle.data for t in tensors))
    data = np.asarray(data).astype(first.handle.data.dtype)
    return tl.tensor(TensorHandle(data, first.handle.dtype.scalar), first.type)


def tanh(x):
    return _apply(np.tanh, x)


def atan(x):
    return _apply(np.arctan, x)


def log1p(x):
    return _apply(np.log1p, x)


def expm1(x):
    return _apply(np.expm1, x)


def trunc(x):
    return _apply(np.trunc, x)


def nearbyint(x):
    return _apply(np.rint, x)


def pow(x, y):
    return _apply(np.power, x, y)


def atan2(x, y):
    return _apply(np.arctan2, x, y)


def round_to_bf16(x):
    """fp32 -> bf16 rounded to nearest even, as a GPU converts (the interpreter truncates)."""
    rounded = torch.from_numpy(np.ascontiguousarray(x.handle.data, dtype=np.float32)).to(torch.bfloat16)
    handle = TensorHandle(rounded.view(torch.uint16).numpy(), tl.bfloat16)
    return tl.tensor(handle, x.type.with_element_ty(tl.bfloat16) if x.type.is_block() else tl.bfloat16)
