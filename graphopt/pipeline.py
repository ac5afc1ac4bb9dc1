"""The ordered pass list and the pass manager.

A pass is a pure function `run(gm, ctx) -> (gm, PassReport)`. The manager hands
each pass its own copy of the graph, so the graph before the pass stays intact
for the record, the CLI's diffs and the eager fallback. It times every pass and
keeps its report; with `debug_dir` set the records are written out as files.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import fx
from torch.fx._lazy_graph_module import _LazyGraphModule

from graphopt.options import Options

if TYPE_CHECKING:
    from graphopt.cache import TuningCache

GraphKind = Literal["forward", "backward", "inference", "joint"]  # joint: what the partitioner (remat) sees


@dataclasses.dataclass(frozen=True)
class PassReport:
    """What a pass decided and why. Passes subclass it with their own fields."""

    def summary(self) -> str:
        """One line for logs and the CLI; subclasses override with something sharper."""
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (list, tuple, dict, set)):
                value = len(value)
            parts.append(f"{f.name}={value}")
        return ", ".join(parts)


@dataclasses.dataclass
class PassContext:
    """Everything a pass may read: nothing else is global."""

    options: Options
    graph_name: str
    kind: GraphKind
    example_inputs: Sequence[Any]
    device: torch.device = torch.device("cpu")
    cache: TuningCache | None = None  # the tuning cache, bound to this graph; None: caching off
    # How many leading outputs go to the caller as they are (a forward graph's others are saved
    # for the backward graph, which was traced for their layouts); 0: none, or not known.
    user_outputs: int = 0


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """One pass's run: its name, the graph code before and after, time and report."""

    name: str
    before: fx.GraphModule
    after: fx.GraphModule
    seconds: float
    report: PassReport


GraphPass = Callable[[fx.GraphModule, PassContext], tuple[fx.GraphModule, PassReport]]


def graph_passes(options: Options) -> list[tuple[str, GraphPass]]:
    """The passes run on every forward, backward and inference graph, in order."""
    from graphopt.passes import (
        batch_casts,
        batch_write_backs,
        buffer_reuse,
        cleanup,
        conv_layout,
        fusion,
        pad_matmul,
        planned_views,
    )

    passes: list[tuple[str, GraphPass]] = [("cleanup", cleanup.run)]
    if options.channels_last:
        passes.append(("conv_layout", conv_layout.run))
    if options.pad_matmuls:
        passes.append(("pad_matmul", pad_matmul.run))
    if options.fusion:
        passes.append(("fusion", fusion.run))
    if options.fusion and options.batch_casts:
        passes.append(("batch_casts", batch_casts.run))
    if options.planned_views:
        passes.append(("planned_views", planned_views.run))
    if options.fusion and options.reuse_buffers:
        passes.append(("buffer_reuse", buffer_reuse.run))
    if options.batch_write_backs:
        passes.append(("batch_write_backs", batch_write_backs.run))
    return passes


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copied graph (node meta copied shallowly, submodules shared).

    Lazy: its Python code is generated when first read or run, not on every copy and
    `recompile()`, since most copies (a pass's input, the records) are never run."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, val_map={})
    graph.output(out)
    graph._codegen = gm.graph._codegen
    return _LazyGraphModule(gm, graph, gm.__class__.__name__)


PassSelector = Callable[[Sequence[tuple[str, GraphPass]], PassContext], Sequence[tuple[str, GraphPass]]]

# `graphopt bisect`'s lever, for the CLI and tests only: deliberately not an option, so it
# never reaches users or the tuning-cache key. Set through `selecting_passes`.
_pass_selector: contextvars.ContextVar[PassSelector | None] = contextvars.ContextVar("graphopt_pass_selector", default=None)


@contextlib.contextmanager
def selecting_passes(select: PassSelector) -> Iterator[None]:
    """Inside the block, every pipeline runs `select(passes, ctx)` instead of `passes`."""
    token = _pass_selector.set(select)
    try:
        yield
    finally:
        _pass_selector.reset(token)


def passes_selected() -> bool:
    """Whether `selecting_passes` is in effect (a compile loaded from a cache ran every pass)."""
    return _pass_selector.get() is not None


@dataclasses.dataclass
class PipelineResult:
    gm: fx.GraphModule
    records: list[PassRecord]


def run_pipeline(
    gm: fx.GraphModule, ctx: PassContext, passes: Sequence[tuple[str, GraphPass]] | None = None
) -> PipelineResult:
    """Run `passes` (default: graph_passes(ctx.options)) in order, recording each one."""
    if passes is None:
        passes = graph_passes(ctx.options)
    select = _pass_selector.get()
    if select is not None:
        passes = select(passes, ctx)
    records: list[PassRecord] = []
    current = gm
    for name, graph_pass in passes:
        start = time.perf_counter()
        after, report = graph_pass(copy_graph_module(current), ctx)
        after.graph.lint()
        after.recompile()
        records.append(PassRecord(name, current, after, time.perf_counter() - start, report))
        current = after
    _LazyGraphModule.force_recompile(current)  # the graph that runs: its code now, not on the first call
    if ctx.options.debug_dir:
        from graphopt.debug_dump import write_graph_records

        write_graph_records(ctx.options.debug_dir, ctx.graph_name, gm, records)
    from graphopt.structured_trace import trace_graph_records

    trace_graph_records(ctx.graph_name, gm, records)
    return PipelineResult(current, records)


def readable(gm: fx.GraphModule) -> str:
    """The graph as Python with shapes/dtypes in comments (what the dumps and diffs show)."""
    try:
        return gm.print_readable(print_output=False, include_stride=True, include_device=True)
    except Exception:  # print_readable needs meta['val']; hand-built graphs may lack it
        return gm.code


def node_op_name(node: fx.Node) -> str:
    """A short, stable name for what a node computes (aten.mm.default, a kernel's name, ...)."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    return getattr(target, "__name__", str(target))
