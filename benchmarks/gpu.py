"""GPU check: float vs FP16 (AMP) vs INT8 of the demo DynUNet (and its compressed version) at 128^3,
through PyTorch and ONNX Runtime's CUDA / TensorRT execution providers, timed in alternation.

Without a CUDA device (or without ``onnxruntime-gpu``'s CUDA provider) it prints one line saying why and
exits 0. Rows whose provider is missing or fails to build an engine say so instead of a time.

    python benchmarks/gpu.py [--compressed DIR/compressed] [--size 128 128 128] [--out gpu.json]

Writes ``gpu.json`` and ``gpu.md`` (the table, with the card's name). Every backend reads a CUDA tensor
and writes one (ONNX Runtime through I/O binding), so the times are device times without host copies.
Agreement: Dice of each variant's argmax segmentation against PyTorch float32's, on the sample CT
padded to the input size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunekit3d.export import export_onnx
from prunekit3d.io.files import atomic_file, write_json
from prunekit3d.quantize import _mean_dice, _segmentation, quantize_onnx


def why_not() -> str | None:
    """Why this machine cannot run the check (``None`` if it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device visible to PyTorch"
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime-gpu)"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
    return None


def ort_runner(
    path: Path, provider: str, options: dict, out_shape: tuple[int, ...]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A CUDA-tensor -> CUDA-tensor call of ``path`` on ``provider`` (I/O binding, no host copies)."""
    import onnxruntime as ort

    providers = [(provider, options)] + ([("CUDAExecutionProvider", {})] if provider != "CUDAExecutionProvider" else [])
    session = ort.InferenceSession(str(path), providers=providers)
    if session.get_providers()[0] != provider:
        raise RuntimeError(f"{provider} not used (session runs on {session.get_providers()})")
    name, out_name = session.get_inputs()[0].name, session.get_outputs()[0].name
    out = torch.empty(out_shape, device="cuda", dtype=torch.float32)

    def run(x: torch.Tensor) -> torch.Tensor:
        binding = session.io_binding()
        binding.bind_input(name, "cuda", 0, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output(out_name, "cuda", 0, np.float32, list(out.shape), out.data_ptr())
        session.run_with_iobinding(binding)
        return out

    return run


def paired(calls: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in calls}
    with torch.no_grad():
        for round_ in range(3 + repeats):
            for label, call in calls.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                call(x)
                torch.cuda.synchronize()
                if round_ >= 3:
                    times[label].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def variants(net: nn.Module, tmp: Path, size: tuple[int, ...], calibration: list[torch.Tensor]) -> tuple[dict, dict]:
    """label -> CUDA call, and label -> why it is missing."""
    net = net.cuda().eval()
    example = torch.zeros(1, 1, *size)
    float_onnx = export_onnx(net.cpu(), example, tmp / "model.onnx")
    int8_onnx = tmp / "model.int8.onnx"
    quantize_onnx(float_onnx, calibration, int8_onnx)
    net.cuda()
    with torch.no_grad():
        out_shape = tuple(net(example.cuda()).shape)

    def amp(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16):
            return net(x).float()

    calls: dict[str, Callable] = {"torch float32": net, "torch AMP fp16": amp}
    cache = str(tmp / "trt")
    wanted = {
        "ORT CUDA float32": (float_onnx, "CUDAExecutionProvider", {}),
        "ORT CUDA int8 (QDQ)": (int8_onnx, "CUDAExecutionProvider", {}),
        "ORT TensorRT float32": (float_onnx, "TensorrtExecutionProvider", {"trt_engine_cache_path": cache}),
        "ORT TensorRT fp16": (float_onnx, "TensorrtExecutionProvider", {"trt_fp16_enable": True,
                                                                        "trt_engine_cache_path": cache}),
        "ORT TensorRT int8 (QDQ)": (int8_onnx, "TensorrtExecutionProvider", {"trt_int8_enable": True,
                                                                             "trt_fp16_enable": True,
                                                                             "trt_engine_cache_path": cache}),
    }
    missing = {}
    for label, (path, provider, options) in wanted.items():
        try:
            calls[label] = ort_runner(path, provider, options, out_shape)
        except Exception as e:  # a missing provider or an engine TensorRT cannot build: say so, go on
            missing[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return calls, missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compressed", help="a compressed demo artifact (prunekit3d demo's DIR/compressed)")
    parser.add_argument("--size", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="gpu.json")
    args = parser.parse_args()
    reason = why_not()
    if reason:
        print(f"benchmarks/gpu.py: skipped: {reason}")
        return
    sys.path.insert(0, str(Path(__file__).parent))
    import prunekit3d as pk
    from int8 import patches, sample_halves  # the same calibration patches as benchmarks/int8.py
    from prunekit3d.recipes.demo import baseline

    size = tuple(args.size)
    (calib_image, _), (test_image, _) = sample_halves()
    calibration = patches(calib_image, 16)
    full = torch.cat([calib_image, test_image], 1)  # the whole CT, zero-padded (or cropped) to the input size
    region = tuple(slice(0, min(p, s)) for p, s in zip(size, full.shape[1:]))
    probe = torch.zeros(1, 1, *size)
    probe[(0, 0, *region)] = full[(0, *region)]
    probe = probe.cuda()
    nets = [("demo DynUNet", baseline()[0])] + ([("demo DynUNet compressed", pk.load(args.compressed))]
                                                if args.compressed else [])
    card = torch.cuda.get_device_name()
    rows = []
    for name, net in nets:
        with tempfile.TemporaryDirectory() as tmp:
            calls, missing = variants(net, Path(tmp), size, calibration)
            ms = paired(calls, torch.randn(1, 1, *size, device="cuda"), args.repeats)
            with torch.no_grad():
                reference = _segmentation(net(probe))
                for label, call in calls.items():
                    seg = _segmentation(call(probe))
                    rows.append({"network": name, "variant": label, "ms": ms[label],
                                 "speedup": ms["torch float32"] / ms[label],
                                 "agreement_dice": _mean_dice(reference, seg, int(reference.max()) + 1)})
            rows += [{"network": name, "variant": k, "missing": v} for k, v in missing.items()]
    lines = [f"GPU check on {card}, input 1x1x{'x'.join(map(str, size))}, median of {args.repeats} paired rounds", "",
             "| network | variant | ms | speed-up vs torch float32 | agreement Dice |",
             "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        if "missing" in r:
            lines.append(f"| {r['network']} | {r['variant']} | unavailable: {r['missing']} | | |")
        else:
            lines.append(f"| {r['network']} | {r['variant']} | {r['ms']:.2f} | {r['speedup']:.2f}x"
                         f" | {r['agreement_dice']:.3f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_json(args.out, {"card": card, "size": list(size), "repeats": args.repeats, "torch": torch.__version__,
                          "rows": rows})
    with atomic_file(Path(args.out).with_suffix(".md")) as tmp:
        tmp.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
