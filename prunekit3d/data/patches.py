"""Patch sampling: random training and distillation patches from whole volumes.

Training draws its patches through MONAI transforms inside a ``CacheDataset`` (:func:`training_augmentation`)::

    preprocessed case -- pad to patch -- foreground indices --                         (cached with the case)
                      -- crop (foreground-centred with p = foreground_fraction) -- rotate -- flip x, y, z

Compression draws uniformly placed patches of its in-memory calibration volumes (:class:`PatchSampler`),
seeded by a ``torch.Generator`` so that a resumed run draws what the interrupted one would have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.transforms import (
    Compose,
    DeleteItemsd,
    FgBgToIndicesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotated,
    SpatialPadd,
)

from prunekit3d.data.preprocessing import KEYS

__all__ = ["PatchSampler", "training_augmentation"]

_INDICES = ["label_fg", "label_bg"]


def training_augmentation(pre: Compose, patch: Sequence[int], foreground_fraction: float) -> Compose:
    """``pre``, then pad to the patch and index the foreground (both cached with ``pre`` by a CacheDataset),
    then the random part: crop with foreground oversampling, rotate, flip along each axis."""
    angle = math.radians(15)
    return Compose([
        *pre.transforms,
        SpatialPadd(KEYS, spatial_size=tuple(patch)),
        FgBgToIndicesd("label", fg_postfix="_fg", bg_postfix="_bg"),
        RandCropByPosNegLabeld(
            KEYS, "label", spatial_size=tuple(patch), pos=foreground_fraction, neg=1 - foreground_fraction,
            num_samples=1, fg_indices_key=_INDICES[0], bg_indices_key=_INDICES[1],
        ),
        DeleteItemsd(_INDICES),  # flat index arrays of varying length: they would not collate
        RandRotated(KEYS, range_x=angle, range_y=angle, range_z=angle, prob=0.2, mode=("bilinear", "nearest")),
        *(RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)),
    ])


class PatchSampler:
    """Random patches of the calibration volumes (zero-padded where a volume is smaller than a patch).

    Args:
        images: ``(C, X, Y, Z)`` tensors, already normalised.
        labels: one ``(X, Y, Z)`` integer tensor per image, or ``None``.
        patch: patch size.
    """

    def __init__(
        self, images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None, patch: Sequence[int]
    ) -> None:
        self.patch = tuple(int(p) for p in patch)
        self.images = [self._pad(x) for x in images]
        self.labels = None if labels is None else [self._pad(y[None])[0] for y in labels]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        extra = [max(0, p - s) for p, s in zip(self.patch, x.shape[1:])]
        pad: list[int] = []
        for e in reversed(extra):  # F.pad lists the last axis first
            pad += [e // 2, e - e // 2]
        return torch.nn.functional.pad(x, pad) if any(extra) else x

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` patches ``(n, C, *patch)`` (and their labels ``(n, *patch)``), drawn with ``generator``."""
        images, labels = [], []
        for _ in range(n):
            i = int(torch.randint(len(self.images), (1,), generator=generator))
            x = self.images[i]
            corner = [int(torch.randint(s - p + 1, (1,), generator=generator)) for s, p in zip(x.shape[1:], self.patch)]
            box = tuple(slice(c, c + p) for c, p in zip(corner, self.patch))
            images.append(x[(slice(None), *box)])
            if self.labels is not None:
                labels.append(self.labels[i][box])
        return torch.stack(images), (torch.stack(labels) if self.labels is not None else None)
