"""A trained network given as weights: a prunekit3d artifact, or a state dict plus the network's spec.

::

    CHECKPOINT (artifact dir)                         --prunekit3d.load-------------------------------> model
    CHECKPOINT (.pt/.pth, .safetensors) + model spec  --from_spec, check 3-D, check every tensor, load--> model

A ``.pt``/``.pth`` file is read with ``torch.load(weights_only=True)`` (never unpickling code) and may hold
the state dict itself or inside ``{"state_dict": ...}`` / ``{"network_weights": ...}`` (nnU-Net) /
``{"model": ...}`` (MONAI bundles); the spec is ``--model DOTTED.PATH --model-kwargs JSON`` or ``--spec FILE``
(JSON, see :func:`prunekit3d.from_spec`).
Nothing is ever written next to the input.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunekit3d.io import from_spec, load
from prunekit3d.io.artifact import MANIFEST
from prunekit3d.io.errors import first_line

__all__ = ["build_model", "check_3d", "first_conv", "fit_weights", "model_spec", "read_state_dict"]

#: Keys under which training frameworks nest the weights (Lightning / MONAI, nnU-Net, a MONAI bundle's
#: CheckpointSaver when it saves more than the model).
NESTED_KEYS = ("state_dict", "network_weights", "model")


def model_spec(
    model: str | None, model_kwargs: str | Mapping[str, Any] | None, spec_file: str | Path | None
) -> dict[str, Any] | None:
    """The JSON spec of the network from ``--model``/``--model-kwargs`` or ``--spec`` (``None`` if neither)."""
    if spec_file is not None and (model is not None or model_kwargs is not None):
        raise ValueError("give either --spec FILE or --model DOTTED.PATH [--model-kwargs JSON], not both")
    if spec_file is not None:
        path = Path(spec_file)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"--spec {path} does not exist; pass a JSON file like "
                                    '{"import_path": "monai.networks.nets.DynUNet", "kwargs": {...}}') from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"--spec {path} is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError(f"--spec {path} must hold a JSON object, got {type(data).__name__}")
        return data
    if model is None:
        if model_kwargs is not None:
            raise ValueError("--model-kwargs needs --model DOTTED.PATH (the network class they are passed to)")
        return None
    kwargs: Any = model_kwargs if model_kwargs is not None else {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as err:
            example = '{"spatial_dims": 3, "in_channels": 1}'
            raise ValueError(f"--model-kwargs is not valid JSON ({err}); e.g. '{example}'") from None
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"--model-kwargs must be a JSON object of keyword arguments, got {type(kwargs).__name__}")
    return {"import_path": model, "kwargs": dict(kwargs)}


def _is_tensor_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a prefix every key shares from a wrapper (DistributedDataParallel, torch.compile)."""
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or a ``.pt``/``.pth`` state dict, never unpickling code.

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable, or a pickle holding more than tensors (a whole model, an optimizer).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a state_dict (.pt, .pth, .safetensors) "
                                "or a prunekit3d artifact directory")
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file and not a prunekit3d artifact (no {MANIFEST} in it)")
    if path.suffix == ".safetensors":
        import safetensors.torch
        from safetensors import SafetensorError

        try:
            return _strip_prefix(safetensors.torch.load_file(path, device="cpu"))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read checkpoint {path} as safetensors: {first_line(err)}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))
        if found:  # the weights-only unpickler met a class or function: a pickled object, not tensors
            raise ValueError(
                f"checkpoint {path} pickles a {found.group(1)}, not a plain state_dict (a whole model or training "
                "state?); prunekit3d never unpickles code: save torch.save(model.state_dict(), path) instead"
            ) from None
        raise ValueError(f"cannot read checkpoint {path}: damaged or not a PyTorch file") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise ValueError(f"cannot read checkpoint {path}: damaged or not a PyTorch file ({first_line(err)})") from None
    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            if _is_tensor_dict(obj.get(key)):
                return _strip_prefix(dict(obj[key]))
        if _is_tensor_dict(obj):
            return _strip_prefix(dict(obj))
    raise ValueError(
        f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict: expected a dict of tensors, "
        f"possibly under one of {list(NESTED_KEYS)}; save torch.save(model.state_dict(), path)"
    )


def check_3d(model: nn.Module, what: str) -> None:
    """Refuse a network without 3-D convolutions (a 2-D model, or no CNN at all)."""
    kinds = [type(m) for m in model.modules()]
    if any(issubclass(k, (nn.Conv3d, nn.ConvTranspose3d)) for k in kinds):
        return
    if any(issubclass(k, (nn.Conv2d, nn.Conv1d, nn.ConvTranspose2d)) for k in kinds):
        raise ValueError(f"{what} is a 2-D model (2-D convolutions, no 3-D ones); prunekit3d compresses 3-D "
                         "segmentation networks: build it with spatial_dims=3 / conv_op=nn.Conv3d")
    raise ValueError(f"{what} has no 3-D convolution; prunekit3d compresses 3-D CNN segmentation networks")


def fit_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """Load ``state`` strictly, naming the first tensor that is missing, unexpected or of another shape."""
    expected = model.state_dict()
    state = _with_aliases(state, expected)
    hint = "fix --model-kwargs (or --spec) so that the network is the one the weights were trained with"
    for key, t in expected.items():
        if key not in state:
            raise ValueError(f"{path} does not fit {what}: the model has {key!r} {tuple(t.shape)}, the checkpoint "
                             f"does not; {hint}")
        if tuple(state[key].shape) != tuple(t.shape):
            raise ValueError(f"{path} does not fit {what}: {key!r} is {tuple(state[key].shape)} in the checkpoint "
                             f"but {tuple(t.shape)} in the model; {hint}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ValueError(f"{path} does not fit {what}: the checkpoint has {unexpected[0]!r} "
                         f"{tuple(state[unexpected[0]].shape)}, the model does not; {hint}")
    model.load_state_dict(state, strict=True)


def _with_aliases(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill keys the file lacks from another name of the same tensor in the model (DynUNet's ``skip_layers``):
    ``safetensors.torch.save_model`` keeps one name per shared tensor."""
    state = dict(state)
    names: dict[tuple, list[str]] = {}
    for key, t in expected.items():
        if t.numel():
            names.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(key)
    for group in names.values():
        present = [k for k in group if k in state]
        for key in group:
            if key not in state and present:
                state[key] = state[present[0]]
    return state


def build_model(checkpoint: str | Path, spec: Mapping[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    """The trained network of ``checkpoint`` in eval mode on the CPU, and the spec of its base network.

    Args:
        checkpoint: a prunekit3d artifact directory, or a state-dict file (needs ``spec``).
        spec: the JSON spec of the network (:func:`model_spec`); must be ``None`` for an artifact.

    Raises:
        FileNotFoundError, ValueError: with one line naming the problem and the fix.
    """
    path = Path(checkpoint)
    if path.is_dir() and (path / MANIFEST).is_file():
        if spec is not None:
            raise ValueError(f"{path} is a prunekit3d artifact, which records its network: drop --model/--spec")
        model = load(path)
        base = getattr(model, "spec", None)
        from prunekit3d.io import load_manifest

        base = load_manifest(path)["model"].get("spec") if base is None else base
        check_3d(model, f"the network in {path}")
        return model.eval(), dict(base) if base else {}
    state = read_state_dict(path)
    if spec is None:
        raise ValueError(f"{path} holds weights only: say which network they belong to with --model DOTTED.PATH "
                         "--model-kwargs JSON or --spec FILE")
    model = from_spec(spec)
    what = f"{type(model).__name__}({_kwargs_text(spec)})"
    check_3d(model, what)
    fit_weights(model, state, path, what)
    return model.eval(), dict(getattr(model, "spec", spec))


def _kwargs_text(spec: Mapping[str, Any]) -> str:
    kwargs = spec.get("kwargs", {k: v for k, v in spec.items() if k != "name"})
    text = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return text if len(text) < 80 else text[:77] + "..."


def first_conv(model: nn.Module) -> tuple[str, nn.Module]:
    """The first 3-D convolution in definition order (the stem of the usual segmentation networks)."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)):
            return name, m
    raise ValueError(f"{type(model).__name__} has no 3-D convolution")
