"""Policy: when to prune, when to undo a pruning event, when to stop (PSP-Seg's progressive schedule).

One call per epoch drives it, so it serves a hand-written loop, a MONAI engine handler or an
nnU-Net trainer hook alike::

    pruner = ProgressivePruner(model, calibration=lambda: iter(train_loader), total_epochs=1000)
    for epoch in range(1000):
        losses = train_one_epoch(...)                    # e.g. {"total": 0.41, "fd": 0.9, "aux": 0.3}
        decision = pruner.on_epoch_end(epoch, losses)
        if decision is not None and decision.structure_changed:
            optimizer = make_optimizer(model)            # and re-wrap DDP: the set of used parameters changed

The rules, counted in epochs with finite losses since the last event (the start of training counts
as one):

- *Converged*: none of the monitored losses set a new minimum (of the values since the last event)
  in the last ``patience`` epochs.
- On convergence, if the last event was a pruning event and *any* monitored loss never came back
  within ``tolerance`` of its best value up to that event, i.e.
  ``min(loss since event) > min(loss up to event) + tolerance``, the event *over-pruned*: its
  branches are restored and ``step`` drops by 1 (pruning ends at 0). Otherwise prune again:
  calibrate on ``calibration_batches`` batches with the current ``step`` and mask the chosen
  branches, which makes the previous event's branches permanent.
- Pruning ends at the end of epoch ``ceil(stop_fraction * total_epochs) - 1`` (0-based): the branches
  of the last event, which no convergence check has confirmed yet, are restored, so only branches
  removed for good stay removed. It also ends when no module has more than ``step`` active branches.
- An epoch with a NaN/inf monitored loss is skipped: it neither counts nor decides (it is logged);
  only the stop at ``stop_fraction``, which depends on the epoch alone, still happens then.

PSP-Seg checks at the start of every epoch; the end of the previous one is the same moment.

Under ``torch.distributed`` the losses are averaged over ranks first and calibration sums its
errors over ranks, so every rank takes the same decision.

Saving: the masks live in the model's buffers (``active``, ``restorable``), so a checkpoint holds
both ``model.state_dict()`` and ``pruner.state_dict()``; loading both continues the run exactly.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from rich.console import Console
from torch import nn

from prunekit3d.calibrate import Scorer, calibrate
from prunekit3d.plan import PrunePlan
from prunekit3d.prune import prune, restore

__all__ = ["Decision", "ProgressivePruner", "kept_plans"]

@dataclass
class Decision:
    """What the pruner did at the end of one epoch. Round-trips through JSON (``to_dict``/``from_dict``).

    Attributes:
        kind: "prune" (branches masked), "restore" (the last event's branches back on) or "stop".
        epoch: the epoch whose end triggered it.
        step: the step in force after the decision (0 once pruning ended by over-pruning).
        structure_changed: the set of active branches changed: rebuild the optimizer and the DDP wrapper.
        branches: per module, the branches switched off ("prune") or back on ("restore", "stop").
        plan: the calibration plan that was applied or undone, if any.
        reason: why, in words.
    """

    kind: str
    epoch: int
    step: int
    structure_changed: bool
    branches: dict[str, list[int]] = field(default_factory=dict)
    plan: PrunePlan | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "epoch": self.epoch,
            "step": self.step,
            "structure_changed": self.structure_changed,
            "branches": {k: list(v) for k, v in self.branches.items()},
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        plan = data.get("plan")
        return cls(
            kind=data["kind"],
            epoch=int(data["epoch"]),
            step=int(data["step"]),
            structure_changed=bool(data["structure_changed"]),
            branches={k: list(v) for k, v in data.get("branches", {}).items()},
            plan=PrunePlan.from_dict(plan) if plan is not None else None,
            reason=data.get("reason", ""),
        )


class ProgressivePruner:
    """PSP-Seg's progressive schedule around :func:`~prunekit3d.calibrate` and :func:`~prunekit3d.prune`.

    Args:
        model: a model with redundant modules (wrapped, PSP-Seg, or DDP around either).
        calibration: a factory returning an iterable of batches (tensors, ``(image, label)`` pairs or
            dicts with ``"image"``), e.g. ``lambda: iter(train_loader)``; called once per pruning event.
        total_epochs: epochs of the whole training run (for ``stop_fraction``).
        patience: epochs without a new minimum that mean "converged" (PSP-Seg: 10).
        tolerance: how far above its best a loss may stay before an event counts as over-pruning (0.001).
        step: branches removed per module and event at the start (PSP-Seg: 2, sometimes 1).
        stop_fraction: fraction of ``total_epochs`` after which pruning ends (0.4).
        calibration_batches: batches taken from ``calibration()`` per event (100).
        monitor: the loss names to track; default: every key of the first ``losses`` dict.
        scorer: calibration scorer, default :class:`~prunekit3d.calibrate.ReconstructionError`.
        console: where decisions are printed; ``Console(quiet=True)`` silences it.

    Example::

        >>> pruner = ProgressivePruner(model, lambda: iter(loader), total_epochs=1000)
        >>> decision = pruner.on_epoch_end(0, {"total": 1.2, "fd": 2.0, "aux": 0.7})  # None: not converged
    """

    def __init__(
        self,
        model: nn.Module,
        calibration: Callable[[], Iterable[Any]],
        total_epochs: int,
        *,
        patience: int = 10,
        tolerance: float = 1e-3,
        step: int = 2,
        stop_fraction: float = 0.4,
        calibration_batches: int = 100,
        monitor: Sequence[str] | None = None,
        scorer: Scorer | None = None,
        console: Console | None = None,
    ) -> None:
        if not callable(calibration):
            raise TypeError("calibration must be a factory returning batches, e.g. lambda: iter(train_loader)")
        checks = {
            "total_epochs >= 1": total_epochs >= 1,
            "patience >= 1": patience >= 1,
            "tolerance >= 0": tolerance >= 0,
            "step >= 1": step >= 1,
            "0 <= stop_fraction <= 1": 0 <= stop_fraction <= 1,
            "calibration_batches >= 1": calibration_batches >= 1,
        }
        failed = [rule for rule, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"ProgressivePruner needs {', '.join(failed)}")
        if isinstance(monitor, str):
            monitor = [monitor]
        self.model = model
        self.calibration = calibration
        self.total_epochs = total_epochs
        self.patience = patience
        self.tolerance = float(tolerance)
        self.stop_fraction = stop_fraction
        self.calibration_batches = calibration_batches
        self.scorer = scorer
        self.console = console if console is not None else Console()
        # Everything below is the resumable state (see state_dict).
        self.step = step
        self.stopped = False
        self.monitor: list[str] | None = list(monitor) if monitor is not None else None
        self.history: list[dict[str, Any]] = []
        self.skipped: list[int] = []  # epochs with non-finite losses
        self._last_epoch: int | None = None
        self._best: dict[str, float] = {}  # best of every finite epoch so far
        self._best_at_event: dict[str, float] = {}  # best up to the last pruning event
        self._min_since: dict[str, float] = {}  # minimum since the last event
        self._stale = 0  # finite epochs since a monitored loss last set a new minimum since the event
        self._pending: PrunePlan | None = None  # the last pruning event, while it can be restored

    @property
    def stop_epoch(self) -> int:
        """0-based epoch at whose end pruning ends."""
        return max(math.ceil(self.stop_fraction * self.total_epochs) - 1, 0)

    # ---- the per-epoch call ----------------------------------------------------------------------
    def on_epoch_end(self, epoch: int, losses: Mapping[str, float]) -> Decision | None:
        """Record the epoch's losses and prune, restore or stop if the schedule says so.

        Args:
            epoch: 0-based index of the epoch that just ended; must increase from call to call.
            losses: the epoch's losses by name (floats or 0-d tensors), e.g. the training means.

        Returns:
            The :class:`Decision` taken, or ``None``. Once pruning has ended it always returns ``None``.
        """
        if self._last_epoch is not None and epoch <= self._last_epoch:
            raise ValueError(
                f"epoch {epoch} after epoch {self._last_epoch}: epochs must increase (a pruner state from a later "
                "run loaded, or the same epoch reported twice?)"
            )
        self._last_epoch = epoch
        if self.stopped:
            return None
        if epoch >= self.stop_epoch:
            return self._stop(epoch, f"{self.stop_fraction:.0%} of {self.total_epochs} epochs reached")
        values = self._all_reduced(self._monitored(losses))
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        if bad:
            self.skipped.append(epoch)
            self.console.print(f"[yellow]epoch {epoch}: non-finite {bad}: skipped for pruning decisions[/]")
            return None
        self._observe(values)
        if self._stale < self.patience:
            return None
        over = self._over_pruned() if self._pending is not None else []
        return self._restore(epoch, over) if over else self._prune(epoch)

    def _monitored(self, losses: Mapping[str, float]) -> dict[str, float]:
        if self.monitor is None:
            if not losses:
                raise ValueError("losses is empty: pass the epoch's losses by name, e.g. {'total': 0.41}")
            self.monitor = sorted(losses)
        missing = [k for k in self.monitor if k not in losses]
        if missing:
            raise ValueError(f"losses lacks the monitored {missing}; got keys {sorted(losses)}")
        return {k: float(losses[k]) for k in self.monitor}

    def _all_reduced(self, values: dict[str, float]) -> dict[str, float]:
        if not (dist.is_available() and dist.is_initialized()):
            return values
        device = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
        dist.all_reduce(t)  # a NaN on any rank makes every rank skip the epoch
        return dict(zip(values, (t / dist.get_world_size()).tolist()))

    def _observe(self, values: dict[str, float]) -> None:
        improved = False
        for k, v in values.items():
            if v < self._min_since.get(k, math.inf):
                self._min_since[k] = v
                improved = True
            self._best[k] = min(self._best.get(k, math.inf), v)
        self._stale = 0 if improved else self._stale + 1

    def _over_pruned(self) -> list[str]:
        """The monitored losses that stayed worse than their best before the last event by > tolerance."""
        return [k for k, best in self._best_at_event.items() if self._min_since[k] > best + self.tolerance]

    # ---- events --------------------------------------------------------------------------------
    def _new_window(self) -> None:
        self._min_since, self._stale = {}, 0

    def _prune(self, epoch: int) -> Decision:
        batches = itertools.islice(self.calibration(), self.calibration_batches)
        plan = calibrate(self.model, batches, step=self.step, scorer=self.scorer)
        prune(self.model, plan)  # the previous event's branches become permanent
        self._new_window()
        if not plan.modules:
            self.stopped, self._pending = True, None
            reason = f"no redundant module has more than {self.step} active branches"
            return self._record(Decision("stop", epoch, self.step, False, reason=reason))
        self._pending = plan
        self._best_at_event = dict(self._best)
        reason = f"converged: no new minimum for {self.patience} epochs"
        return self._record(Decision("prune", epoch, self.step, True, plan.chosen(), plan, reason))

    def _restore(self, epoch: int, over: list[str]) -> Decision:
        plan = self._pending
        assert plan is not None
        worse = ", ".join(f"{k} {self._min_since[k]:.4g} > best {self._best_at_event[k]:.4g}" for k in over)
        restore(self.model, plan)
        self._pending = None
        self.step -= 1
        self.stopped = self.step == 0
        self._new_window()
        reason = f"over-pruned ({worse} + tolerance {self.tolerance:g}); step now {self.step}"
        if self.stopped:
            reason += ": pruning ends"
        return self._record(Decision("restore", epoch, self.step, True, plan.chosen(), plan, reason))

    def _stop(self, epoch: int, reason: str) -> Decision:
        plan, self._pending, self.stopped = self._pending, None, True
        if plan is not None:
            restore(self.model, plan)
            reason += "; the last event's branches are restored"
        branches = plan.chosen() if plan is not None else {}
        return self._record(Decision("stop", epoch, self.step, plan is not None, branches, plan, reason))

    def _record(self, decision: Decision) -> Decision:
        self.history.append(decision.to_dict())
        removed = sum(len(v) for v in decision.branches.values())
        what = {"prune": "masked", "restore": "restored", "stop": "restored"}[decision.kind]
        self.console.print(
            f"[bold]epoch {decision.epoch}: {decision.kind}[/] (step {decision.step}): "
            f"{removed} branches {what} in {len(decision.branches)} modules. {decision.reason}"
        )
        if decision.kind == "prune" and decision.plan is not None:
            self.console.print(decision.plan)
        return decision

    # ---- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The schedule's state as plain JSON-able data (save it beside ``model.state_dict()``)."""
        return {
            "step": self.step,
            "stopped": self.stopped,
            "monitor": self.monitor,
            "last_epoch": self._last_epoch,
            "best": dict(self._best),
            "best_at_event": dict(self._best_at_event),
            "min_since": dict(self._min_since),
            "stale": self._stale,
            "pending": self._pending.to_dict() if self._pending is not None else None,
            "history": [dict(h) for h in self.history],
            "skipped": list(self.skipped),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`; load the model's state dict too (it holds the masks)."""
        missing = [k for k in self.state_dict() if k not in state]
        if missing:
            raise ValueError(f"not a ProgressivePruner state: missing {missing}")
        self.step = int(state["step"])
        self.stopped = bool(state["stopped"])
        self.monitor = list(state["monitor"]) if state["monitor"] is not None else None
        self._last_epoch = state["last_epoch"]
        self._best = dict(state["best"])
        self._best_at_event = dict(state["best_at_event"])
        self._min_since = dict(state["min_since"])
        self._stale = int(state["stale"])
        self._pending = PrunePlan.from_dict(state["pending"]) if state["pending"] is not None else None
        self.history = [dict(h) for h in state["history"]]
        self.skipped = list(state["skipped"])


def kept_plans(events: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The plans of the pruning events that stayed (not undone by a restore or the final stop), oldest first.

    Args:
        events: the pruner's ``history`` (or :meth:`Decision.to_dict` records), in order.
    """
    kept: list[dict[str, Any]] = []
    for event in events:
        if event["kind"] == "prune":
            kept.append(event["plan"])
        elif event["kind"] in ("restore", "stop") and event.get("plan") is not None and event["structure_changed"]:
            kept.pop()
    return kept
