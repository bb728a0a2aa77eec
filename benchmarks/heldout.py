"""Held-out benchmark: what compression keeps on images it has never seen, and what it costs.

The bundled CT is split along z (:mod:`prunekit3d.sample.split`): baselines of several families are trained
on the training slab, ``prunekit3d compress`` distils and prunes them label-free on the calibration images
(the training slab and the unlabeled lower scan), and every network is scored on the evaluation slab, which
neither training, calibration nor distillation sees. Per row:

- parameters, FLOPs (multiply-adds, fvcore), peak inference memory (one patch);
- latency paired with the original (timed in alternation, one patch, 2 threads) on PyTorch's default CPU
  path and with ``prunekit3d.use_onednn``;
- held-out Dice and NSD against the labels (mean of liver, kidneys, spleen), held-out agreement (Dice with the
  original's segmentation), and compress's wall time;
- a "plain student": the compressed architecture re-initialised and trained from scratch on the training
  slab like the baseline -- what compression adds over training a small network directly;
- a "second original": the same family trained like the baseline with another seed -- the agreement with the
  original that an equally trained, equally large network reaches on the evaluation slab, the yardstick for
  the compressed rows' agreement.

One compression of one network scored on one CT is a noisy measurement: ``compress``'s seed alone (which patches
it calibrates and distils on) moved held-out Dice by 0.10 at x0.25 FLOPs. ``--seeds 0 1 2`` compresses every
budget once per seed and adds a table of mean and standard deviation over the seeds: compare recipes there.

``--fold 1`` holds out the bundled CT's other evaluation slab (:data:`prunekit3d.sample.split.FOLDS`): baselines
are trained on that fold's training slabs (``baseline-fold1*.safetensors``) and every row is scored on its slab.
Run each fold into its own ``--out``; the two folds together score on twice the labeled voxels.

With ``--with-labels`` the compressed rows are made as a user with a labeled training set would: ``compress``
calibrates and distils on the training slab with ``--labels`` (a supervised term beside the distillation).

Writes ``heldout.json`` (after every row), ``heldout.md`` and ``heldout.png`` (held-out Dice against FLOPs and
against latency) into ``--out``. Measured numbers only.

    python benchmarks/heldout.py [--families dynunet segresnet basic_unet plain_unet] [--fold 0] [--out heldout-results]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import prunekit3d as pk
from prunekit3d.io.files import write_json
from prunekit3d.report import count_flops, count_params, measure, paired_latency
from prunekit3d.data.network_input import Preprocessing
from prunekit3d.recipes.demo import BASELINE_SPEC as DEMO_BASELINE_SPEC
from prunekit3d.sample.split import FOLDS, evaluation, heldout_split, training_pairs

#: The baselines: one network per family, each a few minutes of CPU training.
FAMILIES: dict[str, dict[str, Any]] = {
    "dynunet": DEMO_BASELINE_SPEC,  # prunekit3d demo's baseline (its weights are the ones this script trains)
    "segresnet": {"import_path": "monai.networks.nets.SegResNet", "kwargs": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 4, "init_filters": 16}},
    "basic_unet": {"import_path": "monai.networks.nets.BasicUNet", "kwargs": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 4, "features": [16, 16, 32, 64, 128, 16]}},
    # nnU-Net's PlainConvUNet as its plans describe it (prunekit3d's "nnunet_network" registry model builds it)
    "plain_unet": {"name": "nnunet_network", "input_channels": 1, "num_classes": 4, "deep_supervision": False,
                   "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                   "kw_requires_import": ["conv_op", "norm_op", "nonlin"], "arch_kwargs": {
        "n_stages": 4, "features_per_stage": [16, 32, 64, 128], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 4, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "nonlin": "torch.nn.modules.activation.LeakyReLU", "nonlin_kwargs": {"inplace": True}}},
}
#: (flag, value) of each compression budget.
BUDGETS = [("target_flops", 0.5), ("target_flops", 0.3), ("target_flops", 0.2), ("target_params", 0.3)]
PATCH = (64, 64, 16)
#: Every network's preprocessing: a CT soft-tissue window scaled to [0, 1] (recorded in the compressed artifacts).
PREPROCESSING = "ct:-200:300"


def build(name: str) -> nn.Module:
    return pk.from_spec(FAMILIES[name])


def fit(model: nn.Module, images: list[torch.Tensor], labels: list[torch.Tensor], iterations: int, seed: int,
        console: Console, title: str) -> nn.Module:
    """Supervised training on the training slabs (Dice + CE, Adam, poly decay, patches centred on the foreground
    half of the time, rotated, flipped and intensity-jittered)."""
    from prunekit3d.recipes.demo import fit_supervised

    return fit_supervised(model, images, labels, PATCH, iterations, seed=seed, console=console, title=title,
                          augment=True)


def costs(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    """Parameters, FLOPs, peak inference memory and latency paired with ``reference`` (default path, oneDNN)."""
    x = torch.zeros(1, 1, *PATCH)
    size = [1, 1, *PATCH]
    default = paired_latency([reference.eval(), model.eval()], size, warmup=2, repeats=7)
    fast = [pk.use_onednn(copy.deepcopy(m).eval()) for m in (reference, model)]
    onednn = paired_latency(fast, size, warmup=2, repeats=7)
    report = measure(model, size, warmup=1, repeats=1, train_step=False)
    return {"params": count_params(model), "flops": count_flops(model, x)[0],
            "latency_ms": default[1], "latency_ms_reference": default[0],
            "latency_onednn_ms": onednn[1], "latency_onednn_ms_reference": onednn[0],
            "peak_inference_mib": report.peak_memory_inference_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--budgets", nargs="*", default=[f"{k}={v}" for k, v in BUDGETS],
                        help="e.g. target_flops=0.3 target_params=0.3")
    parser.add_argument("--iterations", type=int, default=1000, help="training steps of baselines and plain students")
    parser.add_argument("--student-budget", default="target_flops=0.3",
                        help="the budget whose architecture is also trained from scratch ('' for none)")
    parser.add_argument("--compress", default="{}", help="extra CompressConfig settings as JSON (ablations)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="compress every budget once per seed (compress's seed: calibration and distillation "
                             "patches); the tables add mean and standard deviation over them")
    parser.add_argument("--out", type=Path, default=Path("heldout-results"))
    parser.add_argument("--baselines", type=Path, help="where trained baselines are kept and reused (default: --out)")
    parser.add_argument("--fold", type=int, default=0, choices=range(len(FOLDS)),
                        help="which slab of the bundled CT is held out for evaluation (one --out per fold)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--with-labels", action="store_true",
                        help="compress on the training slab with its labels, not the unlabeled calibration images")
    parser.add_argument("--no-second-original", dest="second_original", action="store_false",
                        help="skip training each family a second time with another seed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=max(Console().width, 160))
    args.out.mkdir(parents=True, exist_ok=True)
    split = heldout_split(args.out / "split", args.fold)
    record = Preprocessing.parse(PREPROCESSING)
    held_out = evaluation(split, record)
    data = {"calib": split.calibration_dir, "train": training_pairs(split, record), "split": split}
    budgets = [(k, float(v)) for k, v in (b.split("=") for b in args.budgets)]
    extra = json.loads(args.compress)
    if "seed" in extra:
        parser.error("--compress sets no seed: pass it with --seeds")
    results_file = args.out / "heldout.json"
    earlier = json.loads(results_file.read_text()) if results_file.is_file() else {"fold": args.fold, "rows": []}
    if earlier.get("fold", 0) != args.fold:
        parser.error(f"{results_file} holds fold {earlier.get('fold', 0)}'s rows; pass another --out for fold {args.fold}")
    rows: list[dict[str, Any]] = earlier["rows"]
    done = {(r["family"], r["variant"], r.get("seed", 0)) for r in rows}
    for family in args.families:
        baseline = _baseline(family, data, args, console)
        if (family, "original", 0) not in done:
            rows.append({"family": family, "variant": "original", **costs(baseline, baseline),
                         **held_out.scores(baseline, None, PATCH), "agreement": 1.0})
            _save(results_file, rows, args)
        if args.second_original and (family, "second original", 0) not in done:
            twin = _baseline(family, data, args, console, seed=1)
            rows.append({"family": family, "variant": "second original", **costs(twin, baseline),
                         **held_out.scores(twin, baseline, PATCH)})
            _save(results_file, rows, args)
        for kind, value in budgets:
            variant = f"{kind}={value:g}" + (" with labels" if args.with_labels else "")
            for seed in args.seeds:
                if (family, variant, seed) in done:
                    continue
                small, seconds, report = _compress(family, data, variant, {kind: value, **extra, "seed": seed},
                                                   args, console)
                rows.append({"family": family, "variant": variant, "seed": seed, "settings": extra,
                             "compress_s": seconds,
                             **costs(small, baseline), **held_out.scores(small, baseline, PATCH),
                             "agreement_reported": report.get("agreement_dice"),
                             # the held-out calibration volume's agreement per epoch of the last round, and the kept one
                             "best_epoch": report.get("best_epoch")})
                _save(results_file, rows, args)
            # a resumed run still trains the plain student of a budget compressed before
            if variant == args.student_budget and (family, f"plain student {variant}", 0) not in done:
                student = pk.load(args.out / family / _folder(variant, args.seeds[0]))
                _reinitialise(student)
                fit(student, *data["train"], args.iterations, 1, console, f"{family}: plain student {variant}")
                rows.append({"family": family, "variant": f"plain student {variant}", **costs(student, baseline),
                             **held_out.scores(student, baseline, PATCH)})
                _save(results_file, rows, args)
    _table(rows, console)
    _plot(rows, args.out / "heldout.png")
    console.print(f"wrote {results_file}, {args.out / 'heldout.md'}, {args.out / 'heldout.png'}")


def _baseline(family: str, data: dict[str, Any], args: argparse.Namespace, console: Console,
              seed: int = 0) -> nn.Module:
    path = _baseline_path(family, args, seed)
    model = build(family)
    if path.is_file():
        from prunekit3d.sources import fit_weights, read_state_dict

        fit_weights(model, read_state_dict(path), path, family)
        return model.eval()
    import safetensors.torch

    torch.manual_seed(seed)
    model = fit(build(family), *data["train"], args.iterations, seed, console, f"{family}: baseline seed {seed}")
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(model, str(path))
    return model


def _compress(family: str, data: dict[str, Any], variant: str, settings: dict[str, Any],
              args: argparse.Namespace, console: Console) -> tuple[nn.Module, float, dict]:
    from prunekit3d.recipes.compress import CompressConfig, compress

    spec = args.out / family / "spec.json"
    write_json(spec, FAMILIES[family])
    split = data["split"]
    train = split.train[0]
    calib = {"calib": str(train.image.parent), "labels": str(train.label.parent)} if args.with_labels else {
        "calib": str(data["calib"])}
    config = CompressConfig(checkpoint=str(_baseline_path(family, args)),
                            out=str(args.out / family / _folder(variant, settings["seed"])), spec=str(spec),
                            preprocessing=PREPROCESSING,
                            patch=PATCH, device="cpu", overwrite=True, **calib, **settings)
    started = time.perf_counter()
    result = compress(config, console=console)
    return result.model.cpu().eval(), time.perf_counter() - started, result.report


def _baseline_path(family: str, args: argparse.Namespace, seed: int = 0) -> Path:
    """Where a family's baseline of ``seed`` trained on ``--fold``'s training slabs is kept (fold 0 unmarked)."""
    tags = (f"-fold{args.fold}" if args.fold else "") + (f"-seed{seed}" if seed else "")
    return (args.baselines or args.out) / family / f"baseline{tags}.safetensors"


def _folder(variant: str, seed: int = 0) -> str:
    return variant.replace("=", "-").replace(" with labels", "-labels") + (f"-seed{seed}" if seed else "")


def _reinitialise(model: nn.Module) -> None:
    """Fresh weights for every layer (the architecture stays): the plain student starts from scratch."""
    torch.manual_seed(1)
    for m in model.modules():
        if m is not model and hasattr(m, "reset_parameters"):
            m.reset_parameters()


def _save(path: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    write_json(path, {"fold": args.fold, "threads": args.threads, "patch": list(PATCH), "preprocessing": PREPROCESSING,
                      "rows": rows, "torch": torch.__version__})
    (path.parent / "heldout.md").write_text(markdown(rows), encoding="utf-8")


COLUMNS = [("family", "family", "{}"), ("variant", "variant", "{}"), ("params", "params", "{:,}"),
           ("flops", "GFLOPs", "{:.2f}"), ("latency_ms", "latency ms", "{:.0f}"),
           ("latency_onednn_ms", "latency oneDNN ms", "{:.0f}"), ("peak_inference_mib", "peak MiB", "{:.0f}"),
           ("dice", "held-out Dice", "{:.3f}"), ("nsd", "held-out NSD", "{:.3f}"),
           ("agreement", "held-out agreement", "{:.3f}"), ("compress_s", "compress s", "{:.0f}")]


def _cells(row: dict[str, Any], original: dict[str, Any] | None) -> list[str]:
    cells = []
    for key, _, form in COLUMNS:
        value = row.get(key)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            cells.append("-")
            continue
        text = form.format(value / 1e9 if key == "flops" else value)
        if key == "variant" and row.get("seed"):
            text += f" (seed {row['seed']})"
        if (original is not None and key in ("params", "flops", "latency_ms", "latency_onednn_ms")
                and row is not original):
            reference = row.get(f"{key}_reference", original[key]) if key.startswith("latency") else original[key]
            text += f" (x{value / reference:.2f})"
        cells.append(text)
    return cells


#: The columns averaged over seeds: (key, title); ratios are to the original's.
SEED_COLUMNS = [("flops", "FLOPs"), ("latency_onednn_ms", "latency oneDNN"), ("dice", "held-out Dice"),
                ("nsd", "held-out NSD"), ("agreement", "held-out agreement")]


def over_seeds(rows: list[dict[str, Any]]) -> list[list[str]]:
    """One row of cells per (family, variant) compressed with more than one seed: the seeds, then mean +- standard
    deviation of each :data:`SEED_COLUMNS` value (FLOPs and latency as ratios to the original's)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if "seed" in row:
            groups.setdefault((row["family"], row["variant"]), []).append(row)
    table = []
    for (family, variant), mine in groups.items():
        if len(mine) < 2:
            continue
        original = next(r for r in rows if r["family"] == family and r["variant"] == "original")
        cells = [family, variant, ", ".join(str(r["seed"]) for r in mine)]
        for key, _ in SEED_COLUMNS:
            values = [r[key] / (r.get(f"{key}_reference") or original[key]) if key in ("flops", "latency_onednn_ms")
                      else r[key] for r in mine]
            mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
            prefix = "x" if key in ("flops", "latency_onednn_ms") else ""
            cells.append(f"{prefix}{mean:.3f} ± {sd:.3f}")
        table.append(cells)
    return table


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        original = next((r for r in rows if r["family"] == row["family"] and r["variant"] == "original"), None)
        lines.append("| " + " | ".join(_cells(row, original)) + " |")
    seeded = over_seeds(rows)
    if seeded:
        titles = ["family", "variant", "seeds", *(f"{t}: mean ± sd" for _, t in SEED_COLUMNS)]
        lines += ["", "Over seeds (sample standard deviation):", "", "| " + " | ".join(titles) + " |",
                  "|" + " --- |" * len(titles), *("| " + " | ".join(cells) + " |" for cells in seeded)]
    return "\n".join(lines) + "\n"


def _table(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="held-out benchmark (evaluation slab never seen by training, calibration or distillation)")
    for _, title, _ in COLUMNS:
        table.add_column(title, justify="left" if title in ("family", "variant") else "right")
    for row in rows:
        original = next((r for r in rows if r["family"] == row["family"] and r["variant"] == "original"), None)
        table.add_row(*_cells(row, original))
    console.print(table)
    seeded = over_seeds(rows)
    if seeded:
        table = Table(title="over seeds: mean ± sample standard deviation")
        for title in ["family", "variant", "seeds", *(t for _, t in SEED_COLUMNS)]:
            table.add_column(title)
        for cells in seeded:
            table.add_row(*cells)
        console.print(table)


def _kind(variant: str) -> str:
    if variant.startswith("plain student"):
        return "student"
    if variant.startswith("target_"):
        return "compressed with labels" if variant.endswith("with labels") else "compressed"
    return variant


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, label in ((axes[0], "flops", "GFLOPs (multiply-adds, one patch)"),
                           (axes[1], "latency_onednn_ms", "latency, oneDNN path (ms, one patch, 2 threads)")):
        for colour, family in enumerate(dict.fromkeys(r["family"] for r in rows)):  # one colour per family
            mine = [r for r in rows if r["family"] == family]
            kinds = {"original": "o", "second original": "^", "compressed": "s", "compressed with labels": "D",
                     "student": "x"}
            for kind, marker in kinds.items():
                pts = [r for r in mine if _kind(r["variant"]) == kind]
                if pts:
                    xs = [r[key] / (1e9 if key == "flops" else 1) for r in pts]
                    ax.scatter(xs, [r["dice"] for r in pts], marker=marker, color=f"C{colour}",
                               label=f"{family} {kind}")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out Dice")
        ax.set_xscale("log")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
