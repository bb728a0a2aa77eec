"""Train/eval bookkeeping for code that runs a user's model for its own purposes (tracing, counting,
timing, exporting): whatever the block switches, every submodule gets its own flag back afterwards
(a model may hold a frozen, eval-mode teacher or norm inside a training network).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["eval_mode", "kept_modes", "observed_forward"]


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


def observed_forward(
    model: nn.Module,
    example_input: torch.Tensor,
    forward_hook: Callable[[nn.Module, tuple, dict, Any], None],
    pre_hook: Callable[[nn.Module, tuple, dict], None] | None = None,
) -> Any:
    """One eval-mode, no-grad forward of ``model`` with ``forward_hook`` (and ``pre_hook``) on every module
    (each once, however often it is reachable), all removed afterwards; returns the output.

    How discovery reads a network: eval means no deep-supervision side paths and no dropout, and the shapes
    are those of inference.
    """
    modules = list(dict.fromkeys(model.modules()))
    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in modules] if pre_hook else []
    handles += [m.register_forward_hook(forward_hook, with_kwargs=True) for m in modules]
    try:
        with eval_mode(model), torch.no_grad():
            return model(example_input)
    finally:
        for h in handles:
            h.remove()
