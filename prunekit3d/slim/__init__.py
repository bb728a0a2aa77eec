"""Physical slimming: turn a wrapped or pruned model into a plain, smaller, faster ``nn.Module``.

Each redundant module is replaced by a block built from its *active* branches only::

    active branches               slim block
    ---------------               ----------
    none                          nn.Identity
    original f only (PRM)         GatedBlock: lerp(x, f(x), g_0)   (SlimParallel if it has an out activation)
    light (+ original) (PRM)      SlimParallel: one fused 1x1 reduction, a k-conv per branch, gates folded
    any (SRM)                     the active steps in order (GatedBlock / one-branch SlimParallel)

Masked branches, light-branch gates and ``active``/``restorable`` buffers are gone. Hooks stay where
they are (a copy carries them along): whoever registered one removes it (``FDLoss.close()``, a handle).
The original block keeps its gate (a ``GatedBlock``) even when it is exactly 1: ``f`` may be any block,
so the gate cannot be folded into it, and dropping it at 1 would make the architecture depend on a
gate value. ``lerp`` costs what the residual add costs.

The slim architecture depends only on which branches are active
(:func:`prunekit3d.prune.active_branches`), so a model rebuilt from its base network, wrap spec and
masks slims to the same state_dict keys and shapes -- how :func:`prunekit3d.load` rebuilds it::

    active = active_branches(pruned)                      # saved beside the slim weights
    rebuilt = set_active_branches(apply_wrap_spec(base(), spec), active)
    slim(rebuilt).load_state_dict(saved_slim_state)
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from prunekit3d.redundant import LightBranch, ParallelRedundantModule, RedundantModule, SequentialRedundantModule
from prunekit3d.redundant.branches import NEGATIVE_SLOPE
from prunekit3d.slim.blocks import GatedBlock, SlimParallel
from prunekit3d.wrap import _replace, redundant_modules

__all__ = ["GatedBlock", "SlimParallel", "set_active_branches", "slim", "slim_module"]


def set_active_branches(model: nn.Module, active: Mapping[str, Sequence[int]]) -> nn.Module:
    """Set every redundant module's ``active`` mask from :func:`prunekit3d.prune.active_branches`, in place.

    With the base network and the wrap spec this rebuilds the architecture of a slim model before
    its weights are loaded: ``slim(set_active_branches(apply_wrap_spec(base, spec), active))``.
    """
    modules = dict(redundant_modules(model))
    missing, extra = sorted(set(modules) - set(active)), sorted(set(active) - set(modules))
    if missing or extra:
        raise ValueError(
            f"active branches do not match the model's redundant modules: missing {missing}, unknown {extra}. "
            "Rebuild the model with the same base network and wrap spec as the model they came from."
        )
    for name, m in modules.items():
        keep = m._check(active[name])
        mask = torch.zeros_like(m.active)
        mask[keep] = True
        m.active.copy_(mask)
    return model


def _check_light(branch: nn.Module) -> LightBranch:
    if not isinstance(branch, LightBranch):
        raise TypeError(
            f"expected a LightBranch, got {type(branch).__name__}: slim only knows prunekit3d's light branch"
        )
    for norm in (branch.norm1, branch.norm2):
        # Folding gates into the norms is exact only for per-instance statistics with affine weights.
        if not norm.affine or norm.track_running_stats:
            raise ValueError(
                f"light branch norms must be InstanceNorm3d(affine=True, track_running_stats=False); got {norm}"
            )
    return branch


@torch.no_grad()
def _fuse(m: RedundantModule, light: list[int], original: GatedBlock | None, out_activation: bool) -> SlimParallel:
    branches = [_check_light(m.branches[k]) for k in light]
    ref = m.gates
    block = SlimParallel(
        branches[0].conv.out_channels if branches else m.channels,  # channel pruning may have narrowed it
        [b.reduce.out_channels for b in branches],
        [b.kernel for b in branches],
        original=original,
        out_activation=out_activation,
        eps=branches[0].norm1.eps if branches else 1e-5,
        device=ref.device,
        dtype=ref.dtype,
    )
    if branches:
        block.reduce.weight.copy_(torch.cat([b.reduce.weight for b in branches]))
        block.reduce.bias.copy_(torch.cat([b.reduce.bias for b in branches]))
        block.norm1.weight.copy_(torch.cat([b.norm1.weight for b in branches]))
        block.norm1.bias.copy_(torch.cat([b.norm1.bias for b in branches]))
    for k, b, conv, norm in zip(light, branches, block.convs, block.norms):
        g = m.gates[k]
        conv.weight.copy_(b.conv.weight)
        conv.bias.copy_(b.conv.bias)
        norm.weight.copy_(g * b.norm2.weight)
        norm.bias.copy_(g * b.norm2.bias)
    return block


def slim_module(m: RedundantModule) -> nn.Module:
    """The plain block computing what ``m`` computes with its current masks (eval and train alike)."""
    active = m.active_indices()
    if not active:
        return nn.Identity()
    original = GatedBlock(m.branches[0], m.gates.detach()[0]) if m.has_original and active[0] == 0 else None
    light = [k for k in active if not m.is_original(k)]
    if isinstance(m, SequentialRedundantModule):
        # A sequential step multiplies its gate after the norm; folded, it agrees up to float rounding.
        steps = [original if m.is_original(k) else _fuse(m, [k], None, False) for k in active]
        if m.out_activation:
            steps.append(nn.LeakyReLU(NEGATIVE_SLOPE))
        out = steps[0] if len(steps) == 1 else nn.Sequential(*steps)  # type: ignore[arg-type]
    elif isinstance(m, ParallelRedundantModule):
        out = original if not light and not m.out_activation else _fuse(m, light, original, m.out_activation)
    else:
        raise TypeError(f"cannot slim {type(m).__name__}: slim knows the parallel and sequential redundant modules")
    return out.train(m.training)  # type: ignore[union-attr]


def slim(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Replace every redundant module of ``model`` by a plain block built from its active branches.

    The result computes what the masked model computes (bit for bit for parallel modules, to float
    rounding for sequential ones), holds no masked branch, light-branch gate or mask buffer, and traces /
    exports to ONNX like any network (see :mod:`prunekit3d.export`). Forward hooks on modules that stay
    are kept, in the copy too: close an :class:`~prunekit3d.FDLoss` before slimming what it watched.

    Args:
        model: a model holding redundant modules (from :func:`prunekit3d.wrap`, or a PSP-Seg network).
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        the slim model.

    Example::

        >>> from monai.networks.nets import DynUNet
        >>> from prunekit3d import wrap
        >>> x = torch.randn(1, 1, 16, 16, 16)
        >>> net = wrap(DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2]), x, branches=4).eval()
        >>> small = slim(net)
        >>> torch.allclose(small(x), net(x), atol=1e-5), len(redundant_modules(small))
        (True, 0)
    """
    targets = redundant_modules(model)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} holds no redundant module, so there is nothing to slim; "
            "wrap it first (prunekit3d.wrap) or pass the wrapped model."
        )
    if not inplace:
        model = copy.deepcopy(model)
        targets = redundant_modules(model)
    # Innermost first, so that an original block holding redundant modules is slim before it is moved.
    for _, m in reversed(targets):
        if m is model:
            return slim_module(m)
        _replace(model, m, slim_module(m))
    return model
