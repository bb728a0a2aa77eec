"""The prune plan: what one pruning event measured and decided, as plain data.

A :class:`PrunePlan` holds, for every redundant module that was scored, each candidate set of
branches, its calibration error and the chosen set. It prints as a rich table and round-trips
through JSON, so it is what gets saved, logged and compared.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.table import Table

__all__ = ["ModuleDecision", "PrunePlan"]


@dataclass
class ModuleDecision:
    """Scores of one module: ``errors[i]`` belongs to ``candidates[i]``; ``chosen`` is the lowest."""

    candidates: list[list[int]]
    errors: list[float]
    chosen: list[int]

    def margin(self) -> float:
        """How much worse the runner-up was than the chosen set (inf with a single candidate)."""
        ranked = sorted(self.errors)
        return ranked[1] - ranked[0] if len(ranked) > 1 else float("inf")


@dataclass
class PrunePlan:
    """One pruning event: the branches to switch off in each module.

    Attributes:
        step: branches removed per module.
        batches: calibration batches the errors were summed over.
        scorer: name of the scorer that produced the errors.
        modules: decision per redundant-module qualified name.
    """

    step: int
    batches: int = 0
    scorer: str = "reconstruction"
    modules: dict[str, ModuleDecision] = field(default_factory=dict)

    def chosen(self) -> dict[str, list[int]]:
        return {name: d.chosen for name, d in self.modules.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrunePlan:
        try:
            modules = {name: ModuleDecision(**d) for name, d in data.get("modules", {}).items()}
            return cls(step=int(data["step"]), batches=int(data.get("batches", 0)),
                       scorer=str(data.get("scorer", "reconstruction")), modules=modules)
        except (KeyError, TypeError) as err:
            raise ValueError(f"not a prune plan ({err}); expected keys step, batches, scorer, modules") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        return cls.from_dict(json.loads(text))

    def __rich__(self) -> Table:
        table = Table(title=f"prune plan: step {self.step}, {self.batches} calibration batches ({self.scorer})")
        for col in ("module", "candidates", "remove", "error", "runner-up"):
            table.add_column(col, justify="right" if col in ("candidates", "error", "runner-up") else "left")
        for name, d in self.modules.items():
            ranked = sorted(d.errors)
            table.add_row(
                name,
                str(len(d.candidates)),
                ",".join(map(str, d.chosen)),
                f"{ranked[0]:.4g}",
                f"{ranked[1]:.4g}" if len(ranked) > 1 else "-",
            )
        return table
