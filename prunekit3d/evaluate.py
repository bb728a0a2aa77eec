"""Evaluation: whole-volume predictions and how they are scored, on MONAI's inferer and metrics.

::

    image (C, X, Y, Z) --sliding_window_logits (MONAI sliding_window_inference)--> logits (K, X, Y, Z)
    logits --segmentation--> classes (X, Y, Z): argmax, or logit > 0 for one output channel
    two segmentations --mean_dice (MONAI compute_dice)--> mean Dice of the foreground classes present in either
    segmentation + truth --dice_and_nsd (MONAI compute_dice, compute_surface_dice)--> per-class DSC and NSD

``agreement_dice`` compares two networks on the same images (how much of the original's function a
compressed network keeps); ``label_dice`` compares a network with labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.metrics import compute_dice, compute_surface_dice
from monai.networks.utils import one_hot
from torch import nn

__all__ = [
    "agreement_dice",
    "dice_and_nsd",
    "label_dice",
    "mean_dice",
    "output_logits",
    "segmentation",
    "sliding_window_logits",
]


def output_logits(output: Any) -> torch.Tensor:
    """The full-resolution prediction of a network's output (the first tensor of a list or tuple)."""
    while isinstance(output, (list, tuple)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(
            f"the network returned a {type(output).__name__}; prunekit3d needs a tensor (or a list of them)"
        )
    return output


@torch.no_grad()
def sliding_window_logits(
    model: nn.Module,
    image: torch.Tensor,
    patch: Sequence[int],
    *,
    overlap: float = 0.25,
    mode: str = "constant",
    batch: int = 1,
    autocast: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Logits ``(K, X, Y, Z)`` (float32, CPU) of a whole ``(C, X, Y, Z)`` image, ``patch``-sized windows.

    The model runs as it is (call ``model.eval()`` first for inference), its windows sent to ``device``:
    by default where its parameters are, or the CPU for a module without parameters (an ONNX file run by
    :class:`prunekit3d.backends.OnnxRuntimeModel` or ``OpenVinoModel``).
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    with torch.autocast(device.type, enabled=autocast):
        out = sliding_window_inference(
            image[None].to(device), tuple(patch), batch, lambda x: output_logits(model(x)), overlap=overlap, mode=mode
        )
    return output_logits(out)[0].float().cpu()


def segmentation(logits: torch.Tensor) -> torch.Tensor:
    """Class indices ``(X, Y, Z)`` of logits ``(K, X, Y, Z)``: argmax, or ``logit > 0`` for one channel."""
    return (logits[0] > 0).long() if logits.shape[0] == 1 else logits.argmax(0)


def _one_hot(classes: torch.Tensor, n: int) -> torch.Tensor:
    inside = torch.where((classes >= 0) & (classes < n), classes, torch.zeros_like(classes))  # others: background
    return one_hot(inside.long()[None, None], n)


def mean_dice(a: torch.Tensor, b: torch.Tensor, classes: int) -> float:
    """Mean Dice (MONAI's ``compute_dice``) of the foreground classes present in ``a`` or ``b``; 1.0 if none is.

    Args:
        a, b: class indices of one volume, same shape; values outside ``0 .. classes - 1`` count as background.
        classes: number of classes including the background (a one-channel network has 2).
    """
    n = max(classes, 2)
    x, y = _one_hot(a, n), _one_hot(b, n)
    scores = compute_dice(x, y, include_background=False, ignore_empty=False)[0]  # both empty -> 1, one -> 0
    present = (x[0, 1:].flatten(1).any(1) | y[0, 1:].flatten(1).any(1)).to(scores.device)
    return float(scores[present].double().mean()) if bool(present.any()) else 1.0


def agreement_dice(
    reference: nn.Module, model: nn.Module, images: Sequence[torch.Tensor], patch: Sequence[int]
) -> float:
    """Mean Dice between the two networks' segmentations of ``images`` (foreground classes, per image, averaged)."""
    scores = []
    for image in images:
        a, b = sliding_window_logits(reference, image, patch), sliding_window_logits(model, image, patch)
        scores.append(mean_dice(segmentation(a), segmentation(b), a.shape[0]))
    return float(np.mean(scores))


def label_dice(
    model: nn.Module, images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], patch: Sequence[int]
) -> float:
    """Mean Dice of the network's segmentations against ``labels`` (foreground classes, per image, averaged)."""
    scores = []
    for image, label in zip(images, labels):
        logits = sliding_window_logits(model, image, patch)
        scores.append(mean_dice(segmentation(logits), label.long(), logits.shape[0]))
    return float(np.mean(scores))


def dice_and_nsd(
    logits: torch.Tensor, truth: torch.Tensor, spacing: Sequence[float], tolerance: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per foreground class: Dice and normalised surface Dice (MONAI) of ``logits`` ``(K, ...)`` against class
    indices ``truth`` ``(...)``; NaN where a class is absent from the truth. ``tolerance`` in mm."""
    classes = logits.shape[0]
    pred = one_hot(segmentation(logits)[None, None], classes)
    ref = one_hot(truth.long()[None, None], classes)
    dsc = compute_dice(pred, ref, include_background=False, ignore_empty=True)[0]
    nsd = compute_surface_dice(pred, ref, [tolerance] * (classes - 1), include_background=False,
                               spacing=[float(s) for s in spacing])[0]
    return dsc, nsd
