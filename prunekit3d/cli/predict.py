"""``prunekit3d predict``: argument parsing, then :func:`prunekit3d.inference.predict`.

The command is ``(help line, add_arguments(parser), run(args) -> exit code)`` as :data:`prunekit3d.cli.COMMANDS`
holds it. Bad input raises ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` / ``ImportError`` with one
line naming the problem and the fix; ``prunekit3d.cli.main`` prints it and exits 2.
"""

from __future__ import annotations

import argparse

__all__ = ["COMMAND", "add_predict_arguments", "run_predict"]

HELP = ("segment NIfTI images with a compressed (or any) network: artifact, quantize output, MONAI bundle or "
        "nnU-Net folder")


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="prunekit3d artifact, prunekit3d quantize output (ONNX backends), MONAI bundle folder, or "
                             "nnU-Net model folder")
    parser.add_argument("input", metavar="INPUT",
                        help="NIfTI file, or folder of them (nnU-Net case_0000.nii.gz channel files grouped)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where <case>.nii.gz segmentations go")
    pre = parser.add_argument_group("preprocessing (default: what the model records)")
    pre.add_argument("--preprocessing", metavar="SCHEME",
                     help="zscore | zscore:nonzero | zscore:above:T | ct:LO:HI | ct:LO:HI:MEAN:STD | "
                          "percentile:LO:HI | none | FILE.json")
    pre.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"), help="resample to this spacing (mm)")
    run = parser.add_argument_group("inference")
    run.add_argument("--patch", type=int, nargs="+", metavar="N",
                     help="sliding-window patch, 1 or 3 numbers (the artifact's patch_size, else 96)")
    run.add_argument("--overlap", type=float, help="sliding-window overlap (0.25; a bundle: its inferer's)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (auto)")
    run.add_argument("--no-onednn", dest="onednn", action="store_false",
                     help="keep PyTorch's own CPU convolutions (default: small ones on oneDNN, faster)")
    run.add_argument("--backend", choices=["torch", "onnxruntime", "openvino"], default="torch",
                     help="PyTorch, or the ONNX file on ONNX Runtime / OpenVINO (CPU): a quantize output's, or the "
                          "model exported on the fly (torch)")
    run.add_argument("--int8", action="store_true",
                     help="run the quantize output's model.int8.onnx (needs --backend onnxruntime|openvino; "
                          "OpenVINO is the fast INT8 path on x86)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace segmentations an earlier predict wrote in DIR (never other files)")


def run_predict(args: argparse.Namespace) -> int:
    from rich.console import Console

    from prunekit3d.inference import predict

    console = Console(stderr=True)
    written = predict(
        args.model, args.input, args.out, preprocessing=args.preprocessing, spacing=args.spacing, patch=args.patch,
        overlap=args.overlap, device=args.device, onednn=args.onednn, backend=args.backend, int8=args.int8,
        overwrite=args.overwrite, console=console,
    )
    console.print(f"wrote {len(written)} segmentation(s) to {args.out}/")
    return 0


COMMAND = (HELP, add_predict_arguments, run_predict)
