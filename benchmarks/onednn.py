"""What :func:`prunekit3d.use_onednn` gains on the CPU: single 3x3x3 convolutions and whole networks.

PyTorch sends a batch-1 ``Conv3d`` to oneDNN only when ``N*C*D*H > 20480``. This prints, side by side and
timed in alternation (:func:`prunekit3d.report.paired_latency`), PyTorch's default path against
``use_onednn``: single convolutions below and above that line, then the demo DynUNet and its compressed
version (64x64x32, the demo's patch), PSP-Seg S and an nnU-Net-size DynUNet (64^3), with the largest
output difference.

    python benchmarks/onednn.py [--threads 2] [--repeats 7] [--out onednn.json]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import safetensors.torch
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import prunekit3d as pk
from prunekit3d.io.files import write_json
from prunekit3d.report import paired_latency

CONVS = [(8, 32), (16, 32), (24, 16), (32, 16), (64, 8), (128, 4), (32, 64)]  # (channels, cube side)


def _first(y: object) -> torch.Tensor:
    return y[0] if isinstance(y, (list, tuple)) else y  # type: ignore[return-value]


def networks(console: Console) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    from monai.networks.nets import DynUNet

    from prunekit3d.models import psp_seg
    from prunekit3d.recipes.compress import CompressConfig, compress
    from prunekit3d.recipes.demo import BASELINE_SPEC, PATCH, PREPROCESSING, baseline, demo_data

    base, _ = baseline(console)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "baseline.safetensors"
        safetensors.torch.save_model(base, str(checkpoint))
        console.print("compressing the demo baseline (as `prunekit3d demo` does) ...")
        calib = str(demo_data(Path(tmp) / "data")[0].calibration_dir)
        small = compress(CompressConfig(checkpoint=str(checkpoint), out=str(Path(tmp) / "c"), calib=calib,
                                        preprocessing=PREPROCESSING,
                                        model=BASELINE_SPEC["import_path"], model_kwargs=BASELINE_SPEC["kwargs"],
                                        target_params=0.5, patch=PATCH, device="cpu"),
                         console=Console(quiet=True)).model
    torch.manual_seed(0)
    big = DynUNet(3, 1, 4, [3] * 6, [1, 2, 2, 2, 2, 2], [2] * 5, filters=[32, 64, 128, 256, 320, 320])
    return [("demo DynUNet", base, (1, 1, *PATCH)), ("demo DynUNet compressed", small.cpu(), (1, 1, *PATCH)),
            ("PSP-Seg S", psp_seg("S", 1, 4), (1, 1, 64, 64, 64)), ("DynUNet, nnU-Net size", big, (1, 1, 64, 64, 64))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default="onednn.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 120))  # the full table, also in a log file
    rows = []
    for channels, side in CONVS:
        conv = nn.Conv3d(channels, channels, 3, padding=1)
        rows.append(("conv", f"3x3x3 conv, {channels} ch, {side}^3", conv, (1, channels, side, side, side)))
    rows += [("network", name, model, size) for name, model, size in networks(console)]
    table = Table(title=f"PyTorch's default CPU path against use_onednn ({args.threads} threads, batch 1, "
                        f"median of {args.repeats}, timed in alternation)")
    for col in ("kind", "what", "N*C*D*H", "default ms", "oneDNN ms", "speed-up", "max diff"):
        table.add_column(col, justify="left" if col in ("kind", "what") else "right")
    results = []
    for kind, name, model, size in rows:
        model.eval()
        fast = pk.use_onednn(copy.deepcopy(model))
        x = torch.randn(size)
        with torch.no_grad():
            diff = float((_first(model(x)) - _first(fast(x))).abs().max())
        default_ms, onednn_ms = paired_latency([model, fast], size, warmup=2, repeats=args.repeats)
        results.append({"kind": kind, "name": name, "input": list(size), "default_ms": default_ms,
                        "onednn_ms": onednn_ms, "speedup": default_ms / onednn_ms, "max_diff": diff})
        table.add_row(kind, name, f"{size[0] * size[1] * size[2] * size[3]:,}" if kind == "conv" else "",
                      f"{default_ms:.2f}", f"{onednn_ms:.2f}", f"{default_ms / onednn_ms:.2f}x", f"{diff:.1e}")
    console.print(table)
    write_json(args.out, {"threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                          "rows": results})
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
