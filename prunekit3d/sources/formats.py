"""Which format a trained network comes in, and how ``compress`` takes it and gives it back the same way.

::

    CHECKPOINT                           read as                                  written back as
    prunekit3d artifact / state dict     sources.state_dict.build_model           DIR: artifact, report.json
    MONAI bundle (configs/, models/)     sources.bundle.read_bundle               DIR/bundle: the bundle, compressed
    nnU-Net model folder (plans.json)    sources.nnunet.read_model_folder         DIR/nnunet: the folder, every fold
                                                                                  compressed (DIR/fold_<k>: artifacts)

A :class:`Source` holds one teacher per part (``"model"``, or ``"fold_0"``, ``"fold_1"`` ... of an nnU-Net
folder), the base network's JSON spec, the preprocessing the format records, and the format's own way of
turning raw calibration images into network input where it has one (nnU-Net's preprocessor). Adding a format
means one reader and one writer here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit3d.data.network_input import Preprocessing
from prunekit3d.io.artifact import MANIFEST
from prunekit3d.sources.bundle import is_bundle
from prunekit3d.sources.state_dict import build_model, model_spec

__all__ = ["Source", "is_nnunet_folder", "open_source"]

#: ``(name, image (C, X, Y, Z) float32)`` pairs of a calibration folder, preprocessed by the format itself.
Calibration = Callable[[str], list[tuple[str, torch.Tensor]]]


@dataclass
class Source:
    """A trained network as the user gave it (see the module docstring).

    Attributes:
        kind: "artifact", "state_dict", "bundle" or "nnunet".
        path: what the user passed.
        teachers: the networks to compress, by part name, in eval mode.
        spec: JSON spec of the base network (what the artifacts record), or ``None``.
        preprocessing: the preprocessing the format records (``None``: none recorded; see ``calibration``).
        patch: the patch the format's inference uses, if it records one.
        calibration: the format's own preprocessing of a folder of raw images, or ``None``.
        write: writes the compressed parts back in the format, ``write(artifacts by part, target dir)``.
        notes: what the reader noticed (printed by compress).
    """

    kind: str
    path: Path
    teachers: dict[str, nn.Module]
    spec: dict[str, Any] | None
    preprocessing: Preprocessing | None = None
    patch: tuple[int, ...] | None = None
    calibration: Calibration | None = None
    write: Callable[[Mapping[str, Path], Path], None] | None = None
    notes: list[str] = field(default_factory=list)


def is_nnunet_folder(path: str | Path) -> bool:
    """Whether ``path`` is an nnU-Net model folder (``plans.json`` and ``dataset.json``)."""
    return (Path(path) / "plans.json").is_file() and (Path(path) / "dataset.json").is_file()


def open_source(
    checkpoint: str | Path,
    *,
    model: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    spec_file: str | Path | None = None,
    folds: Sequence[int | str] | None = None,
) -> Source:
    """Read ``checkpoint`` in whichever format it is (module docstring); one clear line on bad input."""
    path = Path(checkpoint)
    given = model is not None or model_kwargs is not None or spec_file is not None
    if path.is_dir() and (is_bundle(path) or is_nnunet_folder(path)) and given:
        raise ValueError(f"{path} describes its own network: drop --model / --model-kwargs / --spec")
    if path.is_dir() and is_nnunet_folder(path):
        return _nnunet(path, folds)
    if folds is not None:
        raise ValueError("--fold applies to nnU-Net model folders only")
    if path.is_dir() and is_bundle(path):
        return _bundle(path)
    network, spec = build_model(path, model_spec(model, model_kwargs, spec_file))
    kind = "artifact" if path.is_dir() and (path / MANIFEST).is_file() else "state_dict"
    recorded = None
    if kind == "artifact":
        from prunekit3d.io import load_manifest

        recorded = Preprocessing.from_manifest(load_manifest(path))
    return Source(kind, path, {"model": network}, spec, preprocessing=recorded)


def _bundle(path: Path) -> Source:
    from prunekit3d.sources.bundle import read_bundle, write_bundle

    bundle = read_bundle(path)

    def write(artifacts: Mapping[str, Path], target: Path) -> None:
        write_bundle(bundle, artifacts["model"], target)

    return Source("bundle", path, {"model": bundle.network.eval()}, bundle.spec, preprocessing=bundle.preprocessing,
                  patch=bundle.patch, write=write)


def _nnunet(path: Path, folds: Sequence[int | str] | None) -> Source:
    from prunekit3d import load
    from prunekit3d.sources.nnunet import calibration_images, read_model_folder, write_model_folder
    from prunekit3d.sources.nnunet.preprocess import raw_cases

    model = read_model_folder(path, folds)
    teachers = {f"fold_{f.fold}": f.network.eval() for f in model.folds}

    def calibration(images: str) -> list[tuple[str, torch.Tensor]]:
        arrays = calibration_images(model, images)
        try:  # raw images: the case names; a preprocessed folder: its files, in the same (sorted) order
            names = sorted(raw_cases(images, model.dataset_json["file_ending"], model.input_channels))
        except ValueError:
            names = [f"case_{i:03d}" for i in range(len(arrays))]
        return [(n, torch.from_numpy(a)) for n, a in zip(names, arrays)]

    def write(artifacts: Mapping[str, Path], target: Path) -> None:
        networks = [load(artifacts[f"fold_{f.fold}"]) for f in model.folds]
        write_model_folder(target, model, networks, report={"source": str(path)})

    return Source("nnunet", path, teachers, model.base, patch=tuple(int(p) for p in model.patch_size),
                  calibration=calibration, write=write, notes=list(model.notes))
