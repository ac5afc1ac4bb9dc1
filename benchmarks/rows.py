"""What one benchmark row measures, and how a command line expands into rows.

A row is one (model, mode, backend, precision, memory budget, CUDA graphs, graphopt
option turned off or on) combination; it runs in its own process, so its name (`label`)
and its configuration must round-trip through JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

MODES = ("train", "infer")
BACKENDS = ("eager", "inductor", "graphopt")
PRECISIONS = ("bf16", "fp32")


@dataclasses.dataclass(frozen=True)
class Row:
    model: str
    mode: str
    backend: str
    precision: str = "bf16"
    memory_budget: float | None = None
    cuda_graphs: bool = False
    graphopt_off: str | None = None  # boolean graphopt options turned off (an ablation row), '+'-joined
    graphopt_on: str | None = None  # boolean options, off by default, turned on (a trial row), '+'-joined

    @property
    def label(self) -> str:
        """The variant's name in tables and plots, e.g. `inductor-budget50-cg`, `graphopt-no_channels_last`,
        `graphopt-with_remat_compress`."""
        parts = [self.backend]
        if self.memory_budget is not None:
            parts.append(f"budget{round(self.memory_budget * 100)}")
        if self.cuda_graphs:
            parts.append("cg")
        if self.graphopt_off:
            parts.append(f"no_{self.graphopt_off}")
        if self.graphopt_on:
            parts.append(f"with_{self.graphopt_on}")
        if self.precision != "bf16":
            parts.append(self.precision)
        return "-".join(parts)

    @classmethod
    def from_label(cls, model: str, mode: str, label: str) -> Row:
        """The row a `label` names (its inverse), e.g. `graphopt-cg` or `graphopt-with_remat_compress`."""
        backend, *parts = label.split("-")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r} in {label!r}; known: {', '.join(BACKENDS)}")
        fields: dict = {}
        for part in parts:
            if part == "cg":
                fields["cuda_graphs"] = True
            elif part in PRECISIONS:
                fields["precision"] = part
            elif part.startswith("budget") and part.removeprefix("budget").isdigit():
                fields["memory_budget"] = int(part.removeprefix("budget")) / 100
            elif part.startswith("no_"):
                fields["graphopt_off"] = part.removeprefix("no_")
            elif part.startswith("with_"):
                fields["graphopt_on"] = part.removeprefix("with_")
            else:
                raise ValueError(f"unknown part {part!r} of {label!r}: budgetNN, cg, no_OPTION, with_OPTION or a precision")
        return cls(model, mode, backend, **fields)

    @property
    def key(self) -> str:
        """Unique within a run: names the row's log file and identifies it in progress output."""
        return f"{self.model}-{self.mode}-{self.label}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_rows(
    models: Sequence[str],
    modes: Sequence[str],
    backends: Sequence[str],
    precisions: Sequence[str],
    memory_budgets: Sequence[float],
    cuda_graphs: bool,
    graphopt_ablations: Sequence[str] = (),
    graphopt_trials: Sequence[str] = (),
) -> list[Row]:
    """Every row of a run, model by model, so a run cut short by its time budget has whole models.

    Budget sweeps apply to training of the compiled backends (inference saves no
    activations); CUDA-graph rows are added for the compiled backends beside the
    plain ones; each ablation adds a graphopt row with that option turned off, each trial one
    with that option turned on.
    """
    rows = []
    for model in models:
        for mode in modes:
            for precision in precisions:
                for backend in backends:
                    rows.append(Row(model, mode, backend, precision))
                    compiled = backend != "eager"
                    if compiled and cuda_graphs:
                        rows.append(Row(model, mode, backend, precision, cuda_graphs=True))
                    if compiled and mode == "train":
                        rows.extend(Row(model, mode, backend, precision, memory_budget=b) for b in memory_budgets)
                    if backend == "graphopt":
                        rows.extend(Row(model, mode, backend, precision, graphopt_off=o) for o in graphopt_ablations)
                        rows.extend(Row(model, mode, backend, precision, graphopt_on=o) for o in graphopt_trials)
    return rows
