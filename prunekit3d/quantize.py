"""Post-training static INT8 of a (slim) network: ONNX Runtime's quantizer, calibrated on preprocessed patches.

::

    model / artifact dir / .onnx --export_onnx--> out/model.onnx (float, one output, dynamic axes)
    calibration patches (B, C, D, H, W) --checked--> onnxruntime.quantization.quantize_static
        QDQ format, weights int8 per output channel (symmetric), activations int8 symmetric (zero point 0),
        MinMax / Entropy / Percentile calibrator, instance norms and `keep_float` nodes left in float
                                                  --> out/model.int8.onnx
    float vs INT8 on the calibration patches: Dice of the argmax segmentations, largest logit difference
    sizes and paired latency of every backend (torch, torch+oneDNN, ONNX Runtime, OpenVINO)
                                                  --> out/quantize.json
    what the folder is (format ``prunekit3d.quantized``), and the caller's ``extra`` (the preprocessing
    record, the patch: what ``prunekit3d predict`` needs to run the folder on its own)
                                                  --> out/manifest.json

The INT8 file is standard ONNX (QuantizeLinear / DequantizeLinear around float ops): ONNX Runtime,
OpenVINO and TensorRT all read it. Which runtime makes it fast is measured, not assumed; on x86 CPUs
OpenVINO runs its 3-D convolutions on oneDNN's INT8 kernels, while ONNX Runtime's CPU ``QLinearConv``
is slower than float for 3-D kernels (single-threaded im2col wherever the channel counts miss its
fast path) -- ``docs/deploy.md`` has the figures. Why symmetric activations: a zero point of 0 lets
the runtime fold dequantisation into the convolution; asymmetric uint8 leaves a float subtraction per
tensor that cost more than the INT8 convolutions saved (measured).

    >>> result = quantize("compressed/", patches, "int8/", example_input=patches[0][:1])
    >>> result.report["size_ratio"], result.report["agreement_dice"]
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit3d.backends import OnnxRuntimeModel, RUNTIMES, backend_models, openvino_available
from prunekit3d.export import export_onnx, preprocessing_path
from prunekit3d.io.files import atomic_directory, write_json
from prunekit3d.report import paired_latency

__all__ = ["CALIBRATORS", "FLOAT_FILE", "INT8_FILE", "MANIFEST", "QUANTIZED_FORMAT", "REPORT_FILE", "QuantizeResult",
           "check_calibration", "measure", "onnx_input_shape", "quantize", "quantize_onnx"]

FLOAT_FILE, INT8_FILE, REPORT_FILE, MANIFEST = "model.onnx", "model.int8.onnx", "quantize.json", "manifest.json"
#: ``out/manifest.json``'s ``format``: marks a folder :func:`quantize` wrote (``overwrite`` may replace it;
#: ``prunekit3d predict`` runs it).
QUANTIZED_FORMAT = "prunekit3d.quantized"
CALIBRATORS = ("minmax", "entropy", "percentile")
#: Operators left in float whatever the caller asks: normalisations have no INT8 kernel on the CPU
#: runtimes, and quantizing their scale and input only adds (de)quantisation steps around a float op.
FLOAT_OPS = ("InstanceNormalization", "BatchNormalization", "LayerNormalization")


def _ort_quantization() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError as e:
        raise ImportError("INT8 quantization needs onnxruntime: pip install 'prunekit3d[deploy]'") from e
    return quantization


@dataclass
class QuantizeResult:
    """What :func:`quantize` wrote: the float and INT8 files, and the report (also in ``quantize.json``)."""

    out: Path
    float_onnx: Path
    int8_onnx: Path
    report: dict[str, Any]


# ---- calibration input ------------------------------------------------------------------------------------
def onnx_input_shape(onnx_path: Path) -> list[int | str]:
    """The first input's shape of an ONNX file, a dynamic axis as its name (read without the weights)."""
    import onnx

    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]


def check_calibration(batches: Iterable[Any], input_shape: Sequence[int | str]) -> list[np.ndarray]:
    """The calibration batches as float32 arrays, or one clear ``ValueError`` line about the first bad one.

    Args:
        batches: preprocessed patches, tensors or arrays shaped like the model input ``(B, C, *spatial)``.
        input_shape: the model input's shape (numbers where fixed, names where dynamic).
    """
    if isinstance(batches, (torch.Tensor, np.ndarray)):
        raise ValueError("calibration must be a list of batches, not one tensor; pass list(patches) or [patches]")
    arrays = []
    want = len(input_shape)
    for i, batch in enumerate(batches):
        if not isinstance(batch, (torch.Tensor, np.ndarray)):
            raise ValueError(f"calibration batch {i} is a {type(batch).__name__}; pass tensors or numpy arrays")
        x = batch.detach().cpu().float().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch, np.float32)
        if x.ndim != want:
            raise ValueError(f"calibration batch {i} has shape {list(x.shape)} ({x.ndim}-D); the model takes "
                             f"{want}-D input (B, C, *spatial) -- add the batch axis with x[None]")
        channels = input_shape[1]
        if isinstance(channels, int) and channels > 0 and x.shape[1] != channels:
            raise ValueError(f"calibration batch {i} has {x.shape[1]} channels (shape {list(x.shape)}); "
                             f"the model takes {channels}")
        if x.size == 0 or not np.isfinite(x).all():
            raise ValueError(f"calibration batch {i} is empty or holds NaN/inf; pass preprocessed image patches")
        arrays.append(np.ascontiguousarray(x))
    if not arrays:
        raise ValueError("no calibration batches: pass at least one preprocessed patch (B, C, *spatial)")
    return arrays


def _reader(name: str, arrays: list[np.ndarray]) -> Any:
    quantization = _ort_quantization()

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(arrays)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {name: batch}

    return Reader()


# ---- the quantization itself -------------------------------------------------------------------------------
def _output_convs(onnx_path: Path) -> list[str]:
    """Names of the convolutions that write the graph's outputs (the segmentation head)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    outputs = {o.name for o in graph.output}
    return [n.name for n in graph.node if n.op_type == "Conv" and outputs & set(n.output)]


def _concat_convs(onnx_path: Path) -> list[str]:
    """Names of the convolutions that read a ``Concat`` (a U-Net decoder's skip joins)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    concats = {o for n in graph.node if n.op_type == "Concat" for o in n.output}
    return [n.name for n in graph.node if n.op_type in ("Conv", "ConvTranspose") and n.input[0] in concats]


def quantize_onnx(
    float_onnx: str | os.PathLike,
    calibration: Iterable[Any],
    int8_onnx: str | os.PathLike,
    *,
    calibrator: str = "minmax",
    keep_float: Sequence[str] = (),
    output_layer_float: bool = False,
    after_concat_float: bool = False,
) -> dict[str, Any]:
    """Quantize ``float_onnx`` to ``int8_onnx`` (static, QDQ); returns what was done, as plain data.

    Args:
        float_onnx: a float ONNX file (e.g. from :func:`prunekit3d.export_onnx`).
        calibration: preprocessed patches (:func:`check_calibration`).
        int8_onnx: destination (written through a temporary directory, then moved).
        calibrator: ``"minmax"``, ``"entropy"`` or ``"percentile"`` (ONNX Runtime's calibrators).
        keep_float: names of ONNX nodes to leave in float.
        output_layer_float: leave the segmentation head (the convolution writing the output) in float.
        after_concat_float: leave the convolutions reading a ``Concat`` in float. OpenVINO 2026.4 on an AVX512-VNNI
            CPU without AMX computes them far from the QDQ graph's meaning (a float Concat -> Q/DQ -> Conv subgraph
            alone differs by ~10% of the logits range, ONNX Runtime by ~0); docs/deploy.md has the figures.
    """
    quantization = _ort_quantization()
    if calibrator not in CALIBRATORS:
        raise ValueError(f"calibrator {calibrator!r} is not one of {list(CALIBRATORS)}")
    float_onnx, int8_onnx = Path(float_onnx), Path(int8_onnx)
    shape = onnx_input_shape(float_onnx)
    arrays = check_calibration(calibration, shape)
    excluded = list(keep_float) + (_output_convs(float_onnx) if output_layer_float else []) \
        + (_concat_convs(float_onnx) if after_concat_float else [])
    op_types = sorted(set(quantization.registry.QDQRegistry) - set(FLOAT_OPS))
    method = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}[calibrator]
    with tempfile.TemporaryDirectory(dir=int8_onnx.parent, prefix=".quantize-") as tmp:
        staged = Path(tmp) / int8_onnx.name
        quantization.quantize_static(
            str(float_onnx), str(staged), _reader(_input_name(float_onnx), arrays),
            quant_format=quantization.QuantFormat.QDQ, per_channel=True,
            activation_type=quantization.QuantType.QInt8, weight_type=quantization.QuantType.QInt8,
            calibrate_method=getattr(quantization.CalibrationMethod, method),
            op_types_to_quantize=op_types, nodes_to_exclude=excluded,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
        quantized = _quantized_ops(staged)
        os.replace(staged, int8_onnx)
    return {"calibrator": calibrator, "format": "QDQ", "activations": "int8 symmetric per tensor",
            "weights": "int8 symmetric per output channel", "calibration_batches": len(arrays),
            "kept_float": excluded, "float_op_types": list(FLOAT_OPS), "quantized_ops": quantized}


def _input_name(onnx_path: Path) -> str:
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False).graph.input[0].name


def _quantized_ops(int8_onnx: Path) -> dict[str, int]:
    """Operator type -> how many read only dequantized inputs and write a quantized output: the ones a
    runtime fuses into an INT8 kernel."""
    import onnx

    graph = onnx.load(str(int8_onnx), load_external_data=False).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized_in = {i for n in graph.node if n.op_type == "QuantizeLinear" for i in n.input[:1]}
    constants = {t.name for t in graph.initializer}
    counts: dict[str, int] = {}
    for n in graph.node:
        inputs = [i for i in n.input if i and i not in constants]
        if (n.op_type not in ("QuantizeLinear", "DequantizeLinear") and inputs
                and all(i in dequantized for i in inputs) and quantized_in & set(n.output)):
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


# ---- measurement: sizes, agreement, paired latency -----------------------------------------------------------
def _segmentation(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)


def _mean_dice(a: torch.Tensor, b: torch.Tensor, classes: int) -> float:
    """Mean Dice over the foreground classes present in ``a`` or ``b`` (1.0 where neither holds any)."""
    scores = []
    for c in range(1, max(classes, 2)):
        x, y = a == c, b == c
        total = int(x.sum() + y.sum())
        if total:
            scores.append(2 * int((x & y).sum()) / total)
    return float(np.mean(scores)) if scores else 1.0


def _agreement(reference: nn.Module, model: nn.Module, arrays: list[np.ndarray]) -> dict[str, float]:
    dice, diff = [], 0.0
    with torch.no_grad():
        for x in arrays:
            a, b = reference(torch.from_numpy(x)), model(torch.from_numpy(x))
            dice.append(_mean_dice(_segmentation(a), _segmentation(b), a.shape[1]))
            diff = max(diff, float((a - b).abs().max()))
    return {"agreement_dice": float(np.mean(dice)), "max_logit_diff": diff}


def measure(
    model: nn.Module | None, float_onnx: Path, int8_onnx: Path, arrays: list[np.ndarray], input_size: Sequence[int],
    *, runtimes: Sequence[str], threads: int | None = None, repeats: int = 7,
) -> dict[str, Any]:
    """Sizes, INT8-vs-float agreement on ``arrays`` per runtime, and paired latency of every backend."""
    reference = model.eval() if model is not None else OnnxRuntimeModel(float_onnx, threads)
    sizes = {"float_bytes": float_onnx.stat().st_size, "int8_bytes": int8_onnx.stat().st_size}
    agreement = {rt: _agreement(reference, RUNTIMES[rt](int8_onnx, threads), arrays) for rt in runtimes}
    backends = backend_models(model, onnx={"float": float_onnx, "int8": int8_onnx}, runtimes=runtimes, threads=threads)
    latency = dict(zip(backends, paired_latency(list(backends.values()), input_size, warmup=2, repeats=repeats)))
    fastest_int8 = min((k for k in latency if k.endswith(" int8")), key=latency.__getitem__)
    floats = {k: v for k, v in latency.items() if not k.endswith(" int8")}
    return {
        **sizes, "size_ratio": sizes["float_bytes"] / sizes["int8_bytes"],
        "agreement": agreement, "latency_ms": latency, "input_size": list(input_size),
        "threads": int(threads or torch.get_num_threads()), "fastest_int8": fastest_int8,
        "speedup_vs_float": {k: v / latency[fastest_int8] for k, v in floats.items()},
    }


# ---- the whole job ----------------------------------------------------------------------------------------------
def _source(source: nn.Module | str | os.PathLike) -> tuple[nn.Module | None, Path | None]:
    if isinstance(source, nn.Module):
        return source.eval(), None
    path = Path(source)
    if path.is_dir():
        from prunekit3d.io import load

        return load(path).eval(), None
    if path.is_file() and path.suffix == ".onnx":
        return None, path
    raise ValueError(f"{path} is not a model artifact directory or an .onnx file; pass one (or an nn.Module)")


def _model_input(model: nn.Module) -> list[int | str]:
    """The input shape the model's first convolution implies: ``["batch", C, "s1", ...]``."""
    conv = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if conv is None:
        return []
    return ["batch", conv.in_channels, *(f"s{i}" for i in range(conv.weight.dim() - 2))]


def quantize(
    source: nn.Module | str | os.PathLike,
    calibration: Iterable[Any],
    out: str | os.PathLike,
    *,
    calibrator: str = "minmax",
    example_input: torch.Tensor | None = None,
    keep_float: Sequence[str] = (),
    output_layer_float: bool = False,
    after_concat_float: bool = False,
    preprocessing: dict[str, Any] | None = None,
    runtimes: Sequence[str] | None = None,
    threads: int | None = None,
    repeats: int = 7,
    overwrite: bool = False,
    extra: dict[str, Any] | None = None,
) -> QuantizeResult:
    """Static INT8 of ``source`` into the directory ``out``: ``model.onnx``, ``model.int8.onnx``, ``quantize.json``,
    ``manifest.json`` (and ``model.preprocessing.json`` with ``preprocessing``), all or nothing.

    Args:
        source: a model, a :func:`prunekit3d.save` artifact directory, or a float ``.onnx`` file.
        calibration: preprocessed patches ``(B, C, *spatial)`` (tensors or arrays), as the model sees them.
        out: the output directory (replaced only with ``overwrite``).
        calibrator: ``"minmax"`` (default, measured best here), ``"entropy"`` or ``"percentile"``.
        example_input: the input the export traces and the latency is timed at (default: one calibration patch).
        keep_float: ONNX node names to leave in float; ``output_layer_float`` also leaves the head in float,
            ``after_concat_float`` the convolutions reading a ``Concat`` (:func:`quantize_onnx`).
        preprocessing: the preprocessing record to write beside the models.
        runtimes: where to run the INT8 file for the report (default: ONNX Runtime, and OpenVINO if installed);
            an empty list skips the measurement.
        threads: CPU threads of every backend (default: torch's).
        repeats: timed rounds of the paired latency.
        overwrite: replace an existing ``out`` (only a folder prunekit3d wrote, or one whose every file this rewrites).
        extra: plain-JSON metadata for ``manifest.json`` (``prunekit3d quantize`` records the preprocessing record,
            the patch and the input channels there).
    """
    model, onnx_source = _source(source)
    batches = list(calibration) if not isinstance(calibration, (torch.Tensor, np.ndarray)) else calibration
    arrays = check_calibration(batches, _model_input(model) if model is not None else onnx_input_shape(onnx_source))
    example = example_input if example_input is not None else torch.from_numpy(arrays[0][:1])
    if runtimes is None:
        runtimes = ("onnxruntime", "openvino") if openvino_available() else ("onnxruntime",)
    with atomic_directory(Path(out), overwrite=overwrite) as tmp:
        float_onnx, int8_onnx = tmp / FLOAT_FILE, tmp / INT8_FILE
        if model is not None:
            export_onnx(model, example, float_onnx, preprocessing=preprocessing)
        else:
            shutil.copyfile(onnx_source, float_onnx)  # never touch the caller's file
            if preprocessing is not None:
                write_json(preprocessing_path(float_onnx), preprocessing)
        report: dict[str, Any] = {"source": type(source).__name__ if isinstance(source, nn.Module) else str(source)}
        report.update(quantize_onnx(float_onnx, arrays, int8_onnx, calibrator=calibrator, keep_float=keep_float,
                                    output_layer_float=output_layer_float, after_concat_float=after_concat_float))
        if runtimes:
            report.update(measure(model, float_onnx, int8_onnx, arrays, list(example.shape), runtimes=runtimes,
                                  threads=threads, repeats=repeats))
        write_json(tmp / REPORT_FILE, report)
        write_json(tmp / MANIFEST, {"format": QUANTIZED_FORMAT, "format_version": 1, "float": FLOAT_FILE,
                                    "int8": INT8_FILE, "report": REPORT_FILE, "extra": dict(extra or {})})
    out = Path(out)
    return QuantizeResult(out, out / FLOAT_FILE, out / INT8_FILE, report)
