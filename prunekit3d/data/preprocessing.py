"""Preprocessing: how stored intensities become the network's input, for training, compression and prediction.

The record of one network's preprocessing (:class:`Preprocessing`, in :mod:`~prunekit3d.data.network_input`):
named schemes (CT window, z-score over the image or its foreground, percentile clip, none), target spacing
and orientation, or a MONAI transform list in bundle-config syntax; saved in the artifact, re-applied by
``predict``, inverted onto the image's grid.

Training (``prunekit3d train``) preprocesses each case with MONAI transforms, deterministic and cached once::

    load -- orient RAS -- [resample to spacing] -- normalise

Normalisation per channel as nnU-Net does it (:class:`Normalise`): CT is clipped to the 0.5 / 99.5
percentiles of the training set's foreground intensities and z-scored with their mean and std
(:func:`intensity_fingerprint`); every other modality is z-scored per image. :func:`normalise_volume` is
the older name of the two simplest records ("zscore" per image and channel, or "none").
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import Compose, EnsureTyped, LoadImaged, MapTransform, Orientationd, Spacingd

from prunekit3d.data.msd import MSDDataset
from prunekit3d.data.network_input import EXTRA_KEY, PARSE_HELP, SCHEMES, NetworkInput, Preprocessing
from prunekit3d.data.volumes import Volume

__all__ = [
    "EXTRA_KEY",
    "KEYS",
    "NORMALISATIONS",
    "PARSE_HELP",
    "SCHEMES",
    "NetworkInput",
    "Normalise",
    "Preprocessing",
    "intensity_fingerprint",
    "normalise_volume",
    "preprocessing",
]

#: The keys of a case dict: the image and its label.
KEYS = ["image", "label"]
#: What :func:`normalise_volume` can do to a calibration volume.
NORMALISATIONS = ("zscore", "none")


def normalise_volume(volume: Volume, how: str) -> torch.Tensor:
    """A calibration volume as a float32 tensor ``(C, X, Y, Z)``: z-scored per channel, or as stored
    (the records ``Preprocessing("zscore")`` and ``Preprocessing("none")``)."""
    if how not in NORMALISATIONS:
        raise ValueError(f"normalise_volume: {how!r} is not one of {list(NORMALISATIONS)}")
    return Preprocessing(how).apply(volume)


def _load_pair(files: Mapping[str, Any], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Raw image ``(C, X, Y, Z)`` and label ``(X, Y, Z)`` as stored (scaling applied), via nibabel."""
    paths = list(np.atleast_1d(files["image"]))
    arrays = [np.asanyarray(nib.load(p).dataobj, dtype=np.float32) for p in paths]
    image = np.moveaxis(arrays[0], -1, 0) if len(paths) == 1 and arrays[0].ndim == 4 else np.stack(arrays)
    label = np.asanyarray(nib.load(files["label"]).dataobj)
    if image.shape[0] != channels or image.shape[1:] != label.shape:
        raise ValueError(
            f"{paths[0]}: image {image.shape[1:]} with {image.shape[0]} channel(s) does not fit label {label.shape} "
            f"from {files['label']} with {channels} channel(s) in dataset.json"
        )
    return image, label


def intensity_fingerprint(
    dataset: MSDDataset, cases: Sequence[str], seed: int = 0, samples_per_case: int = 10_000
) -> list[dict[str, float]]:
    """Per channel: 0.5 / 99.5 percentile, mean and std of the foreground intensities of ``cases``.

    Reads every case once (nnU-Net's fingerprint, streamed: ``samples_per_case`` random foreground
    voxels per case and channel are kept). Also checks that every label holds only the listed classes.
    """
    rng = np.random.default_rng(seed)
    kept: list[list[np.ndarray]] = [[] for _ in dataset.modalities]
    for case in cases:
        image, label = _load_pair(dataset.cases[case], len(dataset.modalities))
        values = np.unique(label)
        if values.min() < 0 or values.max() >= dataset.num_classes or not np.all(values == np.round(values)):
            raise ValueError(
                f"case {case!r}: label values {values.tolist()[:8]} are not the class indices "
                f"0 .. {dataset.num_classes - 1} of dataset.json's labels {dataset.labels}"
            )
        foreground = label > 0
        for c in range(image.shape[0]):
            v = image[c][foreground]
            kept[c].append(rng.choice(v, samples_per_case) if v.size > samples_per_case else v)
    stats = []
    for c, parts in enumerate(kept):
        v = np.concatenate(parts) if parts else np.empty(0)
        if v.size == 0:
            raise ValueError(f"no foreground voxel (label > 0) in the training cases {list(cases)[:3]}")
        stats.append({
            "percentile_00_5": float(np.percentile(v, 0.5)),
            "percentile_99_5": float(np.percentile(v, 99.5)),
            "mean": float(v.mean()),
            "std": float(v.std()),
        })
    return stats


class Normalise(MapTransform):
    """Per channel: CT -> clip to the fingerprint's 0.5/99.5 percentiles, z-score with its mean/std;
    anything else -> z-score with the image's own mean/std (nnU-Net's CT and z-score normalisation)."""

    def __init__(
        self, keys: KeysCollection, modalities: Sequence[str], fingerprint: Sequence[Mapping[str, float]]
    ) -> None:
        super().__init__(keys)
        self.modalities = [m.upper() for m in modalities]
        self.fingerprint = [dict(f) for f in fingerprint]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key].float().clone()  # keeps the MetaTensor's affine and spacing
            for c, modality in enumerate(self.modalities):
                if modality == "CT":
                    f = self.fingerprint[c]
                    x[c] = (x[c].clamp(f["percentile_00_5"], f["percentile_99_5"]) - f["mean"]) / max(f["std"], 1e-8)
                else:
                    x[c] = (x[c] - x[c].mean()) / x[c].std().clamp_min(1e-8)
            d[key] = x
        return d


def preprocessing(
    dataset: MSDDataset, fingerprint: Sequence[Mapping[str, float]], spacing: Sequence[float] | None = None
) -> Compose:
    """The deterministic transforms of a case (validation uses them alone): load, orient, resample, normalise."""
    chain: list = [
        LoadImaged(KEYS, ensure_channel_first=True, image_only=True),
        Orientationd(KEYS, axcodes="RAS", labels=None),
    ]
    if spacing is not None:
        chain.append(Spacingd(KEYS, pixdim=tuple(spacing), mode=("bilinear", "nearest")))
    chain += [Normalise("image", dataset.modalities, fingerprint), EnsureTyped("label", dtype=torch.uint8)]
    return Compose(chain)
