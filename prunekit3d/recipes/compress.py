"""Compress a trained 3-D segmentation network to a budget, label-free: ``prunekit3d compress`` as a function.

The original network is the teacher; its wrapped copy is the student::

    checkpoint --build_model--> teacher --wrap(deepcopy)--> student (redundant modules: original + light branches)
    1 stand-in     block-wise distillation: each module's light branches learn to replace its original block
    2 blocks       originals replaced where the stand-in is good (lowest error first) until the budget is met;
                   end-to-end distillation while ProgressivePruner removes the light branches the output can spare
                   -> slim -> artifact (DIR.partial/blocks)
    3 channels     if the budget is still not met: channel pruning (prunekit3d.channels) in rounds, each cutting
                   an equal factor of the way to the budget and followed by end-to-end distillation
                   (without anything to prune: one round of distillation)
    report         params, FLOPs, latency, memory before / after; agreement Dice on the calibration volumes
                   -> DIR: artifact + report.json + report.md (written beside DIR, renamed into place)

The budget (``target_params`` or ``target_flops``) is a fraction of the ORIGINAL network's count. Replacing an
original block by light branches is what makes block pruning save: the light branches of a kept original are
dropped, so a block never costs more than it did.

Resuming: every phase and every epoch of a training phase is checkpointed (safetensors + JSON, written
atomically) into the sibling directory ``DIR.partial``; ``compress(config, resume=True)`` continues from the
last checkpoint with the same settings. ``DIR`` appears only complete, and ``DIR.partial`` is removed then.
Inputs are only read.

>>> from prunekit3d.recipes.compress import CompressConfig, compress
>>> result = compress(CompressConfig(checkpoint="dynunet.pt", out="small", calib="Task09_Spleen",
...     model="monai.networks.nets.DynUNet", model_kwargs={...}, target_params=0.5))
>>> result.report["params_after"] / result.report["params_before"] <= 0.5
True
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

from prunekit3d.channels import count_flops as torch_flops
from prunekit3d.channels import prune_channels
from prunekit3d.channels.prune import MAX_RATIO
from prunekit3d.io import load, save
from prunekit3d.io.files import atomic_directory, write_json
from prunekit3d.io.weights import fit_state, split_tied
from prunekit3d.recipes.checkpoints import Volume, build_model, first_conv, model_spec, read_labels, read_volumes
from prunekit3d.recipes.distill import (
    distill_step,
    init_stand_ins,
    output_logits,
    stand_in_errors,
    stand_in_parameters,
    stand_in_step,
)
from prunekit3d.redundant import RedundantModule
from prunekit3d.report import (
    ModelReport,
    comparison_rows,
    comparison_table,
    count_flops,
    count_params,
    measure,
    paired_latency,
)
from prunekit3d.schedule import ProgressivePruner
from prunekit3d.wrap import WrapSpec, apply_wrap_spec, redundant_modules, wrap, wrap_spec

__all__ = ["CompressConfig", "CompressResult", "PatchSampler", "agreement_dice", "compress", "partial_dir", "predict"]

NORMALISATIONS = ("zscore", "none")


@dataclass
class CompressConfig:
    """Everything that defines one compression run (what ``prunekit3d compress`` parses its flags into).

    Input:
        checkpoint: a prunekit3d artifact directory or a state dict (``.pt``/``.pth``/``.safetensors``).
        model, model_kwargs: the network class by import path and its keyword arguments (for a state dict), or
        spec: a JSON file ``{"import_path": ..., "kwargs": ...}`` / ``{"name": ...}``.
        calib: calibration images: a NIfTI file, a folder of them, or an MSD data set folder.
        labels: labels of the calibration images (a supervised loss is added to the distillation).
        normalize: "zscore" (per image and channel) or "none" (fed as stored).
        out: the output directory.
        overwrite: replace a non-empty ``out``.

    Budget (a fraction of the original network's count; at most one of the two):
        target_params, target_flops: keep at most this fraction of the parameters / FLOPs.
        channels: remove this fraction of the channels of every layer group (forces channel pruning).

    Schedule (epochs of ``iters_per_epoch`` steps on ``batch`` random patches of size ``patch``):
        blockwise_epochs: block-wise distillation of the light branches.
        epochs: end-to-end distillation with progressive pruning of light branches.
        finetune_epochs: end-to-end distillation of the slim network, shared by the channel-pruning rounds.
        channel_rounds: channel pruning is spread over this many rounds (when channels must go at all).
        lr: Adam learning rate (constant). calib_patches: fixed patches the pruner calibrates on.
        branches, exp_ratio: light branches per block (7, 4 or 1) and their width.
        max_block_error: an original block is replaced only if its stand-in error is at most this
            (1 = no better than dropping the block). Low by default: on a trained network a replaced block
            costs agreement, and four light branches run no faster than one 3x3x3 convolution on a CPU.
        patience, tolerance, step: the progressive pruner's (see :class:`~prunekit3d.schedule.ProgressivePruner`).

    Run:
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:N". seed: seeds every random draw.
    """

    checkpoint: str
    out: str
    calib: str
    model: str | None = None
    model_kwargs: dict[str, Any] | None = None
    spec: str | None = None
    labels: str | None = None
    normalize: str = "zscore"
    target_params: float | None = None
    target_flops: float | None = None
    channels: float | None = None
    patch: tuple[int, int, int] = (64, 64, 64)
    batch: int = 2
    blockwise_epochs: int = 4
    epochs: int = 4
    finetune_epochs: int = 24
    channel_rounds: int = 3
    iters_per_epoch: int = 10
    lr: float = 5e-3
    calib_patches: int = 8
    branches: int = 4
    exp_ratio: float = 0.5
    max_block_error: float = 0.02
    patience: int = 1
    tolerance: float = 0.01
    step: int = 1
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.checkpoint, self.out, self.calib = str(self.checkpoint), str(self.out), str(self.calib)
        for name in ("spec", "labels"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else str(value))
        values = [self.patch] if isinstance(self.patch, int) else list(self.patch)
        self.patch = tuple(int(v) for v in (values * 3 if len(values) == 1 else values))  # type: ignore[assignment]
        rules = {
            "at most one of target_params and target_flops": self.target_params is None or self.target_flops is None,
            "0 < target_params <= 1": self.target_params is None or 0 < self.target_params <= 1,
            "0 < target_flops <= 1": self.target_flops is None or 0 < self.target_flops <= 1,
            "0 < channels < 1 (the fraction of channels removed)": self.channels is None or 0 < self.channels < 1,
            "patch: 3 sizes >= 1": len(self.patch) == 3 and min(self.patch) >= 1,
            f"normalize in {list(NORMALISATIONS)}": self.normalize in NORMALISATIONS,
            "batch >= 1": self.batch >= 1,
            "epochs, blockwise_epochs, finetune_epochs >= 0":
                min(self.epochs, self.blockwise_epochs, self.finetune_epochs) >= 0,
            "iters_per_epoch >= 1": self.iters_per_epoch >= 1,
            "calib_patches >= 1, channel_rounds >= 1": self.calib_patches >= 1 and self.channel_rounds >= 1,
            "lr > 0": self.lr > 0,
            "max_block_error >= 0": self.max_block_error >= 0,
            "patience >= 1, step >= 1, tolerance >= 0": self.patience >= 1 and self.step >= 1 and self.tolerance >= 0,
        }
        broken = [rule for rule, ok in rules.items() if not ok]
        if broken:
            raise ValueError(f"invalid compress settings: needs {'; '.join(broken)}")

    @property
    def budget(self) -> tuple[str, float] | None:
        """``("params" | "flops", fraction)`` or ``None``."""
        if self.target_params is not None:
            return "params", float(self.target_params)
        if self.target_flops is not None:
            return "flops", float(self.target_flops)
        return None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["patch"] = list(self.patch)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown compress settings {unknown}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class CompressResult:
    """What a run wrote: the output directory, its report (as in ``report.json``) and the compressed network."""

    out: Path
    report: dict[str, Any]
    model: nn.Module = field(repr=False)

    def table(self, extra: Sequence[tuple[str, str, str]] = (), title: str | None = None) -> Table:
        """The before / after table: costs, agreement Dice, Dice vs labels (if measured), plus ``extra`` rows."""
        r = self.report
        rows = [("agreement Dice with the original", "1.000", f"{r['agreement_dice']:.3f}")]
        if "dice_vs_labels_before" in r:
            rows.append(("Dice vs labels", f"{r['dice_vs_labels_before']:.3f}", f"{r['dice_vs_labels_after']:.3f}"))
        budget = r.get("budget")
        if title is None:
            title = f"prunekit3d compress -> {self.out}"
            if budget:
                title += f" (budget: {budget['asked']:g} of the {budget['kind']}, reached {budget['reached']:.3f})"
        before, after = ModelReport.from_dict(r["before"]), ModelReport.from_dict(r["after"])
        return comparison_table(before, after, [*rows, *extra], title=title)


def partial_dir(out: str | Path) -> Path:
    """Where an unfinished run keeps its resume state: the sibling ``<out>.partial``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


# ---- calibration data ------------------------------------------------------------------------------------
def _normalised(volume: Volume, how: str) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(volume.image, dtype=np.float32))
    if how == "zscore":
        dims = tuple(range(1, x.dim()))
        x = (x - x.mean(dims, keepdim=True)) / x.std(dims, keepdim=True).clamp_min(1e-8)
    return x


class PatchSampler:
    """Random patches of the calibration volumes (zero-padded where a volume is smaller than a patch).

    Args:
        images: ``(C, X, Y, Z)`` tensors, already normalised.
        labels: one ``(X, Y, Z)`` integer tensor per image, or ``None``.
        patch: patch size.
    """

    def __init__(
        self, images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None, patch: Sequence[int]
    ) -> None:
        self.patch = tuple(int(p) for p in patch)
        self.images = [self._pad(x) for x in images]
        self.labels = None if labels is None else [self._pad(y[None])[0] for y in labels]

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        extra = [max(0, p - s) for p, s in zip(self.patch, x.shape[1:])]
        pad: list[int] = []
        for e in reversed(extra):  # F.pad lists the last axis first
            pad += [e // 2, e - e // 2]
        return torch.nn.functional.pad(x, pad) if any(extra) else x

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``n`` patches ``(n, C, *patch)`` (and their labels ``(n, *patch)``), drawn with ``generator``."""
        images, labels = [], []
        for _ in range(n):
            i = int(torch.randint(len(self.images), (1,), generator=generator))
            x = self.images[i]
            corner = [int(torch.randint(s - p + 1, (1,), generator=generator)) for s, p in zip(x.shape[1:], self.patch)]
            box = tuple(slice(c, c + p) for c, p in zip(corner, self.patch))
            images.append(x[(slice(None), *box)])
            if self.labels is not None:
                labels.append(self.labels[i][box])
        return torch.stack(images), (torch.stack(labels) if self.labels is not None else None)


@torch.no_grad()
def predict(model: nn.Module, image: torch.Tensor, patch: Sequence[int]) -> torch.Tensor:
    """Sliding-window prediction (logits) of a whole ``(C, X, Y, Z)`` image, ``patch``-sized windows."""
    from monai.inferers import sliding_window_inference

    ref = next(model.parameters())
    out = sliding_window_inference(
        image[None].to(ref.device), tuple(patch), 1, lambda x: output_logits(model(x)), overlap=0.25
    )
    return output_logits(out)[0].float().cpu()


def _classes(logits: torch.Tensor) -> torch.Tensor:
    return (logits[0] > 0).long() if logits.shape[0] == 1 else logits.argmax(0)


def _mean_dice(a: torch.Tensor, b: torch.Tensor, classes: int) -> float:
    """Mean Dice of the foreground classes present in ``a`` or ``b`` (1.0 if none is)."""
    scores = []
    for c in range(1, max(classes, 2)):
        x, y = a == c, b == c
        total = int(x.sum() + y.sum())
        if total:
            scores.append(2 * int((x & y).sum()) / total)
    return float(np.mean(scores)) if scores else 1.0


def agreement_dice(
    reference: nn.Module, model: nn.Module, images: Sequence[torch.Tensor], patch: Sequence[int]
) -> float:
    """Mean Dice between the two networks' segmentations of ``images`` (foreground classes, per image, averaged)."""
    scores = []
    for image in images:
        a, b = predict(reference, image, patch), predict(model, image, patch)
        scores.append(_mean_dice(_classes(a), _classes(b), a.shape[0]))
    return float(np.mean(scores))


def label_dice(
    model: nn.Module, images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], patch: Sequence[int]
) -> float:
    """Mean Dice of the network's segmentations against ``labels`` (foreground classes, per image, averaged)."""
    scores = []
    for image, label in zip(images, labels):
        logits = predict(model, image, patch)
        scores.append(_mean_dice(_classes(logits), label.long(), logits.shape[0]))
    return float(np.mean(scores))


# ---- the run -----------------------------------------------------------------------------------------------
def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


# ---- progress checkpoints: weights (shared tensors once) and optimizer in safetensors, the rest in JSON --------
_MODEL, _OPTIMIZER, _STATE = "model.safetensors", "optimizer.safetensors", "state.json"


def save_progress(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Write (or atomically replace) a progress checkpoint directory; ``state`` must be JSON-able."""
    import safetensors.torch

    weights, tied = split_tied(model.state_dict())
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in opt["state"].items()
               for k, v in s.items() if isinstance(v, torch.Tensor)}
    scalars = {f"{i}.{k}": v for i, s in opt["state"].items() for k, v in s.items() if not isinstance(v, torch.Tensor)}
    body = {"tied": tied, "param_groups": opt["param_groups"], "scalars": scalars, "state": state}
    with atomic_directory(path, overwrite=True) as tmp:
        safetensors.torch.save_file(weights, tmp / _MODEL)
        safetensors.torch.save_file(tensors, tmp / _OPTIMIZER)
        (tmp / _STATE).write_text(json.dumps(body), encoding="utf-8")


def progress_state(path: Path) -> dict[str, Any] | None:
    """The caller's ``state`` of the progress checkpoint at ``path``, or ``None`` if there is none."""
    file = path / _STATE
    return json.loads(file.read_text(encoding="utf-8"))["state"] if file.is_file() else None


def load_progress(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device
) -> dict[str, Any]:
    """Load the weights (and the optimizer) of a progress checkpoint in place; returns its ``state``."""
    import safetensors.torch

    body = json.loads((path / _STATE).read_text(encoding="utf-8"))
    weights = fit_state(safetensors.torch.load_file(path / _MODEL), body["tied"], model, path / _MODEL)
    model.load_state_dict(weights, strict=True)
    if optimizer is not None:
        per_param: dict[int, dict[str, Any]] = {}
        tensors = safetensors.torch.load_file(path / _OPTIMIZER, device=str(device))
        for key, value in [*tensors.items(), *body["scalars"].items()]:
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": per_param, "param_groups": body["param_groups"]})
    return body["state"]


class _Run:
    """One compression run: the state shared by the phases, and the phases as methods."""

    def __init__(self, config: CompressConfig, resume: bool, console: Console) -> None:
        self.cfg = config
        self.console = console
        self.out = Path(config.out)
        self.partial = partial_dir(self.out)
        self.resume = resume
        self.device = _device(config.device)
        self.state: dict[str, Any] = {"config": self._settings(), "completed": [], "timings": {}}

    def _settings(self) -> dict[str, Any]:
        """The settings that must match for ``--resume`` (not where it runs or whether it may overwrite)."""
        data = self.cfg.to_dict()
        for key in ("device", "overwrite"):
            data.pop(key)
        return data

    # ---- checks before anything is written -------------------------------------------------------------
    def check_out(self) -> None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"--out {out} is a file; pass a directory path")
        if out.is_dir() and any(out.iterdir()) and not self.cfg.overwrite:
            raise FileExistsError(
                f"--out {out} exists and is not empty; pass --overwrite to replace it, or another --out"
            )
        if self.resume and not (self.partial / "state.json").is_file():
            raise FileNotFoundError(f"nothing to resume: {self.partial} holds no interrupted run; run without --resume")
        if not self.resume and self.partial.exists():
            raise FileExistsError(f"{self.partial} holds an interrupted run: pass --resume to continue it, or delete "
                                  "it to start over")
        for given in (self.cfg.checkpoint, self.cfg.calib, self.cfg.labels):
            if given is not None and Path(given).resolve() in (out.resolve(), self.partial.resolve()):
                raise ValueError(f"--out {out} is an input of this run; write the result somewhere else")

    def load_inputs(self) -> None:
        cfg = self.cfg
        spec = model_spec(cfg.model, cfg.model_kwargs, cfg.spec)
        self.teacher, self.spec = build_model(cfg.checkpoint, spec)
        self.teacher.requires_grad_(False)
        volumes = read_volumes(cfg.calib)
        if cfg.labels is not None:
            read_labels(cfg.labels, volumes)
        name, conv = first_conv(self.teacher)
        channels = {v.image.shape[0] for v in volumes}
        if channels != {conv.in_channels}:
            raise ValueError(
                f"the calibration images have {sorted(channels)} channel(s) but the network takes {conv.in_channels} "
                f"(its first convolution {name!r}); pass images with {conv.in_channels} channel(s)"
            )
        self.in_channels = conv.in_channels
        self.images = [_normalised(v, cfg.normalize) for v in volumes]
        self.labels = [torch.from_numpy(v.label) for v in volumes] if cfg.labels is not None else None
        self.patch = self._fit_patch(cfg.patch)
        self.sampler = PatchSampler(self.images, self.labels, self.patch)
        self.example = torch.zeros(1, self.in_channels, *self.patch)
        self.teacher.to(self.device)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        self.calib_batches = [
            self.sampler.sample(min(cfg.batch, cfg.calib_patches - i), generator)[0].to(self.device)
            for i in range(0, cfg.calib_patches, cfg.batch)
        ]

    def _runs(self, patch: Sequence[int]) -> Exception | None:
        """``None`` if the teacher runs on a patch of this size, else the error."""
        try:
            with torch.no_grad():
                output_logits(self.teacher(torch.zeros(1, self.in_channels, *patch)))
        except Exception as err:  # any failure here means the patch does not fit the network
            return err
        return None

    def _fit_patch(self, patch: Sequence[int]) -> tuple[int, ...]:
        """``patch``, each side cut down to the smallest image's extent rounded up to a multiple of 16 if the
        network runs on that (a patch larger than every image only adds padding to compute)."""
        smallest = np.min([x.shape[1:] for x in self.images], axis=0)
        fitted = tuple(int(min(p, -(-e // 16) * 16)) for p, e in zip(patch, smallest))
        if fitted != tuple(patch) and self._runs(fitted) is None:
            self.console.print(f"patch {list(patch)} -> {list(fitted)}: no calibration image is larger")
            return fitted
        err = self._runs(patch)
        if err is not None:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"the network cannot run on a patch of {list(patch)} ({first}); choose a --patch whose sides "
                "the network's total stride divides (e.g. 64 or 96)"
            )
        return tuple(patch)

    def measure_original(self) -> None:
        self.params_before = count_params(self.teacher)
        self.flops_before = count_flops(self.teacher.cpu(), self.example)[0]
        self.teacher.to(self.device)

    def check_budget(self) -> None:
        """Fail now, not after training, if the budget is below what removing ``MAX_RATIO`` of the channels gives."""
        budget = self.cfg.budget
        if budget is None:
            return
        kind, ratio = budget
        floor = copy.deepcopy(self.teacher).cpu().requires_grad_(True)  # torch-pruning leaves frozen layers alone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prune_channels(floor, self.example, ratio=MAX_RATIO)
        reached = self._count(floor, kind) / self._reference(kind)
        if reached > ratio:
            raise ValueError(
                f"the budget --target-{kind} {ratio:g} is unreachable: even removing {MAX_RATIO:.0%} of every layer's "
                f"channels keeps {reached:.3f} of the original {kind}; raise the budget"
            )

    # ---- progress, seeds, checkpoints ------------------------------------------------------------------
    def progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"), console=self.console, disable=self.console.quiet,
        )

    def generator(self, phase: int, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + phase * 10_007 + epoch)

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = self.sampler.sample(self.cfg.batch, generator)
        return images.to(self.device), (labels.to(self.device) if labels is not None else None)

    def save_state(self) -> None:
        write_json(self.partial / "state.json", self.state)

    def checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, Any]) -> None:
        save_progress(self.partial / "student", model, optimizer, progress)

    def load_latest(self, student: nn.Module) -> None:
        """On resume, the weights (and masks) of an interrupted stand-in or blocks phase."""
        if self.resume and progress_state(self.partial / "student") is not None:
            load_progress(self.partial / "student", student, None, self.device)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, phase: str) -> dict[str, Any] | None:
        """The saved progress of ``phase`` (loaded into ``model`` and ``optimizer``), or ``None``."""
        saved = progress_state(self.partial / "student") if self.resume else None
        if saved is None or saved.get("phase") != phase:
            return None
        return load_progress(self.partial / "student", model, optimizer, self.device)

    def done(self, phase: str, started: float) -> None:
        self.state["completed"].append(phase)
        self.state["timings"][phase] = round(time.perf_counter() - started + self.state["timings"].get(phase, 0.0), 1)
        self.save_state()

    # ---- phases ----------------------------------------------------------------------------------------
    def build_student(self) -> nn.Module:
        """The wrapped copy of the teacher (the same wrap spec on resume)."""
        student = copy.deepcopy(self.teacher).cpu()
        if "wrap_spec" in self.state:
            return apply_wrap_spec(student, WrapSpec.from_dict(self.state["wrap_spec"])).to(self.device)
        try:
            wrap(student, self.example, branches=self.cfg.branches, exp_ratio=self.cfg.exp_ratio)
        except ValueError as err:
            self.console.print(f"[yellow]block pruning skipped: {err}[/]")
        self.state["wrap_spec"] = wrap_spec(student).to_dict()
        return student.to(self.device)

    def wrapped_modules(self, student: nn.Module) -> dict[str, RedundantModule]:
        return {n: m for n, m in redundant_modules(student) if m.has_original}

    def train(
        self,
        phase: str,
        title: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        step: Callable[[torch.Tensor, torch.Tensor | None], float],
        pruner: ProgressivePruner | None = None,
    ) -> None:
        """``epochs`` epochs of ``step(images, labels) -> loss`` on random patches, checkpointed after every epoch
        and continued from the last checkpoint on resume. The learning rate stays constant: these schedules
        are short, and a decaying rate leaves the network less recovered at the end."""
        saved = self.restore(model, optimizer, phase)
        if saved and pruner is not None:
            pruner.load_state_dict(saved["pruner"])
        first = saved["epoch"] + 1 if saved else 0
        iters = self.cfg.iters_per_epoch
        model.eval()  # see prunekit3d.recipes.distill: the student learns the function inference computes
        with self.progress() as bar:
            task = bar.add_task(title, total=epochs * iters, completed=first * iters, info="")
            for epoch in range(first, epochs):
                generator = self.generator(zlib.crc32(phase.encode()), epoch)
                losses = []
                for _ in range(iters):
                    losses.append(step(*self.batch(generator)))
                    bar.update(task, advance=1, info=f"loss {losses[-1]:.4f}")
                progress: dict[str, Any] = {"phase": phase, "epoch": epoch}
                if pruner is not None:
                    # PSP-Seg's rule on the epoch's mean training loss: prune once it sets no new minimum.
                    decision = pruner.on_epoch_end(epoch, {"distill": float(np.mean(losses))})
                    if decision is not None and decision.branches:
                        n = sum(len(v) for v in decision.branches.values())
                        bar.console.print(f"epoch {epoch}: {decision.kind}: {n} light branches ({decision.reason})")
                    progress["pruner"] = pruner.state_dict()
                self.checkpoint(model, optimizer, progress)
        self.drop_graph(model)

    def drop_graph(self, model: nn.Module) -> None:
        """One forward without autograd. Networks that keep intermediate outputs as attributes (MONAI DynUNet's
        deep-supervision heads) otherwise still hold tensors of the last training step's graph, which deepcopy
        (slim, save) refuses."""
        ref = next(model.parameters())
        with torch.no_grad():
            model(self.example.to(ref.device))

    def stand_in(self, student: nn.Module) -> None:
        """Phase 1: block-wise distillation of the light branches (each learns to replace its original)."""
        modules = self.wrapped_modules(student)
        started = time.perf_counter()
        if modules and self.cfg.blockwise_epochs:
            init_stand_ins(self.teacher, modules, self.calib_batches[0])
            optimizer = torch.optim.Adam(stand_in_parameters(modules), lr=self.cfg.lr)
            self.train("stand-in", "1/3 block-wise distillation", student, optimizer, self.cfg.blockwise_epochs,
                       lambda images, _: stand_in_step(self.teacher, modules, images, optimizer))
        self.state["stand_in_errors"] = stand_in_errors(self.teacher, modules, self.calib_batches) if modules else {}
        self.done("stand-in", started)

    def _block_costs(self, student: nn.Module) -> dict[str, dict[str, float]]:
        """Per wrapped module: parameters and torch-counted FLOPs of the original and of its light branches."""
        from torch.utils.flop_counter import FlopCounterMode

        modules = self.wrapped_modules(student)
        model = student.cpu().eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(self.example)
        flops = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
        top = type(model).__name__
        costs = {}
        for name, m in modules.items():
            whole, original = flops.get(f"{top}.{name}", 0), flops.get(f"{top}.{name}.branches.0", 0)
            light = sum(p.numel() for k, b in enumerate(m.branches) if k and m.active[k] for p in b.parameters())
            costs[name] = {
                "params_original": sum(p.numel() for p in m.branches[0].parameters()),
                "params_light": light,
                "flops_original": original,
                "flops_light": whole - original,
            }
        student.to(self.device)
        return costs

    def choose_replacements(self, student: nn.Module) -> list[str]:
        """Replace originals, best stand-in first, while it is good enough and the budget is not yet met."""
        modules = self.wrapped_modules(student)
        errors = self.state["stand_in_errors"]
        costs = self._block_costs(student)
        budget = self.cfg.budget
        kind = budget[0] if budget else "params"
        total = (count_params(self.teacher) if kind == "params"
                 else torch_flops(self.teacher.cpu(), self.example))
        self.teacher.to(self.device)
        # Kept originals drop their light branches, so start from the original's own count.
        current = float(total)
        replaced = []
        for name in sorted(modules, key=lambda n: errors[n]):
            c = costs[name]
            saving = c[f"{kind}_original"] - c[f"{kind}_light"]
            if errors[name] > self.cfg.max_block_error or saving <= 0:
                continue
            if budget is not None and current <= budget[1] * total:
                break
            replaced.append(name)
            current -= saving
        return replaced

    def apply_replacements(self, student: nn.Module, replaced: list[str]) -> None:
        """Mask the replaced originals, and every light branch of the blocks that keep their original."""
        for name, m in self.wrapped_modules(student).items():
            drop = [0] if name in replaced else [k for k in range(1, len(m.branches))]
            m.mask([k for k in drop if m.active[k]])

    def blocks(self, student: nn.Module) -> None:
        """Phase 2: replace originals, then distil end to end while the pruner removes light branches."""
        started = time.perf_counter()
        cfg = self.cfg
        if "replaced" not in self.state:
            self.state["replaced"] = self.choose_replacements(student)
            self.save_state()
        self.apply_replacements(student, self.state["replaced"])
        prunable = any(len(m.active_indices()) > cfg.step for _, m in redundant_modules(student))
        pruner = None
        if cfg.epochs and (self.state["replaced"] or prunable):  # otherwise the student is still the teacher
            optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=cfg.lr)
            pruner = ProgressivePruner(
                student, lambda: iter(self.calib_batches), total_epochs=cfg.epochs, patience=cfg.patience,
                tolerance=cfg.tolerance, step=cfg.step, stop_fraction=1.0, calibration_batches=len(self.calib_batches),
                monitor=["distill"], console=Console(quiet=True),
            )
            self.train("blocks", "2/3 distillation + block pruning", student, optimizer, cfg.epochs,
                       lambda images, labels: distill_step(self.teacher, student, images, optimizer, labels=labels),
                       pruner)
        self.state["pruner"] = pruner.history if pruner is not None else []
        self.state["active_branches"] = {n: m.active_indices() for n, m in redundant_modules(student)}
        # Nothing replaced and nothing to prune: the student is the teacher, so keep the teacher's own layers.
        untouched = pruner is None and not self.state["replaced"]
        save(self.teacher if untouched else student, self.partial / "blocks", spec=self.spec, overwrite=True)
        self.done("blocks", started)

    def _count(self, model: nn.Module, kind: str) -> float:
        """Parameters, or fvcore FLOPs on one patch, of ``model``."""
        model = model.cpu()
        value = count_params(model) if kind == "params" else count_flops(model, self.example)[0]
        model.to(self.device)
        return value

    def _reference(self, kind: str) -> float:
        return self.params_before if kind == "params" else self.flops_before

    def channels(self) -> nn.Module:
        """Phase 3: channel pruning in rounds toward the budget, each round followed by end-to-end distillation.

        Pruning a little at a time and letting the network recover in between keeps far more of the original's
        function than one cut to the budget. With nothing to prune, one round of distillation alone. Each round
        writes ``pruned-<r>`` (right after pruning) and ``round-<r>`` (distilled) into the partial directory.
        """
        cfg = self.cfg
        started = time.perf_counter()
        rounds = self.state.setdefault("channel_rounds", [])
        model = load(self.partial / (f"round-{len(rounds) - 1}" if rounds else "blocks")).to(self.device)
        if not rounds:
            self.state["rounds"] = cfg.channel_rounds if self._needs_channels(model) else 1
            self.save_state()
        total = self.state["rounds"]
        epochs = math.ceil(cfg.finetune_epochs / total)
        for r in range(len(rounds), total):
            pruned = self.partial / f"pruned-{r}"
            if pruned.is_dir():
                model = load(pruned).to(self.device)
            else:
                self.state["pruned"] = None
                if self._needs_channels(model):
                    model, self.state["pruned"] = self._prune_round(model, r, total)
                save(model, pruned, spec=self.spec, overwrite=True)
                self.save_state()
            optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
            title = f"3/3 channel round {r + 1}/{total} + distillation" if total > 1 else "3/3 distillation"
            self.train(f"round-{r}", title, model, optimizer, epochs,
                       lambda images, labels: distill_step(self.teacher, model, images, optimizer, labels=labels))
            save(model, self.partial / f"round-{r}", spec=self.spec, overwrite=True)
            rounds.append(self.state.pop("pruned", None))
            self.save_state()
        self._check_budget_met(model)
        self.done("channels", started)
        return model

    def _needs_channels(self, model: nn.Module) -> bool:
        budget = self.cfg.budget
        if self.cfg.channels is not None:
            return True
        return budget is not None and self._count(model, budget[0]) > budget[1] * self._reference(budget[0])

    def _prune_round(self, model: nn.Module, r: int, total: int) -> tuple[nn.Module, dict[str, Any]]:
        """``model`` pruned by round ``r``'s share: an equal factor of the way to the budget per round."""
        cfg, budget = self.cfg, self.cfg.budget
        model = model.cpu()
        if cfg.channels is not None:
            plan = prune_channels(model, self.example, ratio=1 - (1 - cfg.channels) ** (1 / total))
        else:
            assert budget is not None
            kind, ratio = budget
            now = self._count(model, kind)
            model, plan = self._prune_to(model, kind, now * (ratio * self._reference(kind) / now) ** (1 / (total - r)))
        info = {"round": r, "ratio": plan.ratio, "params_before": plan.params_before, "params_after": plan.params_after,
                "widths": plan.widths}
        return model.to(self.device), info

    def _prune_to(self, model: nn.Module, kind: str, target: float) -> tuple[nn.Module, Any]:
        """``model`` (a copy) with the least channel pruning -- one ratio for every group of coupled layers -- that
        brings its parameters or fvcore FLOPs to ``target``: bisection on the ratio, each try on a copy."""
        def attempt(r: float) -> tuple[nn.Module, Any, float]:
            trial = copy.deepcopy(model)
            plan = prune_channels(trial, self.example, ratio=r)
            return trial, plan, self._count(trial, kind)

        now = self._count(model, kind)
        lo, hi = 0.0, MAX_RATIO
        r = min(MAX_RATIO, max(0.01, 1 - math.sqrt(target / now)))  # convolutions: cost ~ width^2
        found = None
        for _ in range(8):
            trial, plan, value = attempt(r)
            if value <= target:
                found, hi = (trial, plan), r
                if value >= 0.97 * target:  # close enough: prune no more than needed
                    break
            else:
                lo = r
            r = (lo + hi) / 2
        if found is None:
            trial, plan, value = attempt(MAX_RATIO)
            if value > target:
                asked = self.cfg.budget[1] if self.cfg.budget else target / self._reference(kind)
                raise _Unreachable(
                    f"the budget --target-{kind} {asked:g} is unreachable: removing "
                    f"{MAX_RATIO:.0%} of the channels leaves {value / self._reference(kind):.3f} of the original "
                    f"{kind}; raise the budget"
                )
            found = (trial, plan)
        return found

    def _check_budget_met(self, model: nn.Module) -> None:
        budget = self.cfg.budget
        if budget is None:
            return
        kind, ratio = budget
        reached = self._count(model, kind) / self._reference(kind)
        if reached > ratio:
            raise _Unreachable(
                f"the budget --target-{kind} {ratio:g} is unreachable: after block pruning and "
                f"{self.state['rounds']} round(s) of channel pruning the network keeps {reached:.3f} of the original "
                f"{kind}; raise the budget"
            )

    # ---- report -------------------------------------------------------------------------------------------
    def report(self, model: nn.Module) -> tuple[dict[str, Any], ModelReport, ModelReport]:
        size = [1, self.in_channels, *self.patch]
        with self.progress() as bar:
            task = bar.add_task("measuring before / after", total=3, info="")
            before = measure(self.teacher, size, name="original", device=self.device, warmup=1, repeats=3)
            bar.update(task, advance=1)
            after = measure(model, size, name="compressed", device=self.device, warmup=1, repeats=3)
            # The latencies compared: timed in alternation, so that the machine's load drifts out of the ratio.
            latency = paired_latency([self.teacher, model], size, warmup=1, repeats=7)
            before, after = (replace(r, latency_ms=ms) for r, ms in zip((before, after), latency))
            bar.update(task, advance=1)
            agreement = agreement_dice(self.teacher, model, self.images, self.patch)
            bar.update(task, advance=1)
        budget = self.cfg.budget
        report: dict[str, Any] = {
            "params_before": before.params,
            "params_after": after.params,
            "flops_before": before.flops,
            "flops_after": after.flops,
            "latency_ms_before": before.latency_ms,
            "latency_ms_after": after.latency_ms,
            "agreement_dice": agreement,
        }
        if self.labels is not None:
            report["dice_vs_labels_before"] = label_dice(self.teacher, self.images, self.labels, self.patch)
            report["dice_vs_labels_after"] = label_dice(model, self.images, self.labels, self.patch)
        if budget is not None:
            kind, ratio = budget
            reached = report[f"{kind}_after"] / report[f"{kind}_before"]
            report["budget"] = {"kind": kind, "asked": ratio, "reached": reached, "met": reached <= ratio}
        else:
            report["budget"] = None
        report["plan"] = {
            "wrapped_blocks": list(self.state.get("stand_in_errors", {})),
            "stand_in_errors": self.state.get("stand_in_errors", {}),
            "replaced_originals": self.state.get("replaced", []),
            "active_branches": self.state.get("active_branches", {}),
            "pruning_events": [
                {k: h[k] for k in ("kind", "epoch", "branches", "reason")} for h in self.state.get("pruner", [])
            ],
            "light_branches_pruned": sum(
                self.cfg.branches - len(self.state["active_branches"].get(n, []))
                for n in self.state.get("replaced", [])
            ),
            "channel_rounds": [r for r in self.state.get("channel_rounds", []) if r],
        }
        report["before"], report["after"] = before.to_dict(), after.to_dict()
        report["calibration"] = {
            "images": len(self.images), "patch": list(self.patch), "normalize": self.cfg.normalize
        }
        report["timings_s"] = self.state["timings"]
        report["config"] = self.cfg.to_dict()
        return report, before, after

    def write(self, model: nn.Module, report: dict[str, Any], before: ModelReport, after: ModelReport) -> None:
        plans = [p for h in self.state.get("pruner", []) if h.get("kind") == "prune" for p in [h.get("plan")] if p]
        extra = {"compress": {k: report[k] for k in ("params_before", "params_after", "agreement_dice", "budget")},
                 "patch_size": list(self.patch), "normalize": self.cfg.normalize}
        with atomic_directory(self.out, overwrite=self.cfg.overwrite) as tmp:
            save(model, tmp, spec=self.spec, plans=plans, extra=extra)
            (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
            (tmp / "report.md").write_text(markdown_report(report, before, after), encoding="utf-8")


class _Unreachable(ValueError):
    """The budget cannot be met (found only after training: the partial run is removed)."""


def markdown_report(report: dict[str, Any], before: ModelReport, after: ModelReport) -> str:
    """``report.md``: the before / after table, the budget and the plan in words."""
    lines = ["# prunekit3d compress", "", "| quantity | original | compressed | compressed / original |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {b} | {a} | {ratio} |" for name, b, a, ratio in comparison_rows(before, after)]
    lines.append(f"| agreement Dice with the original | 1.000 | {report['agreement_dice']:.3f} | |")
    if "dice_vs_labels_before" in report:
        lines.append(
            f"| Dice vs labels | {report['dice_vs_labels_before']:.3f} | {report['dice_vs_labels_after']:.3f} | |"
        )
    threads = f"{before.threads} thread{'s' if before.threads != 1 else ''}"
    size = "x".join(map(str, before.input_size))
    lines += ["", f"Input {size} on {before.device} ({threads}); memory: {before.memory_method}.", ""]
    budget = report.get("budget")
    if budget:
        lines.append(f"Budget: keep at most {budget['asked']:g} of the {budget['kind']}; reached "
                     f"{budget['reached']:.3f} ({'met' if budget['met'] else 'NOT met'}).")
    plan = report["plan"]
    rounds = plan["channel_rounds"]
    lines += [
        "",
        f"Plan: {len(plan['replaced_originals'])} of {len(plan['wrapped_blocks'])} wrapped blocks replaced by their "
        f"light branches, {plan['light_branches_pruned']} light branch(es) of those pruned for good; "
        + (f"{len(rounds)} round(s) of channel pruning, {rounds[0]['params_before']:,} -> "
           f"{rounds[-1]['params_after']:,} parameters." if rounds else "no channel pruning."),
        "",
        "| block | stand-in error | replaced | active branches |",
        "| --- | ---: | :---: | --- |",
    ]
    for name, err in plan["stand_in_errors"].items():
        replaced = "yes" if name in plan["replaced_originals"] else "no"
        lines.append(f"| {name} | {err:.3f} | {replaced} | {plan['active_branches'].get(name, [])} |")
    return "\n".join(lines) + "\n"


def compress(config: CompressConfig, *, resume: bool = False, console: Console | None = None) -> CompressResult:
    """Compress the network of ``config.checkpoint`` to the budget; see the module docstring.

    Args:
        config: the run's settings.
        resume: continue the interrupted run kept in ``<out>.partial`` (same settings required).
        console: where progress and the table are printed (``Console(quiet=True)`` silences it).

    Returns:
        a :class:`CompressResult`; ``config.out`` holds the artifact, ``report.json`` and ``report.md``.

    Raises:
        FileNotFoundError, FileExistsError, ValueError: bad input, named in one line; nothing is written then.
    """
    console = console or Console()
    run = _Run(config, resume, console)
    run.check_out()
    run.load_inputs()
    run.measure_original()
    if resume:
        saved = json.loads((run.partial / "state.json").read_text(encoding="utf-8"))
        if saved.get("config") != run.state["config"]:
            changed = sorted(k for k in run.state["config"] if saved.get("config", {}).get(k) != run.state["config"][k])
            raise ValueError(f"{run.partial} was started with other settings ({', '.join(changed)} differ); "
                             "resume with the same flags, or delete it to start over")
        run.state = saved
    else:
        run.check_budget()
        run.partial.mkdir(parents=True)
        run.save_state()
    try:
        return _phases(run)
    except _Unreachable:
        shutil.rmtree(run.partial, ignore_errors=True)
        raise


def _phases(run: _Run) -> CompressResult:
    completed = run.state["completed"]
    if "blocks" not in completed:
        student = run.build_student()
        run.save_state()
        run.load_latest(student)
        if "stand-in" not in completed:
            run.stand_in(student)
        run.blocks(student)
    if "channels" not in completed:
        model = run.channels()
    else:
        model = load(run.partial / f"round-{run.state['rounds'] - 1}").to(run.device)
    report, before, after = run.report(model)
    run.write(model, report, before, after)
    shutil.rmtree(run.partial, ignore_errors=True)
    return CompressResult(run.out, report, model)
