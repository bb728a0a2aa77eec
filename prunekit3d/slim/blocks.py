"""Slim blocks: what a redundant module becomes once only its active branches are kept.

Every block is a plain ``nn.Module`` (no masks, no gates to multiply at run time), traceable by
``torch.jit.trace`` and exportable to ONNX. Its structure depends only on which branches were
active, never on gate values, so :func:`prunekit3d.slim.slim` builds the same architecture from a
freshly built model with the same masks -- what loading a slim checkpoint relies on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunekit3d.redundant.branches import NEGATIVE_SLOPE, Kernel, blend
from prunekit3d.tracing import Traceable

__all__ = ["GatedBlock", "SlimParallel"]


def _instance_norm(channels: int, eps: float, **kw: object) -> nn.GroupNorm:
    """Affine instance norm as a group norm with one group per channel: the same numbers, and PyTorch's
    CPU group-norm kernel is ~3x faster than its instance norm (the masked modules use it too)."""
    return nn.GroupNorm(channels, channels, eps=eps, affine=True, **kw)  # type: ignore[arg-type]


class GatedBlock(nn.Module):
    """An original block blended with its input by its gate: ``y = lerp(x, f(x), gate)``.

    ``torch.lerp`` returns exactly ``f(x)`` at ``gate = 1``; the gate stays a parameter (not folded
    into ``f``, which may be any block) so that fine-tuning the slim model trains it as before.

    Args:
        block: the original shape-preserving block ``f``.
        gate: its gate value.
    """

    def __init__(self, block: nn.Module, gate: float | torch.Tensor = 1.0) -> None:
        super().__init__()
        self.block = block
        self.gate = nn.Parameter(torch.as_tensor(gate).detach().clone().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return blend(x, self.block(x), self.gate)


class SlimParallel(Traceable, nn.Module):
    """The active branches of a parallel redundant module, fused::

        x ---------------- [GatedBlock: lerp(x, f(x), g_0)] ---------------------------- z
        x -- Conv 1x1 (C -> sum h_k) -- IN -- LeakyReLU -- split -- Conv k_1 (h_1 -> C) -- IN (g_1 folded) --+
                                                               -- Conv k_n (h_n -> C) -- IN (g_n folded) --+-- sum
        y = [LeakyReLU](z + sum)

    All reductions run as one 1x1x1 convolution and one instance norm over the concatenated hidden
    channels (instance norm is per channel, so this is exact). ``IN`` is an affine instance norm held
    as ``nn.GroupNorm(C, C)``: one group per channel gives the same numbers through a faster CPU
    kernel. Each branch's gate is folded into its last norm's affine parameters, and the branch
    outputs are accumulated in place (no stacking), in the masked module's order: the slim block
    computes its numbers bit for bit. (The conv biases, which the norms cancel, are kept for that
    reason: dropping them changes the rounding, and a bias add inside a conv costs nothing.) The kernel
    families hold distinct kernels, so no two branches could share one convolution.

    Args:
        channels: channels ``C`` of input and output.
        hidden: hidden width ``h`` of each active light branch.
        kernels: kernel size of each active light branch (may be empty).
        original: the gated original block, or ``None``.
        out_activation: apply LeakyReLU(0.01) to the sum.
        eps: instance-norm epsilon of the branches.
        device, dtype: where the new parameters live (those of the redundant module).
    """

    def __init__(
        self,
        channels: int,
        hidden: Sequence[int],
        kernels: Sequence[Kernel],
        original: GatedBlock | None = None,
        out_activation: bool = False,
        eps: float = 1e-5,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.original = original
        self.kernels = [tuple(int(s) for s in k) for k in kernels]
        self.hidden = [int(h) for h in hidden]
        if len(self.hidden) != len(self.kernels):
            raise ValueError(
                f"got {len(self.hidden)} hidden widths for {len(self.kernels)} kernels; pass one per branch"
            )
        self.out_activation = bool(out_activation)
        if self.kernels:
            self.reduce = nn.Conv3d(channels, sum(self.hidden), 1, **kw)
            self.norm1 = _instance_norm(sum(self.hidden), eps, **kw)
        self.convs = nn.ModuleList(
            nn.Conv3d(h, channels, k, padding=tuple(s // 2 for s in k), **kw)
            for h, k in zip(self.hidden, self.kernels)
        )
        self.norms = nn.ModuleList(_instance_norm(channels, eps, **kw) for _ in self.kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tracing:
            return self.traceable_forward(x)
        z = self.original(x) if self.original is not None else x
        if self.kernels:
            hid = F.leaky_relu(self.norm1(self.reduce(x)), NEGATIVE_SLOPE, inplace=True)
            parts = hid.split(self.hidden, dim=1) if len(self.kernels) > 1 else (hid,)
            total = self.norms[0](self.convs[0](parts[0]))
            for part, conv, norm in zip(parts[1:], self.convs[1:], self.norms[1:]):
                total.add_(norm(conv(part)))  # the first branch's fresh output is the accumulator
            # z + total as the masked module sums (so outputs agree bit for bit), into a fresh buffer
            # rather than a new allocation: large CPU allocations cost page faults. Under autocast the two
            # may differ in dtype: then out of place, promoting as the masked module does.
            if total.dtype != z.dtype:
                z = z + total
            else:
                z = total.add_(z) if self.original is None else z.add_(total)
        if self.out_activation:
            z = F.leaky_relu(z, NEGATIVE_SLOPE, inplace=z is not x)  # never modify the input in place
        return z

    def traceable_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same function without in-place ops, whose rewritten autograd history a tracer cannot follow
        (see :mod:`prunekit3d.tracing`)."""
        z = self.original(x) if self.original is not None else x
        if self.kernels:
            hidden = F.leaky_relu(self.norm1(self.reduce(x)), NEGATIVE_SLOPE)
            parts = hidden.split(self.hidden, dim=1) if len(self.hidden) > 1 else (hidden,)
            for part, conv, norm in zip(parts, self.convs, self.norms):
                z = z + norm(conv(part))
        return F.leaky_relu(z, NEGATIVE_SLOPE) if self.out_activation else z

    def extra_repr(self) -> str:
        return f"kernels={self.kernels}, hidden={self.hidden}, out_activation={self.out_activation}"
