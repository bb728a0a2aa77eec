"""Data for the training recipe: a Medical Segmentation Decathlon data set, its split, its transforms.

Layout read by :func:`read_msd` (MSD v1; nnU-Net v2's variant of it also works)::

    root/
        dataset.json     "modality" (or "channel_names"): {"0": "CT"}; "labels": {"0": "background", "1": "liver"}
                         (or {"background": 0, "liver": 1}); "training": [{"image": "./imagesTr/x.nii.gz",
                         "label": "./labelsTr/x.nii.gz"}, ...] (or, without "training": "file_ending" and
                         imagesTr/x_0000.nii.gz, labelsTr/x.nii.gz)
        imagesTr/        one image per case (MSD: 4-D NIfTI for several channels) or one file per channel
        labelsTr/        class indices 0 .. C-1, same grid as the image

Transforms (MONAI), deterministic part first (cached once per case)::

    load -- orient RAS -- [resample to spacing] -- normalise                  (training and validation)
      training only: -- pad to patch -- foreground indices --                   (cached too)
                     -- crop (foreground-centred with p = foreground_fraction) -- rotate -- flip x, y, z

Normalisation per channel as nnU-Net does it: CT is clipped to the 0.5 / 99.5 percentiles of the training
set's foreground intensities and z-scored with their mean and std (:func:`intensity_fingerprint`); every
other modality is z-scored per image.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotated,
    Spacingd,
    SpatialPadd,
)

__all__ = [
    "MSDDataset",
    "Normalise",
    "intensity_fingerprint",
    "preprocessing",
    "read_msd",
    "split_cases",
    "training_augmentation",
]


@dataclass
class MSDDataset:
    """A data set in MSD layout.

    Attributes:
        root: the directory holding ``dataset.json``.
        name: ``dataset.json``'s "name" (or the directory name).
        modalities: one name per image channel, e.g. ``["CT"]``.
        labels: class names, index = class value (``labels[0]`` is the background).
        cases: ``{case name: {"image": path or [path per channel], "label": path}}``, sorted by name.
    """

    root: Path
    name: str
    modalities: list[str]
    labels: list[str]
    cases: dict[str, dict[str, Any]]

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: {what}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None


def _class_names(labels: Mapping[str, Any], where: Path) -> list[str]:
    """``{"0": "background", ...}`` (MSD) or ``{"background": 0, ...}`` (nnU-Net v2) -> names by value."""
    pairs = {}
    for key, value in labels.items():
        index, name = (key, value) if str(key).isdigit() else (value, key)
        if not isinstance(index, (int, str)) or not str(index).isdigit():
            raise ValueError(
                f"{where}: label {key!r}: {value!r} is not a class index and a name (regions are not supported)"
            )
        pairs[int(index)] = str(name)
    if sorted(pairs) != list(range(len(pairs))) or len(pairs) < 2:
        raise ValueError(
            f"{where}: labels must be the classes 0 .. C-1 with C >= 2 (0 = background); got {sorted(pairs)}"
        )
    return [pairs[i] for i in range(len(pairs))]


def _case_name(path: str) -> str:
    name = Path(path).name
    for ending in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(ending):
            return name[: -len(ending)]
    return name


def read_msd(root: str | Path) -> MSDDataset:
    """Read ``root/dataset.json`` and check that every listed image and label file exists.

    Raises:
        FileNotFoundError: ``dataset.json`` or a case file is missing (the message names it).
        ValueError: ``dataset.json`` lacks a field or lists no training case.
    """
    root = Path(root)
    where = root / "dataset.json"
    meta = _read_json(where, "--data must be a Medical Segmentation Decathlon directory (dataset.json, imagesTr/, ...)")
    channels = meta.get("modality", meta.get("channel_names"))
    if not isinstance(channels, Mapping) or not channels:
        raise ValueError(f"{where} needs 'modality' (MSD) or 'channel_names' (nnU-Net v2), e.g. {{\"0\": \"CT\"}}")
    modalities = [str(channels[k]) for k in sorted(channels, key=int)]
    if "labels" not in meta:
        raise ValueError(f"{where} needs 'labels', e.g. {{\"0\": \"background\", \"1\": \"liver\"}}")
    labels = _class_names(meta["labels"], where)
    if "training" in meta:
        cases = {
            _case_name(c["label"]): {"image": str(root / c["image"]), "label": str(root / c["label"])}
            for c in meta["training"]
        }
    else:  # nnU-Net v2: labelsTr/<case><ending>, imagesTr/<case>_<channel:04d><ending>
        ending = meta.get("file_ending", ".nii.gz")
        cases = {}
        for label in sorted((root / "labelsTr").glob(f"*{ending}")):
            case = label.name[: -len(ending)]
            images = [str(root / "imagesTr" / f"{case}_{c:04d}{ending}") for c in range(len(modalities))]
            cases[case] = {"image": images if len(images) > 1 else images[0], "label": str(label)}
    if not cases:
        raise ValueError(f"{where} lists no training case ('training' is empty and labelsTr/ holds none)")
    for case, files in cases.items():
        for path in [*np.atleast_1d(files["image"]), files["label"]]:
            if not Path(path).is_file():
                raise FileNotFoundError(f"case {case!r}: {path} is listed in {where} but does not exist")
    return MSDDataset(root, str(meta.get("name", root.name)), modalities, labels, dict(sorted(cases.items())))


def split_cases(dataset: MSDDataset, split: str | Path | None = None, seed: int = 0) -> dict[str, list[str]]:
    """The training and validation cases: from a JSON file, or a seeded 80/20 split.

    Args:
        dataset: from :func:`read_msd`.
        split: a JSON file ``{"train": [...], "val": [...]}`` of case names (file names without extension),
            or ``None`` for a random 80/20 split seeded with ``seed``. A one-case data set validates on
            its training case.

    Returns:
        ``{"train": [...], "val": [...]}``.
    """
    names = list(dataset.cases)
    if split is None:
        if len(names) == 1:
            return {"train": names, "val": names}
        shuffled = random.Random(seed).sample(names, len(names))
        n_val = max(1, round(0.2 * len(names)))
        return {"train": sorted(shuffled[n_val:]), "val": sorted(shuffled[:n_val])}
    chosen = _read_json(Path(split), "--split must be a JSON file with 'train' and 'val' case lists")
    lists = isinstance(chosen, Mapping) and all(isinstance(chosen.get(k), list) and chosen[k] for k in ("train", "val"))
    if not lists:
        raise ValueError(f"{split} must hold non-empty lists 'train' and 'val' of case names")
    for key in ("train", "val"):
        unknown = [c for c in chosen[key] if c not in dataset.cases]
        if unknown:
            raise ValueError(
                f"{split}: {key} cases {unknown[:3]} are not in {dataset.root / 'dataset.json'} "
                f"(its cases: {names[:3]}{' ...' if len(names) > 3 else ''})"
            )
    return {"train": list(chosen["train"]), "val": list(chosen["val"])}


# ---- normalisation --------------------------------------------------------------------------------


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


# ---- transform chains -----------------------------------------------------------------------------


_KEYS = ["image", "label"]
_INDICES = ["label_fg", "label_bg"]


def preprocessing(
    dataset: MSDDataset, fingerprint: Sequence[Mapping[str, float]], spacing: Sequence[float] | None = None
) -> Compose:
    """The deterministic transforms of a case (validation uses them alone): load, orient, resample, normalise."""
    chain: list = [
        LoadImaged(_KEYS, ensure_channel_first=True, image_only=True),
        Orientationd(_KEYS, axcodes="RAS", labels=None),
    ]
    if spacing is not None:
        chain.append(Spacingd(_KEYS, pixdim=tuple(spacing), mode=("bilinear", "nearest")))
    chain += [Normalise("image", dataset.modalities, fingerprint), EnsureTyped("label", dtype=torch.uint8)]
    return Compose(chain)


def training_augmentation(pre: Compose, patch: Sequence[int], foreground_fraction: float) -> Compose:
    """``pre``, then pad to the patch and index the foreground (both cached with ``pre`` by a CacheDataset),
    then the random part: crop with foreground oversampling, rotate, flip along each axis."""
    angle = math.radians(15)
    return Compose([
        *pre.transforms,
        SpatialPadd(_KEYS, spatial_size=tuple(patch)),
        FgBgToIndicesd("label", fg_postfix="_fg", bg_postfix="_bg"),
        RandCropByPosNegLabeld(
            _KEYS, "label", spatial_size=tuple(patch), pos=foreground_fraction, neg=1 - foreground_fraction,
            num_samples=1, fg_indices_key=_INDICES[0], bg_indices_key=_INDICES[1],
        ),
        DeleteItemsd(_INDICES),  # flat index arrays of varying length: they would not collate
        RandRotated(_KEYS, range_x=angle, range_y=angle, range_z=angle, prob=0.2, mode=("bilinear", "nearest")),
        *(RandFlipd(_KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)),
    ])
