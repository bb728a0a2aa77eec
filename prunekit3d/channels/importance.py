"""Channel importance criteria: which channels of a group of coupled layers matter least.

The scorers are torch-pruning's group importances, by name: ``"magnitude"`` (the L2 norm of every weight a
channel touches across its group) and ``"taylor"`` (|weight x gradient|, first order; backpropagate a loss on
real data first). Any ``callable(group) -> per-channel scores`` works in their place.

Ranking channels by importance per unit of cost (multiply-adds, parameters or activations per channel) was
measured and removed: it takes the full-resolution layers first, down to 2 of 16 channels, and left three
networks of the held-out benchmark with Dice 0.000 (``benchmarks/results/widths/README.md``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Union

import torch
import torch_pruning as tp

__all__ = ["IMPORTANCES", "Importance", "importance_scorer"]

Importance = Union[str, Callable[[tp.Group], "torch.Tensor | None"]]

#: Channel scorers by name (torch-pruning's group importances: L2 magnitude, first-order Taylor).
IMPORTANCES: dict[str, Callable[[], Callable[[tp.Group], torch.Tensor | None]]] = {
    "magnitude": tp.importance.GroupMagnitudeImportance,
    "taylor": tp.importance.GroupTaylorImportance,
}


def importance_scorer(importance: Importance) -> tuple[Callable[[tp.Group], torch.Tensor | None], str]:
    """The scorer ``importance`` names (or ``importance`` itself if callable), and a name for the record."""
    if isinstance(importance, str):
        if importance not in IMPORTANCES:
            close = difflib.get_close_matches(importance, IMPORTANCES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown importance {importance!r}: {hint}use one of {sorted(IMPORTANCES)} or a scorer")
        return IMPORTANCES[importance](), importance
    if callable(importance):
        return importance, type(importance).__name__
    raise TypeError("importance must be a name such as 'magnitude' or a callable(group) -> per-channel scores")
