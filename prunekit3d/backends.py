r"""Inference backends side by side: PyTorch's default path, PyTorch with oneDNN, ONNX Runtime and OpenVINO
(float or INT8 ONNX files).

An ONNX file runs through :class:`OnnxRuntimeModel` or :class:`OpenVinoModel`, ``nn.Module``\ s without
parameters whose forward calls the runtime on the CPU, so that everything written for PyTorch models --
MONAI's ``sliding_window_inference``, :func:`prunekit3d.report.paired_latency` -- runs them unchanged::

    torch tensor --numpy (no copy)--> InferenceSession.run / InferRequest.infer --torch.from_numpy--> torch tensor

OpenVINO runs an INT8 QDQ file on oneDNN's INT8 convolutions (AVX512-VNNI / AMX), 3-D ones included,
where ONNX Runtime's CPU ``QLinearConv`` takes a slow single-threaded im2col path for 3-D kernels
(see ``docs/deploy.md`` for the measurements); a float file runs in float32 (no bf16 downcast).

:func:`backend_models` builds the set a report compares, one label each.

    >>> models = backend_models(slim, onnx={"float": "model.onnx", "int8": "model.int8.onnx"}, runtimes=["openvino"])
    >>> dict(zip(models, paired_latency(list(models.values()), (1, 1, 64, 64, 32))))
    {'torch': 47.0, 'torch+onednn': 31.9, 'openvino float': 42.7, 'openvino int8': 14.3}
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from prunekit3d.runtime import use_onednn

if TYPE_CHECKING:
    from prunekit3d.report import ModelReport

__all__ = ["OnnxRuntimeModel", "OpenVinoModel", "RUNTIMES", "available_runtimes", "backend_latency", "backend_models",
           "openvino_available", "session_options", "with_backend_latency"]


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("running ONNX files needs onnxruntime: pip install 'prunekit3d[deploy]'") from e
    return onnxruntime


def session_options(threads: int | None = None) -> Any:
    """ONNX Runtime session options for CPU inference with ``threads`` intra-op threads (default: torch's).

    Worker threads do not spin-wait after a run: on a machine shared with PyTorch (or timed in alternation
    with it) a spinning pool takes the cores the next call needs.
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class OnnxRuntimeModel(nn.Module):
    """An ONNX file run by ONNX Runtime's CPU provider, called like the PyTorch model it was exported from.

    Args:
        path: the ``.onnx`` file (one input, the first output is returned).
        threads: intra-op threads (default: ``torch.get_num_threads()``).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; export the model first (prunekit3d.export_onnx)")
        self.session = _ort().InferenceSession(
            str(self.path), session_options(threads), providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0]).to(x.device)

    def __deepcopy__(self, memo: dict[int, Any]) -> OnnxRuntimeModel:  # a session cannot be copied: open another
        return OnnxRuntimeModel(self.path, self.session.get_session_options().intra_op_num_threads)

    def extra_repr(self) -> str:
        return str(self.path)


def openvino_available() -> bool:
    """Whether OpenVINO's Python runtime is installed (``pip install 'prunekit3d[openvino]'``)."""
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


class OpenVinoModel(nn.Module):
    """An ONNX file compiled by OpenVINO for the CPU (latency mode, one stream, float32 where it is float).

    Args:
        path: the ``.onnx`` file (one input, the first output is returned).
        threads: inference threads (default: ``torch.get_num_threads()``).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist; export the model first (prunekit3d.export_onnx)")
        try:
            import openvino
        except ImportError as e:
            raise ImportError(
                "running ONNX files on OpenVINO needs openvino: pip install 'prunekit3d[openvino]'"
            ) from e
        self.threads = int(threads or torch.get_num_threads())
        config = {"INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}  # else AMX machines silently run float models in bf16
        self.compiled = openvino.Core().compile_model(str(self.path), "CPU", config)
        self.request = self.compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.request.infer({0: array})[0]
        return torch.from_numpy(out.copy()).to(x.device)  # the request reuses its output buffer

    def __deepcopy__(self, memo: dict[int, Any]) -> OpenVinoModel:
        return OpenVinoModel(self.path, self.threads)

    def extra_repr(self) -> str:
        return str(self.path)


#: Runtime label -> class running an ONNX file.
RUNTIMES: dict[str, type[nn.Module]] = {"onnxruntime": OnnxRuntimeModel, "openvino": OpenVinoModel}


def backend_models(
    model: nn.Module | None = None,
    *,
    onnx: Mapping[str, str | os.PathLike] | None = None,
    runtimes: Sequence[str] = ("onnxruntime",),
    threads: int | None = None,
) -> dict[str, nn.Module]:
    """The backends to compare, by label: ``"torch"`` (PyTorch's default CPU path) and ``"torch+onednn"``
    (:func:`prunekit3d.use_onednn` on a copy) for ``model``, then each ``onnx`` file (label -> path) on
    each of ``runtimes`` (``"onnxruntime"``, ``"openvino"``), labelled ``"<runtime> <label>"``."""
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        raise ValueError(f"unknown runtime(s) {unknown}; choose from {sorted(RUNTIMES)}")
    models: dict[str, nn.Module] = {}
    if model is not None:
        models["torch"] = model.eval()
        models["torch+onednn"] = use_onednn(copy.deepcopy(model)).eval()
    for runtime in runtimes:
        for label, path in (onnx or {}).items():
            models[f"{runtime} {label}"] = RUNTIMES[runtime](path, threads)
    return models


def available_runtimes() -> list[str]:
    """The ONNX runtimes installed here, in :data:`RUNTIMES` order."""
    import importlib.util

    found = {"onnxruntime": importlib.util.find_spec("onnxruntime") is not None, "openvino": openvino_available()}
    return [r for r in RUNTIMES if found[r]]


def backend_latency(
    model: nn.Module | None,
    input_size: Sequence[int],
    *,
    onnx: Mapping[str, str | os.PathLike] | None = None,
    runtimes: Sequence[str] | None = None,
    threads: int | None = None,
    warmup: int = 2,
    repeats: int = 7,
) -> dict[str, float]:
    """Median latency (ms) of every backend of :func:`backend_models` at ``input_size``, timed in alternation
    (:func:`prunekit3d.report.paired_latency`); ``runtimes`` default: every one installed."""
    from prunekit3d.report import paired_latency

    chosen = available_runtimes() if runtimes is None else list(runtimes)
    models = backend_models(model, onnx=onnx, runtimes=chosen if onnx else (), threads=threads)
    return dict(zip(models, paired_latency(list(models.values()), input_size, warmup=warmup, repeats=repeats)))


def with_backend_latency(report: ModelReport, latency: Mapping[str, float]) -> ModelReport:
    """``report`` with every backend's latency (``backends_ms``) and, as its ``latency_ms``, the faster of the two
    PyTorch CPU paths (``"torch"``, ``"torch+onednn"``), named in ``latency_path``: the path to run."""
    import dataclasses

    torch_paths = {k: v for k, v in latency.items() if k in ("torch", "torch+onednn")}
    if not torch_paths:
        return dataclasses.replace(report, backends_ms=dict(latency))
    used = min(torch_paths, key=torch_paths.__getitem__)
    return dataclasses.replace(report, latency_ms=torch_paths[used], latency_path=used, backends_ms=dict(latency))
