"""Parallel and sequential redundant modules (PRM, SRM).

A redundant module holds several branches beside a residual path, each scaled by one learnable
scalar gate and switchable on and off through a boolean buffer::

    PRM:  x --+-- g_0 * (f(x) - x) --+
              +-- g_1 * LNB_1(x) ----+-- x + sum --> [LeakyReLU] --> y
              +-- g_k * LNB_k(x) ----+

    SRM:  x -> x + g_0 * (f(x) - x) -> . + g_1 * LNB_1(.) -> ... -> [LeakyReLU] -> y

Branch 0 may be an *original block* ``f`` (a block of a pretrained model that :func:`prunekit3d.wrap`
replaced); its gate starts at 1 and the light branches' gates at 0, so a freshly built module computes
exactly ``f``. The original branch is evaluated as ``torch.lerp(x, f(x), g_0)``, which is bit-exact
``f(x)`` at ``g_0 = 1`` (:func:`~prunekit3d.redundant.branches.blend`, which also serves autocast). With no active
branch a module is the identity.

The public contract used by calibration, pruning and slimming: ``.branches`` (ModuleList),
``.gates`` (Parameter), ``.active`` (bool buffer), ``.mask(indices)``, ``.unmask(indices)``,
``.compute(x)`` (the module's function) and ``.contributions(x)`` (each branch's additive term).

``forward`` is ``compute`` except in the two modes the module honours, each set for one pass by the
code that needs it and reset afterwards (no forward is ever replaced):

- *scoring* (``module.scoring = observer``, by :func:`prunekit3d.calibrate`): ``forward`` returns
  ``observer(module, x)``, which scores candidate branch sets and returns the module's output;
- *tracing* (``module.tracing = True``, by :func:`prunekit3d.tracing.tracing`): ``forward`` runs
  :meth:`RedundantModule.traceable_forward`, every branch called as a module (for torch-pruning).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from prunekit3d.redundant.branches import (
    NEGATIVE_SLOPE,
    LightBranch,
    blend,
    hidden_channels,
    instance_norm,
    kernel_family,
)
from prunekit3d.tracing import Traceable

__all__ = ["RedundantModule", "ParallelRedundantModule", "SequentialRedundantModule", "MODES"]


class RedundantModule(Traceable, nn.Module):
    """State shared by the parallel and sequential modules.

    Args:
        channels: channels ``C`` of the input and output.
        branches: number of light branches (a kernel family: 7, 4 or 1) or a list of kernel sizes.
        exp_ratio: hidden width of each light branch as a fraction of ``C``.
        original: a shape-preserving block kept as branch 0 (its gate starts at 1), or ``None``.
        out_activation: apply LeakyReLU to the sum (the PSP-Seg modules do; wrapped blocks do not,
            so that they compute exactly the original block at start).
    """

    mode: str = ""
    #: While set, ``forward`` returns ``scoring(self, x)`` (see the module docstring).
    scoring: Callable[[RedundantModule, torch.Tensor], torch.Tensor] | None = None

    def __init__(
        self,
        channels: int,
        branches: int | Sequence[Sequence[int]] = 7,
        exp_ratio: float = 0.5,
        original: nn.Module | None = None,
        out_activation: bool = False,
    ) -> None:
        super().__init__()
        kernels = kernel_family(branches)
        hidden = hidden_channels(channels, exp_ratio)
        self.channels = channels
        self.exp_ratio = float(exp_ratio)
        self.has_original = original is not None
        light = [LightBranch(channels, hidden, k) for k in kernels]
        self.branches = nn.ModuleList(([original] if original is not None else []) + light)
        start = torch.zeros(len(self.branches))
        if self.has_original:
            start[0] = 1.0
        self.gates = nn.Parameter(start)
        self.register_buffer("active", torch.ones(len(self.branches), dtype=torch.bool))
        # Branches masked at the latest pruning event; only these can be restored.
        self.register_buffer("restorable", torch.zeros(len(self.branches), dtype=torch.bool))
        self.out_activation = bool(out_activation)

    # ---- masking -------------------------------------------------------------------------
    def _check(self, indices: Iterable[int]) -> list[int]:
        idx = sorted({int(i) for i in indices})
        bad = [i for i in idx if not 0 <= i < len(self.branches)]
        if bad:
            raise IndexError(f"branch indices {bad} out of range: this module has {len(self.branches)} branches")
        return idx

    def mask(self, indices: Iterable[int]) -> None:
        """Switch branches off (they stay in memory and can be switched on again)."""
        self.active[self._check(indices)] = False

    def unmask(self, indices: Iterable[int]) -> None:
        """Switch branches on again."""
        self.active[self._check(indices)] = True

    def active_indices(self) -> list[int]:
        """Indices of the active branches.

        Read from the ``active`` buffer only when it changed, not at every forward: on a GPU each read
        is a host sync. The cached list is keyed by a weak reference to the buffer and by its version
        counter, which every in-place write bumps (``mask``, ``m.active[0] = False``, ``copy_``,
        ``load_state_dict``). The weak reference is what a deep copy cannot fake: a copied buffer restarts
        its version counter, but the copy's cache still points at the original buffer, so it is read anew.
        (Writing through ``m.active.data`` bypasses the counter: don't.)
        """
        active = self.active
        try:
            version = active._version
        except RuntimeError:  # an inference-mode tensor keeps no version counter: read it every time
            return [i for i, a in enumerate(active.tolist()) if a]
        cached = self.__dict__.get("_active_cache")
        if cached is None or cached[0]() is not active or cached[1] != version:
            cached = (weakref.ref(active), version, tuple(i for i, a in enumerate(active.tolist()) if a))
            self.__dict__["_active_cache"] = cached
        return list(cached[2])

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state = dict(state)
        state.pop("_active_cache", None)  # a weak reference does not pickle, and the cache is derived
        return state

    def is_original(self, index: int) -> bool:
        return self.has_original and index == 0

    def finish(self, z: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(z, NEGATIVE_SLOPE) if self.out_activation else z

    # ---- forward -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tracing:
            return self.traceable_forward(x)
        if self.scoring is not None:
            return self.scoring(self, x)
        if torch.compiler.is_compiling():
            return self.compute_masked(x)
        return self.compute(x)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        """The module's output for the current masks and gates, whatever mode it is in."""
        raise NotImplementedError

    def contributions(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each active branch's additive term: ``compute(x) == finish(x + sum of the terms)``."""
        raise NotImplementedError

    def compute_masked(self, x: torch.Tensor) -> torch.Tensor:
        """``compute`` with the mask as data: every branch runs, its gate multiplied by its ``active`` flag.

        What ``forward`` runs under ``torch.compile``: a compiled graph cannot see which branches are active
        without a host read (a graph break per module), and a graph specialised on one mask would go on
        computing it after pruning. With the mask as a tensor the compiled graph follows every mask change.
        Masked branches cost their compute, and get zero gradients instead of none; slim the model to drop them.
        """
        raise NotImplementedError

    def _masked_gates(self) -> torch.Tensor:
        return self.gates * self.active.to(self.gates.dtype)

    def _identity_if_all_masked(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.where(self.active.any(), y, x)  # no active branch: the identity, as ``compute`` has it

    def traceable_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every branch, masked ones too (a restored branch must still fit), called as a module; gates detached
        (a gate is one scalar per branch, never a channel). For tracers: see :mod:`prunekit3d.tracing`."""
        sequential = isinstance(self, SequentialRedundantModule)
        z = x
        for k, branch in enumerate(self.branches):
            g = self.gates[k].detach()
            source = z if sequential else x
            z = blend(source, branch(source), g) if self.is_original(k) else z + g * branch(source)
        return self.finish(z)

    def extra_repr(self) -> str:
        kernels = [b.kernel for b in self.branches if isinstance(b, LightBranch)]
        return (
            f"channels={self.channels}, original={self.has_original}, kernels={kernels}, "
            f"exp_ratio={self.exp_ratio}, out_activation={self.out_activation}"
        )


class ParallelRedundantModule(RedundantModule):
    """PRM: ``y = act(x + sum_k active_k * g_k * delta_k(x))``; identity with no active branch.

    The 1x1x1 reductions of all active light branches run as one convolution and the gates scale
    the last norm's affine parameters, so no branch output is stacked or multiplied separately.

    Example::

        >>> m = ParallelRedundantModule(16, branches=4, exp_ratio=0.5, out_activation=True)
        >>> m.mask([0, 1, 2, 3]); m(torch.ones(1, 16, 4, 4, 4)).eq(1).all().item()
        True
    """

    mode = "parallel"

    def _light_terms(self, x: torch.Tensor, light: list[int], gates: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each light branch's gated output ``g_k * LNB_k(x)``, its 1x1x1 reduction fused with the others'."""
        gates = self.gates if gates is None else gates
        branches = [self.branches[k] for k in light]
        weight = torch.cat([b.reduce.weight for b in branches])
        bias = torch.cat([b.reduce.bias for b in branches])
        h = F.conv3d(x, weight, bias)
        h = instance_norm(
            h,
            torch.cat([b.norm1.weight for b in branches]),
            torch.cat([b.norm1.bias for b in branches]),
            branches[0].norm1.eps,
        )
        h = F.leaky_relu(h, NEGATIVE_SLOPE, inplace=True)
        parts = h.split([b.reduce.out_channels for b in branches], dim=1)
        # The gate scales the last norm's affine: no separate multiply per branch.
        return [
            instance_norm(b.conv(part), gates[k] * b.norm2.weight, gates[k] * b.norm2.bias, b.norm2.eps)
            for k, b, part in zip(light, branches, parts)
        ]

    def _light_sum(self, x: torch.Tensor, light: list[int], gates: torch.Tensor | None = None) -> torch.Tensor:
        terms = self._light_terms(x, light, gates)
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        return total

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        active = self.active_indices()
        if not active:
            return x
        light = [k for k in active if not self.is_original(k)]
        z = blend(x, self.branches[0](x), self.gates[0]) if self.has_original and active[0] == 0 else x
        if light:
            z = z + self._light_sum(x, light)
        return self.finish(z)

    def compute_masked(self, x: torch.Tensor) -> torch.Tensor:
        gates = self._masked_gates()
        z = blend(x, self.branches[0](x), gates[0]) if self.has_original else x
        light = [k for k in range(len(self.branches)) if not self.is_original(k)]
        if light:
            z = z + self._light_sum(x, light, gates)
        return self._identity_if_all_masked(x, self.finish(z))

    def contributions(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each active branch's additive term ``g_k * delta_k(x)``: ``y = finish(x + sum)``."""
        active = self.active_indices()
        out: dict[int, torch.Tensor] = {}
        if self.has_original and active and active[0] == 0:
            out[0] = blend(x, self.branches[0](x), self.gates[0]) - x
        light = [k for k in active if not self.is_original(k)]
        if light:
            out.update(zip(light, self._light_terms(x, light)))
        return out


class SequentialRedundantModule(RedundantModule):
    """SRM: the active branches applied one after another, ``z <- z + g_k * delta_k(z)``.

    The ablation that PSP-Seg compares the parallel module against; branches feed each other, so
    removing one changes the input of every later one.
    """

    mode = "sequential"

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        active = self.active_indices()
        if not active:
            return x
        z = x
        for k in active:
            if self.is_original(k):
                z = blend(z, self.branches[0](z), self.gates[0])
            else:
                z = z + self.gates[k] * self.branches[k](z)
        return self.finish(z)

    def compute_masked(self, x: torch.Tensor) -> torch.Tensor:
        gates = self._masked_gates()
        z = x
        for k, branch in enumerate(self.branches):
            z = blend(z, branch(z), gates[k]) if self.is_original(k) else z + gates[k] * branch(z)
        return self._identity_if_all_masked(x, self.finish(z))

    def contributions(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each active branch's step ``z_after - z_before`` along the chain: ``y = finish(x + sum)``."""
        out: dict[int, torch.Tensor] = {}
        z = x
        for k in self.active_indices():
            nxt = (blend(z, self.branches[0](z), self.gates[0]) if self.is_original(k)
                   else z + self.gates[k] * self.branches[k](z))
            out[k] = nxt - z
            z = nxt
        return out


#: Redundant module class by ``mode`` name.
MODES: dict[str, type[RedundantModule]] = {
    "parallel": ParallelRedundantModule,
    "sequential": SequentialRedundantModule,
}
