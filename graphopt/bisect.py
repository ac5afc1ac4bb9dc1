"""Find the first pass, then the first generated kernel, that makes graphopt's result
differ from eager.

The script states its check by defining `main()` that returns its outputs (a
tensor, or any nest of lists/tuples/dicts of tensors and numbers). Every trial
loads the script afresh with the same seeds and calls `main()`: once with
torch.compile compiling nothing (the eager reference), then with graphopt and only
the first k passes of every pipeline (pipeline.selecting_passes), bisecting k like
inductor's compiler bisector. If the culprit pass emits generated kernels
(GuardedCall nodes), the kernels after the first j run their eager subgraph
instead, and j is bisected the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import random
import runpy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from graphopt import events
from graphopt.cli_script import CliError, call_main, patched_compile
from graphopt.pipeline import GraphPass, PassContext, node_op_name, selecting_passes
from graphopt.repro import ReproError, repro_source
from graphopt.runtime import GuardedCall

Log = Callable[[str], None]


def compare(expected: Any, actual: Any, rtol: float, atol: float) -> str | None:
    """None when `actual` matches `expected`, else what differs (one line)."""
    flat_expected, spec_expected = tree_flatten(expected)
    flat_actual, spec_actual = tree_flatten(actual)
    if spec_expected != spec_actual:
        return f"main() returned a different structure: {spec_actual} instead of {spec_expected}"
    for index, (e, a) in enumerate(zip(flat_expected, flat_actual)):
        if isinstance(e, torch.Tensor) and isinstance(a, torch.Tensor):
            try:
                torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True)
            except AssertionError as error:
                lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
                detail = next((line for line in lines if line.startswith("Greatest absolute")), lines[0])
                return f"output {index}: {lines[0]} {detail if detail != lines[0] else ''}".strip()
        elif isinstance(e, float) and isinstance(a, float):
            if not math.isclose(a, e, rel_tol=rtol, abs_tol=atol) and not (math.isnan(a) and math.isnan(e)):
                return f"output {index}: {a!r} instead of {e!r}"
        elif e != a:
            return f"output {index}: {a!r} instead of {e!r}"
    return None


def _detached(value: Any) -> Any:
    return torch.utils._pytree.tree_map(lambda v: v.detach().clone() if isinstance(v, torch.Tensor) else v, value)


@dataclasses.dataclass
class _Selection:
    """The pipeline each graph runs in one trial: the first `passes` passes, and of the
    last one's generated kernels only the first `kernels` (None: all)."""

    passes: int
    kernels: int | None = None
    pipelines: dict[str, tuple[PassContext, list[tuple[str, GraphPass]]]] = dataclasses.field(default_factory=dict)
    kernel_names: list[str] = dataclasses.field(default_factory=list)
    kernel_subgraphs: dict[str, tuple[fx.GraphModule, str]] = dataclasses.field(default_factory=dict)

    def __call__(self, passes: Sequence[tuple[str, GraphPass]], ctx: PassContext) -> list[tuple[str, GraphPass]]:
        self.pipelines[ctx.graph_name] = (ctx, list(passes))
        chosen = list(passes[: self.passes])
        if chosen:
            name, graph_pass = chosen[-1]
            chosen[-1] = (name, self._counting_kernels(graph_pass))
        return chosen

    def _counting_kernels(self, graph_pass: GraphPass) -> GraphPass:
        def counted(gm: fx.GraphModule, ctx: PassContext):
            after, report = graph_pass(gm, ctx)
            for node in after.graph.nodes:
                if node.op == "call_function" and isinstance(node.target, GuardedCall):
                    self.kernel_names.append(node.target.__name__)
                    self.kernel_subgraphs[node.target.__name__] = (node.target.fallback, ctx.graph_name)
                    if self.kernels is not None and len(self.kernel_names) > self.kernels:
                        fallback = node.target.fallback
                        node.target = GuardedCall(node.target.__name__, fallback, fallback)
            after.recompile()
            return after, report

        return counted


@dataclasses.dataclass
class _Candidate:
    """A graph a repro could start from, with the pipeline it ran."""

    gm: fx.GraphModule
    ctx: PassContext
    pipeline: list[tuple[str, GraphPass]]
    where: str


@dataclasses.dataclass
class BisectResult:
    difference: str | None  # how graphopt's full result differs from eager; None: it does not
    passes: list[str]
    culprit: str | None = None
    culprit_index: int | None = None
    kernel: str | None = None  # named as in the trial that found it (graph numbers differ between trials)
    kernel_ops: list[str] = dataclasses.field(default_factory=list)
    kernel_note: str | None = None
    repro_path: str | None = None
    repro_note: str | None = None
    trials: int = 0


class Bisector:
    def __init__(self, script: str, args: Sequence[str], *, rtol: float, atol: float, force_backend: bool, log: Log):
        self.script, self.args = script, list(args)
        self.rtol, self.atol = rtol, atol
        self.compile_mode = "graphopt" if force_backend else None
        self.log = log
        self.trials = 0

    def _outputs(self, compile_mode: str | None) -> Any:
        torch._dynamo.reset()
        torch.manual_seed(0)
        random.seed(0)
        with patched_compile(compile_mode):
            return _detached(call_main(self.script, self.args))

    def _trial(self, selection: _Selection, reference: Any) -> tuple[str | None, list[events.CompiledGraphInfo]]:
        self.trials += 1
        with selecting_passes(selection), events.capture() as graphs:
            outputs = self._outputs(self.compile_mode)
        return compare(reference, outputs, self.rtol, self.atol), list(graphs)

    def run(self, repro_path: str) -> BisectResult:
        reference = self._outputs("eager")
        if compare(reference, self._outputs("eager"), self.rtol, self.atol) is not None:
            raise CliError("main() gives different results on two eager runs with the same seeds; fix that first")
        everything = _Selection(passes=10**9)
        difference, _ = self._trial(everything, reference)
        pass_lists = [names for _, names in everything.pipelines.values()]
        if not pass_lists:
            raise CliError("the script compiled nothing with graphopt (use --force-backend if it uses another backend)")
        longest = max(pass_lists, key=len)
        result = BisectResult(difference, [name for name, _ in longest])
        self.log(f"graphopt vs eager: {difference or 'same result'}")
        if difference is None:
            result.trials = self.trials
            return result
        with_none, _ = self._trial(_Selection(passes=0), reference)
        if with_none is not None:
            raise CliError(
                f"the result differs even with every pass off ({with_none}): the difference comes from "
                "AOTAutograd, decompositions or the runtime, not from a pass"
            )

        def differs_with_passes(k: int) -> bool:
            differs, _ = self._trial(_Selection(passes=k), reference)
            self.log(f"  first {k} pass(es) {[n for n, _ in longest[:k]]}: {'differs' if differs else 'same'}")
            return differs is not None

        bad = _first_bad(len(longest), differs_with_passes)
        result.culprit_index, result.culprit = bad - 1, longest[bad - 1][0]
        kernel_candidate = self._bisect_kernels(result, bad, reference)
        self._write_repro(result, bad, reference, repro_path, kernel_candidate)
        result.trials = self.trials
        return result

    def _bisect_kernels(self, result: BisectResult, passes: int, reference: Any) -> _Candidate | None:
        """Names the first kernel that makes the difference; returns its eager subgraph as a repro candidate."""
        probe = _Selection(passes=passes)
        self._trial(probe, reference)
        kernels = list(probe.kernel_names)
        if not kernels:
            result.kernel_note = f"pass {result.culprit!r} emits no generated kernels; bisected passes only"
            return None
        none_on, _ = self._trial(_Selection(passes=passes, kernels=0), reference)
        if none_on is not None:
            result.kernel_note = (
                f"the difference remains with all {len(kernels)} kernels of {result.culprit!r} running their eager "
                "subgraphs: it is in the pass's graph rewrite, not in a kernel"
            )
            return None

        def differs_with_kernels(j: int) -> bool:
            differs, _ = self._trial(_Selection(passes=passes, kernels=j), reference)
            self.log(f"  first {j} of {len(kernels)} kernels generated: {'differs' if differs else 'same'}")
            return differs is not None

        result.kernel = kernels[_first_bad(len(kernels), differs_with_kernels) - 1]
        subgraph, graph_name = probe.kernel_subgraphs[result.kernel]
        result.kernel_ops = sorted({node_op_name(n) for n in subgraph.graph.nodes if n.op == "call_function"})
        ctx, pipeline = probe.pipelines[graph_name]
        return _Candidate(subgraph, ctx, pipeline, f"the eager subgraph of kernel {result.kernel} (graph {graph_name})")

    def _write_repro(
        self, result: BisectResult, passes: int, reference: Any, path: str, kernel_candidate: _Candidate | None
    ) -> None:
        """The smallest graph that shows the difference: the culprit kernel's subgraph if there is
        one, else the first compiled graph whose repro reproduces."""
        selection = _Selection(passes=passes)
        _, graphs = self._trial(selection, reference)
        candidates = [kernel_candidate] if kernel_candidate is not None else []
        for info in graphs:
            if info.name in selection.pipelines:
                ctx, pipeline = selection.pipelines[info.name]
                candidates.append(_Candidate(info.input_gm, ctx, pipeline, f"graph {info.name}"))
        problems = []
        for candidate in candidates:
            pipeline = candidate.pipeline
            if len(pipeline) < passes or pipeline[passes - 1][0] != result.culprit:
                continue
            try:
                source = repro_source(
                    candidate.gm,
                    pipeline[:passes],
                    options=candidate.ctx.options,
                    kind=candidate.ctx.kind,
                    device=candidate.ctx.device,
                    rtol=self.rtol,
                    atol=self.atol,
                    script=os.path.basename(self.script),
                    where=candidate.where,
                )
            except ReproError as e:
                problems.append(f"{candidate.where}: {e}")
                continue
            with open(path, "w") as f:
                f.write(source)
            result.repro_path = path
            if _reproduces(path):
                result.repro_note = f"{candidate.where}; reproduces"
                return
            problems.append(f"{candidate.where}: does not reproduce on random inputs")
        result.repro_note = "; ".join(problems) or "no graph ran the culprit pass"


def _first_bad(bad: int, differs_at: Callable[[int], bool]) -> int:
    """The smallest k in 1..bad with differs_at(k), given not differs_at(0) and differs_at(bad)."""
    good = 0
    while bad - good > 1:
        middle = (good + bad) // 2
        if differs_at(middle):
            bad = middle
        else:
            good = middle
    return bad


def _reproduces(path: str) -> bool:
    """Run the repro file's main() here; 1 means it showed the difference."""
    torch._dynamo.reset()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return runpy.run_path(path, run_name="__graphopt_repro__")["main"]() == 1
    except Exception:  # a repro that crashes does not count as reproducing
        return False
