"""Medical Segmentation Decathlon data sets: the layout ``prunekit3d train`` reads, and their split.

Layout read by :func:`read_msd` (MSD v1; nnU-Net v2's variant of it also works)::

    root/
        dataset.json     "modality" (or "channel_names"): {"0": "CT"}; "labels": {"0": "background", "1": "liver"}
                         (or {"background": 0, "liver": 1}); "training": [{"image": "./imagesTr/x.nii.gz",
                         "label": "./labelsTr/x.nii.gz"}, ...] (or, without "training": "file_ending" and
                         imagesTr/x_0000.nii.gz, labelsTr/x.nii.gz)
        imagesTr/        one image per case (MSD: 4-D NIfTI for several channels) or one file per channel
        labelsTr/        class indices 0 .. C-1, same grid as the image
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prunekit3d.data.volumes import case_name

__all__ = ["MSDDataset", "read_msd", "split_cases"]


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
            case_name(c["label"]): {"image": str(root / c["image"]), "label": str(root / c["label"])}
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


