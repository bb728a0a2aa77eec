"""The bundled CT split for held-out evaluation: a part to train and calibrate on, a part never seen.

The labeled CT (``imagesTr/ct_abdomen.nii.gz``, 30 slices) is slices 82-111 of the full 112-slice scan
(``unlabeled/ct_abdomen_full.nii.gz``, no labels). Along z (the scan's slice axis), fold 0 (the default)::

    full CT slices   0 ... 26 | 27 ... 54 | 55 ... 81 | 82 ..... 91 | 92 ........... 111
                     unlabeled, three parts            | EVALUATION  | TRAINING (labeled)
    labeled slices                                     |  0 ...... 9 | 10 ............ 29

and fold 1, which holds out the next ten labeled slices and trains on the two slabs around them::

    labeled slices                                     |  0 ... 9 | 10 ...... 19 | 20 ... 29
                                                       | TRAINING | EVALUATION   | TRAINING

- ``train``: the labeled slices outside the fold's evaluation slab (liver, kidneys, spleen), one file per
  contiguous slab -- baselines are trained on them;
- ``calibration``: unlabeled images for label-free compression: the training slab(s) (``abdomen``, or
  ``abdomen_1`` and ``abdomen_2``) and the three parts of full-CT slices 0-81 (``lower_1`` .. ``lower_3``; compress
  holds out the last by name to measure agreement);
- ``evaluation``: the fold's ten labeled slices (all three organs), never part of training, calibration or
  distillation. A network is scored on them as inference sees them: predicted within the whole scan
  (``context``), whose other slices are the training and calibration parts, and cut to the slab
  (``Case.slices``) afterwards.

Labeled slices 20-29 hold 89 kidney voxels in all, too few to score an organ on, so they make no third fold. Two
folds double the labeled voxels a benchmark is scored on; networks trained on one fold are scored on its own
evaluation slab only.

Every part is written as its own NIfTI file (labels in a ``labels/`` folder beside it, named like the
image) with the affine of its first slice, so predictions land on the scan's grid. Intensities stay in Hounsfield
units; preprocessing is the user's choice.

>>> split = heldout_split("work/split")
>>> split.evaluation.image.name
'evaluation.nii.gz'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch import nn

from prunekit3d.data.network_input import Preprocessing
from prunekit3d.sample import sample_dataset

__all__ = ["FOLDS", "LABELED_OFFSET", "Case", "Evaluation", "HeldoutSplit", "evaluation", "heldout_split",
           "training_pairs"]

#: The labeled CT's slices each fold holds out for evaluation (the rest of its 30 slices train), and where the
#: labeled CT starts in the full scan.
FOLDS, LABELED_OFFSET = (range(0, 10), range(10, 20)), 82
LABELED_SLICES = range(0, 30)


@dataclass(frozen=True)
class Case:
    """One image file, its label file (``None`` when unlabeled) and the full-scan slices it covers."""

    image: Path
    label: Path | None
    slices: range


@dataclass(frozen=True)
class HeldoutSplit:
    """The written parts (see the module docstring)."""

    train: tuple[Case, ...]
    calibration: tuple[Case, ...]
    evaluation: Case
    context: Path

    @property
    def calibration_dir(self) -> Path:
        """The folder holding exactly the calibration images (what ``--calib`` takes)."""
        return self.calibration[0].image.parent


def _slab(image: nib.Nifti1Image, slices: range, dtype: type) -> nib.Nifti1Image:
    data = np.asanyarray(image.dataobj)[:, :, slices.start:slices.stop].astype(dtype)
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.array([0, 0, slices.start]) + image.affine[:3, 3]
    out = nib.Nifti1Image(data, affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    return out


def heldout_split(out: str | Path, fold: int = 0) -> HeldoutSplit:
    """Write fold ``fold``'s split into ``out`` (``train/``, ``calibration/``, ``evaluation/``; files are replaced).

    Raises:
        ValueError: ``fold`` is not one of :data:`FOLDS`, or ``out`` holds another split's images (another fold's
            calibration images could hold this fold's evaluation slab).
    """
    if fold not in range(len(FOLDS)):
        raise ValueError(f"fold {fold} does not exist; the bundled CT has folds {list(range(len(FOLDS)))}")
    out = Path(out)
    root = sample_dataset()
    labeled = nib.load(str(root / "imagesTr" / "ct_abdomen.nii.gz"))
    labels = nib.load(str(root / "labelsTr" / "ct_abdomen.nii.gz"))
    full = nib.load(str(root / "unlabeled" / "ct_abdomen_full.nii.gz"))
    # The labeled CT's file carries the full scan's origin, so the slabs are cut from the full scan, whose
    # slices 82-111 are the labeled CT voxel for voxel (and the labels are cut at the same offsets).
    shifted = lambda r: range(r.start + LABELED_OFFSET, r.stop + LABELED_OFFSET)  # noqa: E731
    if not np.array_equal(np.asanyarray(full.dataobj)[:, :, LABELED_OFFSET:], np.asanyarray(labeled.dataobj)):
        raise ValueError(f"{root}: the labeled CT is not slices {LABELED_OFFSET}+ of the full CT; reinstall prunekit3d")
    label_array = np.zeros(full.shape, np.uint8)
    label_array[:, :, LABELED_OFFSET:] = np.asanyarray(labels.dataobj)
    label_full = nib.Nifti1Image(label_array, full.affine)

    def write(part: str, name: str, slices: range, labeled_part: bool) -> Case:
        (out / part).mkdir(parents=True, exist_ok=True)
        image = out / part / f"{name}.nii.gz"
        nib.save(_slab(full, slices, np.int16), str(image))
        label = None
        if labeled_part:
            (out / part / "labels").mkdir(exist_ok=True)
            label = out / part / "labels" / f"{name}.nii.gz"
            nib.save(_slab(label_full, slices, np.uint8), str(label))
        return Case(image, label, slices)

    held = FOLDS[fold]
    slabs = [shifted(r) for r in (range(LABELED_SLICES.start, held.start), range(held.stop, LABELED_SLICES.stop))
             if len(r)]
    tags = [""] if len(slabs) == 1 else [f"_{i + 1}" for i in range(len(slabs))]
    thirds = [round(i * LABELED_OFFSET / 3) for i in range(4)]
    train = {f"train{t}": r for t, r in zip(tags, slabs)}
    calibration = {**{f"abdomen{t}": r for t, r in zip(tags, slabs)},
                   **{f"lower_{i + 1}": range(thirds[i], thirds[i + 1]) for i in range(3)}}
    # checked before anything is written, so that another fold's split is left as it was
    stale = [f"{part}/{p.name}" for part, names in (("train", train), ("calibration", calibration))
             for p in sorted((out / part).glob("*.nii*")) if p.name.removesuffix(".nii.gz") not in names]
    if stale:
        raise ValueError(f"{out} also holds {stale}, from another split (they could hold this fold's evaluation "
                         "slab); write each fold into its own empty folder")
    split = HeldoutSplit(
        train=tuple(write("train", name, r, True) for name, r in train.items()),
        calibration=tuple(write("calibration", name, r, False) for name, r in calibration.items()),
        evaluation=write("evaluation", "evaluation", shifted(held), True),
        context=root / "unlabeled" / "ct_abdomen_full.nii.gz",
    )
    return split


@dataclass(frozen=True)
class Evaluation:
    """The evaluation slab as a network sees it: the whole scan preprocessed, and what is scored of it."""

    scan: torch.Tensor  # (C, X, Y, Z), the preprocessed whole scan
    label: torch.Tensor  # (X, Y, Z') of the slab
    scored: slice  # the slab's slices along z
    spacing: tuple[float, float, float]

    def scores(self, model: nn.Module, reference: nn.Module | None, patch: Sequence[int]) -> dict[str, float]:
        """Held-out Dice and NSD against the labels (mean over the classes present) and agreement with
        ``reference`` (Dice with its segmentation), on the slab, predicted within the whole scan."""
        from prunekit3d.evaluate import dice_and_nsd, mean_dice, segmentation, sliding_window_logits

        logits = sliding_window_logits(model.eval(), self.scan, patch)[..., self.scored]
        dsc, nsd = dice_and_nsd(logits, self.label, self.spacing, tolerance=max(self.spacing))
        out = {"dice": float(np.nanmean(dsc.numpy())), "nsd": float(np.nanmean(nsd.numpy()))}
        if reference is not None:
            ref = sliding_window_logits(reference.eval(), self.scan, patch)[..., self.scored]
            out["agreement"] = mean_dice(segmentation(ref), segmentation(logits), ref.shape[0])
        return out


def evaluation(split: HeldoutSplit, preprocessing: Preprocessing) -> Evaluation:
    """The evaluation slab of ``split`` prepared with ``preprocessing`` (a whole-image record: no resampling)."""
    from prunekit3d.data import read_labels, read_volumes

    (scan,) = read_volumes(split.context)
    (slab,) = read_volumes(split.evaluation.image)
    read_labels(split.evaluation.label, [slab])
    spacing = tuple(float(s) for s in nib.load(str(split.evaluation.image)).header.get_zooms()[:3])
    scored = slice(split.evaluation.slices.start, split.evaluation.slices.stop)
    return Evaluation(preprocessing.apply(scan), torch.from_numpy(slab.label), scored, spacing)  # type: ignore[arg-type]


def training_pairs(split: HeldoutSplit, preprocessing: Preprocessing) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The training slabs prepared with ``preprocessing`` and their labels: ``[(C, X, Y, Z), ...], [(X, Y, Z), ...]``."""
    from prunekit3d.data import read_labels, read_volumes

    images, labels = [], []
    for case in split.train:
        (volume,) = read_volumes(case.image)
        read_labels(case.label, [volume])
        images.append(preprocessing.apply(volume))
        labels.append(torch.from_numpy(volume.label))
    return images, labels
