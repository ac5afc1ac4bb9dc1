"""One fusion group -> the source of one Triton kernel.

`analyze` decides the group's iteration space and checks that every node can
be generated (it raises CannotGenerate naming the node and the reason, which is
how the fusion pass learns that a candidate group is illegal). `render` writes
the kernel.

Iteration space. A pointwise kernel walks its outputs' shape with one linear
index `xindex` (contiguous 1-D blocks, so loads and stores vectorize), in the
memory order of its first output: a channels-last output is walked channels
innermost, so consecutive threads touch consecutive addresses. A
reduction kernel walks its reductions' input shape split into kept dims
(`xindex`, rows) and reduced dims (`rindex`), with 2-D [XBLOCK, RBLOCK] blocks.
Values are computed where they are needed: a node is evaluated at an index,
its operands at the index that broadcasting or the view maps give, loads at
the address the strides give. Values that depend only on the row are computed
once per row ("x level"), values that vary along the reduction per element
("xr level").

Two shapes of reduction kernel: persistent (the whole reduced extent is one
block in registers; every reduction, prologue and epilogue works on it without
re-reading memory) and looped (one loop over the reduced extent per reduction
depth, recomputing the prologue each time; for rows too long for registers).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import inspect
from collections.abc import Sequence
from typing import Any

import sympy
import torch
from torch import fx

from graphopt.codegen import compiler, lowerings
from graphopt.codegen.indexing import (
    RINDEX,
    unit_stride_indices,
    VIEW_INDEX_MAPS,
    XINDEX,
    Index,
    IndexingError,
    broadcast_index,
    delinearize,
    offset,
    print_index,
    product,
    reshape_index,
    same,
    same_shape,
    shape_of,
    simplify_index,
    strides_of,
)

aten = torch.ops.aten


# How many op names a kernel's name lists (the rest are left out, to keep names readable).
_NAMED_OPS = 5


# Triton's interpreter has no libdevice; under it kernels use numpy-backed stand-ins.
_LIBDEVICE_IMPORT = {
    False: "from triton.language.extra import libdevice",
    True: "from graphopt.codegen import interpreter_libdevice as libdevice",
}


class CannotGenerate(Exception):
    """A group (or one node of it) has no Triton lowering; `node` names the culprit where known."""

    def __init__(self, reason: str, node: fx.Node | None = None):
        super().__init__(reason)
        self.reason = reason
        self.node = node


def node_kind(node: fx.Node) -> str:
    """'pointwise', 'reduction', 'view', 'cast', 'constant' for ops codegen knows, else 'extern'."""
    if node.op != "call_function":
        return "extern"
    target = node.target
    if target in lowerings.REDUCTIONS:
        return "reduction"
    if target in VIEW_INDEX_MAPS:
        return "view"
    if target in lowerings.CASTS:
        return "cast"
    if target in lowerings.CONSTANTS:
        return "constant"
    if target in lowerings.POINTWISE or target in lowerings.BOUNDED:
        return "pointwise"
    return "extern"


def is_scalar_node(node: Any) -> bool:
    return isinstance(node, fx.Node) and isinstance(node.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool))


@dataclasses.dataclass(frozen=True)
class Domain:
    """The iteration space: `shape`, of which `reduced` dims are walked by rindex (none: pointwise).

    `order` lists the dims from outermost to innermost as the linear indices walk them (None:
    row-major), so that the innermost walked dim is the one contiguous in memory.
    """

    shape: Index
    reduced: tuple[int, ...]
    order: tuple[int, ...] | None = None

    @property
    def is_reduction(self) -> bool:
        return bool(self.reduced)

    @property
    def x_shape(self) -> Index:
        return tuple(s for d, s in enumerate(self.shape) if d not in self.reduced)

    @property
    def r_shape(self) -> Index:
        return tuple(self.shape[d] for d in self.reduced)

    @property
    def xnumel(self) -> sympy.Expr:
        return product(self.x_shape)

    @property
    def rnumel(self) -> sympy.Expr:
        return product(self.r_shape)

    def _walk(self, linear: sympy.Symbol, reduced: bool) -> dict[int, sympy.Expr]:
        """Each kept (or reduced) dim's index as a function of the linear index that walks them."""
        dims = [d for d in (self.order or range(len(self.shape))) if (d in self.reduced) == reduced]
        return dict(zip(dims, delinearize(linear, [self.shape[d] for d in dims])))

    def full_index(self) -> Index:
        at = {**self._walk(XINDEX, False), **self._walk(RINDEX, True)}
        return tuple(at[d] for d in range(len(self.shape)))

    def row_shape(self, keepdim: bool) -> Index:
        if keepdim:
            return tuple(sympy.Integer(1) if d in self.reduced else s for d, s in enumerate(self.shape))
        return self.x_shape

    def row_index(self, keepdim: bool) -> Index:
        at = self._walk(XINDEX, False)
        if keepdim:
            return tuple(sympy.Integer(0) if d in self.reduced else at[d] for d in range(len(self.shape)))
        return tuple(at[d] for d in range(len(self.shape)) if d not in self.reduced)


def memory_order(node: fx.Node) -> tuple[int, ...] | None:
    """The dims of `node`'s dense, statically strided tensor from outermost to innermost in
    memory; None when that is row-major or cannot be known at compile time (symbolic strides)."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or any(not isinstance(v, int) for v in (*val.shape, *val.stride())):
        return None
    order = tuple(sorted(range(val.dim()), key=lambda d: (-val.stride(d), d)))
    expected = 1
    for d in reversed(order):  # dense: each dim's stride is the product of the sizes inside it
        if val.shape[d] != 1:
            if val.stride(d) != expected:
                return None
            expected *= val.shape[d]
    return None if order == tuple(range(val.dim())) else order


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """A generatable group: its nodes (topological), external inputs, outputs and iteration space.

    `roles[i]` says where output i lives: "full" (the whole domain) or "row" (one value per
    row of a reduction; `keepdims[i]` tells which row shape). An output of another shape with
    as many elements (a layer norm's result viewed as a matrix for the next matmul) takes the
    same elements in row-major order. `symbols` are the size symbols the kernel takes as arguments.
    """

    name: str
    nodes: tuple[fx.Node, ...]
    inputs: tuple[fx.Node, ...]
    outputs: tuple[fx.Node, ...]
    domain: Domain
    roles: tuple[str, ...]
    keepdims: tuple[bool, ...]
    symbols: tuple[sympy.Symbol, ...]
    inner: bool = True

    @property
    def kernel_name(self) -> str:
        """The jit function's name: its kind and ops, as profilers show it (`graphopt_red_native_layer_norm_add`).
        Made of the group's contents only, so identical groups (the same layer norm in every
        transformer block) render identical sources and share one compiled kernel."""
        computing = (n for n in self.nodes if node_kind(n) != "view")
        ops = list(dict.fromkeys(getattr(n.target, "_opname", n.target.__name__) for n in computing))
        kind = "red" if self.domain.is_reduction else "poi"
        return "_".join(["graphopt", kind, *ops[:_NAMED_OPS]])

    @property
    def tensor_inputs(self) -> list[fx.Node]:
        return [n for n in self.inputs if not is_scalar_node(n)]

    @property
    def scalar_inputs(self) -> list[fx.Node]:
        return [n for n in self.inputs if is_scalar_node(n)]


def _is_trivial_reduction(node: fx.Node) -> bool:
    """A reduction over no dims (of a 0-dim tensor): the identity."""
    return not _reduction_domain(node)[0].reduced


def _reduction_domain(node: fx.Node) -> tuple[Domain, bool]:
    source = node.args[0]
    shape = shape_of(source)
    dims, keepdim = lowerings.reduction_dims(node.target, node.args, node.kwargs, len(shape))
    return Domain(shape, dims), keepdim


def external_inputs(nodes: Sequence[fx.Node]) -> list[fx.Node]:
    """The values `nodes` read that none of them computes, in first-use order (a kernel's arguments)."""
    inside = set(nodes)
    return list(dict.fromkeys(arg for node in nodes for arg in node.all_input_nodes if arg not in inside))


def analyze(name: str, nodes: Sequence[fx.Node], outputs: Sequence[fx.Node]) -> KernelSpec:
    """Check that `nodes` form one kernel and describe it; raise CannotGenerate if not."""
    for node in nodes:
        if node_kind(node) == "extern":
            raise CannotGenerate(f"no Triton lowering for {node.target}", node)
        _check_dtype(node)
    inputs = external_inputs(nodes)
    if not outputs:
        raise CannotGenerate("group has no outputs")
    reductions = [n for n in nodes if node_kind(n) == "reduction" and not _is_trivial_reduction(n)]
    if reductions:
        domain, _ = _reduction_domain(reductions[0])
        for r in reductions[1:]:
            other, _ = _reduction_domain(r)
            if not same_shape(other.shape, domain.shape) or other.reduced != domain.reduced:
                raise CannotGenerate("reductions over different iteration spaces", r)
    else:
        domain = Domain(shape_of(outputs[0]), (), memory_order(outputs[0]))
    roles, keepdims = [], []
    for out in outputs:
        if node_kind(out) == "view":
            raise CannotGenerate("a view cannot be a kernel output (it would lose its aliasing)", out)
        shape = shape_of(out)
        if same_shape(shape, domain.shape):
            roles.append("full")
            keepdims.append(True)
        elif domain.is_reduction and same_shape(shape, domain.row_shape(True)):
            roles.append("row")
            keepdims.append(True)
        elif domain.is_reduction and same_shape(shape, domain.row_shape(False)):
            roles.append("row")
            keepdims.append(False)
        elif domain.order is None and same(product(shape), product(domain.shape)):
            roles.append("full")  # a reshape of the domain: stored at the same elements (reshape_index)
            keepdims.append(True)
        elif domain.is_reduction and same(product(shape), domain.xnumel):
            roles.append("row")  # a reshape of the rows
            keepdims.append(True)
        else:
            raise CannotGenerate("output shape does not match the kernel's iteration space", out)
    spec = KernelSpec(name, tuple(nodes), tuple(inputs), tuple(outputs), domain, tuple(roles), tuple(keepdims), ())
    rendered = _Emitter(spec, persistent=True, index64=False).emit()
    if domain.is_reduction and not rendered.inner and "full" in roles:
        # A reduction across rows (a weight gradient summed over tokens) walks few wide column
        # blocks; full-size outputs stored in that walk ran ~3x slower than a row-wise kernel
        # writing them plus the column sum reading one (Llama's RMSNorm backward on an H200).
        raise CannotGenerate("a reduction across rows does not also store full-size outputs")
    return dataclasses.replace(spec, symbols=tuple(sorted(rendered.symbols, key=str)), inner=rendered.inner)


def _check_dtype(node: fx.Node) -> None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise CannotGenerate("not a tensor value", node)
    if val.dtype not in lowerings.TRITON_DTYPES:
        raise CannotGenerate(f"dtype {val.dtype} has no Triton equivalent", node)
    for arg in node.all_input_nodes:  # an operand's too: abs of a complex tensor is a float one
        arg_val = arg.meta.get("val")
        if isinstance(arg_val, torch.Tensor) and arg_val.dtype not in lowerings.TRITON_DTYPES:
            raise CannotGenerate(f"operand {arg.name} has dtype {arg_val.dtype}, which has no Triton equivalent", node)
    if val.device.type == "meta":
        raise CannotGenerate("meta tensor", node)
    if any(isinstance(size, int) and size == 0 for size in val.shape):
        raise CannotGenerate("empty tensor (nothing to compute)", node)


@dataclasses.dataclass(frozen=True)
class _Value:
    """A Triton expression; level 0 scalar, 1 per row (x), 2 per element (xr). dtype None: weak scalar."""

    expr: str
    dtype: torch.dtype | None
    level: int


@dataclasses.dataclass
class RenderedKernel:
    source: str
    symbols: set[sympy.Symbol]
    inner: bool  # more loads walk memory along rindex than along xindex


def _in_dtype(value: _Value, dtype: torch.dtype) -> str:
    """`value`'s expression converted to `dtype` (a weak scalar converts where it is used)."""
    return lowerings.cast(value.expr, value.dtype, dtype) if value.dtype is not None else value.expr


@functools.lru_cache(maxsize=None)
def _positional_count(fn: Any) -> int:
    return sum(
        1 for p in inspect.signature(fn).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    )


def _normalized_args(node: fx.Node) -> list[Any]:
    """All schema arguments of `node` in positional order (kwargs and defaults filled in)."""
    schema = node.target._schema
    args = []
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            args.append(node.args[i])
        elif arg.name in node.kwargs:
            args.append(node.kwargs[arg.name])
        else:
            args.append(arg.default_value if arg.has_default_value() else None)
    return args


@functools.lru_cache(maxsize=None)
def _promoted(kinds: tuple[Any, ...]) -> torch.dtype:
    """torch's type promotion over tensor dtypes and Python scalar types (weaker than tensors)."""
    dtypes = [k for k in kinds if isinstance(k, torch.dtype)]
    if not dtypes:
        return torch.float32
    dtype = functools.reduce(torch.promote_types, dtypes)
    for scalar_type in (k for k in kinds if not isinstance(k, torch.dtype)):
        dtype = torch.result_type(torch.empty(1, dtype=dtype), scalar_type(1))
    return dtype


class _Emitter:
    """Writes one kernel variant. Caches values per (node, index) within their scope."""

    def __init__(self, spec: KernelSpec, persistent: bool, index64: bool):
        self.spec = spec
        self.members = set(spec.nodes)
        self.persistent = persistent
        self.index64 = index64
        self.reduction = spec.domain.is_reduction
        self.counter = 0
        self.symbols: set[sympy.Symbol] = set()
        self.unit_strides: collections.Counter[sympy.Symbol] = collections.Counter()  # loads contiguous along x / r
        self.bound: str | None = None  # where the values being computed are needed (bounded ops' inputs)
        self.row_cache: dict[tuple, _Value] = {}
        self.elem_cache: dict[tuple, _Value] = {}
        self.reduced: dict[fx.Node, _Value] = {}
        self.body: list[str] = []  # finished code, indent 1
        self.row_block: list[str] = []  # current per-row section
        self.elem_block: list[str] = []  # current per-element section (loop body when looped)
        self.input_names = {n: f"in_ptr{i}" for i, n in enumerate(spec.tensor_inputs)}
        self.scalar_names = {n: f"ks{i}" for i, n in enumerate(spec.scalar_inputs)}

    # ------------------------------------------------------------ helpers
    def fresh(self) -> str:
        self.counter += 1
        return f"tmp{self.counter}"

    def index_str(self, expr: sympy.Expr) -> str:
        expr = simplify_index(expr)
        self.symbols |= {s for s in expr.free_symbols if s not in (XINDEX, RINDEX)}
        return print_index(expr)

    def put(self, expr: str, dtype: torch.dtype | None, level: int) -> _Value:
        name = self.fresh()
        block = self.elem_block if level == 2 else self.row_block
        block.append(f"{name} = {expr}")
        return _Value(name, dtype, level)

    def block_shape(self, level: int) -> str:
        if not self.reduction:
            return "[XBLOCK]"
        return "[XBLOCK, RBLOCK]" if level == 2 else "[XBLOCK, 1]"

    def widen(self, value: _Value, level: int, dtype: torch.dtype) -> str:
        """`value` as a block of `level`'s shape in `dtype` (for stores and reductions)."""
        expr = lowerings.cast(value.expr, value.dtype, dtype) if value.dtype is not None else value.expr
        if value.level < level or value.level == 0:
            return f"(tl.zeros({self.block_shape(level)}, {lowerings.TRITON_DTYPES[dtype]}) + {expr})"
        return expr

    def mask(self, level: int) -> str:
        return "xrmask" if level == 2 else "xmask"

    # ------------------------------------------------------------ values
    def value(self, node: Any, index: Index) -> _Value:
        if isinstance(node, str):
            return _Value(node, None, 0)
        if not isinstance(node, fx.Node):
            try:
                return _Value(lowerings.literal(node), None, 0)
            except TypeError:
                raise CannotGenerate(f"argument {node!r} is not a scalar") from None
        if node in self.scalar_names:
            return _Value(self.scalar_names[node], None, 0)
        key = (node, index, self.bound)
        cached = self.elem_cache.get(key) or self.row_cache.get(key)
        if cached is not None:
            return cached
        if node not in self.members:
            result = self.load(node, index)
        else:
            kind = node_kind(node)
            try:
                if kind == "view":
                    result = self.value(node.args[0], VIEW_INDEX_MAPS[node.target](node, index))
                elif node.target in lowerings.BOUNDED:
                    if self.reduction:
                        raise CannotGenerate(f"{node.target} inside a reduction kernel", node)
                    emit = {
                        aten.constant_pad_nd.default: self.padded,
                        aten.cat.default: self.concatenated,
                        aten.slice_scatter.default: self.slice_scattered,
                    }[node.target]
                    result = emit(node, index)
                elif kind == "reduction" and _is_trivial_reduction(node):
                    v = self.operand(node.args[0], node, index)
                    dtype = lowerings.compute_dtype(node.meta["val"].dtype)
                    result = self.put(lowerings.cast(v.expr, v.dtype, dtype) if v.dtype else v.expr, dtype, v.level)
                elif kind == "reduction":
                    result = self.reduction_value(node, index)
                elif kind == "cast":
                    result = self.cast(node, index)
                elif kind == "constant":
                    result = self.constant(node, index)
                else:
                    result = self.pointwise(node, index)
            except IndexingError as e:
                raise CannotGenerate(str(e), node) from None
        (self.elem_cache if result.level == 2 else self.row_cache)[key] = result
        return result

    def load(self, node: fx.Node, index: Index) -> _Value:
        """`node`'s element at `index`; under a bound (self.bound), only where it holds (else 0)."""
        bound = self.bound
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise CannotGenerate(f"input {node.name} is not a tensor")
        off = simplify_index(offset(index, strides_of(node), shape_of(node)))
        level = 2 if RINDEX in off.free_symbols else 1
        self.unit_strides.update(unit_stride_indices(off))
        ptr = f"{self.input_names[node]} + {self.index_str(off)}"
        if XINDEX not in off.free_symbols and level == 1:
            ptr += " + 0 * xindex"  # one element for every row: a broadcast load, shaped like the rows
        mask = self.mask(level) if bound is None else f"{self.mask(level)} & {bound}"
        expr = f"tl.load({ptr}, {mask}, other=0)"
        dtype = lowerings.compute_dtype(val.dtype)
        expr = lowerings.cast(expr, val.dtype, dtype)
        return self.put(expr, dtype, level)

    def bounded(self, node: fx.Node, index: Index, bound: str) -> _Value:
        """`node` at `index`, needed only where `bound` holds: every load it makes is masked by
        the bound, so an index out of the input's range is never read."""
        outer = self.bound
        self.bound = bound if outer is None else f"{outer} & {bound}"
        try:
            return self.value(node, index)
        finally:
            self.bound = outer

    def _within(self, position: sympy.Expr, low: sympy.Expr, size: sympy.Expr) -> str:
        """Triton source of low <= position < low + size."""
        where = self.index_str(position)
        return f"(({where} >= {self.index_str(low)}) & ({where} < {self.index_str(low + size)}))"

    def padded(self, node: fx.Node, index: Index) -> _Value:
        """constant_pad_nd: the input where `index` falls inside it, the fill value elsewhere."""
        source, pads = node.args[0], node.args[1]
        fill = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        if any(p < 0 for p in pads):
            raise CannotGenerate("negative padding (a crop)", node)
        shape = shape_of(source)
        inner, bounds = list(index), []
        for i, (low, high) in enumerate(zip(pads[::2], pads[1::2])):
            d = len(shape) - 1 - i
            if low or high:
                inner[d] = index[d] - low
                bounds.append(self._within(index[d], sympy.Integer(low), shape[d]))
        if not bounds:
            return self.value(source, index)
        bound = " & ".join(bounds)
        inside = self.bounded(source, tuple(inner), bound)
        dtype = lowerings.compute_dtype(node.meta["val"].dtype)
        return self.put(f"tl.where({bound}, {_in_dtype(inside, dtype)}, {lowerings.literal(fill)})", dtype, 1)

    def slice_scattered(self, node: fx.Node, index: Index) -> _Value:
        """slice_scatter (step 1): `src` inside the slice, the input elsewhere."""
        base, src, dim, start, _, step = _normalized_args(node)
        start = 0 if start is None else start
        if step != 1 or not isinstance(start, int) or start < 0:
            raise CannotGenerate("slice_scatter with a step, or a negative or symbolic start", node)
        dim %= len(index)
        bound = self._within(index[dim], sympy.Integer(start), shape_of(src)[dim])
        inside = self.bounded(src, index[:dim] + (index[dim] - start,) + index[dim + 1 :], bound)
        outside = self.value(base, index)
        dtype = lowerings.compute_dtype(node.meta["val"].dtype)
        return self.put(f"tl.where({bound}, {_in_dtype(inside, dtype)}, {_in_dtype(outside, dtype)})", dtype, 1)

    def concatenated(self, node: fx.Node, index: Index) -> _Value:
        """cat: the element of the input whose slice along `dim` holds `index`."""
        tensors = [t for t in node.args[0] if not same(product(shape_of(t)), sympy.Integer(0))]
        rank = len(shape_of(node))
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % rank
        dtype = lowerings.compute_dtype(node.meta["val"].dtype)
        pieces, low = [], sympy.Integer(0)
        for tensor in tensors:
            size = shape_of(tensor)[dim]
            bound = self._within(index[dim], low, size)
            inner = index[:dim] + (index[dim] - low,) + index[dim + 1 :]
            value = self.bounded(tensor, inner, bound)
            pieces.append((bound, _in_dtype(value, dtype)))
            low = low + size
        result = pieces[-1][1]
        for bound, expr in reversed(pieces[:-1]):
            result = f"tl.where({bound}, {expr}, {result})"
        return self.put(result, dtype, 1)

    def operand(self, arg: Any, node: fx.Node, index: Index) -> _Value:
        if isinstance(arg, fx.Node) and not is_scalar_node(arg):
            return self.value(arg, broadcast_index(index, shape_of(node), shape_of(arg)))
        return self.value(arg, ())

    def pointwise(self, node: fx.Node, index: Index) -> _Value:
        lowering = lowerings.POINTWISE[node.target]
        out_dtype = lowerings.compute_dtype(node.meta["val"].dtype)
        if not out_dtype.is_floating_point:
            lowering = lowerings.INTEGER_POINTWISE.get(node.target, lowering)
        args = _normalized_args(node)[: _positional_count(lowering.emit)]
        operands = [self.operand(a, node, index) if a is not None else None for a in args]
        promoted_lowp = None
        if lowering.operands == "promoted":
            target = _promoted(
                tuple(
                    (a.meta["val"].dtype if isinstance(a, fx.Node) else v.dtype) if v.dtype is not None else type(a)
                    for v, a in zip(operands, args)
                    if v is not None and (v.dtype is not None or isinstance(a, (int, float, bool)))
                )
            )
            promoted_lowp = target if target in (torch.float16, torch.bfloat16) else None
            target = lowerings.compute_dtype(target)
        elif lowering.operands == "bool":
            target = torch.bool
        else:
            target = out_dtype
        exprs = []
        for pos, (v, a) in enumerate(zip(operands, args)):
            if v is None:
                exprs.append(None)
            elif v.dtype is None and promoted_lowp is not None and isinstance(a, float):
                # a comparison in fp16/bf16 compares with the scalar rounded to that dtype, as eager does
                exprs.append(lowerings.literal(torch.tensor(a, dtype=promoted_lowp).item()))
            elif v.dtype is None:
                exprs.append(v.expr)
            elif lowering.operands == "as_is":  # where(cond, a, b)
                exprs.append(lowerings.cast(v.expr, v.dtype, torch.bool if pos == 0 else out_dtype))
            else:
                expr = v.expr
                stored = a.meta["val"].dtype if isinstance(a, fx.Node) else None
                if lowering.exact and stored in (torch.float16, torch.bfloat16) and v.dtype == torch.float32:
                    expr = lowerings.cast(lowerings.cast(expr, v.dtype, stored), stored, v.dtype)  # eager's rounding
                exprs.append(lowerings.cast(expr, v.dtype, target))
        level = max((v.level for v in operands if v is not None), default=0)
        try:
            expr = lowering.emit(*exprs)
        except lowerings.NoExactLowering as e:
            raise CannotGenerate(f"no Triton lowering for {e}", node) from None
        return self.put(expr, out_dtype, level)

    def cast(self, node: fx.Node, index: Index) -> _Value:
        target = node.meta["val"].dtype
        source = node.args[0]
        if node.target == aten._to_copy.default:
            device = node.kwargs.get("device")
            if device is not None and torch.device(device) != source.meta["val"].device:
                raise CannotGenerate("copy to another device", node)
        v = self.operand(source, node, index)
        compute = lowerings.compute_dtype(target)
        if v.dtype is None:
            return self.put(v.expr, None, v.level)
        expr = lowerings.cast(v.expr, v.dtype, target)
        if target != compute:  # round to fp16/bf16 as the graph asks, keep computing in fp32
            expr = lowerings.cast(expr, target, compute)
        return self.put(expr, compute, v.level)

    def constant(self, node: fx.Node, index: Index) -> _Value:
        dtype = node.meta["val"].dtype
        compute = lowerings.compute_dtype(dtype)
        if node.target in lowerings.RANGES:
            start, step = lowerings.range_start_step(node.target, node.args, node.kwargs)
            if not all(isinstance(v, int) for v in (start, step)):
                raise CannotGenerate("a range with non-integer or symbolic start/step", node)
            expr = sympy.Integer(start) + index[0] * sympy.Integer(step)
            level = 2 if RINDEX in expr.free_symbols else 1 if XINDEX in expr.free_symbols else 0
            if level == 0:
                return _Value(lowerings.literal(int(expr)), None, 0)
            index_dtype = torch.int64 if self.index64 else torch.int32
            return self.put(lowerings.cast(f"({self.index_str(expr)})", index_dtype, compute), compute, level)
        value = lowerings.constant_value(node.target, node.args, node.kwargs)
        if isinstance(value, fx.Node):
            return self.value(value, ())
        if dtype == torch.bool:
            value = bool(value)
        elif dtype.is_floating_point:
            value = float(value)
        else:
            value = int(value)
        return _Value(lowerings.literal(value), None, 0)

    def reduction_value(self, node: fx.Node, index: Index) -> _Value:
        domain = self.spec.domain
        _, keepdim = _reduction_domain(node)
        if index != domain.row_index(keepdim):
            raise CannotGenerate("reduction result read at another row than its own", node)
        if node not in self.reduced:
            raise CannotGenerate("reduction read before it is computed", node)
        return self.reduced[node]

    def accumulate(self, node: fx.Node) -> str:
        """Emit the per-element part of a reduction; returns its accumulator (looped) or masked block."""
        spec = lowerings.REDUCTIONS[node.target]
        dtype = lowerings.compute_dtype(node.meta["val"].dtype)
        v = self.value(node.args[0], self.spec.domain.full_index())
        block = self.widen(v, 2, dtype)
        neutral = _neutral(spec, dtype)
        if self.persistent:
            return self.put(f"tl.where(xrmask, {block}, {neutral})", dtype, 2).expr
        acc = self.fresh()
        tl_dtype = lowerings.TRITON_DTYPES[dtype]
        self.row_block.append(f"{acc} = tl.full([XBLOCK, RBLOCK], {neutral}, {tl_dtype})")
        nan = ", tl.PropagateNan.ALL" if dtype.is_floating_point else ""  # torch's max/min keep NaN
        combined = {
            "tl.sum": f"{acc} + {block}",
            "tl.max": f"tl.maximum({acc}, {block}{nan})",
            "tl.min": f"tl.minimum({acc}, {block}{nan})",
        }[spec.combine]
        self.elem_block.append(f"{acc} = tl.where(xrmask, {combined}, {acc})")
        return acc

    def finish_reduction(self, node: fx.Node, acc: str) -> _Value:
        spec = lowerings.REDUCTIONS[node.target]
        dtype = lowerings.compute_dtype(node.meta["val"].dtype)
        expr = f"{spec.combine}({acc}, 1)[:, None]"
        if spec.combine != "tl.sum" and dtype.is_floating_point:
            # tl.max/tl.min drop NaN; torch's amax/amin return NaN for a row that has one
            expr = f'tl.where(tl.sum(({acc} != {acc}).to(tl.int32), 1)[:, None] > 0, float("nan"), {expr})'
        if spec.mean:
            expr = f"({expr} / rnumel)"
        self.reduced[node] = result = self.put(expr, dtype, 1)
        return result

    # ------------------------------------------------------------ structure
    def store(self, position: int, out: fx.Node, level: int) -> None:
        domain = self.spec.domain
        if level == 2 or not self.reduction:
            index = reshape_index(domain.full_index(), domain.shape, shape_of(out))
        else:
            keepdim = self.spec.keepdims[position]
            index = reshape_index(domain.row_index(keepdim), domain.row_shape(keepdim), shape_of(out))
        v = self.value(out, index)
        val = out.meta["val"]
        off = simplify_index(offset(index, strides_of(out), shape_of(out)))
        off_str = self.index_str(off)
        if XINDEX not in off.free_symbols:
            off_str += " + 0 * xindex"
        if level == 2 and RINDEX not in off.free_symbols:
            off_str += " + 0 * rindex"
        block = self.widen(v, level, lowerings.compute_dtype(val.dtype))
        block = lowerings.cast(block, lowerings.compute_dtype(val.dtype), val.dtype)
        target = self.elem_block if level == 2 else self.row_block
        target.append(f"tl.store(out_ptr{position} + {off_str}, {block}, {self.mask(level)})")

    def flush(self, lines: list[str], indent: int) -> None:
        self.body.extend("    " * indent + line for line in lines)
        lines.clear()

    def emit(self) -> RenderedKernel:
        spec = self.spec
        if not self.reduction:
            self.row_block = self.elem_block = []
            for position, out in enumerate(spec.outputs):
                self.store(position, out, 1)
            self.flush(self.row_block, 1)
            return RenderedKernel(self.source(), self.symbols, False)
        depth = _reduction_depths(spec.nodes, self.members)
        real = [n for n in spec.nodes if node_kind(n) == "reduction" and not _is_trivial_reduction(n)]
        phases = sorted({depth[n] for n in real})
        full_outputs = [(p, o) for p, o in enumerate(spec.outputs) if spec.roles[p] == "full"]
        last = max(phases) + 1
        for phase in [*phases, last]:
            reductions = [n for n in real if depth[n] == phase]
            stores = [(p, o) for p, o in full_outputs if _store_phase(depth[o], phases, last) == phase]
            if not reductions and not stores:
                continue
            if not self.persistent:
                self.elem_block = []
                self.elem_cache = {}
            else:
                self.elem_block = self.row_block
            accs = [(r, self.accumulate(r)) for r in reductions]
            for position, out in stores:
                self.store(position, out, 2)
            if not self.persistent:
                self.flush(self.row_block, 1)
                self.body.append("    for roffset in range(0, rnumel, RBLOCK):")
                self.body.append("        rindex = roffset + rbase")
                self.body.append("        rmask = rindex < rnumel")
                self.body.append("        xrmask = xmask & rmask")
                self.flush(self.elem_block, 2)
            for r, acc in accs:
                self.finish_reduction(r, acc)
        for position, out in enumerate(spec.outputs):
            if spec.roles[position] == "row":
                self.store(position, out, 1)
        self.flush(self.row_block, 1)
        return RenderedKernel(self.source(), self.symbols, self.unit_strides[RINDEX] >= self.unit_strides[XINDEX])

    def source(self) -> str:
        spec = self.spec
        params = [*self.input_names.values(), *(f"out_ptr{i}" for i in range(len(spec.outputs)))]
        params += list(self.scalar_names.values())
        params += [str(s) for s in spec.symbols or sorted(self.symbols, key=str)]
        params += ["xnumel", "rnumel", "XBLOCK: tl.constexpr"]
        if self.reduction:
            params.append("RBLOCK: tl.constexpr")
        pid = "tl.program_id(0).to(tl.int64)" if self.index64 else "tl.program_id(0)"
        head = [f"    xoffset = {pid} * XBLOCK"]
        if self.reduction:
            head.append("    xindex = xoffset + tl.arange(0, XBLOCK)[:, None]")
            head.append("    xmask = xindex < xnumel")
            rbase = "tl.arange(0, RBLOCK)[None, :]" + (".to(tl.int64)" if self.index64 else "")
            head.append(f"    rbase = {rbase}")
            if self.persistent:
                head += ["    rindex = rbase", "    rmask = rindex < rnumel", "    xrmask = xmask & rmask"]
        else:
            head.append("    xindex = xoffset + tl.arange(0, XBLOCK)")
            head.append("    xmask = xindex < xnumel")
        lines = [
            "import triton",
            "import triton.language as tl",
            _LIBDEVICE_IMPORT[compiler.interpreting()],
            "",
            "",
            "@triton.jit",
            f"def {spec.kernel_name}({', '.join(params)}):",
            *head,
            *self.body,
            "",
        ]
        return "\n".join(lines)


def _store_phase(depth: int, phases: list[int], last: int) -> int:
    """The first loop at or after `depth` (full outputs are stored in a loop that exists anyway)."""
    return next((p for p in phases if p >= depth), last)


def _neutral(spec: lowerings.Reduction, dtype: torch.dtype) -> str:
    if spec.combine == "tl.sum" or dtype.is_floating_point:
        return spec.neutral
    info = torch.iinfo(dtype) if dtype != torch.bool else None
    if info is None:
        return "0" if spec.combine == "tl.max" else "1"
    return str(info.min if spec.combine == "tl.max" else info.max)


def _reduction_depths(nodes: Sequence[fx.Node], members: set[fx.Node]) -> dict[fx.Node, int]:
    """For each node, how many reductions of the group lie on its longest path from the inputs."""
    depth: dict[fx.Node, int] = {}
    for node in nodes:
        d = 0
        for arg in node.all_input_nodes:
            if arg in members:
                d = max(d, depth[arg] + (1 if node_kind(arg) == "reduction" and not _is_trivial_reduction(arg) else 0))
        depth[node] = d
    return depth


def render(spec: KernelSpec, persistent: bool, index64: bool) -> str:
    """The Triton source of one variant of `spec`'s kernel."""
    return _Emitter(spec, persistent, index64).emit().source
