"""Index math of generated kernels, as sympy expressions.

A kernel iterates over a linear index (`xindex`, and `rindex` for the reduced
part of a reduction). Every tensor element it touches is addressed by an
expression in those linear indices and in the graph's size symbols (`s0`, ...),
so one kernel serves every size the symbols can take: sizes are kernel
arguments, never baked-in constants, unless the graph itself is static.

Views (expand, permute, slice, reshape, ...) are pure index maps here: a view
node inside a kernel moves no data, it rewrites the index at which its input is
read. `simplify_index` folds the mixed-radix pieces back together
(`(x // 16) * 16 + x % 16 -> x`) so that contiguous accesses come out as plain
`xindex` and Triton can vectorize them.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence

import sympy
import torch
from sympy.printing.str import StrPrinter
from torch import fx
from torch.utils._sympy.functions import FloorDiv, ModularIndexing

aten = torch.ops.aten
prims = torch.ops.prims

Index = tuple[sympy.Expr, ...]

XINDEX = sympy.Symbol("xindex", integer=True, nonnegative=True)
RINDEX = sympy.Symbol("rindex", integer=True, nonnegative=True)


class IndexingError(Exception):
    """The index map of a node cannot be expressed (the group must be split here)."""


def size_expr(value: int | torch.SymInt) -> sympy.Expr:
    """A size or stride from meta['val'] as sympy (a SymInt contributes its symbolic expression)."""
    if isinstance(value, torch.SymInt):
        return sympy.sympify(value.node.expr)
    return sympy.Integer(int(value))


def tensor_meta(node: fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise IndexingError(f"{node.name} has no tensor meta['val']")
    return val


def shape_of(node: fx.Node) -> Index:
    return _shape(tensor_meta(node))


def strides_of(node: fx.Node) -> Index:
    return _strides(tensor_meta(node))


# Keyed by the meta tensor itself (the cache keeps it alive, so its id is never reused).
@functools.lru_cache(maxsize=1 << 14)
def _shape(val: torch.Tensor) -> Index:
    return tuple(size_expr(s) for s in val.shape)


@functools.lru_cache(maxsize=1 << 14)
def _strides(val: torch.Tensor) -> Index:
    return tuple(size_expr(s) for s in val.stride())


def product(values: Sequence[sympy.Expr]) -> sympy.Expr:
    return functools.reduce(operator.mul, values, sympy.Integer(1))


@functools.lru_cache(maxsize=1 << 16)
def same(a: sympy.Expr, b: sympy.Expr) -> bool:
    """Provably equal sizes (symbolic comparison; never a runtime guard)."""
    return sympy.expand(a - b) == 0


def same_shape(a: Sequence[sympy.Expr], b: Sequence[sympy.Expr]) -> bool:
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))


def delinearize(linear: sympy.Expr, shape: Sequence[sympy.Expr]) -> Index:
    """Row-major multi-index of `linear` in `shape` (the first dim unbounded)."""
    index = []
    stride = sympy.Integer(1)
    for pos in range(len(shape) - 1, -1, -1):
        if shape[pos] == 1:
            index.append(sympy.Integer(0))
        elif pos == 0:
            index.append(FloorDiv(linear, stride))
        else:
            index.append(ModularIndexing(linear, stride, shape[pos]))
        stride = stride * shape[pos]
    return tuple(reversed(index))


def linearize(index: Sequence[sympy.Expr], shape: Sequence[sympy.Expr]) -> sympy.Expr:
    linear = sympy.Integer(0)
    for i, size in zip(index, shape):
        linear = linear * size + i
    return linear


def offset(index: Sequence[sympy.Expr], strides: Sequence[sympy.Expr], shape: Sequence[sympy.Expr]) -> sympy.Expr:
    """Memory offset of `index`; dims of size 1 contribute nothing whatever their stride."""
    return sympy.Add(*(i * st for i, st, s in zip(index, strides, shape) if s != 1))


def broadcast_index(index: Index, out_shape: Index, arg_shape: Index) -> Index:
    """The index into a broadcast argument: leading dims dropped, size-1 dims read at 0."""
    extra = len(out_shape) - len(arg_shape)
    if extra < 0:
        raise IndexingError("argument has more dims than the result")
    return tuple(sympy.Integer(0) if s == 1 else i for i, s in zip(index[extra:], arg_shape))


# ---------------------------------------------------------------- view index maps


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


@functools.lru_cache(maxsize=1 << 12)
def _reshape_groups(in_shape: Index, out_shape: Index) -> list[tuple[list[int], list[int]]] | None:
    """Pairs of (in dims, out dims) with equal products, in order; None if no such split is provable."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        if i < len(in_shape) and in_shape[i] == 1:
            groups.append(([i], []))
            i += 1
            continue
        if j < len(out_shape) and out_shape[j] == 1:
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(in_shape) or j >= len(out_shape):
            return None
        in_dims, out_dims = [i], [j]
        pi, pj = in_shape[i], out_shape[j]
        i, j = i + 1, j + 1
        while not same(pi, pj):
            ratio = sympy.simplify(pj / pi)
            if ratio.is_integer and i < len(in_shape):
                pi, i = pi * in_shape[i], i + 1
                in_dims.append(i - 1)
            elif j < len(out_shape):
                pj, j = pj * out_shape[j], j + 1
                out_dims.append(j - 1)
            else:
                return None
        groups.append((in_dims, out_dims))
    return groups


def reshape_index(index: Index, shape: Index, target: Index) -> Index:
    """The index in `target` of the element at `index` in `shape`, elements taken in row-major
    order (what a reshape maps); dims are matched group by group, so the result stays simple."""
    if same_shape(shape, target):
        return tuple(index)
    groups = _reshape_groups(target, shape)
    if groups is None:
        return delinearize(simplify_index(linearize(index, shape)), target)
    result: list[sympy.Expr] = []
    for target_dims, dims in groups:
        if not dims:
            result.extend(sympy.Integer(0) for _ in target_dims)
            continue
        linear = simplify_index(linearize([index[d] for d in dims], [shape[d] for d in dims]))
        if len(target_dims) == 1:
            result.append(linear)
        else:
            result.extend(delinearize(linear, [target[d] for d in target_dims]))
    return tuple(result)


def _reshape(node: fx.Node, index: Index) -> Index:
    return reshape_index(index, shape_of(node), shape_of(node.args[0]))


def _expand(node: fx.Node, index: Index) -> Index:
    return broadcast_index(index, shape_of(node), shape_of(node.args[0]))


def _permute(node: fx.Node, index: Index) -> Index:
    dims = [_norm_dim(d, len(index)) for d in node.args[1]]
    result: list[sympy.Expr] = [sympy.Integer(0)] * len(index)
    for out_pos, in_pos in enumerate(dims):
        result[in_pos] = index[out_pos]
    return tuple(result)


def _transpose(node: fx.Node, index: Index) -> Index:
    a, b = (_norm_dim(d, len(index)) for d in node.args[1:3])
    result = list(index)
    result[a], result[b] = result[b], result[a]
    return tuple(result)


def _t(node: fx.Node, index: Index) -> Index:
    return tuple(reversed(index))


def _unsqueeze(node: fx.Node, index: Index) -> Index:
    dim = _norm_dim(node.args[1], len(index))
    return index[:dim] + index[dim + 1 :]


def _squeeze(node: fx.Node, index: Index) -> Index:
    in_shape = shape_of(node.args[0])
    if node.target == aten.squeeze.default:
        dims = {d for d, s in enumerate(in_shape) if s == 1}
    else:
        raw = node.args[1] if node.target == aten.squeeze.dims else [node.args[1]]
        dims = {_norm_dim(d, len(in_shape)) for d in raw if in_shape[_norm_dim(d, len(in_shape))] == 1}
    result, it = [], iter(index)
    for d in range(len(in_shape)):
        result.append(sympy.Integer(0) if d in dims else next(it))
    return tuple(result)


def _slice(node: fx.Node, index: Index) -> Index:
    in_shape = shape_of(node.args[0])
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, len(in_shape))
    start = node.args[2] if len(node.args) > 2 else 0
    step = node.args[4] if len(node.args) > 4 else 1
    start = 0 if start is None else start
    if isinstance(start, fx.Node):
        start = start.meta.get("val")
    start_expr = size_expr(start)
    if not (start_expr.is_number and start_expr >= 0):
        raise IndexingError("slice with a negative or symbolic start")
    result = list(index)
    result[dim] = start_expr + index[dim] * size_expr(step)
    return tuple(result)


def _select(node: fx.Node, index: Index) -> Index:
    in_shape = shape_of(node.args[0])
    dim = _norm_dim(node.args[1], len(in_shape))
    pos = node.args[2]
    if not isinstance(pos, int):
        raise IndexingError("select at a symbolic position")
    pos = pos + in_shape[dim] if pos < 0 else sympy.Integer(pos)
    return index[:dim] + (pos,) + index[dim:]


def _broadcast_in_dim(node: fx.Node, index: Index) -> Index:
    in_shape = shape_of(node.args[0])
    dims = node.args[2]
    return tuple(sympy.Integer(0) if in_shape[k] == 1 else index[d] for k, d in enumerate(dims))


def _identity(node: fx.Node, index: Index) -> Index:
    return index


VIEW_INDEX_MAPS: dict[object, Callable[[fx.Node, Index], Index]] = {
    aten.view.default: _reshape,
    aten.reshape.default: _reshape,
    aten._unsafe_view.default: _reshape,
    aten.expand.default: _expand,
    aten.permute.default: _permute,
    aten.transpose.int: _transpose,
    aten.t.default: _t,
    aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.default: _squeeze,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    aten.slice.Tensor: _slice,
    aten.select.int: _select,
    aten.alias.default: _identity,
    prims.broadcast_in_dim.default: _broadcast_in_dim,
}


# ---------------------------------------------------------------- simplification


def _radix_term(term: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr, sympy.Expr, sympy.Expr | None] | None:
    """term == coef * ((base // div) % mod) (mod None: no modulus) with coef free of index symbols."""
    coef, factors = sympy.Integer(1), []
    for factor in sympy.Mul.make_args(term):
        if factor.free_symbols & {XINDEX, RINDEX}:
            factors.append(factor)
        else:
            coef = coef * factor
    if len(factors) != 1:
        return None
    (atom,) = factors
    if isinstance(atom, ModularIndexing):
        return coef, atom.args[0], atom.args[1], atom.args[2]
    if isinstance(atom, FloorDiv):
        return coef, atom.args[0], atom.args[1], None
    if atom in (XINDEX, RINDEX):
        return coef, atom, sympy.Integer(1), None
    return None


@functools.lru_cache(maxsize=1 << 16)
def simplify_index(expr: sympy.Expr) -> sympy.Expr:
    """Merge mixed-radix digit pairs: c*m*((a//(k*m)) % n) + c*((a//k) % m) -> c*((a//k) % (m*n))."""
    expr = sympy.expand(expr)
    terms = list(sympy.Add.make_args(expr))
    changed = True
    while changed:
        changed = False
        for i, ti in enumerate(terms):
            low = _radix_term(ti)
            if low is None:
                continue
            c_low, base, div_low, mod_low = low
            if mod_low is None:
                continue
            for j, tj in enumerate(terms):
                high = _radix_term(tj) if j != i else None
                if high is None:
                    continue
                c_high, base_h, div_high, mod_high = high
                if base_h != base or not same(div_high, div_low * mod_low) or not same(c_high, c_low * mod_low):
                    continue
                if mod_high is None:
                    merged = c_low * FloorDiv(base, div_low)
                else:
                    merged = c_low * ModularIndexing(base, div_low, mod_low * mod_high)
                terms = [t for k, t in enumerate(terms) if k not in (i, j)] + [merged]
                changed = True
                break
            if changed:
                break
    return sympy.Add(*terms)


def unit_stride_indices(offset_expr: sympy.Expr) -> list[sympy.Symbol]:
    """The linear indices (xindex, rindex) along which this address moves by one element:
    the lowest digit of the index appears with coefficient 1."""
    found = []
    for term in sympy.Add.make_args(offset_expr):
        radix = _radix_term(term)
        if radix is not None and radix[0] == 1 and radix[2] == 1 and radix[1] in (XINDEX, RINDEX):
            found.append(radix[1])
    return found


class TritonPrinter(StrPrinter):
    """sympy index/size expressions as Triton (and Python) integer code."""

    def _print_FloorDiv(self, expr):
        a, b = expr.args
        return f"({self._print(a)} // {self._print(b)})"

    def _print_ModularIndexing(self, expr):
        a, div, mod = expr.args
        inner = self._print(a) if div == 1 else f"({self._print(a)} // {self._print(div)})"
        return f"({inner} % {self._print(mod)})"

    def _print_CleanDiv(self, expr):
        return self._print_FloorDiv(expr)

    def _print_PythonMod(self, expr):
        a, b = expr.args
        return f"({self._print(a)} % {self._print(b)})"

    _print_Mod = _print_PythonMod

    def _print_Mul(self, expr):
        return "(" + " * ".join(self._print(a) for a in expr.args) + ")"

    def _print_Add(self, expr, order=None):
        return "(" + " + ".join(self._print(a) for a in expr.args) + ")"

    def _print_Pow(self, expr):
        base, exp = expr.args
        if exp.is_Integer and exp > 0:
            return "(" + " * ".join([self._print(base)] * int(exp)) + ")"
        raise IndexingError(f"cannot print {expr} as integer code")

    def _print_Integer(self, expr):
        return str(int(expr))

    def _print_Max(self, expr):
        return functools.reduce(lambda a, b: f"max({a}, {b})", (self._print(a) for a in expr.args))

    def _print_Min(self, expr):
        return functools.reduce(lambda a, b: f"min({a}, {b})", (self._print(a) for a in expr.args))


_printer = TritonPrinter()


def print_index(expr: sympy.Expr) -> str:
    return _printer.doprint(expr)
