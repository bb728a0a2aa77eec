"""Patch sampling: random training and distillation patches of whole volumes, on MONAI transforms.

One crop for every recipe (:func:`patch_crop`)::

    case {"image": (C, X, Y, Z), "label": (1, X, Y, Z)} -- pad to patch -- foreground / background indices
        -- crop centred on a foreground voxel with probability foreground_fraction, else on a background voxel

``prunekit3d train`` runs it inside a cached MONAI dataset after preprocessing, followed by rotation and
flips (:func:`training_augmentation`). :class:`PatchSampler` runs it on volumes held in memory (``compress``
with the original network's own segmentation as the label, baselines with their labels), seeded by a
``torch.Generator`` so that a resumed run draws what the interrupted one would have. Without labels it crops
uniformly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from monai.transforms import (
    Compose,
    DeleteItemsd,
    FgBgToIndicesd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    SpatialPadd,
)

from prunekit3d.data.preprocessing import KEYS

__all__ = ["PatchSampler", "distillation_augmentation", "labelled_augmentation", "patch_crop", "training_augmentation"]

_INDICES = ["label_fg", "label_bg"]


def patch_crop(patch: Sequence[int], foreground_fraction: float) -> tuple[list, list]:
    """The crop as MONAI transforms: ``(deterministic part, random part)`` (a cache keeps the first).

    The deterministic part pads to the patch and indexes the label's foreground and background voxels;
    the random part crops around a foreground voxel with probability ``foreground_fraction``.
    """
    size = tuple(int(p) for p in patch)
    fixed = [SpatialPadd(KEYS, spatial_size=size), FgBgToIndicesd("label", fg_postfix="_fg", bg_postfix="_bg")]
    random = [
        RandCropByPosNegLabeld(
            KEYS, "label", spatial_size=size, pos=foreground_fraction, neg=1 - foreground_fraction, num_samples=1,
            fg_indices_key=_INDICES[0], bg_indices_key=_INDICES[1],
        ),
        DeleteItemsd(_INDICES),  # flat index arrays of varying length: they would not collate
    ]
    return fixed, random


def training_augmentation(pre: Compose, patch: Sequence[int], foreground_fraction: float) -> Compose:
    """``pre``, then :func:`patch_crop` (its deterministic part cached with ``pre`` by a CacheDataset), then
    rotation and a flip along each axis."""
    fixed, random = patch_crop(patch, foreground_fraction)
    return Compose([*pre.transforms, *fixed, *random, *_rotate_and_flip()])


def _rotate_and_flip() -> list:
    angle = math.radians(15)
    return [
        RandRotated(KEYS, range_x=angle, range_y=angle, range_z=angle, prob=0.2, mode=("bilinear", "nearest")),
        *(RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)),
    ]


def labelled_augmentation() -> list:
    """For supervised patches of volumes in memory: training's rotation and flips, and a small intensity
    scale and shift (the labels follow the geometry)."""
    return [*_rotate_and_flip(), RandScaleIntensityd("image", factors=0.1, prob=0.3),
            RandShiftIntensityd("image", offsets=0.1, prob=0.3)]


def distillation_augmentation() -> list:
    """Flips along each axis and a small intensity scale and shift, for label-free distillation patches:
    the original network labels the augmented patch itself, so nothing needs to stay consistent."""
    return [
        *(RandFlipd("image", prob=0.5, spatial_axis=axis) for axis in range(3)),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
    ]


class PatchSampler:
    """Random patches of volumes held in memory (zero-padded where a volume is smaller than a patch).

    Args:
        images: ``(C, X, Y, Z)`` tensors, already normalised.
        labels: one ``(X, Y, Z)`` integer tensor per image (the crop favours their foreground), or ``None``
            (uniform crops).
        patch: patch size.
        foreground_fraction: probability that a patch is centred on a foreground voxel of its label.
        augment: MONAI transforms applied to each patch dict after the crop (e.g. :func:`distillation_augmentation`).
    """

    def __init__(
        self,
        images: Sequence[torch.Tensor],
        labels: Sequence[torch.Tensor] | None,
        patch: Sequence[int],
        *,
        foreground_fraction: float = 0.5,
        augment: Sequence = (),
    ) -> None:
        self.patch = tuple(int(p) for p in patch)
        self.labelled = labels is not None
        if self.labelled:
            fixed, random = patch_crop(self.patch, foreground_fraction)
        else:
            fixed = [SpatialPadd("image", spatial_size=self.patch)]
            random = [RandSpatialCropd("image", roi_size=self.patch, random_size=False)]
        prepare = Compose(fixed)
        self.cases = [
            prepare({"image": x, "label": y[None]} if self.labelled else {"image": x})
            for x, y in zip(images, labels if labels is not None else [None] * len(images))
        ]
        self.draw = Compose([*random, *augment])

    def _one(self, case: dict) -> dict:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a volume without foreground crops on its background: as intended
            out = self.draw(dict(case))
        return out[0] if isinstance(out, list) else out

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` patches ``(n, C, *patch)`` (and their labels ``(n, *patch)``), drawn with ``generator``."""
        self.draw.set_random_state(seed=int(torch.randint(2**31 - 1, (1,), generator=generator)))
        picks = torch.randint(len(self.cases), (n,), generator=generator).tolist()
        patches = [self._one(self.cases[i]) for i in picks]
        images = torch.stack([torch.as_tensor(p["image"]).as_subclass(torch.Tensor) for p in patches])
        if not self.labelled:
            return images, None
        labels = torch.stack([torch.as_tensor(p["label"]).as_subclass(torch.Tensor)[0].long() for p in patches])
        return images, labels
