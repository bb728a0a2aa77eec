"""The bundled CT's held-out split: what a fold evaluates on never reaches its training or calibration files."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from prunekit3d.sample.split import FOLDS, LABELED_OFFSET, heldout_split


def _slices(path) -> set[bytes]:
    data = np.asanyarray(nib.load(str(path)).dataobj)
    return {data[:, :, z].tobytes() for z in range(data.shape[2])}


@pytest.mark.parametrize("fold", range(len(FOLDS)))
def test_no_evaluation_slice_is_in_a_training_or_calibration_file(tmp_path, fold) -> None:
    split = heldout_split(tmp_path / "split", fold)
    held = _slices(split.evaluation.image)
    assert len(held) == len(FOLDS[fold])
    seen = [case.image for case in (*split.train, *split.calibration)]
    # compared by content, slice by slice: a wrong offset or a stale file from another fold would share slices
    assert all(not (held & _slices(path)) for path in seen)
    assert {p.name for p in split.calibration_dir.iterdir()} == {c.image.name for c in split.calibration}
    # the training slabs and the evaluation slab tile the labeled CT, and the slab holds all three organs
    labeled = sorted(z for case in (*split.train, split.evaluation) for z in case.slices)
    assert labeled == list(range(LABELED_OFFSET, LABELED_OFFSET + 30))
    classes, counts = np.unique(np.asanyarray(nib.load(str(split.evaluation.label)).dataobj), return_counts=True)
    assert classes.tolist() == [0, 1, 2, 3] and counts.min() > 1000


def test_a_folder_holding_another_fold_is_refused(tmp_path) -> None:
    first = heldout_split(tmp_path, 0)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.nii.gz")}
    # fold 0's training slab (calibration/abdomen.nii.gz) is fold 1's evaluation slab
    with pytest.raises(ValueError, match=r"calibration/abdomen.nii.gz.*its own empty folder"):
        heldout_split(tmp_path, 1)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.nii.gz")} == before  # fold 0's split left as it was
    assert first.evaluation.image in before
    with pytest.raises(ValueError, match="fold 2 does not exist"):
        heldout_split(tmp_path / "other", 2)
