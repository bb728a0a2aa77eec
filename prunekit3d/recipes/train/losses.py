"""The segmentation loss of the training recipe: nnU-Net's Dice + cross-entropy with deep supervision.

::

    logits at every decoder level (full resolution first) --DiceCE each, weighted 1/2^i--> one scalar

The weights halve per level, the lowest resolution is ignored and they are normalised to sum 1, as
nnU-Net v2 weights its deep-supervision outputs. The FD and auxiliary terms are :class:`prunekit3d.FDLoss`'s.
"""

from __future__ import annotations

from monai.losses import DeepSupervisionLoss, DiceCELoss

__all__ = ["deep_supervision_weights", "segmentation_loss"]


def deep_supervision_weights(levels: int) -> list[float]:
    """nnU-Net's weights of ``levels`` outputs: 1/2^i per level, the lowest resolution 0, normalised to sum 1."""
    w = [0.5**i for i in range(levels)]
    if levels > 1:
        w[-1] = 0.0
    return [v / sum(w) for v in w]


def segmentation_loss(levels: int) -> DeepSupervisionLoss:
    """Dice + CE over the foreground classes (labels as class indices), summed over ``levels`` outputs."""
    dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                         smooth_nr=1e-5, smooth_dr=1e-5)
    return DeepSupervisionLoss(dice_ce, weights=deep_supervision_weights(levels))
