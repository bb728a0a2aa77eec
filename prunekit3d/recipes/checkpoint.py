"""A resumable training checkpoint without pickle: tensors in safetensors, everything else in JSON.

Layout, replaced atomically as a whole (:func:`prunekit3d.io.files.atomic_directory`)::

    checkpoint/
        model.safetensors       model.state_dict(): weights and the branch masks (active, restorable)
        optimizer.safetensors   per-parameter optimizer state, keys "<param index>.<name>" (momentum buffers)
        state.json              the optimizer's param_groups and scalar state, and the caller's ``state``
                                (epoch, iteration, pruner state, history, config, ...)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from prunekit3d.io.files import atomic_directory

__all__ = ["load_checkpoint", "save_checkpoint"]

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
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> Path:
    """Write (or atomically replace) the checkpoint directory ``path``; ``state`` must be JSON-able."""
    path = Path(path)
    tensors, rest = _split_optimizer(optimizer)
    body = json.dumps({"optimizer": rest, "state": state}, indent=1)
    with atomic_directory(path, overwrite=True) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(weights, tmp / MODEL)
        safetensors.torch.save_file(tensors, tmp / OPTIMIZER)
        (tmp / STATE).write_text(body, encoding="utf-8")
    return path


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Load the model and optimizer from ``path`` in place and return the saved ``state``.

    Raises:
        FileNotFoundError: no complete checkpoint at ``path``.
        ValueError: the checkpoint does not fit ``model`` (another architecture or number of classes).
    """
    path = Path(path)
    missing = [name for name in (MODEL, OPTIMIZER, STATE) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"no checkpoint to resume from in {path} (missing {missing}); start without --resume")
    saved = json.loads((path / STATE).read_text(encoding="utf-8"))
    weights = safetensors.torch.load_file(path / MODEL, device=str(device))
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path / MODEL} does not fit the model this run builds: {str(err).splitlines()[0]}") from None
    tensors = safetensors.torch.load_file(path / OPTIMIZER, device=str(device))
    optimizer.load_state_dict(_join_optimizer(tensors, saved["optimizer"]))
    return saved["state"]
