"""Tracing mode: a module-by-module forward for tracers that see module calls only (torch-pruning).

For speed, prunekit3d's light branches, redundant modules and fused slim blocks run some layers
functionally: norms through ``F.group_norm``, the light branches' 1x1 reductions as one ``F.conv3d`` of
concatenated weights, sums in place. A tracer that records module calls would miss those layers (and
take the fused convolution for an element-wise op). So each of these classes is :class:`Traceable`:
it offers :meth:`~Traceable.traceable_forward`, which calls every layer as a module, and its ``forward``
runs that while the module's ``tracing`` flag is set::

    with tracing(model):        # every Traceable module of model: tracing = True
        model(x)                # ... their forwards call traceable_forward
                                # on exit each flag is as it was

No forward is replaced and no attribute deleted: a user's own instance-level forward stays theirs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["Traceable", "tracing"]


class Traceable:
    """Mixin of prunekit3d modules with a module-by-module forward for tracers (see the module docstring)."""

    #: While True, ``forward`` returns :meth:`traceable_forward`; set by :func:`tracing`.
    tracing: bool = False

    def traceable_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module's function with every layer called as a module (no fused or functional layers)."""
        raise NotImplementedError


@contextlib.contextmanager
def tracing(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every :class:`Traceable` module of ``model`` runs its traceable forward."""
    modules = [m for m in model.modules() if isinstance(m, Traceable)]
    before = [m.tracing for m in modules]
    for m in modules:
        m.tracing = True
    try:
        yield model
    finally:
        for m, flag in zip(modules, before):
            m.tracing = flag
