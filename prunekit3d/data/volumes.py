"""Reading volumes: the NIfTI images (and labels) a user gives for calibration, evaluation or prediction.

Calibration images (``--calib``) come from a NIfTI file, a folder of them (nnU-Net's ``case_0000.nii.gz``,
``case_0001.nii.gz`` ... files are joined into one multi-channel case) or an MSD data set folder
(``dataset.json``); each becomes a :class:`Volume` ``(C, X, Y, Z)`` float32 array, in the voxel order stored
in the file. Labels (``--labels``) are matched to the images by case name. Files are only read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prunekit3d.io.errors import first_line

__all__ = ["IMAGE_ENDINGS", "NIFTI", "Volume", "case_name", "find_cases", "read_case", "read_labels", "read_volumes"]

NIFTI = (".nii.gz", ".nii")
#: Endings stripped from file names to get case names (NIfTI, and what nnU-Net data sets also use).
IMAGE_ENDINGS = (*NIFTI, ".mha", ".nrrd")


@dataclass
class Volume:
    """One case: ``image`` is ``(C, X, Y, Z)`` float32 as stored; ``label`` ``(X, Y, Z)`` or ``None``;
    ``affine`` the 4x4 voxel-to-world (RAS mm) matrix of its (first) file, or ``None`` if unknown."""

    name: str
    image: np.ndarray
    label: np.ndarray | None = None
    source: str = ""
    affine: np.ndarray | None = None


def case_name(path: str | Path) -> str:
    """A case's name: the file name without its image ending (``case_0000.nii.gz`` -> ``case_0000``)."""
    name = Path(path).name
    for ending in IMAGE_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)]
    return Path(name).stem


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        data = np.asanyarray(nib.load(str(path)).dataobj, dtype=np.float32)
    except Exception as err:  # nibabel raises several types for damaged files
        raise ValueError(f"cannot read {path} as NIfTI: {first_line(err)}") from None
    if data.ndim == 5 and data.shape[3] == 1:  # ITK writes vector images as X, Y, Z, 1, C
        data = data[:, :, :, 0]
    if data.ndim not in (3, 4):
        raise ValueError(f"{path} is a {data.ndim}-D image {data.shape}; calibration images are 3-D volumes "
                         "(X, Y, Z), or 4-D with channels last")
    return data


def _affine(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).affine, dtype=np.float64)  # the header only: the data stay on disk


def _image(paths: list[Path]) -> np.ndarray:
    arrays = [_read_nifti(p) for p in paths]
    if len(arrays) == 1:
        a = arrays[0]
        return a[None] if a.ndim == 3 else np.moveaxis(a, -1, 0)
    if any(a.ndim != 3 for a in arrays) or len({a.shape for a in arrays}) != 1:
        raise ValueError(f"the channel files {[p.name for p in paths]} must be 3-D volumes of one shape")
    return np.stack(arrays)


def _nifti_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI))


def _group_channels(files: list[Path]) -> dict[str, list[Path]]:
    """nnU-Net's ``case_0000``, ``case_0001`` ... files as one case; otherwise one case per file."""
    pattern = re.compile(r"^(.*)_(\d{4})$")
    matches = [pattern.match(case_name(f)) for f in files]
    if all(matches):
        cases: dict[str, list[Path]] = {}
        for f, m in zip(files, matches):
            cases.setdefault(m.group(1), []).append(f)  # type: ignore[union-attr]
        return {c: sorted(fs) for c, fs in cases.items()}
    return {case_name(f): [f] for f in files}


def find_cases(path: str | Path, what: str = "--calib") -> dict[str, list[Path]]:
    """The cases of a NIfTI file, a folder of NIfTI files or an MSD data set folder, without reading them:
    ``{case name: [image file per channel]}`` (nnU-Net's ``case_0000``, ``case_0001`` ... files grouped).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no image found.
    """
    path = Path(path)
    hint = "pass a NIfTI file (.nii, .nii.gz), a folder of them, or an MSD data set folder (dataset.json)"
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist; {hint}")
    if path.is_file():
        if not path.name.endswith(NIFTI):
            raise ValueError(f"{what} {path} is not a NIfTI file; {hint}")
        return {case_name(path): [path]}
    if (path / "dataset.json").is_file():
        from prunekit3d.data.msd import read_msd  # msd reads its cases' names through this module

        dataset = read_msd(path)
        return {name: [Path(p) for p in np.atleast_1d(files["image"])] for name, files in dataset.cases.items()}
    files = _nifti_files(path)
    if not files:
        raise ValueError(f"{what} {path} holds no NIfTI image (.nii, .nii.gz); {hint}")
    return _group_channels(files)


def read_case(name: str, files: list[Path]) -> Volume:
    """One case of :func:`find_cases` read: its image (channel files stacked) and the first file's affine.

    Raises:
        ValueError: a file cannot be read, or the channel files do not fit together.
    """
    return Volume(name, _image(files), source=str(files[0]), affine=_affine(files[0]))


def read_volumes(path: str | Path, what: str = "--calib") -> list[Volume]:
    """The images of a NIfTI file, a folder of NIfTI files or an MSD data set folder (:func:`find_cases`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: no image found, or one cannot be read.
    """
    return [read_case(name, files) for name, files in find_cases(path, what).items()]


def read_labels(path: str | Path, volumes: list[Volume]) -> None:
    """Attach ``label`` arrays to ``volumes`` in place: one NIfTI file (one volume), a folder of label
    files named like the cases, or an MSD folder (its ``labelsTr/``).

    Raises:
        FileNotFoundError, ValueError: a label is missing or does not fit its image.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--labels {path} does not exist; pass a label NIfTI file or a folder of them")
    if path.is_file():
        if len(volumes) != 1:
            raise ValueError(f"--labels {path} is one file but --calib holds {len(volumes)} images; pass a folder "
                             "of label files named like the images")
        files = {volumes[0].name: path}
    else:
        folder = path / "labelsTr" if (path / "dataset.json").is_file() else path
        files = {case_name(f): f for f in _nifti_files(folder)}
    for v in volumes:
        if v.name not in files:
            raise FileNotFoundError(f"no label for calibration image {v.name!r} in {path} (expected {v.name}.nii.gz)")
        label = _read_nifti(files[v.name])
        if label.ndim != 3 or label.shape != v.image.shape[1:]:
            raise ValueError(
                f"label {files[v.name]} has shape {label.shape}, its image {v.name!r} {v.image.shape[1:]}; "
                "labels must be 3-D on the image's grid"
            )
        if not np.all(label == np.round(label)) or label.min() < 0:
            raise ValueError(f"label {files[v.name]} holds values that are not class indices 0, 1, 2, ...")
        v.label = label.astype(np.int64)
