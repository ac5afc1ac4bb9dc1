"""`libdevice` for kernels run by Triton's CPU interpreter (TRITON_INTERPRET=1).

Triton's interpreter leaves triton.language.extra.libdevice unimplemented, so
generated kernels import this module under the same name when interpreting.
Each function applies the numpy function to the interpreter's tensor data,
which is what the interpreter does for the tl.math functions it implements.
Only ever imported under the interpreter; GPU kernels use the real libdevice.
"""

from __future__ import annotations

import numpy as np
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
