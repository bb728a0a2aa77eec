"""Train PSP-Seg-S with progressive pruning on the bundled CT sample, on a CPU, and show what pruning did.

    python examples/train_psp_seg_sample.py --out runs/psp_seg_sample          # about 10 minutes on one core

The same run from the command line:

    prunekit3d train --data "$(python -c 'import prunekit3d.sample as s; print(s.sample_dataset())')" \\
        --out runs/psp_seg_sample --patch 64 64 32 --epochs 40 --iters-per-epoch 5 --patience 1 --tolerance 0.1 \\
        --step 1 --calib-batches 4 --stop-fraction 0.75 --val-every 4 --device cpu

PSP-Seg-S has 4 branches per module, so ``--step 1`` allows up to three pruning events (4 -> 3 -> 2 -> 1).
The published patience (10) and tolerance (0.001) assume 250-step epochs; with 5-step epochs the epoch losses
are noisy, so this short schedule uses patience 1 and a tolerance of 0.1 (and the FD loss, which rises while
the encoder first learns the task, would otherwise flag every event as over-pruning).
The sample is a single case, so validation runs on the training case: the DSC shows that the pipeline
learns, not how well it generalises. Prints every pruning event and a before/after table.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from prunekit3d.recipes import TrainConfig, train
from prunekit3d.sample import sample_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/psp_seg_sample")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--iters-per-epoch", type=int, default=5)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    config = TrainConfig(
        data=str(sample_dataset()), out=args.out, variant="S", patch=(64, 64, 32), batch=2,
        epochs=args.epochs, iters_per_epoch=args.iters_per_epoch, patience=1, tolerance=0.1, step=1, calib_batches=4,
        stop_fraction=0.75, val_every=4, device="cpu",
    )
    result = train(config, resume=args.resume)
    history, report = result.history, result.report
    console = Console()

    events = Table(title="pruning events")
    for column in ("epoch", "event", "step after", "branches", "modules", "why"):
        events.add_column(column)
    for e in history["events"]:
        branches = e.get("branches", {})
        events.add_row(str(e["epoch"]), e["kind"], str(e.get("step", "")), str(sum(map(len, branches.values()))),
                       str(len(branches)), e.get("reason", ""))
    console.print(events)

    before = report["validation_before_first_prune"]
    after = report["validation"]
    classes = history["dataset"]["labels"][1:]
    table = Table(title=f"PSP-Seg-S on the sample, {config.epochs} epochs x {config.iters_per_epoch} steps")
    for column in ("", "params", "GFLOPs", "mean DSC", *classes):
        table.add_column(column, justify="right")

    def dsc(v):
        if v is None:
            return ["-"] * (1 + len(classes))
        return [f"{v['mean_dsc']:.3f}", *(f"{x:.3f}" if x is not None else "-" for x in v["dsc"].values())]

    params, flops = report["params"], report["flops"]
    table.add_row("start", f"{params['start']:,}", f"{flops['start'] / 1e9:.2f}", *dsc(before))
    table.add_row("end (slim)", f"{params['end']:,}", f"{flops['end'] / 1e9:.2f}", *dsc(after))
    console.print(table)
    console.print("GFLOPs of one 64x64x32 patch; DSC per class. start: the unified network, DSC of the last validation "
                  "before the first pruning event; end: the slim model, DSC of the last validation.")
    losses = [e["losses"]["total"] for e in history["epochs"]]
    console.print(f"loss: first epoch {losses[0]:.3f}, last epoch {losses[-1]:.3f}; slim model in {report['model']}")


if __name__ == "__main__":
    main()
