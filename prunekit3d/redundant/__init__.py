"""Redundant modules: gated, cheap, anisotropic branches beside a residual path."""

from prunekit3d.redundant.branches import KERNEL_FAMILIES, LightBranch, hidden_channels, kernel_family
from prunekit3d.redundant.modules import (
    MODES,
    ParallelRedundantModule,
    RedundantModule,
    SequentialRedundantModule,
)

__all__ = [
    "KERNEL_FAMILIES",
    "LightBranch",
    "MODES",
    "ParallelRedundantModule",
    "RedundantModule",
    "SequentialRedundantModule",
    "hidden_channels",
    "kernel_family",
]
