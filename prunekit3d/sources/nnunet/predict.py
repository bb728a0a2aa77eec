"""Segment raw images with an nnU-Net model folder (original or compressed) through nnU-Net's own predictor.

::

    read_model_folder (checkpoints read weights-only, networks built as nnU-Net builds them)
        --nnUNetPredictor.manual_initialization--> nnU-Net's preprocessing, sliding window (Gaussian, mirroring),
                                                   fold ensembling, export in the input's geometry --> OUT/case.nii.gz

It is what ``nnUNetv2_predict_from_modelfolder`` does, except that the checkpoints are never unpickled
with ``weights_only=False`` (nnU-Net's own loader does that): the weights are read as
:func:`~prunekit3d.sources.nnunet.read_checkpoint` reads them and handed to the predictor.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from prunekit3d.sources.nnunet.folder import read_model_folder
from prunekit3d.sources.nnunet.preprocess import raw_cases

__all__ = ["predict_folder"]


def predict_folder(
    model_folder: str | os.PathLike,
    images: str | os.PathLike,
    out: str | os.PathLike,
    *,
    folds: Sequence[int | str] | None = None,
    device: str | torch.device = "cpu",
    step_size: float = 0.5,
    mirroring: bool = True,
    processes: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Segment every case of ``images`` with ``model_folder``; one file per case in ``out``.

    Args:
        model_folder: an nnU-Net model folder, e.g. one :func:`~prunekit3d.sources.nnunet.write_model_folder` wrote.
        images: raw nnU-Net-named images (``CASE_0000`` + dataset.json's ``file_ending``).
        out: output folder (created); segmentations are ``CASE`` + ``file_ending``, in the inputs' geometry.
        folds: folds to ensemble; default all present.
        device: ``"cpu"``, ``"cuda"``, ...
        step_size: sliding-window step as a fraction of the patch (nnU-Net's ``-step_size``).
        mirroring: test-time mirroring along the axes the trainer allowed (nnU-Net's default; off: ``--disable_tta``).
        processes: worker processes for preprocessing and export; 0 runs nnU-Net's sequential path.
        overwrite: replace existing segmentations in ``out``; otherwise refuse if any exists.

    Returns:
        The written segmentation files.
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    model = read_model_folder(model_folder, folds)
    ending = model.dataset_json["file_ending"]
    cases = raw_cases(images, ending, model.input_channels)
    out = Path(out)
    targets = [out / f"{case}{ending}" for case in sorted(cases)]
    if Path(images).resolve() == out.resolve():
        raise ValueError(f"--out {out} is the input folder; write the segmentations elsewhere")
    existing = [t for t in targets if t.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} exists; pass overwrite=True or choose another output folder")
    device = torch.device(device)
    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device,
                                verbose=False, allow_tqdm=False)
    first = model.folds[0]  # its teacher is the network as the trainer built it; each fold's weights go into it
    weights = [f.checkpoint.weights for f in model.folds]
    predictor.manual_initialization(first.teacher, model.plans_manager(), model.configuration_manager(), weights,
                                    model.dataset_json, first.checkpoint.trainer_name, first.checkpoint.mirroring_axes)
    inputs = [[str(p) for p in cases[case]] for case in sorted(cases)]
    truncated = [str(out / case) for case in sorted(cases)]
    out.mkdir(parents=True, exist_ok=True)
    if processes > 0:
        predictor.predict_from_files(inputs, truncated, save_probabilities=False, overwrite=True,
                                     num_processes_preprocessing=processes, num_processes_segmentation_export=processes)
    else:
        predictor.predict_from_files_sequential(inputs, truncated, save_probabilities=False, overwrite=True)
    return targets
