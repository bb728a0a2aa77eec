"""``prunekit3d demo``: the main job on the bundled CT, in a few minutes on a laptop CPU, judged on data it never saw.

::

    bundled CT --sample.split--> training slab (labeled) | calibration (unlabeled) | evaluation slab (labeled)
    training slab --> MONAI DynUNet baseline (residual, 16-128 filters), CT window [-200, 300] HU scaled to [0, 1]
        (the shipped weights, prunekit3d/recipes/assets/demo_dynunet.safetensors, trained by
         scripts/train_demo_baseline.py; trained here in a few minutes if the file is missing)
    baseline.safetensors --compress (label-free, calibration images only, --target-flops 0.3)--> <out>/compressed/
    before / after table: parameters, FLOPs, latency, memory, agreement and Dice on the evaluation slab

The evaluation slab's labels score both networks at the end; neither training, calibration nor distillation
sees the slab (it is predicted within the whole scan, as inference sees a scan, and cut out afterwards).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

__all__ = ["BASELINE", "BASELINE_SPEC", "PATCH", "PREPROCESSING", "TARGET_FLOPS", "DemoResult", "baseline", "demo_data",
           "fit_supervised", "run_demo", "train_baseline"]

#: The demo's baseline: a MONAI DynUNet with residual blocks (16-128 filters, 1.41 M parameters) for the sample's 4
#: classes (background, liver, kidneys, spleen); also the "dynunet" family of ``benchmarks/heldout.py``.
BASELINE_SPEC: dict[str, Any] = {
    "import_path": "monai.networks.nets.DynUNet",
    "kwargs": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 4,
        "kernel_size": [3, 3, 3, 3],
        "strides": [1, 2, 2, 2],
        "upsample_kernel_size": [2, 2, 2],
        "filters": [16, 32, 64, 128],
        "res_block": True,
    },
}
#: The shipped baseline weights (written by scripts/train_demo_baseline.py).
BASELINE = Path(__file__).resolve().parent / "assets" / "demo_dynunet.safetensors"
PATCH = (64, 64, 16)
#: The baseline's preprocessing (recorded in the compressed artifact; ``prunekit3d predict`` re-applies it).
PREPROCESSING = "ct:-200:300"
#: What the demo asks of compress.
TARGET_FLOPS = 0.3


def demo_data(folder: str | Path, fold: int = 0) -> tuple[Any, tuple[list[torch.Tensor], list[torch.Tensor]], Any]:
    """Fold ``fold`` of the bundled CT's held-out split written into ``folder``: ``(split, (training images,
    their labels), evaluation)``, preprocessed with :data:`PREPROCESSING` (see :mod:`prunekit3d.sample.split`)."""
    from prunekit3d.data.network_input import Preprocessing
    from prunekit3d.sample.split import evaluation, heldout_split, training_pairs

    split = heldout_split(folder, fold)
    record = Preprocessing.parse(PREPROCESSING)
    return split, training_pairs(split, record), evaluation(split, record)


def fit_supervised(
    model: nn.Module,
    images: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    patch: Sequence[int],
    iterations: int,
    *,
    seed: int = 0,
    lr: float = 3e-3,
    console: Console | None = None,
    title: str = "training",
    augment: bool = False,
) -> nn.Module:
    """Train ``model`` in place on random patches of ``images`` (``(C, X, Y, Z)``, normalised) and their labels:
    Dice + cross-entropy, Adam with poly decay, 2 patches a step, centred on the foreground half of the time;
    with ``augment``, rotated, flipped and intensity-jittered. Returns it in eval mode."""
    from prunekit3d.data import PatchSampler
    from prunekit3d.data.patches import labelled_augmentation
    from prunekit3d.recipes.compress.distill import supervised_loss

    console = console or Console()
    sampler = PatchSampler(images, labels, patch, augment=labelled_augmentation() if augment else ())
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=iterations, power=0.9)
    model.train()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console, disable=console.quiet) as bar:
        task = bar.add_task(title, total=iterations, info="")
        for _ in range(iterations):
            batch, target = sampler.sample(2, generator)
            optimizer.zero_grad(set_to_none=True)
            out = model(batch)
            out = out[:, 0] if out.dim() == 6 else out  # deep supervision stacks its heads in dim 1
            loss = supervised_loss(out, target)
            loss.backward()
            optimizer.step()
            schedule.step()
            bar.update(task, advance=1, info=f"loss {loss.item():.3f}")
    return model.eval()


def train_baseline(
    iterations: int = 1000, *, seed: int = 0, spec: dict[str, Any] | None = None, console: Console | None = None,
) -> nn.Module:
    """Train the demo baseline (or the network of ``spec``) on the bundled CT's training slab, preprocessed with
    :data:`PREPROCESSING` (:func:`fit_supervised`, augmented random :data:`PATCH` patches)."""
    import tempfile

    from prunekit3d.io import from_spec

    torch.manual_seed(seed)
    model = from_spec(spec or BASELINE_SPEC)
    with tempfile.TemporaryDirectory() as tmp:
        _, (images, labels), _ = demo_data(tmp)
    return fit_supervised(model, images, labels, PATCH, iterations, seed=seed, console=console,
                          title="training the baseline", augment=True)


def baseline(console: Console | None = None) -> tuple[nn.Module, str]:
    """The demo baseline: the shipped weights if installed, else trained now. Returns it and where it came from."""
    from prunekit3d.io import from_spec
    from prunekit3d.sources import fit_weights, read_state_dict

    if BASELINE.is_file():
        model = from_spec(BASELINE_SPEC)
        fit_weights(model, read_state_dict(BASELINE), BASELINE, "the demo DynUNet")
        return model.eval(), f"shipped weights {BASELINE.name}"
    return train_baseline(console=console), "trained now (no shipped weights found)"


@dataclass
class DemoResult:
    """The demo's output directory, the compression report (with Dice vs the sample's labels) and its wall time."""

    out: Path
    report: dict[str, Any]
    seconds: float


def run_demo(out: str | Path = "prunekit3d-demo", *, device: str = "auto", overwrite: bool = False,
             console: Console | None = None) -> DemoResult:
    """Baseline on the bundled CT compressed label-free to :data:`TARGET_FLOPS` of its FLOPs; prints the before /
    after table with Dice and agreement on the evaluation slab.

    Writes ``out/manifest.json``, ``out/data/`` (the split), ``out/baseline.safetensors`` (the baseline's
    state dict) and ``out/compressed/`` (artifact, ``report.json``, ``report.md``; the report also holds the
    evaluation slab's figures under ``"evaluation"``).
    """
    import safetensors.torch

    from prunekit3d.io.files import check_output_dir, write_json
    from prunekit3d.recipes.compress import CompressConfig, compress, partial_dir

    started = time.perf_counter()
    console = console or Console()
    out = Path(out)
    check_output_dir(out, overwrite=overwrite)  # --overwrite replaces an earlier demo only
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "manifest.json", {"format": "prunekit3d.demo", "format_version": 1})
    shutil.rmtree(partial_dir(out / "compressed"), ignore_errors=True)  # an interrupted earlier demo starts over
    split, _, held_out = demo_data(out / "data")
    model, origin = baseline(console)
    console.print(f"baseline: MONAI DynUNet {BASELINE_SPEC['kwargs']['filters']}, {origin}")
    checkpoint = out / "baseline.safetensors"
    safetensors.torch.save_model(model, str(checkpoint))  # one name per shared tensor (DynUNet's skip blocks)
    config = CompressConfig(
        checkpoint=str(checkpoint), out=str(out / "compressed"), calib=str(split.calibration_dir),
        model=BASELINE_SPEC["import_path"], model_kwargs=BASELINE_SPEC["kwargs"], target_flops=TARGET_FLOPS,
        preprocessing=PREPROCESSING, patch=PATCH, device=device, overwrite=True,
    )
    result = compress(config, console=console)
    before, after = held_out.scores(model, None, PATCH), held_out.scores(result.model.cpu(), model, PATCH)
    result.report["evaluation"] = {"slices": [held_out.scored.start, held_out.scored.stop],
                                   "original": before, "compressed": after}
    write_json(result.out / "report.json", result.report)  # with the evaluation slab's figures
    seconds = time.perf_counter() - started
    rows = [("held-out agreement (evaluation slab)", "1.000", f"{after['agreement']:.3f}"),
            ("held-out Dice vs labels (evaluation slab)", f"{before['dice']:.3f}", f"{after['dice']:.3f}"),
            ("held-out NSD vs labels (evaluation slab)", f"{before['nsd']:.3f}", f"{after['nsd']:.3f}")]
    console.print(result.table(rows, title=f"prunekit3d demo: DynUNet on the bundled CT, compressed to "
                                           f"{TARGET_FLOPS:g} of its FLOPs ({seconds:.0f} s)"))
    console.print(f"compressed model: {result.out} (prunekit3d.load, or: prunekit3d predict {result.out} IMAGE "
                  "--out DIR)")
    return DemoResult(out, result.report, seconds)
