"""Activation rematerialization under a memory budget: graphopt's AOTAutograd partition_fn.

AOTAutograd hands the partitioner one joint forward+backward graph; it returns a
forward graph (which also outputs the values saved for the backward) and a
backward graph (which recomputes whatever was not saved). Which values to save
is the decision made here.

- `memory_budget=None`: torch's min-cut partition, unchanged (runtime-optimal,
  what inductor does by default); its choice is cached (`passes/min_cut.py`).
- A budget: the CP-SAT model of `remat_solver` picks, for every forward value
  the backward needs, save / recompute / store compressed (`remat_compress`),
  so that the activation memory held during the backward (`remat_graph.
  activation_peak`, replayed over the backward's order) fits, at the least
  roofline-estimated extra time. Matmuls and convolutions may be recomputed;
  random ops and ops with effects never are. The search is seeded with the best
  of: the min-cut plan, save-everything, a greedy frontier and segment
  checkpointing; it stops after `remat_time_limit_s` with its best plan (the
  best seed if it found none).
- A budget no plan reaches (proved, or none found in time): the plan of
  smallest peak found, with a RematWarning saying which budget was reachable.
  (Deliberately not min-cut: a user who asks for less memory than is reachable
  wants the least memory, and min-cut's plan is among the seeds anyway.)
- If planning itself fails: min-cut, with graphopt's one fallback warning.

The chosen plan is stored in the tuning cache (namespace "remat", keyed by the
joint graph's structure, shapes and options), so a warm cache skips the solve.
Extraction of the forward/backward modules from the saved set is torch's own
(`_extract_fwd_bwd_modules`, `reordering_to_mimic_autograd_engine`).

The report reaches the CLI as the first pass record of the forward graph (joint
graph in, forward graph out): `Partitioner.take_records`, which the backend's
forward compiler prepends to the pipeline's records.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch._functorch import config as functorch_config
from torch._functorch.compile_utils import fx_graph_cse
from torch._functorch.partitioners import (
    _extract_fwd_bwd_modules,
    min_cut_rematerialization_partition,
    reordering_to_mimic_autograd_engine,
)
from torch.fx.experimental.proxy_tensor import is_sym_node
from torch.utils._ordered_set import OrderedSet
from torch.utils._pytree import tree_leaves

from graphopt.cost_model.roofline import device_spec
from graphopt.fallback import warn_fallback
from graphopt.options import Options
from graphopt.passes import conv_layout, min_cut
from graphopt.passes.remat_compress import compress_saved_values
from graphopt.passes.remat_graph import (
    JointAnalysis,
    Plan,
    activation_peak,
    analyze_joint,
    checkpoint_plans,
    greedy_plans,
    is_backward_input,
    needed_nodes,
    plan_saving,
    recompute_seconds,
    save_everything_plan,
    saved_nodes,
)
from graphopt.passes.remat_solver import plan_within
from graphopt.pipeline import PassContext, PassRecord, PassReport, copy_graph_module

CACHE_NAMESPACE = "remat"
_GREEDY_STEPS = 64  # seed plans along the greedy frontier (each costs one replay of the backward)
_CHECKPOINT_SEGMENTS = (2, 3, 4, 6, 8, 12, 16, 24, 32)  # segment-checkpointing seeds for small budgets


class RematWarning(UserWarning):
    """The memory budget could not be met as asked; the message says what was done instead."""


@dataclasses.dataclass(frozen=True)
class RematReport(PassReport):
    budget: str  # the option as given
    source: str  # how the plan was made: min-cut, cp-sat, smallest reachable peak, tuning cache, ...
    saved: list[str]
    recomputed: list[str]
    compressed: list[str]
    predicted_peak_bytes: int  # activation memory held during the backward under this plan
    save_everything_peak_bytes: int  # the same with every needed value saved (what a fraction refers to)
    predicted_extra_ms: float  # roofline time of recomputation and compression
    solver_status: str
    solve_seconds: float

    def summary(self) -> str:
        ratio = self.predicted_peak_bytes / max(self.save_everything_peak_bytes, 1)
        return (
            f"budget {self.budget}: {self.source}, {self.solver_status} in {self.solve_seconds:.2f}s; "
            f"saved {len(self.saved)}, recomputed {len(self.recomputed)}, compressed {len(self.compressed)}; "
            f"peak {self.predicted_peak_bytes / 2**20:.1f} MiB ({ratio:.2f} of save-everything), "
            f"+{self.predicted_extra_ms:.3f} ms"
        )


@dataclasses.dataclass(frozen=True)
class _Decision:
    plan: Plan | None  # None: use min-cut's partition (no budget)
    source: str
    status: str
    seconds: float


def _capacity_bytes(budget: float | int, save_everything: int) -> int:
    """A fraction refers to the save-everything peak; an int is already bytes."""
    if isinstance(budget, float):
        return int(budget * save_everything)
    return budget


def _cached_decision(analysis: JointAnalysis) -> Callable[[Any], _Decision]:
    """Reads a stored plan back; KeyError if it names a value that is no candidate of this graph."""
    by_name = {n.name: n for n in analysis.candidates}

    def decode(value: Any) -> _Decision:
        recomputed, compressed = (frozenset(by_name[n] for n in value[field]) for field in ("recomputed", "compressed"))
        plan = Plan(recomputed, compressed)
        return _Decision(plan, "tuning cache", str(value["status"]), 0.0)

    return decode


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.3f} MiB"


def _solve(
    analysis: JointAnalysis, capacity: int, min_cut_plan: Callable[[], Plan], save_everything: int, ctx: PassContext
) -> _Decision:
    """The fastest plan within `capacity`, else the one closest to it (with a warning)."""
    options = ctx.options
    hints = [
        min_cut_plan(),
        save_everything_plan(analysis),
        *greedy_plans(analysis, _GREEDY_STEPS),
        *checkpoint_plans(analysis, _CHECKPOINT_SEGMENTS),
    ]
    result = plan_within(
        analysis, capacity, hints, compress=options.remat_compress, time_limit_s=options.remat_time_limit_s
    )
    reached = activation_peak(analysis, result.plan)
    if reached <= capacity:
        return _Decision(result.plan, "cp-sat", result.status, result.seconds)
    warnings.warn(
        f"graphopt: remat of {ctx.graph_name}: memory_budget={options.memory_budget!r} "
        f"({_mib(capacity)} of activations) is not reachable; the smallest found is {_mib(reached)}, "
        f"memory_budget={reached / max(save_everything, 1):.3f} of save-everything ({_mib(save_everything)}); "
        "using that plan",
        RematWarning,
        stacklevel=2,
    )
    return _Decision(result.plan, "smallest reachable peak", result.status, result.seconds)


def _decide(
    analysis: JointAnalysis, capacity: int, hint: Callable[[], Plan], save_everything: int, ctx: PassContext
) -> _Decision:
    cache = ctx.cache
    key = cache.graph_key if cache is not None else None
    if cache is not None and key is not None:
        stored = cache.get(CACHE_NAMESPACE, key, _cached_decision(analysis))
        if stored is not None:
            return stored
    decision = _solve(analysis, capacity, hint, save_everything, ctx)
    if cache is not None and key is not None and decision.plan is not None:
        cache.put(
            CACHE_NAMESPACE,
            key,
            {
                "recomputed": sorted(n.name for n in decision.plan.recomputed),
                "compressed": sorted(n.name for n in decision.plan.compressed),
                "status": decision.status,
                "solve_seconds": decision.seconds,
            },
        )
    return decision


def _extract(
    joint: fx.GraphModule, analysis: JointAnalysis, plan: Plan, num_fwd_outputs: int, static_inputs: OrderedSet
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward/backward modules of `plan`, by torch's extraction from the saved set."""
    saved = saved_nodes(analysis, plan)
    needed = set(needed_nodes(analysis, plan))
    compressed = [n for n in saved if n in plan.compressed and n in needed]
    if compressed:
        backward_only = analysis.backward | {n for n, c in analysis.candidates.items() if not c.in_forward}
        saved = [n for n in saved if n not in plan.compressed] + compress_saved_values(joint, compressed, backward_only)
    saved_syms = [n for n in saved if is_sym_node(n)]
    saved_values = [n for n in saved if not is_sym_node(n)]
    fw, bw = _extract_fwd_bwd_modules(
        joint, saved_values, saved_syms, num_fwd_outputs=num_fwd_outputs, static_lifetime_input_nodes=static_inputs
    )
    return fw, reordering_to_mimic_autograd_engine(bw)


def _report(
    analysis: JointAnalysis, plan: Plan, decision: _Decision, budget: Any, save_everything: int
) -> RematReport:
    needed = set(needed_nodes(analysis, plan))
    return RematReport(
        budget=repr(budget),
        source=decision.source,
        saved=[n.name for n in saved_nodes(analysis, plan) if n not in plan.compressed],
        recomputed=[n.name for n in analysis.candidates if n in plan.recomputed and n in needed],
        compressed=[n.name for n in analysis.candidates if n in plan.compressed and n in needed],
        predicted_peak_bytes=activation_peak(analysis, plan),
        save_everything_peak_bytes=save_everything,
        predicted_extra_ms=recompute_seconds(analysis, plan) * 1e3,
        solver_status=decision.status,
        solve_seconds=decision.seconds,
    )


def run(
    joint: fx.GraphModule,
    ctx: PassContext,
    *,
    num_fwd_outputs: int,
    static_lifetime_input_indices: Sequence[int] = (),
) -> tuple[fx.GraphModule, fx.GraphModule, RematReport]:
    """Split `joint` into forward and backward under `ctx.options.memory_budget` (see module doc).

    `joint` itself is not modified."""
    joint = copy_graph_module(joint)
    joint.graph.eliminate_dead_code()
    if functorch_config.cse:  # as min-cut would (it runs with cse off below, on this same graph)
        joint.graph = fx_graph_cse(joint.graph)
    joint.recompile()
    primals = [n for n in joint.graph.find_nodes(op="placeholder") if not is_backward_input(n)]
    static_inputs = OrderedSet(primals[i] for i in static_lifetime_input_indices if i < len(primals))
    analysis = analyze_joint(
        joint, device_spec(ctx.device), static_inputs, num_fwd_outputs, fused=ctx.options.fusion
    )
    save_everything = activation_peak(analysis, save_everything_plan(analysis))

    def min_cut_plan() -> Plan:  # a seed needs only min-cut's saved set, not its forward and backward
        saved = min_cut.saved_names(joint, num_fwd_outputs, static_lifetime_input_indices, ctx.cache)
        return plan_saving(analysis, saved)

    budget = ctx.options.memory_budget
    if budget is None or not analysis.candidates:
        decision = _Decision(None, "min-cut", "not solved", 0.0)
    else:
        capacity = _capacity_bytes(budget, save_everything)
        decision = _decide(analysis, capacity, min_cut_plan, save_everything, ctx)
    if decision.plan is None:
        fw, bw = min_cut.partition(joint, num_fwd_outputs, static_lifetime_input_indices, ctx.cache)
        plan = plan_saving(analysis, [n.name for n in bw.graph.find_nodes(op="placeholder")])  # what bw reads
        return fw, bw, _report(analysis, plan, decision, budget, save_everything)
    fw, bw = _extract(joint, analysis, decision.plan, num_fwd_outputs, static_inputs)
    return fw, bw, _report(analysis, decision.plan, decision, budget, save_everything)


def _device_of(values: Sequence[Any]) -> torch.device:
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


class Partitioner:
    """The partition_fn AOTAutograd calls: conv_layout (option channels_last), then `run`, on the joint graph.

    Their pass records (joint graph in, forward graph out) wait in `take_records` for
    the backend, which reports them as the first passes of the forward graph, so the
    CLI shows them with the forward; cache lookups carry the forward graph's name.
    `num_fwd_outputs` (the forward's outputs the user gets, before the saved values) waits
    for the forward's compile too."""

    def __init__(self, options: Options, graph_name: Callable[[], str]):
        self.options = options
        self.graph_name = graph_name
        self._records: list[PassRecord] = []
        self.num_fwd_outputs = 0

    def take_records(self) -> list[PassRecord]:
        records, self._records = self._records, []
        return records

    def __call__(
        self,
        joint_module: fx.GraphModule,
        joint_inputs: Any,
        *,
        num_fwd_outputs: int,
        static_lifetime_input_indices: Sequence[int] | None = None,
        **_ignored: Any,
    ) -> tuple[fx.GraphModule, fx.GraphModule]:
        from graphopt.cache import open_graph_cache

        name = self.graph_name()
        self.num_fwd_outputs = num_fwd_outputs
        inputs = [v for v in tree_leaves(joint_inputs) if isinstance(v, (torch.Tensor, torch.SymInt, int))]
        device = _device_of(inputs)
        ctx = PassContext(
            options=self.options,
            graph_name=name,
            kind="joint",
            example_inputs=inputs,
            device=device,
            cache=open_graph_cache(joint_module, inputs, self.options, device, name),
        )
        try:
            records = []
            joint = joint_module
            if self.options.channels_last:  # layouts first, so the forward and the backward agree on them
                start = time.perf_counter()
                joint, layout_report = conv_layout.run(joint_module, ctx)  # works on a copy
                seconds = time.perf_counter() - start
                records.append(PassRecord("conv_layout", joint_module, joint, seconds, layout_report))
            start = time.perf_counter()
            fw, bw, report = run(
                joint,
                ctx,
                num_fwd_outputs=num_fwd_outputs,
                static_lifetime_input_indices=static_lifetime_input_indices or (),
            )
        except Exception as e:  # graphopt's own failure must not stop a model torch can partition
            warn_fallback("remat partition", f"{type(e).__name__}: {e}".splitlines()[0][:300] + "; using min-cut")
            self._records = []
            return min_cut_rematerialization_partition(
                joint_module,
                joint_inputs,
                num_fwd_outputs=num_fwd_outputs,
                static_lifetime_input_indices=static_lifetime_input_indices,
            )
        self._records = [*records, PassRecord("remat", joint, fw, time.perf_counter() - start, report)]
        return fw, bw
