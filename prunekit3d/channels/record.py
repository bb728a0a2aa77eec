"""The channel record: what channel pruning removed, as plain data that rebuilds the pruned model.

Every call of :func:`prunekit3d.prune_channels` is one *round*, a :class:`ChannelPlan`: the shape of the
input the dependency graph was traced with, and torch-pruning's pruning history -- in order, the root
layer of each pruned group and which of its channels went. Replaying the history through the
dependency graph of a freshly built model of the same architecture removes the same channels from
every coupled layer, after which the pruned ``state_dict`` loads (no pickle anywhere).

A round's ``stage`` says where its replay belongs among the steps that rebuild a saved model::

    base network --[ "plain" rounds ]--> wrap spec --[ "redundant" rounds ]--> masks, slim --> load weights

"redundant": the model held redundant modules when it was pruned (wrapped, block-pruned or PSP-Seg),
so the round replays after the wrap spec and before slim; "plain": it held none (a base network
before wrapping, or a loaded slim model, whose saved steps come first). The rounds that
:func:`prunekit3d.prune_channels` applied to a model are kept on it (:func:`channel_record`) for
:func:`prunekit3d.save`; :func:`apply_channel_plan` replays one round, as ``load`` does per step.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from rich.table import Table
from torch import nn

from prunekit3d.channels.graph import build_graph, sync_splits, sync_widths
from prunekit3d.wrap import unwrap

__all__ = ["STAGES", "ChannelPlan", "ChannelRecord", "apply_channel_plan", "apply_channel_record", "channel_record"]

#: Whether a round was applied to a model without ("plain") or with ("redundant") redundant modules.
STAGES = ("plain", "redundant")

_ATTR = "_prunekit3d_channel_record"


@dataclass
class ChannelPlan:
    """One round of channel pruning. Round-trips through JSON.

    Attributes:
        stage: where the round applies, one of :data:`STAGES`.
        input_shape: shape of the example input the dependency graph was traced with.
        importance: name of the channel scorer ("magnitude", "taylor" or a class name).
        global_pruning: channels ranked across all layers (True) or within each group of coupled layers.
        ratio: fraction of every group's channels removed (the last step's, for a budget).
        params_before: parameters before the round.
        params_after: parameters after the round.
        widths: ``[before, after]`` output channels of every layer that lost channels.
        history: torch-pruning's pruning history: ``[root layer name, output channels?, removed indices]``
            per pruned group, in order.
        round_to: the kept widths were multiples of this or power-of-two fractions of it (1: any width).
    """

    stage: str
    input_shape: list[int]
    importance: str
    global_pruning: bool
    ratio: float
    params_before: int
    params_after: int
    widths: dict[str, list[int]] = field(default_factory=dict)
    history: list[list[Any]] = field(default_factory=list)
    round_to: int = 1

    def reduction(self) -> float:
        """Fraction of the parameters this round removed."""
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChannelPlan:
        try:
            plan = cls(**data)
        except TypeError as err:
            raise ValueError(f"not a channel plan ({err}); expected the keys of ChannelPlan.to_dict()") from err
        if plan.stage not in STAGES:
            raise ValueError(f"channel plan stage {plan.stage!r} is unknown; use one of {STAGES}")
        plan.history = [[str(name), bool(out), [int(i) for i in idxs]] for name, out, idxs in plan.history]
        return plan

    def __rich__(self) -> Table:
        table = Table(
            title=f"channel pruning ({self.stage}, {self.importance}, "
            f"{'global' if self.global_pruning else 'per group'}, ratio {self.ratio:.2f}): "
            f"{self.params_before:,} -> {self.params_after:,} parameters (-{self.reduction():.0%})"
        )
        for col in ("layer", "before", "after"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for name, (before, after) in self.widths.items():
            table.add_row(name, str(before), str(after))
        return table


@dataclass
class ChannelRecord:
    """All channel-pruning rounds of a model, in the order they were applied. Round-trips through JSON."""

    rounds: list[ChannelPlan] = field(default_factory=list)

    def at(self, stage: str) -> list[ChannelPlan]:
        """The rounds applied at ``stage``, in order."""
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is unknown; use one of {STAGES}")
        return [r for r in self.rounds if r.stage == stage]

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": [r.to_dict() for r in self.rounds]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChannelRecord:
        if not isinstance(data, dict) or not isinstance(data.get("rounds", []), list):
            raise ValueError("not a channel record; expected {'rounds': [channel plans]}")
        return cls([ChannelPlan.from_dict(r) for r in data.get("rounds", [])])

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> ChannelRecord:
        return cls.from_dict(json.loads(text))


def channel_record(model: nn.Module) -> ChannelRecord:
    """The rounds :func:`prunekit3d.prune_channels` applied to ``model`` (not those ``load`` replayed), oldest first."""
    record = unwrap(model).__dict__.get(_ATTR)
    return record if record is not None else ChannelRecord()


def add_round(model: nn.Module, plan: ChannelPlan) -> None:
    """Append ``plan`` to ``model``'s channel record (kept on the model, copied with it)."""
    root = unwrap(model)
    root.__dict__[_ATTR] = ChannelRecord([*channel_record(root).rounds, plan])


def _example(model: nn.Module, shape: list[int]) -> torch.Tensor:
    ref = next((p for p in model.parameters() if p.is_floating_point()), torch.zeros(()))
    return torch.zeros(shape, device=ref.device, dtype=ref.dtype)


def apply_channel_plan(model: nn.Module, plan: ChannelPlan | dict[str, Any]) -> nn.Module:
    """Replay one round of channel pruning on a freshly rebuilt ``model``, in place.

    Args:
        model: the model rebuilt the way the pruned one was before this round (same base network and,
            for a "redundant" round, same wrap spec), with any weights; load the pruned ``state_dict``
            afterwards.
        plan: a :class:`ChannelPlan` or its ``to_dict()``.

    Returns:
        ``model``, its layers narrowed exactly as in the pruned model. The round is not added to
        ``channel_record(model)``, which holds what :func:`prunekit3d.prune_channels` did to a model.

    Raises:
        ValueError: the model's parameter count before or after the replay is not the plan's, or the
            history does not fit the model (it was not rebuilt the way the pruned one was).
    """
    if isinstance(plan, dict):
        plan = ChannelPlan.from_dict(plan)
    root = unwrap(model)
    hint = "rebuild it from the base network (and wrap spec) of the pruned model"
    params = sum(p.numel() for p in root.parameters())
    if params != plan.params_before:
        raise ValueError(
            f"the channel plan was made on a model of {plan.params_before:,} parameters, "
            f"this one has {params:,}; {hint}"
        )
    try:
        graph = build_graph(root, _example(root, plan.input_shape))
        _replay(graph, plan.history)
    except (AttributeError, AssertionError, ValueError, IndexError, RuntimeError) as err:
        raise ValueError(f"cannot replay the channel plan on this {type(root).__name__} ({err}); {hint}") from err
    sync_widths(root)
    params = sum(p.numel() for p in root.parameters())
    if params != plan.params_after:
        raise ValueError(
            f"replaying the channel plan gave {params:,} parameters, the plan says {plan.params_after:,}; {hint}"
        )
    return model


def _replay(graph: tp.DependencyGraph, history: list) -> None:
    """Prune the recorded groups in order, keeping split sizes current as :func:`prune_channels` does."""
    for name, out_channels, idxs in history:
        module = graph.model.get_submodule(name)
        pruner = graph.get_pruner_of_module(module)
        fn = pruner.prune_out_channels if out_channels else pruner.prune_in_channels
        graph.get_pruning_group(module, fn, list(idxs)).prune(record_history=False)
        sync_splits(graph)


def apply_channel_record(model: nn.Module, record: ChannelRecord | dict[str, Any]) -> nn.Module:
    """Replay every round of ``record`` in order (a model pruned only by :func:`prune_channels`)."""
    if isinstance(record, dict):
        record = ChannelRecord.from_dict(record)
    for plan in record.rounds:
        apply_channel_plan(model, plan)
    return model
