"""``prunekit3d train``: the flags of :class:`~prunekit3d.recipes.TrainConfig`, then :func:`~prunekit3d.recipes.train`.

Settings come from, in increasing priority: the defaults (PSP-Seg's recipe), ``--config FILE`` (a
``config.json`` as every run writes it) and the flags given. Distributed: ``torchrun --nproc_per_node=N
-m prunekit3d train ...``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["COMMAND", "add_train_arguments", "run_train"]

HELP = "train PSP-Seg with progressive pruning on a Medical Segmentation Decathlon data set"


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``train``'s flags; every default is left to :class:`TrainConfig` (unset flags are absent)."""
    s = argparse.SUPPRESS
    data = parser.add_argument_group("data")
    data.add_argument("--data", default=s, help="MSD directory: dataset.json, imagesTr/, labelsTr/")
    data.add_argument("--out", default=s, help="output directory (history.json, checkpoint/, model/, report.json)")
    data.add_argument("--split", default=s, help='JSON {"train": [cases], "val": [cases]} (default: seeded 80/20)')
    data.add_argument("--spacing", type=float, nargs=3, default=s, metavar="MM", help="resample to this spacing")
    data.add_argument("--patch", type=int, nargs="+", default=s, metavar="N", help="patch size, 1 or 3 numbers (128)")
    data.add_argument("--batch", type=int, default=s, help="patches per step and process (2)")
    data.add_argument("--foreground-fraction", type=float, default=s, help="foreground-centred patches (0.33)")
    net = parser.add_argument_group("network and loss")
    net.add_argument("--variant", choices=["S", "B", "L"], type=str.upper, default=s, help="PSP-Seg variant (S)")
    net.add_argument("--module", choices=["prm", "srm"], default=s, help="parallel or sequential modules (prm)")
    net.add_argument("--no-fd", dest="fd", action="store_false", default=s, help="no functional-decoupling loss")
    net.add_argument("--fd-weight", type=float, default=s, help="weight of L_fd + L_aux (0.1)")
    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=s, help="epochs (1000)")
    opt.add_argument("--iters-per-epoch", type=int, default=s, help="steps per epoch (250)")
    opt.add_argument("--lr", type=float, default=s, help="SGD learning rate, poly decay (1e-3)")
    opt.add_argument("--momentum", type=float, default=s, help="Nesterov momentum (0.99)")
    opt.add_argument("--weight-decay", type=float, default=s, help="(3e-5)")
    opt.add_argument("--grad-clip", type=float, default=s, help="gradient-norm clip, 0 = off (12)")
    prune = parser.add_argument_group("pruning")
    prune.add_argument("--patience", type=int, default=s, help="epochs without a new loss minimum = converged (10)")
    prune.add_argument("--tolerance", type=float, default=s, help="loss above its best by more = over-pruned (0.001)")
    prune.add_argument("--step", type=int, default=s, help="branches removed per module and event (2)")
    prune.add_argument("--calib-batches", type=int, default=s, help="calibration batches per event (100)")
    prune.add_argument("--stop-fraction", type=float, default=s, help="prune during this fraction of the epochs (0.4)")
    prune.add_argument("--after-pruning", choices=["finetune", "reinit"], default=s, help="(finetune)")
    run = parser.add_argument_group("run")
    run.add_argument("--val-every", type=int, default=s, help="validate every N epochs (1)")
    run.add_argument("--nsd-tolerance", type=float, default=s, metavar="MM", help="NSD tolerance (one voxel)")
    run.add_argument("--device", default=s, help="auto, cpu, cuda, cuda:N (auto)")
    run.add_argument("--workers", type=int, default=s, help="data-loader processes (0)")
    run.add_argument("--seed", type=int, default=s, help="(0)")
    run.add_argument("--config", type=Path, help="start from this config.json; flags override it")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")


def run_train(args: argparse.Namespace) -> int:
    """Build the :class:`TrainConfig` from ``--config`` and the flags given, train, print the report."""
    from prunekit3d.recipes import TrainConfig, train  # torch and MONAI load only when training

    values = vars(args).copy()
    resume, config_file = values.pop("resume"), values.pop("config")
    values.pop("command", None)
    settings = json.loads(config_file.read_text(encoding="utf-8")) if config_file else {}
    settings.update(values)
    missing = [f"--{k}" for k in ("data", "out") if k not in settings]
    if missing:
        raise ValueError(f"train needs {' and '.join(missing)} (as flags or in the --config file)")
    result = train(TrainConfig.from_dict(settings), resume=resume)
    if result.report:
        print(json.dumps({k: result.report[k] for k in ("params", "flops", "events")}, indent=1))
    return 0


#: ``(help line, add arguments, run)`` as :data:`prunekit3d.cli.COMMANDS` holds it.
COMMAND = (HELP, add_train_arguments, run_train)
