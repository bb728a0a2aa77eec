"""Pruning events: switch off the branches a plan chose, or switch them back on.

PSP semantics: the branches masked at one event stay in memory so that they can be restored if the
event went too far; the next pruning event removes them for good (they can no longer be restored,
and :func:`prunekit3d.slim` drops their parameters). The ``restorable`` buffer of every redundant
module records which branches the latest event masked, so this state is saved with the weights and
a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from prunekit3d.plan import PrunePlan
from prunekit3d.redundant import RedundantModule
from prunekit3d.wrap import redundant_modules

__all__ = ["prune", "restore", "active_branches"]


def _modules_of(model: nn.Module, plan: PrunePlan) -> dict[str, RedundantModule]:
    modules = dict(redundant_modules(model))
    missing = [name for name in plan.modules if name not in modules]
    if missing:
        raise ValueError(
            f"the plan names redundant modules this model does not have: {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}. Was it calibrated on another model?"
        )
    return modules


def _refuse(
    plan: PrunePlan,
    modules: dict[str, RedundantModule],
    bad: Callable[[RedundantModule, int], bool],
    message: str,
) -> None:
    """Raise ``message`` (formatted with ``name`` and ``bad``) for the first module whose chosen branches fail."""
    for name, decision in plan.modules.items():
        offending = [k for k in decision.chosen if bad(modules[name], k)]
        if offending:
            raise ValueError(message.format(name=name, bad=offending))


def prune(model: nn.Module, plan: PrunePlan) -> None:
    """Mask the branches ``plan`` chose; the previous event's masked branches become permanent."""
    modules = _modules_of(model, plan)
    _refuse(plan, modules, lambda m, k: not m.active[k],
            "plan is stale: module {name!r} branches {bad} are already off. "
            "Calibrate again on the current model before pruning.")
    for module in modules.values():
        module.restorable.zero_()
    for name, decision in plan.modules.items():
        modules[name].mask(decision.chosen)
        modules[name].restorable[decision.chosen] = True


def restore(model: nn.Module, plan: PrunePlan) -> None:
    """Switch back on exactly the branches that ``prune(model, plan)`` masked (the latest event only)."""
    modules = _modules_of(model, plan)
    _refuse(plan, modules, lambda m, k: not m.restorable[k],
            "cannot restore module {name!r} branches {bad}: they were not masked by the latest pruning "
            "event (a later event removed them for good, or this plan was never applied).")
    for name, decision in plan.modules.items():
        modules[name].unmask(decision.chosen)
        modules[name].restorable[decision.chosen] = False


def active_branches(model: nn.Module) -> dict[str, list[int]]:
    """Active branch indices per redundant module: the mask pattern that fixes the slim architecture."""
    return {name: m.active_indices() for name, m in redundant_modules(model)}
