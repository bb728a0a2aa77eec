"""``prunekit3d report``: argument parsing, then the Python API.

The command is ``(help line, add_arguments(parser), run(args) -> exit code)`` as :data:`prunekit3d.cli.COMMANDS`
holds it. Bad input raises ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` with one line naming the
problem and the fix; ``prunekit3d.cli.main`` prints it and exits 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prunekit3d.cli.arguments import add_model_arguments

__all__ = ["COMMAND", "add_report_arguments", "run_report"]


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET",
                        help="prunekit3d artifact directory, or state dict with --model/--spec")
    add_model_arguments(parser)
    parser.add_argument("--input-size", type=int, nargs=5, required=True, metavar=("B", "C", "D", "H", "W"),
                        help="input tensor size, e.g. 1 1 64 64 64")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (auto)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs, median reported (5)")
    parser.add_argument("--no-train-step", dest="train_step", action="store_false", help="skip the training step")
    parser.add_argument("--onnx", nargs="+", metavar="PATH", default=[],
                        help="also time these on every installed ONNX runtime: prunekit3d quantize output folders "
                             "(float and INT8) or .onnx files (default: TARGET/int8 if compress --int8 wrote it)")
    parser.add_argument("--no-backends", dest="backends", action="store_false",
                        help="time the model as it is only (default on a CPU: PyTorch's default path and oneDNN, "
                             "paired, the faster one reported, and every ONNX file on ONNX Runtime / OpenVINO)")


def run_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    from prunekit3d.backends import backend_latency, with_backend_latency
    from prunekit3d.deploy import int8_warnings, onnx_files, quantized_folder
    from prunekit3d.recipes.distributed import resolve_device
    from prunekit3d.report import measure
    from prunekit3d.sources import build_model, model_spec

    model, _ = build_model(args.target, model_spec(args.model, args.model_kwargs, args.spec))
    device = resolve_device(args.device)
    timed = device.type == "cpu" and args.backends
    if args.onnx and not timed:
        raise ValueError("--onnx files are timed on the CPU next to PyTorch: drop --device / --no-backends, or --onnx")
    given = args.onnx or ([args.target] if timed and quantized_folder(args.target) else [])
    onnx = onnx_files(given)
    report = measure(model, args.input_size, name=Path(args.target).name, device=device,
                     repeats=args.repeats, train_step=args.train_step)
    if timed:  # the path to run is the one measured faster, and says so
        latency = backend_latency(model, args.input_size, onnx=onnx, repeats=max(args.repeats, 3))
        report = with_backend_latency(report, latency)
    console = Console()
    console.print(report)
    for line in int8_warnings(given):  # speed is not the whole story: an INT8 file that disagrees is not deployable
        console.print(f"[yellow]warning: {line}[/yellow]")
    if args.json is not None:
        from prunekit3d.io.files import atomic_file

        with atomic_file(args.json) as tmp:
            tmp.write_text(report.to_json() + "\n", encoding="utf-8")
    return 0


COMMAND = ("measure a network: parameters, FLOPs, latency (every CPU backend side by side), peak memory",
           add_report_arguments, run_report)
