"""``prunekit3d quantize``: argument parsing, then :func:`prunekit3d.deploy.quantize_artifact`.

The command is ``(help line, add_arguments(parser), run(args) -> exit code)`` as :data:`prunekit3d.cli.COMMANDS`
holds it. Bad input raises ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` / ``ImportError`` with one
line naming the problem and the fix; ``prunekit3d.cli.main`` prints it and exits 2, and nothing is written.
"""

from __future__ import annotations

import argparse

__all__ = ["COMMAND", "add_quantize_arguments", "run_quantize"]

HELP = "post-training static INT8 of an artifact (ONNX, QDQ), calibrated on images through its preprocessing"


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", metavar="ARTIFACT", help="prunekit3d artifact directory (e.g. compress's --out)")
    parser.add_argument("--calib", required=True, metavar="PATH",
                        help="calibration images: NIfTI file, folder of them, or MSD data set folder")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="writes DIR/model.onnx, model.int8.onnx, quantize.json, manifest.json (what predict runs)")
    parser.add_argument("--calibrator", choices=["minmax", "entropy", "percentile"], default="minmax",
                        help="ONNX Runtime's activation-range calibrator (minmax)")
    parser.add_argument("--patch", type=int, nargs="+", metavar="N",
                        help="calibration patch, 1 or 3 numbers (the artifact's patch_size: the window predict slides)")
    parser.add_argument("--max-patches", type=int, default=16, metavar="N",
                        help="random calibration patches drawn from the images (16)")
    parser.add_argument("--preprocessing", metavar="SCHEME",
                        help="replace the artifact's recorded preprocessing (zscore, ct:LO:HI, ..., FILE.json)")
    parser.add_argument("--float-after-concat", action="store_true",
                        help="keep the convolutions reading a skip concatenation in float (OpenVINO's INT8 of them is "
                             "wrong on some CPUs: see the agreement column)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patch draw (0)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds of the paired latency (7)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if an earlier quantize wrote it")


def run_quantize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from prunekit3d.deploy import int8_advice, quantize_artifact, quantize_table

    console = Console()
    result = quantize_artifact(args.artifact, args.calib, args.out, calibrator=args.calibrator, patch=args.patch,
                               max_patches=args.max_patches, preprocessing=args.preprocessing,
                               after_concat_float=args.float_after_concat, seed=args.seed, overwrite=args.overwrite,
                               repeats=args.repeats, console=Console(stderr=True))
    console.print(quantize_table(result.report, f"prunekit3d quantize {args.artifact} -> {result.out}"))
    runtime, warnings = int8_advice(result.report)
    for line in warnings:
        console.print(f"[yellow]warning: {line}[/yellow]")
    console.print(f"wrote {result.out}/: model.onnx, model.int8.onnx, quantize.json, manifest.json")
    if runtime is not None:
        console.print(f"run it: prunekit3d predict {result.out} IMAGES --out DIR --backend {runtime} --int8")
    return 0


COMMAND = (HELP, add_quantize_arguments, run_quantize)
