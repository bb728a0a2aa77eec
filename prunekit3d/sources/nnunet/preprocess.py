"""Calibration images in the network's input space, made by nnU-Net's own preprocessing.

Two sources::

    raw images   case_0000<file_ending>, case_0001...  --the plans' preprocessor (DefaultPreprocessor.run_case):
                 (nnU-Net naming, dataset.json's ending)   transpose, crop to nonzero, resample to the
                                                           configuration's spacing, normalise per channel scheme
    preprocessed nnUNet_preprocessed/DatasetXXX/<data_identifier>/  (*.b2nd or *.npz, as nnU-Net wrote them)

Both give float32 arrays ``(C, z, y, x)`` in nnU-Net's axis order: what the network saw in training.
The preprocessed folder's ``.pkl`` property files are never read (they are pickles); only the image
arrays (blosc2 containers, or ``.npz``/``.npy`` read with ``allow_pickle=False``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from prunekit3d.sources.nnunet.folder import NNUNetModel

__all__ = ["calibration_images", "raw_cases"]


def raw_cases(folder: str | Path, file_ending: str, channels: int) -> dict[str, list[Path]]:
    """nnU-Net-named images of ``folder`` grouped by case: ``{case: [case_0000, case_0001, ...]}``.

    Raises:
        ValueError: no such images, or a case lacks one of the ``channels`` channel files.
    """
    folder = Path(folder)
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(file_ending)}$")
    cases: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if match and path.is_file():
            cases.setdefault(match.group(1), {})[int(match.group(2))] = path
    if not cases:
        raise ValueError(f"{folder} holds no nnU-Net-named images (CASE_0000{file_ending}); name the channel "
                         f"files CASE_XXXX{file_ending} as dataset.json's file_ending says")
    for case, files in cases.items():
        if sorted(files) != list(range(channels)):
            raise ValueError(f"case {case!r} in {folder} has channel files {sorted(files)}; the model takes "
                             f"{channels} channel(s): {case}_0000{file_ending} ... "
                             f"{case}_{channels - 1:04d}{file_ending}")
    return {case: [files[c] for c in range(channels)] for case, files in cases.items()}


def _preprocessed_arrays(folder: Path) -> list[np.ndarray]:
    b2nd = sorted(p for p in folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))
    if b2nd:
        import blosc2

        return [np.asarray(blosc2.open(urlpath=str(p), mode="r")[:], dtype=np.float32) for p in b2nd]
    arrays = []
    for p in sorted(folder.glob("*.npz")):
        with np.load(p, allow_pickle=False) as data:
            arrays.append(np.asarray(data["data"], dtype=np.float32))
    if not arrays:
        raise ValueError(f"{folder} holds no preprocessed cases (*.b2nd or *.npz written by nnUNetv2_preprocess)")
    return arrays


def _preprocessed_folder(path: Path, model: NNUNetModel) -> Path | None:
    """The configuration's folder if ``path`` is an nnUNet_preprocessed dataset folder or that folder itself."""
    identifier = model.configuration_manager().data_identifier
    for candidate in (path / identifier, path):
        if any(candidate.glob("*.b2nd")) or any(candidate.glob("*.npz")):
            return candidate
    return None


def calibration_images(
    model: NNUNetModel, images: str | Path, *, max_cases: int | None = None, cases: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Calibration images for ``model``, preprocessed exactly as nnU-Net preprocesses its inputs.

    Args:
        model: the model folder as read by :func:`~prunekit3d.sources.nnunet.read_model_folder`.
        images: a folder of raw nnU-Net-named images (``CASE_0000`` + dataset.json's ``file_ending``), or
            an ``nnUNet_preprocessed/DatasetXXX_Name`` folder (or its ``<data_identifier>`` subfolder).
        max_cases: use at most this many cases (sorted by name).
        cases: use only these case identifiers (raw images only).

    Returns:
        float32 arrays ``(C, z, y, x)``, one per case, in the network's input space.
    """
    path = Path(images)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder of nnU-Net-named images or an nnUNet_preprocessed folder")
    preprocessed = _preprocessed_folder(path, model)
    if preprocessed is not None:
        if cases is not None:
            raise ValueError("cases= selects raw images; a preprocessed folder is used whole")
        return _preprocessed_arrays(preprocessed)[:max_cases]
    found = raw_cases(path, model.dataset_json["file_ending"], model.input_channels)
    names = [c for c in sorted(found) if cases is None or c in cases][:max_cases]
    plans_manager = model.plans_manager()
    config = plans_manager.get_configuration(model.configuration)
    preprocessor = config.preprocessor_class(verbose=False)
    arrays = []
    for name in names:
        data, _, _ = preprocessor.run_case([str(p) for p in found[name]], None, plans_manager, config,
                                           model.dataset_json)
        arrays.append(np.ascontiguousarray(data, dtype=np.float32))
    return arrays
