"""The one resumable checkpoint of the recipes (``train`` and ``compress``), without pickle.

Layout, replaced atomically as a whole (:func:`prunekit3d.io.files.atomic_directory`)::

    checkpoint/
        model.safetensors       model.state_dict(), one entry per distinct tensor: weights and the branch
                                masks (active, restorable)
        optimizer.safetensors   per-parameter optimizer state, keys "<param index>.<name>" (momentum buffers)
        state.json              format and version, the state dict's aliases ({alias key: stored key} for
                                tensors held under two names, as DynUNet's skip_layers), the optimizer's
                                param_groups and scalar state, and the caller's ``state`` (epoch, pruner
                                state, history, config, ...)

A checkpoint of another format (or an earlier prunekit3d's) is refused with one line, never half-read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from prunekit3d.io.errors import ArtifactError
from prunekit3d.io.files import atomic_directory
from prunekit3d.io.weights import fit_state, split_tied

__all__ = ["FORMAT", "checkpoint_state", "load_checkpoint", "save_checkpoint"]

FORMAT, VERSION = "prunekit3d.checkpoint", 1
MODEL, OPTIMIZER, STATE = "model.safetensors", "optimizer.safetensors", "state.json"


def _split_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: Mapping[str, torch.Tensor], rest: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, state: Mapping[str, Any]
) -> Path:
    """Write (or atomically replace) the checkpoint directory ``path``; ``state`` must be JSON-able. Without an
    ``optimizer`` (weights only, as a best epoch's), its file holds no state."""
    path = Path(path)
    weights, tied = split_tied(model.state_dict())
    tensors, rest = _split_optimizer(optimizer) if optimizer is not None else ({}, {"param_groups": [], "scalars": {}})
    body = json.dumps({"format": FORMAT, "format_version": VERSION, "tied": tied, "optimizer": rest,
                       "state": state}, indent=1)
    with atomic_directory(path, overwrite=True) as tmp:
        safetensors.torch.save_file(weights, tmp / MODEL)
        safetensors.torch.save_file(tensors, tmp / OPTIMIZER)
        (tmp / STATE).write_text(body, encoding="utf-8")
    return path


def _body(path: Path) -> dict[str, Any]:
    missing = [name for name in (MODEL, OPTIMIZER, STATE) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"no checkpoint to resume from in {path} (missing {missing}); start without --resume")
    body = json.loads((path / STATE).read_text(encoding="utf-8"))
    if not isinstance(body, dict) or body.get("format") != FORMAT or body.get("format_version") != VERSION:
        raise ValueError(f"{path} is not a checkpoint this prunekit3d can resume (written by another version?); "
                         "start the run again without --resume")
    return body


def checkpoint_state(path: str | Path) -> dict[str, Any] | None:
    """The caller's ``state`` of the checkpoint at ``path`` (weights not read), or ``None`` if there is none."""
    path = Path(path)
    return _body(path)["state"] if (path / STATE).is_file() else None


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Load the model (and the optimizer, unless ``None``) from ``path`` in place and return the saved ``state``.

    Raises:
        FileNotFoundError: no complete checkpoint at ``path``.
        ValueError: another format, or the checkpoint does not fit ``model`` (another architecture or classes).
    """
    path = Path(path)
    body = _body(path)
    weights = safetensors.torch.load_file(path / MODEL, device=str(device))
    try:
        model.load_state_dict(fit_state(weights, body["tied"], model, path / MODEL), strict=True)
    except ArtifactError as err:
        raise ValueError(f"{err}; the checkpoint was written for another network than this run builds") from None
    if optimizer is not None:
        tensors = safetensors.torch.load_file(path / OPTIMIZER, device=str(device))
        optimizer.load_state_dict(_join_optimizer(tensors, body["optimizer"]))
    return body["state"]
