"""The outside check of ``prunekit3d compress``: a briefly trained MONAI DynUNet compressed to half its parameters.

Trains a DynUNet (residual blocks, filters 16..128, deep supervision) for ``--iterations`` steps on the
bundled CT's training slab, saves its plain ``state_dict`` as a ``.pt`` file, and runs the command line a user
would type::

    prunekit3d compress dynunet.pt --out compressed --model monai.networks.nets.DynUNet \\
        --model-kwargs '{...}' --calib <the split's calibration images> --target-params 0.5

with the default schedule. Then it checks what the issue asks -- exit code 0, ``params_after /
params_before <= 0.5`` in ``report.json``, the artifact loads with :func:`prunekit3d.load` and runs, the
input file's hash is unchanged -- and prints the report's figures, the Dice of both networks against
the sample's labels and the wall time. About 10 minutes on 2 CPU cores.

    python benchmarks/compress_dynunet.py [--iterations 60] [--out compress-dynunet] [--threads 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import prunekit3d as pk
from prunekit3d.recipes.demo import PATCH, PREPROCESSING, demo_data, train_baseline

KWARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 4, "kernel_size": [3, 3, 3, 3],
          "strides": [1, 2, 2, 2], "upsample_kernel_size": [2, 2, 2], "filters": [16, 32, 64, 128],
          "res_block": True, "deep_supervision": True, "deep_supr_num": 2}
SPEC = {"import_path": "monai.networks.nets.DynUNet", "kwargs": KWARGS}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300, help="training steps of the DynUNet")
    parser.add_argument("--out", type=Path, default=Path("compress-dynunet"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 150))  # the full table, also in a log file
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / "dynunet.pt"
    split, _, held_out = demo_data(args.out / "data")
    model = train_baseline(args.iterations, spec=SPEC, console=console)
    torch.save(model.state_dict(), checkpoint)
    digest = sha256(checkpoint)
    cmd = ["prunekit3d", "compress", str(checkpoint), "--out", str(args.out / "compressed"), "--overwrite",
           "--model", SPEC["import_path"], "--model-kwargs", json.dumps(KWARGS), "--calib", str(split.calibration_dir),
           "--preprocessing", PREPROCESSING, "--patch", *map(str, PATCH),
           "--target-params", "0.5", "--device", "cpu"]
    console.print("$ " + " ".join(cmd))
    started = time.perf_counter()
    code = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        sys.exit(f"prunekit3d compress exited with {code}")
    report = json.loads((args.out / "compressed" / "report.json").read_text())
    small = pk.load(args.out / "compressed").eval()
    with torch.no_grad():
        runs = small(torch.randn(1, 1, *PATCH)).shape == (1, KWARGS["out_channels"], *PATCH)
    dice = {name: held_out.scores(m, None, PATCH)["dice"] for name, m in (("original", model), ("compressed", small))}
    table = Table(title=f"compress: DynUNet trained {args.iterations} steps, --target-params 0.5 ({seconds:.0f} s)")
    for col in ("quantity", "before", "after", "after / before"):
        table.add_column(col, justify="left" if col == "quantity" else "right")
    rows = (("params", "parameters", "{:,}"), ("flops", "GFLOPs (fvcore)", "{:.2f}"),
            ("latency_ms", "latency (ms)", "{:.1f}"))
    for key, name, form in rows:
        b, a = report[f"{key}_before"], report[f"{key}_after"]
        shown = (b / 1e9, a / 1e9) if key == "flops" else (b, a)
        table.add_row(name, *(form.format(v) for v in shown), f"{a / b:.3f}")
    table.add_row("agreement Dice with the original", "1", f"{report['agreement_dice']:.3f}", "")
    table.add_row("held-out Dice (evaluation slab)", f"{dice['original']:.3f}", f"{dice['compressed']:.3f}", "")
    console.print(table)
    checks = {
        "exit code 0": code == 0,
        "params_after / params_before <= 0.5": report["params_after"] / report["params_before"] <= 0.5,
        "artifact loads with prunekit3d.load and runs": runs,
        "input file unchanged": sha256(checkpoint) == digest,
    }
    for name, ok in checks.items():
        console.print(f"{'ok  ' if ok else 'FAIL'} {name}")
    sys.exit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
