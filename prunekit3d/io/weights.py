"""State dicts to and from safetensors, with shared (tied) tensors.

Networks often hold one module under two names (DynUNet's ``skip_layers``, nnU-Net's
``decoder.encoder``), so their state dict has several keys for one tensor, which safetensors
refuses to write. The file keeps the first key of each tensor; the others are recorded as aliases::

    state_dict --split_tied--> (one key per tensor -> weights.safetensors,  {alias: kept key} -> manifest)
    weights.safetensors + aliases --fit_state--> a state dict with every key the rebuilt model expects
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from prunekit3d.io.errors import ArtifactError

__all__ = ["fit_state", "read_weights", "split_tied"]


def split_tied(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One CPU tensor per distinct tensor of ``state``, and ``{alias: kept key}`` for the repeats."""
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    first: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for key, t in state.items():
        t = t.detach()
        if t.numel():  # empty tensors may all report address 0
            view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if view in first:
                tied[key] = first[view]
                continue
            first[view] = key
            storage = view[:2]
            if storage in storages:
                t = t.clone()  # another view into a storage already written: give it its own
            storages.add(storage)
        kept[key] = t.cpu().contiguous()
    return kept, tied


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, on the CPU; never unpickles anything."""
    try:
        return safetensors.torch.load_file(file, device="cpu")
    except (SafetensorError, OSError) as err:
        raise ArtifactError(f"{file}: not a readable safetensors file ({err})") from err


def _listing(keys: list[str]) -> str:
    return f"{keys[:3]}{f' and {len(keys) - 3} more' if len(keys) > 3 else ''}"


def fit_state(
    saved: Mapping[str, torch.Tensor], tied: Mapping[str, str], model: nn.Module, file: Path
) -> dict[str, torch.Tensor]:
    """``saved`` plus its aliases, checked key by key and shape by shape against ``model``'s state dict.

    Raises:
        ArtifactError: naming ``file`` and the first missing / unexpected key or shape mismatch.
    """
    state = dict(saved)
    for alias, key in tied.items():
        if key not in saved:
            raise ArtifactError(f"{file}: tied key {alias!r} points at {key!r}, which the file does not hold")
        state[alias] = saved[key]
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ArtifactError(
            f"{file} does not fit {type(model).__name__}: the model has {len(missing)} key(s) the file lacks "
            f"{_listing(missing)}, the file has {len(unexpected)} key(s) the model lacks {_listing(unexpected)}"
        )
    for key, t in expected.items():
        if t.shape != state[key].shape:
            raise ArtifactError(
                f"{file} does not fit {type(model).__name__}: {key!r} is {tuple(state[key].shape)} in the file "
                f"but {tuple(t.shape)} in the model"
            )
    return state
