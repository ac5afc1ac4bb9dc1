"""The rematerialization plan as a CP-SAT model.

Per candidate: booleans save / recompute / compress (exactly one if the backward
needs it), and integer first/last backward positions at which it must exist. A
recomputed node's inputs are needed too (the closure constraint), at least at the
position where it is recomputed. Memory is a cumulative resource over the backward's
positions: a saved value occupies [0, last], a recomputed or decompressed one
[first, last], a compressed copy [0, first] at its smaller size; the cumulative
capacity is the budget, so the constraint is the peak over the backward's order,
not the sum of saved bytes. The objective is the roofline time of what is
recomputed plus the compress/decompress passes.

This is Moccasin's idea (retention intervals in CP-SAT) on AOTAutograd's joint
graph, with one interval per candidate and mode instead of per time step.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

from ortools.sat.python import cp_model
from torch import fx

from graphopt.passes.remat_graph import (
    JointAnalysis,
    Plan,
    activation_peak,
    lifetimes,
    needed_nodes,
    recompute_seconds,
)

# Memory is counted in units of this fraction of all candidates' bytes, rounded up per value:
# fine enough that rounding never matters, coarse enough to keep coefficients (and the
# overflow penalty times the time scale) well inside int64.
_MEMORY_RESOLUTION = 1e-7
_UNITS_PER_SECOND = 1e8  # time in 10 ns units
_SOLVER_WORKERS = 8  # CP-SAT's portfolio (LNS among them) needs several workers even on few cores


@dataclasses.dataclass(frozen=True)
class SolveResult:
    plan: Plan
    status: str  # CP-SAT's status name (and whether the plan is the best seed instead)
    seconds: float


class _Model:
    """The CP-SAT variables and constraints of one joint graph."""

    def __init__(self, analysis: JointAnalysis, *, compress: bool):
        self.analysis = analysis
        m = self.model = cp_model.CpModel()
        total = sum(c.bytes for c in analysis.candidates.values())
        self.unit = max(1, int(total * _MEMORY_RESOLUTION))
        last_position = analysis.backward_length - 1
        self.save: dict[fx.Node, cp_model.IntVar] = {}
        self.recompute: dict[fx.Node, cp_model.IntVar] = {}
        self.compress: dict[fx.Node, cp_model.IntVar] = {}
        self.need: dict[fx.Node, cp_model.IntVar] = {}
        self.first: dict[fx.Node, cp_model.IntVar] = {}
        self.last: dict[fx.Node, cp_model.IntVar] = {}
        for node, cand in analysis.candidates.items():
            i = len(self.save)
            self.save[node] = m.new_bool_var(f"s{i}")
            self.recompute[node] = m.new_bool_var(f"r{i}")
            self.compress[node] = m.new_bool_var(f"c{i}")
            self.need[node] = m.new_bool_var(f"n{i}")
            self.first[node] = m.new_int_var(0, last_position, f"f{i}")
            self.last[node] = m.new_int_var(0, last_position, f"l{i}")
            if not cand.may_save:
                m.add(self.save[node] == 0)
            if not cand.may_recompute:
                m.add(self.recompute[node] == 0)
            if not (compress and cand.compress_to is not None and cand.may_save and cand.bytes > 0):
                m.add(self.compress[node] == 0)
            m.add(self.save[node] + self.recompute[node] + self.compress[node] == self.need[node])
            m.add(self.first[node] <= self.last[node])

        # first = the earliest read: a direct one, or a recomputed user's recomputation (exact, not
        # just a bound: a zero-byte user must not be able to pull its inputs' lifetimes short).
        self.read_at: dict[tuple[fx.Node, fx.Node], cp_model.IntVar] = {}
        for node, cand in analysis.candidates.items():
            users = analysis.users[node]
            reads = []
            for u in (u for u in users if analysis.candidates[u].may_recompute):
                # closure: a recomputed user needs this value when it is recomputed
                at = self.read_at[node, u] = m.new_int_var(0, last_position, f"at{len(self.read_at)}")
                m.add(at == self.first[u]).only_enforce_if(self.recompute[u])
                m.add(at == last_position).only_enforce_if(self.recompute[u].negated())
                m.add(self.last[node] >= self.first[u]).only_enforce_if(self.recompute[u])
                reads.append(at)
            if cand.direct_uses:
                m.add(self.need[node] == 1)
                m.add(self.last[node] >= cand.direct_uses[-1])
                reads.append(cand.direct_uses[0])
            else:
                m.add_max_equality(self.need[node], [self.recompute[u] for u in users])
            m.add_min_equality(self.first[node], reads or [last_position])
            for u in users:
                # A compressed value is decompressed for the backward: users that exist only for the
                # backward read the decompressed copy (so must not be saved), forward users the original
                # (so must not be recomputed from it).
                user_mode = self.recompute[u] if analysis.candidates[u].in_forward else self.save[u]
                m.add_bool_or([self.compress[node].negated(), user_mode.negated()])

        self.capacity_bound = sum(self.units(c.bytes) for c in analysis.candidates.values())
        self.capacity = m.new_int_var(0, self.capacity_bound, "capacity")
        intervals, demands = [], []
        self.materialized: dict[fx.Node, cp_model.IntVar] = {}
        self.span: dict[fx.Node, cp_model.IntVar] = {}
        for node, cand in analysis.candidates.items():
            if cand.bytes == 0:
                continue
            first, last = self.first[node], self.last[node]
            materialized = self.materialized[node] = m.new_bool_var(f"m_{node.name}")
            m.add(materialized == self.recompute[node] + self.compress[node])
            span = self.span[node] = m.new_int_var(1, analysis.backward_length, f"span_{node.name}")
            m.add(span == last - first + 1)
            intervals += [
                m.new_optional_interval_var(0, last + 1, last + 1, self.save[node], f"saved_{node.name}"),
                m.new_optional_interval_var(first, span, last + 1, materialized, f"live_{node.name}"),
            ]
            demands += [self.units(cand.bytes), self.units(cand.bytes)]
            if cand.compress_to is not None and compress:
                intervals.append(
                    m.new_optional_interval_var(0, first + 1, first + 1, self.compress[node], f"small_{node.name}")
                )
                demands.append(self.units(cand.compressed_bytes))
        m.add_cumulative(intervals, demands, self.capacity)

        recompute_cost = {n: round(c.recompute_s * _UNITS_PER_SECOND) for n, c in analysis.candidates.items()}
        compress_cost = {n: round(c.compress_s * _UNITS_PER_SECOND) for n, c in analysis.candidates.items()}
        self.extra_time = sum(
            recompute_cost[n] * self.recompute[n] + compress_cost[n] * self.compress[n] for n in analysis.candidates
        )
        self.time_bound = sum(recompute_cost.values()) + sum(compress_cost.values())

    def units(self, nbytes: int) -> int:
        return -(-nbytes // self.unit)

    def hint(self, plan: Plan) -> None:
        """Hint every variable with `plan` (a complete assignment when the plan is feasible)."""
        needed = set(needed_nodes(self.analysis, plan))
        span = lifetimes(self.analysis, plan)
        for node in self.analysis.candidates:
            n = node in needed
            r = n and node in plan.recomputed
            c = n and node in plan.compressed
            self.model.add_hint(self.need[node], n)
            self.model.add_hint(self.recompute[node], r)
            self.model.add_hint(self.compress[node], c)
            self.model.add_hint(self.save[node], n and not r and not c)
            end = self.analysis.backward_length - 1
            first, last = span.get(node, (end, end))
            self.model.add_hint(self.first[node], first)
            self.model.add_hint(self.last[node], last)
            for u in self.analysis.users[node]:
                if (node, u) not in self.read_at:
                    continue
                recomputed_user = u in needed and u in plan.recomputed
                self.model.add_hint(self.read_at[node, u], span[u][0] if recomputed_user else end)
            if node in self.materialized:
                self.model.add_hint(self.materialized[node], r or c)
                self.model.add_hint(self.span[node], last - first + 1)

    def solve(self, time_limit_s: float) -> tuple[str, cp_model.CpSolver]:
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = time_limit_s
        solver.parameters.num_workers = _SOLVER_WORKERS
        status = solver.solve(self.model)
        return solver.status_name(status), solver

    def plan_from(self, solver: cp_model.CpSolver) -> Plan:
        return Plan(
            recomputed=frozenset(n for n, v in self.recompute.items() if solver.value(v)),
            compressed=frozenset(n for n, v in self.compress.items() if solver.value(v)),
        )


def plan_within(
    analysis: JointAnalysis, capacity_bytes: int, hints: Sequence[Plan], *, compress: bool, time_limit_s: float
) -> SolveResult:
    """The fastest plan whose activation peak fits `capacity_bytes`; if none is found,
    the plan that exceeds it least (then the fastest among those).

    The overflow is penalized above any time, so a feasible plan always wins; the best
    of `hints` (by replayed peak, then time) seeds the search, and is the answer if the
    solver finds nothing within its time limit."""
    model = _Model(analysis, compress=compress)
    m = model.model
    limit = capacity_bytes // model.unit
    overflow = m.new_int_var(0, max(0, model.capacity_bound - limit), "overflow")
    m.add(overflow >= model.capacity - limit)
    m.minimize((model.time_bound + 1) * overflow + model.extra_time)
    best = min(
        hints,
        key=lambda p: (max(0, activation_peak(analysis, p) - capacity_bytes), recompute_seconds(analysis, p)),
    )
    model.hint(best)
    peak_units = activation_peak(analysis, best, model.units)
    m.add_hint(model.capacity, peak_units)
    m.add_hint(overflow, max(0, peak_units - limit))
    start = time.perf_counter()
    status, solver = model.solve(time_limit_s)
    if status in ("OPTIMAL", "FEASIBLE"):
        return SolveResult(model.plan_from(solver), status, time.perf_counter() - start)
    return SolveResult(best, f"{status}, best seed plan", time.perf_counter() - start)
