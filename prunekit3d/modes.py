"""Train/eval bookkeeping for code that runs a user's model for its own purposes (tracing, counting,
timing, exporting): whatever the block switches, every submodule gets its own flag back afterwards
(a model may hold a frozen, eval-mode teacher or norm inside a training network).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["eval_mode", "kept_modes"]


@contextlib.contextmanager
def kept_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Restore the train/eval flag of ``model`` and of each of its submodules on exit."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.train(training)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; every submodule's own flag restored on exit."""
    with kept_modes(model):
        model.eval()
        yield model
