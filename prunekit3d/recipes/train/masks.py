"""What training does around pruning events: masked branches frozen, their momentum dropped, and PSP-Seg's
"re-initialise the pruned architecture" once pruning has ended.

Masked branches get no gradient, so they are frozen (``requires_grad=False``): DDP, which expects a gradient for
every parameter that requires one, and the optimizer skip them, and they come back unchanged if the event is
undone.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit3d.redundant import RedundantModule
from prunekit3d.redundant.branches import NEGATIVE_SLOPE
from prunekit3d.wrap import redundant_modules

__all__ = ["forget_masked_momentum", "freeze_masked_branches", "reinitialise"]


def freeze_masked_branches(model: nn.Module) -> None:
    """Branches train while active and are frozen while masked; a module's gates train while any branch is on."""
    for _, m in redundant_modules(model):
        for k, branch in enumerate(m.branches):
            branch.requires_grad_(bool(m.active[k]))
        m.gates.requires_grad_(bool(m.active.any()))


def forget_masked_momentum(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A masked branch's gate gets zero gradient from now on: drop its momentum so that it stays put."""
    for _, m in redundant_modules(model):
        momentum = optimizer.state.get(m.gates, {}).get("momentum_buffer")
        if momentum is not None:
            momentum[~m.active] = 0


def reinitialise(model: nn.Module) -> None:
    """PSP-Seg's "re-initialise the pruned architecture": Kaiming convs, fresh norms, light-branch gates 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, a=NEGATIVE_SLOPE)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._NormBase):  # instance and batch norms
            m.reset_parameters()
        elif isinstance(m, RedundantModule):
            with torch.no_grad():
                m.gates.zero_()
                if m.has_original:
                    m.gates[0] = 1.0
