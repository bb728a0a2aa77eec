"""Write compressed networks back as an nnU-Net model folder that stock nnU-Net predicts with.

::

    OUT/                                  (atomic: appears complete or not at all)
        plans.json          the source plans; the configuration's architecture names SlimNNUNet with
                            arch_kwargs {base, steps (first fold's), strides, kernel_sizes}
        dataset.json        copied; dataset_fingerprint.json too, where the source has one
        fold_k/checkpoint_final.pth   plain tensors + values (weights_only=True loads it), trainer_name
                                      "nnUNetTrainer", each fold's weights carrying their own architecture
        manifest.json       {"format": "prunekit3d.nnunet", provenance: source folder, trainer, folds,
                             per fold parameters, the compression report, sha256 of every file}

Name OUT ``<Something>__<Plans>__<configuration>`` and put it under ``nnUNet_results/DatasetXXX_Name/`` for
``nnUNetv2_predict -tr <Something>``; ``nnUNetv2_predict_from_modelfolder -m OUT`` takes any name.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from prunekit3d.io.files import atomic_directory, check_output_dir, sha256
from prunekit3d.sources.nnunet.checkpoint import write_checkpoint
from prunekit3d.sources.nnunet.folder import CHECKPOINT, MANIFEST_FORMAT, NNUNetModel
from prunekit3d.sources.nnunet.network import CLASS_NAME, SlimNNUNet

__all__ = ["MANIFEST", "slim_architecture", "write_model_folder"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def slim_architecture(base: Mapping[str, Any], steps: Sequence[Mapping[str, Any]],
                      strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The plans' ``architecture`` entry of a prunekit3d network (see :mod:`prunekit3d.sources.nnunet.network`)."""
    return {
        "network_class_name": CLASS_NAME,
        "arch_kwargs": {"base": dict(base), "steps": [dict(s) for s in steps],
                        "strides": [list(s) for s in strides], "kernel_sizes": [list(k) for k in kernel_sizes]},
        "_kw_requires_import": [],
    }


def write_model_folder(
    out: str | os.PathLike,
    model: NNUNetModel,
    networks: Sequence[nn.Module],
    *,
    report: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``networks`` (one per fold of ``model``, in ``model.folds`` order) as an nnU-Net model folder.

    Args:
        out: the folder to create.
        model: the source folder as read (plans, dataset.json, folds, base spec).
        networks: each fold's compressed network: made from ``model.folds[i].network`` by wrap, prune,
            prune_channels (a wrapped model is slimmed in a copy), or a slim network :func:`prunekit3d.load` built.
        report: the compression report (JSON), kept in manifest.json.
        overwrite: replace ``out`` if it is a folder prunekit3d wrote (never the source, never anything else).

    Returns:
        ``out`` as a Path.
    """
    out = Path(out)
    if len(networks) != len(model.folds):
        raise ValueError(f"{len(networks)} networks for {len(model.folds)} folds; pass one compressed network per fold")
    check_output_dir(out, sources=[model.folder], overwrite=overwrite, what="out")
    original = model.architecture
    kwargs = original["arch_kwargs"]
    slims = [
        SlimNNUNet.from_model(net, model.base, input_channels=model.input_channels, num_classes=model.num_classes,
                              deep_supervision=False, strides=kwargs.get("strides"),
                              kernel_sizes=kwargs.get("kernel_sizes"))
        for net in networks
    ]
    plans = copy.deepcopy(model.plans)
    plans["configurations"][model.configuration]["architecture"] = slim_architecture(
        model.base, slims[0].steps, kwargs["strides"], kwargs["kernel_sizes"]
    )
    with atomic_directory(out, overwrite=overwrite) as tmp:
        (tmp / "plans.json").write_text(json.dumps(plans, indent=2) + "\n", encoding="utf-8")
        for name in ("dataset.json", "dataset_fingerprint.json"):
            if (model.folder / name).is_file():
                shutil.copyfile(model.folder / name, tmp / name)
        folds: dict[str, Any] = {}
        for fold, slim in zip(model.folds, slims):
            path = tmp / f"fold_{fold.fold}" / CHECKPOINT
            path.parent.mkdir()
            write_checkpoint(path, slim.state_dict(), plans=plans, configuration=model.configuration, fold=fold.fold,
                             dataset_json=model.dataset_json, mirroring_axes=fold.checkpoint.mirroring_axes,
                             epoch=fold.checkpoint.epoch)
            folds[str(fold.fold)] = {"parameters": sum(p.numel() for p in slim.parameters()), "steps": len(slim.steps)}
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": FORMAT_VERSION,
            "prunekit3d_version": _version(),
            "source": {"folder": str(model.folder.resolve()), "trainer_name": model.trainer_name,
                       "configuration": model.configuration, "network_class_name": original["network_class_name"]},
            "folds": folds,
            "report": dict(report or {}),
            "files": {str(p.relative_to(tmp)): {"sha256": sha256(p), "bytes": p.stat().st_size} for p in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return out


def _version() -> str:
    from prunekit3d import __version__

    return __version__
