"""nnU-Net checkpoints (``fold_k/checkpoint_final.pth``) read without unpickling code, and written plain.

nnU-Net 2.8 writes a checkpoint with ``torch.save`` (pickle): the network weights, the optimizer
state, its training log, ``init_args`` (plans, configuration, fold, dataset.json, ``torch.device``),
the trainer's class name and the mirroring axes. Its log and ``_best_ema`` hold numpy float32
scalars, which ``torch.load(weights_only=True)`` refuses by default. They are the only non-plain
objects, so the file is read with the weights-only unpickler and these globals allow-listed::

    numpy._core.multiarray.scalar, numpy.dtype, numpy.dtypes.{Float16,Float32,Float64,Int32,Int64,Bool}DType

(the numpy scalar reconstructor builds a number from raw bytes and a dtype; it runs no code). Any
other global (a pickled module, a function, a class of the trainer) is refused with one line naming
it. Only the weights and four plain values are kept (:class:`Checkpoint`).

What :func:`write_checkpoint` writes is what nnU-Net's predictor reads, all plain types: it loads
with ``torch.load(weights_only=True)`` and no allow-list.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prunekit3d.io.files import atomic_file

__all__ = ["Checkpoint", "read_checkpoint", "write_checkpoint"]

#: What nnU-Net's predictor needs to find the trainer class (without timm: nnUNetTrainer is found first).
PREDICTOR_TRAINER = "nnUNetTrainer"


def _numpy_globals() -> list[Any]:
    """The numpy scalar types of nnU-Net's logs, under their numpy 2 and numpy 1 pickle names."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtypes = [getattr(np.dtypes, f"{n}DType") for n in ("Float16", "Float32", "Float64", "Int32", "Int64", "Bool")]
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *dtypes]


@dataclass
class Checkpoint:
    """The parts of an nnU-Net checkpoint prunekit3d uses; everything else in the file is dropped."""

    path: Path
    weights: dict[str, torch.Tensor]
    trainer_name: str
    configuration: str
    mirroring_axes: tuple[int, ...] | None
    epoch: int | None


def _load(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        what = f"pickles a {found.group(1)}" if found else "holds objects the weights-only loader refuses"
        raise ValueError(f"{path} {what}: prunekit3d reads only tensors and plain values from nnU-Net checkpoints "
                         "and never unpickles code; re-save it from a trusted nnU-Net with plain "
                         "network_weights") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"cannot read {path}: damaged or not a PyTorch checkpoint ({str(err).splitlines()[0]})"
        ) from None


def read_checkpoint(path: str | Path) -> Checkpoint:
    """The weights, trainer name, configuration, mirroring axes and epoch of an nnU-Net checkpoint.

    Raises:
        FileNotFoundError: no such file.
        ValueError: it pickles anything but tensors, plain values and numpy scalars, or lacks a field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; an nnU-Net model folder has fold_K/checkpoint_final.pth")
    data = _load(path)
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} holds a {type(data).__name__}, not an nnU-Net checkpoint (a dict)")
    weights = data.get("network_weights")
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise ValueError(f"{path} has no 'network_weights' dict of tensors: not an nnU-Net checkpoint")
    init_args = data.get("init_args")
    configuration = init_args.get("configuration") if isinstance(init_args, Mapping) else None
    trainer = data.get("trainer_name")
    if not isinstance(trainer, str) or not isinstance(configuration, str):
        raise ValueError(f"{path} lacks 'trainer_name' or 'init_args.configuration': not an nnU-Net v2 checkpoint")
    axes = data.get("inference_allowed_mirroring_axes")
    epoch = data.get("current_epoch")
    return Checkpoint(
        path=path,
        weights=dict(weights),
        trainer_name=trainer,
        configuration=configuration,
        mirroring_axes=None if axes is None else tuple(int(a) for a in axes),
        epoch=int(epoch) if isinstance(epoch, (int, np.integer)) else None,
    )


def write_checkpoint(
    path: str | Path,
    weights: Mapping[str, torch.Tensor],
    *,
    plans: Mapping[str, Any],
    configuration: str,
    fold: int | str,
    dataset_json: Mapping[str, Any],
    mirroring_axes: Sequence[int] | None,
    epoch: int | None = None,
) -> Path:
    """Write an inference checkpoint nnU-Net's predictor runs: plain tensors and values, atomically.

    ``trainer_name`` is ``"nnUNetTrainer"``: the predictor builds the network from the plans (which name
    prunekit3d's network class) and finds that trainer without importing nnU-Net's optional trainers.
    """
    checkpoint = {
        "network_weights": {k: v.detach().cpu().contiguous() for k, v in weights.items()},
        "trainer_name": PREDICTOR_TRAINER,
        "init_args": {"plans": dict(plans), "configuration": configuration, "fold": fold,
                      "dataset_json": dict(dataset_json)},
        "inference_allowed_mirroring_axes": None if mirroring_axes is None else tuple(int(a) for a in mirroring_axes),
        "current_epoch": epoch,
    }
    with atomic_file(path) as tmp:
        torch.save(checkpoint, tmp)
    return Path(path)
