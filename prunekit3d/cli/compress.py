"""``prunekit3d compress``: argument parsing, then the Python API.

The command is ``(help line, add_arguments(parser), run(args) -> exit code)`` as :data:`prunekit3d.cli.COMMANDS`
holds it. Bad input raises ``ValueError`` / ``FileNotFoundError`` / ``FileExistsError`` with one line naming the
problem and the fix; ``prunekit3d.cli.main`` prints it and exits 2.
"""

from __future__ import annotations

import argparse
import json

from prunekit3d.cli.arguments import add_model_arguments
from prunekit3d.data.network_input import PARSE_HELP

__all__ = ["COMMAND", "add_compress_arguments", "run_compress"]


def add_compress_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``compress``; unset flags are absent, so :class:`~prunekit3d.recipes.compress.CompressConfig`'s
    defaults apply (and nothing heavy is imported to build the parser)."""
    s = argparse.SUPPRESS
    parser.add_argument("checkpoint", metavar="CHECKPOINT",
                        help="prunekit3d artifact directory, state dict (.pt, .pth, .safetensors), MONAI bundle "
                             "folder or nnU-Net model folder (<Trainer>__<Plans>__<configuration>)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory: artifact(s), report.json, report.md; and DIR/bundle or DIR/nnunet, "
                             "the bundle or nnU-Net model folder compressed")
    parser.add_argument("--fold", dest="folds", nargs="+", default=s, metavar="K",
                        help="folds of an nnU-Net model folder to compress (all present)")
    add_model_arguments(parser)
    data = parser.add_argument_group("calibration data")
    data.add_argument("--calib", required=True, metavar="PATH",
                      help="NIfTI file, folder of them, or MSD data set folder")
    data.add_argument("--labels", default=s, metavar="PATH",
                      help="labels of the calibration images: adds a supervised loss")
    data.add_argument("--preprocessing", default=s, metavar="SCHEME",
                      help="the network's own preprocessing, recorded and re-applied by predict: " + PARSE_HELP
                      + " (zscore)")
    data.add_argument("--spacing", type=float, nargs=3, default=s, metavar="MM",
                      help="resample the calibration images to this spacing first")
    data.add_argument("--holdout", type=float, default=s, metavar="F",
                      help="fraction of the calibration data never distilled on, where agreement is measured (0.2)")
    data.add_argument("--min-agreement", type=float, default=s, metavar="A",
                      help="warn when the held-out agreement with the original ends below this (0.95)")
    budget = parser.add_argument_group("budget (fraction of the original network to keep)")
    one = budget.add_mutually_exclusive_group()
    one.add_argument("--target-params", type=float, default=s, metavar="R", help="keep at most R of the parameters")
    one.add_argument("--target-flops", type=float, default=s, metavar="R",
                     help="keep at most R of the FLOPs (multiply-adds)")
    one.add_argument("--target-latency", type=float, default=s, metavar="R",
                     help="keep at most R of the original's latency on --device (paired timing; oneDNN on a CPU)")
    budget.add_argument("--channels", type=float, default=s, metavar="R",
                        help="force channel pruning: remove R of the channels of every layer group")
    sched = parser.add_argument_group("schedule (an epoch is --iters-per-epoch steps on --batch random patches)")
    sched.add_argument("--patch", type=int, nargs="+", default=s, metavar="N", help="patch size, 1 or 3 numbers (64)")
    sched.add_argument("--batch", type=int, default=s, help="patches per step (2)")
    sched.add_argument("--epochs", type=int, default=s, help="end-to-end distillation epochs with block pruning (4)")
    sched.add_argument("--blockwise-epochs", type=int, default=s, help="block-wise distillation epochs (4)")
    sched.add_argument("--finetune-epochs", type=int, default=s,
                       help="final distillation epochs, shared by the channel rounds (48; 96 takes about 1.7x as "
                            "long and kept more accuracy at a large cut on some benchmark networks, not all; the "
                            "last round goes on, up to twice its share, while its held-out agreement still rises)")
    sched.add_argument("--channel-rounds", type=int, default=s, metavar="R",
                       help="channel pruning spread over R rounds, each followed by distillation (3)")
    sched.add_argument("--prune-rounds", type=int, default=s, metavar="P",
                       help="the first P rounds prune, the rest distil at the final widths (all R)")
    sched.add_argument("--iters-per-epoch", type=int, default=s, help="(10)")
    sched.add_argument("--lr", type=float, default=s, help="Adam learning rate, constant (1e-3)")
    sched.add_argument("--max-block-error", type=float, default=s,
                       help="replace an original block only if its stand-in error is at most this (0.02)")
    recipe = parser.add_argument_group("distillation and pruning criteria")
    recipe.add_argument("--foreground-fraction", type=float, default=s, metavar="P",
                        help="patches centred on the original's foreground with this probability (0.5)")
    recipe.add_argument("--augment", action="store_true", default=s, help="flip and jitter the distillation patches")
    recipe.add_argument("--temperature", type=float, default=s,
                        help="of the distillation KL term (1; 2 measured worse on held-out data)")
    recipe.add_argument("--feature-weight", type=float, default=s, metavar="W",
                        help="weight of attention transfer at every encoder level and the 1/2-resolution decoder "
                             "feature (1; 0: logits only)")
    recipe.add_argument("--importance", choices=["magnitude", "taylor"], default=s,
                        help="channel importance (taylor: |weight x gradient| of the distillation loss)")
    recipe.add_argument("--allocation", choices=["uniform", "global"], default=s,
                        help="which layers lose channels: the same fraction each, or one global ranking by "
                             "importance (uniform; where it would land below 0.8 of the budget, the nearer of "
                             "the two)")
    recipe.add_argument("--round-to", type=int, default=s, metavar="N",
                        help="pruned layers keep multiples of N channels, or N/2, N/4, ... below N: the widths "
                             "CPU kernels run fast (16 on AVX-512: faster under a FLOP budget, coarser, less "
                             "accurate; 1: any width, the default)")
    run = parser.add_argument_group("run")
    run.add_argument("--device", default=s, help="auto, cpu, cuda, cuda:N (auto)")
    run.add_argument("--seed", type=int, default=s, help="(0)")
    run.add_argument("--overwrite", action="store_true", default=s, help="replace a non-empty --out")
    run.add_argument("--int8", action="store_true", default=s,
                     help="also quantize the result to INT8 (ONNX, on the calibration patches) into DIR/int8/, "
                          "which predict --backend openvino --int8 runs")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run (kept in DIR.partial)")


def run_compress(args: argparse.Namespace) -> int:
    from rich.console import Console

    from prunekit3d.recipes.compress import CompressConfig, compress

    values = vars(args).copy()
    values.pop("command", None)
    resume = values.pop("resume")
    if values.get("model_kwargs") is not None:
        try:
            values["model_kwargs"] = json.loads(values["model_kwargs"])
        except json.JSONDecodeError as err:
            raise ValueError(f"--model-kwargs is not valid JSON ({err}); e.g. '{{\"spatial_dims\": 3}}'") from None
        if not isinstance(values["model_kwargs"], dict):
            raise ValueError(f"--model-kwargs must be a JSON object of keyword arguments, got "
                             f"{type(values['model_kwargs']).__name__}")
    console = Console()
    result = compress(CompressConfig.from_dict(values), resume=resume, console=console)
    for part, table in result.tables().items():
        console.print(table)
    if "int8" in result.report:
        from prunekit3d.deploy import quantize_table

        console.print(quantize_table(result.report["int8"], f"INT8 of the compressed network -> {result.out}/int8"))
    console.print(f"wrote {result.out}/: {result.contents()}")
    return 0


COMMAND = ("compress a trained 3-D segmentation network to a budget, label-free", add_compress_arguments, run_compress)
