"""Branches of a redundant module: the cheap light branch and the kernel families.

A light branch (LNB) is the unit that a redundant module holds several of::

    x -- Conv 1x1x1 (C->h) -- InstanceNorm -- LeakyReLU -- Conv k (h->C) -- InstanceNorm --> delta

``h = max(1, round(C * exp_ratio))``. The last norm is affine so that the branch gate can be
folded into it exactly when a model is slimmed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunekit3d.tracing import Traceable

__all__ = ["KERNEL_FAMILIES", "Kernel", "LightBranch", "blend", "hidden_channels", "instance_norm", "kernel_family"]

Kernel = tuple[int, int, int]

#: Kernel sizes of the light branches, by number of branches per module. Anisotropic kernels let a
#: task keep only the directions its anatomy needs.
KERNEL_FAMILIES: dict[int, tuple[Kernel, ...]] = {
    7: ((1, 1, 1), (1, 1, 3), (1, 3, 1), (3, 1, 1), (1, 3, 3), (3, 1, 3), (3, 3, 1)),
    4: ((1, 1, 1), (1, 3, 3), (3, 1, 3), (3, 3, 1)),
    1: ((1, 1, 1),),
}

NEGATIVE_SLOPE = 0.01


def instance_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Instance norm computed as a group norm with one group per channel.

    Identical results, but PyTorch's CPU group-norm kernel is about 3x faster than its instance norm
    (which reshapes into a batch norm), and it accepts a single-voxel input.
    """
    return F.group_norm(x, x.shape[1], weight, bias, eps)


def blend(x: torch.Tensor, fx: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """An original block's output blended with its input by its gate: ``torch.lerp(x, fx, gate)``.

    Exactly ``fx`` at ``gate = 1``. Under autocast a block may return another dtype than it was given
    (e.g. bfloat16 in, float32 out of a CPU-autocast average pool, or float32 out of a CUDA-autocast group
    norm), which ``lerp`` refuses; then both meet in the wider dtype, as ``x + gate * (fx - x)`` would.
    Equal dtypes (always in plain float32) are not cast, so the bit-exact identity at ``gate = 1`` holds.
    """
    if fx.dtype != x.dtype:
        wide = torch.promote_types(x.dtype, fx.dtype)
        x, fx = x.to(wide), fx.to(wide)
    return torch.lerp(x, fx, gate)


def kernel_family(branches: int | Sequence[Sequence[int]]) -> tuple[Kernel, ...]:
    """Kernel sizes for ``branches`` light branches (7, 4 or 1), or a custom list passed through.

    >>> kernel_family(4)
    ((1, 1, 1), (1, 3, 3), (3, 1, 3), (3, 3, 1))
    """
    if isinstance(branches, int):
        if branches not in KERNEL_FAMILIES:
            raise ValueError(
                f"branches={branches} has no kernel family; use one of {sorted(KERNEL_FAMILIES)} "
                "or pass a list of 3-D kernel sizes such as [(1, 1, 1), (3, 3, 1)]"
            )
        return KERNEL_FAMILIES[branches]
    kernels = tuple(tuple(int(s) for s in k) for k in branches)
    for k in kernels:
        if len(k) != 3 or any(s < 1 or s % 2 == 0 for s in k):
            raise ValueError(f"kernel {k} must be three odd sizes >= 1, e.g. (1, 3, 3)")
    return kernels  # type: ignore[return-value]


def hidden_channels(channels: int, exp_ratio: float) -> int:
    """Hidden width ``h`` of a light branch on ``channels`` channels."""
    if exp_ratio <= 0:
        raise ValueError(f"exp_ratio must be > 0, got {exp_ratio}")
    return max(1, int(round(channels * exp_ratio)))


class LightBranch(Traceable, nn.Module):
    """Light branch (LNB): a 1x1x1 reduction, then a conv of kernel ``kernel`` back to ``channels``.

    Args:
        channels: input and output channels ``C``.
        hidden: hidden channels ``h``.
        kernel: 3-D kernel size of the second conv, each odd (padding ``k // 2`` keeps the shape).

    Example::

        >>> b = LightBranch(16, 8, (1, 3, 3))
        >>> b(torch.zeros(1, 16, 4, 4, 4)).shape
        torch.Size([1, 16, 4, 4, 4])
    """

    def __init__(self, channels: int, hidden: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.kernel: Kernel = tuple(int(k) for k in kernel)  # type: ignore[assignment]
        self.reduce = nn.Conv3d(channels, hidden, 1)
        self.norm1 = nn.InstanceNorm3d(hidden, affine=True)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True)
        self.conv = nn.Conv3d(hidden, channels, self.kernel, padding=tuple(k // 2 for k in self.kernel))
        self.norm2 = nn.InstanceNorm3d(channels, affine=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tracing:
            return self.traceable_forward(x)
        h = instance_norm(self.reduce(x), self.norm1.weight, self.norm1.bias, self.norm1.eps)
        return self.expand(self.act(h))

    def traceable_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function with the norms called as modules (for tracers, see :mod:`prunekit3d.tracing`)."""
        return self.norm2(self.conv(self.act(self.norm1(self.reduce(x)))))

    def expand(self, hidden: torch.Tensor) -> torch.Tensor:
        """Second half of the branch, from the already normalised and activated hidden map."""
        return instance_norm(self.conv(hidden), self.norm2.weight, self.norm2.bias, self.norm2.eps)
