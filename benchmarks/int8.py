"""Static INT8 of the demo DynUNet and its compressed version, measured: sizes, paired latency of every
backend, agreement and Dice against the labels on the held-out half of the bundled CT.

The sample CT (z-scored) is cut in two along its first axis: patches of the first half calibrate
(:func:`prunekit3d.quantize.quantize_onnx`, each calibrator in turn), the second half is segmented by
sliding windows (MONAI, the demo's 64x64x32 patch) with the float model and with each INT8 file.
Latencies are timed in alternation (:func:`prunekit3d.report.paired_latency`) at the demo patch and at
a larger input, on ``--threads`` threads.

    python benchmarks/int8.py --compressed /tmp/demo-deploy/compressed [--threads 2] [--out int8.json]

The compressed network comes from ``prunekit3d demo --out DIR`` (``DIR/compressed``); without it only
the baseline is measured. OpenVINO rows appear where ``openvino`` is installed (``prunekit3d[openvino]``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.inferers import sliding_window_inference
from rich.console import Console
from rich.table import Table
from torch import nn

import prunekit3d as pk
from prunekit3d.backends import backend_models, openvino_available, RUNTIMES
from prunekit3d.export import export_onnx
from prunekit3d.io.files import write_json
from prunekit3d.quantize import CALIBRATORS, _mean_dice, _segmentation, quantize_onnx
from prunekit3d.report import paired_latency
from prunekit3d.sample import sample_dataset

PATCH = (64, 64, 32)


def sample_halves() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The z-scored sample CT ``(1, X, Y, Z)`` and its labels, cut in two along X: (calibration, held out)."""
    root = sample_dataset()
    image = np.asarray(nib.load(root / "imagesTr" / "ct_abdomen.nii.gz").dataobj, dtype=np.float32)
    label = np.asarray(nib.load(root / "labelsTr" / "ct_abdomen.nii.gz").dataobj).astype(np.int64)
    x = torch.from_numpy(image)[None]
    x = (x - x.mean()) / x.std().clamp_min(1e-8)
    y = torch.from_numpy(label)
    half = x.shape[1] // 2
    return (x[:, :half], y[:half]), (x[:, half:], y[half:])


def patches(image: torch.Tensor, n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` random ``PATCH`` crops ``(1, 1, *PATCH)`` of ``image`` (zero-padded where it is smaller)."""
    pad = [max(0, p - s) for p, s in zip(PATCH, image.shape[1:])]
    flat = []
    for e in reversed(pad):
        flat += [e // 2, e - e // 2]
    image = nn.functional.pad(image, flat)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        corner = [int(torch.randint(s - p + 1, (1,), generator=g)) for s, p in zip(image.shape[1:], PATCH)]
        out.append(image[(slice(None), *(slice(c, c + p) for c, p in zip(corner, PATCH)))][None].contiguous())
    return out


@torch.no_grad()
def segment(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    logits = sliding_window_inference(image[None], PATCH, 1, model, overlap=0.25)
    return _segmentation(logits)[0]


def networks(compressed: str | None) -> list[tuple[str, nn.Module]]:
    from prunekit3d.recipes.demo import baseline

    nets = [("demo DynUNet", baseline(Console(quiet=True))[0])]
    if compressed:
        nets.append(("demo DynUNet compressed", pk.load(compressed).eval()))
    return nets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compressed", help="a compressed demo artifact (prunekit3d demo's DIR/compressed)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--calibration-patches", type=int, default=16)
    parser.add_argument("--large", type=int, nargs=3, default=[128, 128, 64], help="the second input size timed")
    parser.add_argument("--out", default="int8.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 150))
    runtimes = [r for r in RUNTIMES if r != "openvino" or openvino_available()]
    (calib_image, _), (test_image, test_label) = sample_halves()
    calibration = patches(calib_image, args.calibration_patches)
    classes = int(test_label.max()) + 1
    results = []
    table = Table(title=f"Static INT8 (QDQ, int8 symmetric, per-channel weights) on {args.threads} CPU threads; "
                        f"Dice on the held-out half of the sample CT; latency paired, median of {args.repeats}")
    for col in ("network", "variant", "MB", "input", *(f"{b} ms" for b in ("torch", "torch+oneDNN")),
                *(f"{r} {k} ms" for r in runtimes for k in ("float", "int8")), "agreement", "Dice vs labels"):
        table.add_column(col, justify="left" if col in ("network", "variant") else "right")
    with tempfile.TemporaryDirectory() as tmp:
        for name, net in networks(args.compressed):
            float_onnx = export_onnx(net, calibration[0], Path(tmp) / f"{len(results)}.onnx")
            float_seg = segment(net, test_image)
            float_dice = _mean_dice(float_seg, test_label, classes)
            table.add_row(name, "float", f"{float_onnx.stat().st_size / 2**20:.2f}", "",
                          *[""] * (2 + 2 * len(runtimes)), "1.000", f"{float_dice:.3f}")
            variants = [(c, False) for c in CALIBRATORS] + [("minmax", True)]
            for calibrator, head_float in variants:
                label = calibrator + (", head float" if head_float else "")
                int8 = Path(tmp) / f"{len(results)}.{calibrator}.{int(head_float)}.int8.onnx"
                quantize_onnx(float_onnx, calibration, int8, calibrator=calibrator, output_layer_float=head_float)
                row = {"network": name, "variant": label, "float_bytes": float_onnx.stat().st_size,
                       "int8_bytes": int8.stat().st_size, "dice_float": float_dice, "latency_ms": {}}
                models = backend_models(net, onnx={"float": float_onnx, "int8": int8}, runtimes=runtimes)
                int8_model = models[f"{runtimes[-1]} int8"]
                seg = segment(int8_model, test_image)
                row["int8_runtime"] = runtimes[-1]
                row["agreement_dice"] = _mean_dice(float_seg, seg, classes)
                row["dice_int8"] = _mean_dice(seg, test_label, classes)
                sizes = [(1, 1, *PATCH)] + ([(1, 1, *args.large)] if calibrator == "minmax" and not head_float else [])
                for size in sizes:
                    ms = paired_latency(list(models.values()), size, warmup=2, repeats=args.repeats)
                    row["latency_ms"]["x".join(map(str, size[2:]))] = dict(zip(models, ms))
                    table.add_row(name, label, f"{row['int8_bytes'] / 2**20:.2f}", "x".join(map(str, size[2:])),
                                  *(f"{v:.1f}" for v in ms), f"{row['agreement_dice']:.3f}", f"{row['dice_int8']:.3f}")
                results.append(row)
                console.print(f"{name}, {label}: done")
    console.print(table)
    write_json(args.out, {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                          "runtimes": runtimes, "rows": results})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
