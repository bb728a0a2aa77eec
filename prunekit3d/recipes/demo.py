"""``prunekit3d demo``: the main job on the bundled sample CT, in a few minutes on a laptop CPU.

::

    sample CT (prunekit3d.sample) --z-score--> small MONAI DynUNet baseline
        (the shipped weights, prunekit3d/recipes/assets/demo_dynunet.safetensors, trained by
         scripts/train_demo_baseline.py; trained here in ~1 minute if the file is missing)
    baseline.safetensors --compress (label-free, --target-params 0.5)--> <out>/compressed/
    before / after table: parameters, FLOPs, latency, memory, agreement Dice, Dice vs the sample's labels

The labels of the sample train the baseline and score both networks at the end; compression itself
never sees them. The sample is one case, so the Dice scores are measured on the case the baseline was
trained on: they show what compression keeps, not how well the baseline generalises.
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

__all__ = ["BASELINE", "BASELINE_SPEC", "DemoResult", "baseline", "fit_supervised", "run_demo", "train_baseline"]

#: The demo's baseline: a small MONAI DynUNet for the sample's 4 classes (background, liver, kidneys, spleen).
BASELINE_SPEC: dict[str, Any] = {
    "import_path": "monai.networks.nets.DynUNet",
    "kwargs": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 4,
        "kernel_size": [3, 3, 3, 3],
        "strides": [1, 2, 2, 2],
        "upsample_kernel_size": [2, 2, 2],
        "filters": [8, 16, 32, 64],
    },
}
#: The shipped baseline weights (written by scripts/train_demo_baseline.py).
BASELINE = Path(__file__).resolve().parent / "assets" / "demo_dynunet.safetensors"
PATCH = (64, 64, 32)


def _sample_volume() -> tuple[torch.Tensor, torch.Tensor]:
    """The sample CT, z-scored as ``compress`` does by default, ``(1, X, Y, Z)``, and its labels ``(X, Y, Z)``."""
    from prunekit3d.data import normalise_volume, read_labels, read_volumes
    from prunekit3d.sample import sample_dataset

    volumes = read_volumes(sample_dataset())
    read_labels(sample_dataset(), volumes)
    return normalise_volume(volumes[0], "zscore"), torch.from_numpy(volumes[0].label)


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
    iterations: int = 150, *, seed: int = 0, spec: dict[str, Any] | None = None, console: Console | None = None
) -> nn.Module:
    """Train the demo baseline (or the network of ``spec``) on the sample CT, z-scored (:func:`fit_supervised`,
    random 64x64x32 patches)."""
    from prunekit3d.io import from_spec

    torch.manual_seed(seed)
    model = from_spec(spec or BASELINE_SPEC)
    image, label = _sample_volume()
    return fit_supervised(model, [image], [label], PATCH, iterations, seed=seed, console=console,
                          title="training the baseline")


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
    """Baseline on the sample, compressed label-free to half its parameters; prints the before / after table.

    Writes ``out/baseline.safetensors`` (the baseline's state dict) and ``out/compressed/`` (artifact,
    ``report.json``, ``report.md``).
    """
    import safetensors.torch

    from prunekit3d.evaluate import label_dice
    from prunekit3d.io.files import check_output_dir, write_json
    from prunekit3d.recipes.compress import CompressConfig, compress, partial_dir
    from prunekit3d.sample import sample_dataset

    started = time.perf_counter()
    console = console or Console()
    out = Path(out)
    check_output_dir(out, overwrite=overwrite)  # --overwrite replaces an earlier demo only
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "manifest.json", {"format": "prunekit3d.demo", "format_version": 1})
    shutil.rmtree(partial_dir(out / "compressed"), ignore_errors=True)  # an interrupted earlier demo starts over
    model, origin = baseline(console)
    console.print(f"baseline: MONAI DynUNet {BASELINE_SPEC['kwargs']['filters']}, {origin}")
    checkpoint = out / "baseline.safetensors"
    safetensors.torch.save_model(model, str(checkpoint))  # one name per shared tensor (DynUNet's skip blocks)
    config = CompressConfig(
        checkpoint=str(checkpoint), out=str(out / "compressed"), calib=str(sample_dataset()),
        model=BASELINE_SPEC["import_path"], model_kwargs=BASELINE_SPEC["kwargs"], target_params=0.5,
        patch=PATCH, device=device, overwrite=True,
    )
    result = compress(config, console=console)
    image, label = _sample_volume()
    before, after = (label_dice(m, [image], [label], PATCH) for m in (model, result.model.cpu()))
    result.report["dice_vs_labels_before"], result.report["dice_vs_labels_after"] = before, after
    seconds = time.perf_counter() - started
    console.print(result.table(title=f"prunekit3d demo: DynUNet on the sample CT, compressed to "
                                     f"{config.target_params:g} of its parameters ({seconds:.0f} s)"))
    console.print(f"compressed model: {result.out} (prunekit3d.load('{result.out}'))")
    return DemoResult(out, result.report, seconds)
