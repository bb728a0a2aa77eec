"""Export a (slim) model for deployment: one output, dynamic shapes, ONNX and TorchScript, written atomically.

::

    model --copy, eval, deep supervision off--> SingleOutput (returns the full-resolution logits only)
          --torch.onnx.export(dynamo=True), batch and spatial axes dynamic--> model.onnx  (input "input",
                                                                           output "logits")
          --torch.jit.trace------------------------------------------------> model.pt
    preprocessing record (the caller's JSON-able dict) ---------------------> model.preprocessing.json

Deep supervision is switched off on a copy wherever a submodule has a known flag (nnU-Net's
``decoder.deep_supervision``, PSP-Seg's, MONAI DynUNet's, nnU-Net v1's ``do_ds``); a network that still
returns several tensors (or DynUNet-style stacked heads) is wrapped so that only the full-resolution one
is returned -- a TensorRT engine built from the file has one output, not one per decoder level.

ONNX goes through ``torch.onnx.export(..., dynamo=True)`` -- the maintained exporter of torch >= 2.9
(``torch.export`` + onnxscript) -- with every weight inside the one ``.onnx`` file (no external-data side
file that a rename would orphan; fine below ONNX's 2 GB protobuf limit). The batch and spatial axes are
exported as ``torch.export.Dim.AUTO``: ``torch.export`` itself works out what the network's code
requires (a U-Net's spatial sizes must stay multiples of its total stride; ONNX Runtime refuses other
sizes at run time) and fixes an axis only where the code does (then :func:`export_onnx` warns). The file
is checked against the model in ONNX Runtime before it replaces anything (:data:`RTOL`, :data:`ATOL`).

    >>> export_onnx(small, torch.randn(1, 1, 64, 64, 32), "model.onnx", preprocessing={"normalise": "zscore"})
    PosixPath('model.onnx')                      # and model.preprocessing.json beside it
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit3d.io.files import atomic_file
from prunekit3d.modes import eval_mode

__all__ = [
    "ATOL",
    "DEEP_SUPERVISION_FLAGS",
    "RTOL",
    "SingleOutput",
    "check_onnx",
    "deployable",
    "export_onnx",
    "export_torchscript",
    "onnx_parity",
    "preprocessing_path",
]

#: Attributes that switch deep supervision on in the networks we know of (set to ``False`` on a copy).
DEEP_SUPERVISION_FLAGS = ("deep_supervision", "do_ds")
#: ONNX Runtime parity: ``|onnx - torch| <= ATOL + RTOL * |torch|`` elementwise. RTOL is MONAI's
#: ``convert_to_onnx`` default; ATOL covers logits near zero, where a relative bound means nothing.
RTOL, ATOL = 1e-4, 1e-4
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def _check_input(example_input: torch.Tensor) -> None:
    if not isinstance(example_input, torch.Tensor):
        kind = type(example_input).__name__
        raise TypeError(f"example_input must be one tensor shaped like the model's input, got {kind}")


class SingleOutput(nn.Module):
    """``model`` returning one tensor: item ``index`` of its outputs (``None``: it already returns one);
    ``stacked``: the heads are stacked in dim 1 (MONAI DynUNet's training output), head 0 is returned."""

    def __init__(self, model: nn.Module, index: int | None = None, stacked: bool = False) -> None:
        super().__init__()
        self.model, self.index, self.stacked = model, index, stacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.model(x)
        if self.index is not None:
            y = y[self.index]
        return y[:, 0] if self.stacked else y


def _deep_supervision_off(model: nn.Module) -> list[str]:
    """Switch every known deep-supervision flag of ``model`` off; the names switched."""
    switched = []
    for name, module in model.named_modules():
        for flag in DEEP_SUPERVISION_FLAGS:
            if getattr(module, flag, None) is True:
                setattr(module, flag, False)
                switched.append(f"{name}.{flag}" if name else flag)
    return switched


def _full_resolution(outputs: Sequence[Any], x: torch.Tensor) -> int:
    """Index of the output at the input's spatial size (else the largest): the full-resolution logits."""
    tensors = [(i, y) for i, y in enumerate(outputs) if isinstance(y, torch.Tensor)]
    if not tensors:
        raise TypeError(f"the model returns a {type(outputs).__name__} of no tensors; export needs logits tensors")
    same = [i for i, y in tensors if y.dim() == x.dim() and y.shape[2:] == x.shape[2:]]
    return same[0] if same else max(tensors, key=lambda t: t[1].numel())[0]


def deployable(model: nn.Module, example_input: torch.Tensor) -> nn.Module:
    """A copy of ``model`` for deployment: eval mode, deep supervision off, one output (the full-resolution
    logits). ``model`` itself is left as it was."""
    _check_input(example_input)
    net = copy.deepcopy(model).eval()
    _deep_supervision_off(net)
    with torch.no_grad():
        y = net(example_input)
    if isinstance(y, torch.Tensor):
        stacked = y.dim() == example_input.dim() + 1  # (B, heads, C, D, H, W)
        return SingleOutput(net, stacked=stacked).eval() if stacked else net
    if isinstance(y, Mapping) or not isinstance(y, Sequence):
        raise TypeError(f"the model returns a {type(y).__name__}; export needs a tensor or a list/tuple of them")
    return SingleOutput(net, _full_resolution(y, example_input)).eval()


def preprocessing_path(model_path: str | os.PathLike) -> Path:
    """Where the preprocessing record of ``model_path`` lives: its name up to the first dot, then
    ``.preprocessing.json`` -- one record for ``model.onnx``, ``model.int8.onnx`` and ``model.pt``."""
    path = Path(model_path)
    return path.with_name(f"{path.name.split('.')[0]}.preprocessing.json")


def _record_text(preprocessing: Mapping[str, Any] | None) -> str | None:
    if preprocessing is None:
        return None
    if not isinstance(preprocessing, Mapping):
        raise TypeError(f"preprocessing must be a dict (the preprocessing record), got {type(preprocessing).__name__}")
    try:
        return json.dumps(dict(preprocessing), indent=1, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"the preprocessing record is not plain JSON ({e}); pass numbers, strings, lists, dicts"
        ) from None


def _write_record(model_path: Path, text: str | None) -> None:
    if text is not None:
        with atomic_file(preprocessing_path(model_path)) as tmp:
            tmp.write_text(text, encoding="utf-8")


def _dynamic_shapes(x: torch.Tensor) -> tuple[dict[int, Any]]:
    auto = torch.export.Dim.AUTO
    return ({i: auto for i in range(x.dim()) if i != 1},)  # all but the channel axis


def _fixed_axes(path: Path) -> list[int]:
    import onnx

    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [i for i, d in enumerate(dims) if i != 1 and not d.dim_param]


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamic: bool = True,
    preprocessing: Mapping[str, Any] | None = None,
    check: bool = True,
) -> Path:
    """Write ``model`` as a one-output ONNX file: input ``"input"``, output ``"logits"`` (full resolution).

    Args:
        model: the network to export (usually :func:`prunekit3d.slim`'s output); exported through
            :func:`deployable`, so ``model`` itself is not changed.
        example_input: one input tensor ``(B, C, *spatial)``.
        path: destination ``.onnx`` file (written to a temporary file first, then renamed).
        opset: ONNX opset version; ``None`` lets torch pick its default.
        dynamic: batch and spatial axes dynamic (``False``: the example's shape is fixed in the file).
        preprocessing: a JSON-able record of how inputs must be prepared, written (atomically) to
            :func:`preprocessing_path` beside the model.
        check: run the file in ONNX Runtime on ``example_input`` and raise unless it matches the model
            (:func:`onnx_parity`); needs ``onnxruntime``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    record = _record_text(preprocessing)
    net = deployable(model, example_input)
    x = example_input
    if dynamic and x.shape[0] == 1:  # torch.export fixes an axis whose example size is 1
        x = x.expand(2, *x.shape[1:]).contiguous()
    path = Path(path)
    with torch.no_grad(), atomic_file(path, ".onnx") as tmp:
        program = torch.onnx.export(
            net, (x,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=_dynamic_shapes(x) if dynamic else None, verbose=False,
        )
        if program is None:  # only the legacy exporter writes by itself
            raise RuntimeError("torch.onnx.export(dynamo=True) returned no program; use torch >= 2.5")
        program.save(tmp, external_data=False)
        if check:
            onnx_parity(tmp, net, [example_input])
        fixed = _fixed_axes(tmp) if dynamic else []
    if fixed:
        warnings.warn(f"{path.name}: input axes {fixed} stay fixed: the network's code fixes them", stacklevel=2)
    _write_record(path, record)
    return path


def export_torchscript(
    model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *,
    preprocessing: Mapping[str, Any] | None = None,
) -> Path:
    """Trace :func:`deployable` (``model``) with ``torch.jit.trace`` on ``example_input``; save it atomically.

    Load it back with ``torch.jit.load(path)``; no Python class of the model is needed. It returns one
    tensor, the full-resolution logits; ``preprocessing`` is written as in :func:`export_onnx`.
    """
    record = _record_text(preprocessing)
    net = deployable(model, example_input)
    path = Path(path)
    with torch.no_grad(), atomic_file(path, ".pt") as tmp:
        # check_trace re-runs and diffs whole graphs (slow); comparing the outputs once is enough here.
        traced = torch.jit.trace(net, example_input, check_trace=False)
        diff = _max_diff(traced(example_input), net(example_input))
        if diff > 1e-4:
            raise RuntimeError(
                f"the traced model differs from the model by {diff:.3g}: its forward depends on the input "
                "beyond its shape (data-dependent control flow), which torch.jit.trace cannot record"
            )
        torch.jit.save(traced, tmp)
    _write_record(path, record)
    return path


def _outputs(y: object) -> list[torch.Tensor]:
    return [y] if isinstance(y, torch.Tensor) else [t for t in y]  # type: ignore[attr-defined]


def _max_diff(a: object, b: object) -> float:
    xs, ys = _outputs(a), _outputs(b)
    if len(xs) != len(ys):
        raise ValueError(f"got {len(xs)} outputs where the model returns {len(ys)}")
    return max(float((torch.as_tensor(p).cpu() - q.detach().cpu()).abs().max()) for p, q in zip(xs, ys))


def _session(path: str | os.PathLike) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("checking an ONNX file needs onnxruntime: pip install 'prunekit3d[deploy]'") from e
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session: Any, x: torch.Tensor) -> list[np.ndarray]:
    return session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})


def check_onnx(path: str | os.PathLike, model: nn.Module, example_input: torch.Tensor) -> float:
    """Largest absolute difference between ONNX Runtime's output(s) for ``path`` and ``model``'s (eval mode).

    A one-output file is compared with the full-resolution output of ``model`` (:func:`deployable`).
    """
    session = _session(path)
    got = _run(session, example_input)
    if len(got) == 1:
        model = deployable(model, example_input)
    with eval_mode(model), torch.no_grad():
        return _max_diff(got, model(example_input))


def onnx_parity(
    path: str | os.PathLike, model: nn.Module, inputs: Sequence[torch.Tensor], *, rtol: float = RTOL, atol: float = ATOL
) -> float:
    """Raise unless ONNX Runtime's output for ``path`` matches ``model``'s on every input
    (``|onnx - torch| <= atol * max(1, max|torch|) + rtol * |torch|``); returns the largest absolute difference.

    ``atol`` scales with the output's magnitude: float32 rounding differs between the two runtimes' kernels by a
    fraction of the activations' size, so a trained network with logits of ~20 differs by ~1e-4 x 20 near zero
    logits, while a wrong export differs by the logits' own size."""
    session = _session(path)
    worst = 0.0
    with eval_mode(model), torch.no_grad():
        for x in inputs:
            got = torch.from_numpy(_run(session, x)[0])
            want = _outputs(model(x))[0].detach().cpu().float()
            if got.shape != want.shape:
                raise RuntimeError(
                    f"ONNX Runtime returns shape {list(got.shape)} where the model returns {list(want.shape)}"
                )
            scale = max(1.0, float(want.abs().max()))
            excess = ((got - want).abs() - (atol * scale + rtol * want.abs())).max()
            worst = max(worst, float((got - want).abs().max()))
            if float(excess) > 0:
                raise RuntimeError(
                    f"ONNX Runtime differs from the model by up to {worst:.3g} at input {list(x.shape)}, beyond "
                    f"rtol {rtol:g} + atol {atol:g} x {scale:.3g} (the largest output); export with a newer "
                    "torch/onnxscript or report the model"
                )
    return worst
