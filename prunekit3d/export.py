"""Export a (slim) model for deployment: ONNX and TorchScript, written atomically.

Both exporters trace the model in eval mode on ``example_input``, so the files have the example's
fixed input shape (sliding-window inference runs one patch shape). Call them on the output of
:func:`prunekit3d.slim`; a masked model exports too, but carries its masked branches along.

ONNX goes through ``torch.onnx.export(..., dynamo=True)`` -- the default and maintained exporter of
torch >= 2.9 (``torch.export`` + onnxscript) -- with every weight inside the one ``.onnx`` file
(no external-data side file that a rename would orphan; fine below ONNX's 2 GB protobuf limit).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from prunekit3d.io.files import atomic_file
from prunekit3d.modes import eval_mode

__all__ = ["check_onnx", "export_onnx", "export_torchscript"]


def _check_input(example_input: torch.Tensor) -> None:
    if not isinstance(example_input, torch.Tensor):
        kind = type(example_input).__name__
        raise TypeError(f"example_input must be one tensor shaped like the model's input, got {kind}")


def export_onnx(
    model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike, *, opset: int | None = None
) -> Path:
    """Write ``model`` as an ONNX file whose input is named ``"input"`` (outputs keep the exporter's names).

    Args:
        model: the network to export (usually the output of :func:`prunekit3d.slim`).
        example_input: one input tensor; its shape is fixed in the file.
        path: destination ``.onnx`` file (written to a temporary file first, then renamed).
        opset: ONNX opset version; ``None`` lets torch pick its default.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    _check_input(example_input)
    with eval_mode(model), torch.no_grad(), atomic_file(path, ".onnx") as tmp:
        program = torch.onnx.export(
            model, (example_input,), dynamo=True, opset_version=opset, input_names=["input"], verbose=False
        )
        if program is None:  # only the legacy exporter writes by itself
            raise RuntimeError("torch.onnx.export(dynamo=True) returned no program; use torch >= 2.5")
        program.save(tmp, external_data=False)
    return Path(path)


def export_torchscript(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike) -> Path:
    """Trace ``model`` with ``torch.jit.trace`` on ``example_input`` and save it to ``path`` (atomically).

    Load it back with ``torch.jit.load(path)``; no Python class of the model is needed.
    """
    _check_input(example_input)
    with eval_mode(model), torch.no_grad(), atomic_file(path, ".pt") as tmp:
        # check_trace re-runs and diffs whole graphs (slow); comparing the outputs once is enough here.
        traced = torch.jit.trace(model, example_input, check_trace=False)
        diff = _max_diff(traced(example_input), model(example_input))
        if diff > 1e-4:
            raise RuntimeError(
                f"the traced model differs from the model by {diff:.3g}: its forward depends on the input "
                "beyond its shape (data-dependent control flow), which torch.jit.trace cannot record"
            )
        torch.jit.save(traced, tmp)
    return Path(path)


def _outputs(y: object) -> list[torch.Tensor]:
    return [y] if isinstance(y, torch.Tensor) else [t for t in y]  # type: ignore[attr-defined]


def _max_diff(a: object, b: object) -> float:
    xs, ys = _outputs(a), _outputs(b)
    if len(xs) != len(ys):
        raise ValueError(f"got {len(xs)} outputs where the model returns {len(ys)}")
    return max(float((torch.as_tensor(p).cpu() - q.detach().cpu()).abs().max()) for p, q in zip(xs, ys))


def check_onnx(path: str | os.PathLike, model: nn.Module, example_input: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's output(s) for ``path`` and ``model``'s (eval mode)."""
    try:
        import onnxruntime as ort
    except ImportError as e:  # dev dependency only
        raise ImportError("check_onnx needs onnxruntime: pip install onnxruntime") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: example_input.detach().cpu().numpy()})
    with eval_mode(model), torch.no_grad():
        return _max_diff(got, model(example_input))
