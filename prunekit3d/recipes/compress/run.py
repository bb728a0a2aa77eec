"""One compression run's shared state: settings, inputs, the resume state in ``DIR.partial``, and the
services every stage uses (progress bars, seeded random patches, checkpoints, the training loop, counting).

The stages themselves live in :mod:`~prunekit3d.recipes.compress.blocks` (1 and 2),
:mod:`~prunekit3d.recipes.compress.channels` (3) and :mod:`~prunekit3d.recipes.compress.report`.
"""

from __future__ import annotations

import copy
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from prunekit3d.data import PatchSampler, read_labels, read_volumes
from prunekit3d.data.network_input import Preprocessing
from prunekit3d.data.patches import distillation_augmentation
from prunekit3d.evaluate import mean_dice, output_logits, segmentation, sliding_window_logits
from prunekit3d.io.errors import first_line
from prunekit3d.io.files import check_inputs_outside, check_output_dir, write_json
from prunekit3d.recipes.checkpoint import checkpoint_state, load_checkpoint, save_checkpoint
from prunekit3d.recipes.compress.config import CompressConfig
from prunekit3d.recipes.distributed import resolve_device
from prunekit3d.redundant import RedundantModule
from prunekit3d.report import count_flops, count_params, paired_latency
from prunekit3d.runtime import use_onednn
from prunekit3d.schedule import ProgressivePruner
from prunekit3d.sources import first_conv
from prunekit3d.sources.formats import Source, open_source
from prunekit3d.wrap import redundant_modules

__all__ = ["EXTEND_PATIENCE", "RUN_FORMAT", "CompressRun", "HeldOut", "Unreachable", "hold_out", "keeps_distilling",
           "partial_dir"]

#: Marks the resume state (``DIR.partial/state.json``) of this version of the pipeline.
RUN_FORMAT = "prunekit3d.compress-run/2"
#: How many epochs old the best held-out score may be for the last round's distillation to go on past its epochs.
EXTEND_PATIENCE = 2


def keeps_distilling(epoch: int, epochs: int, extend: int, best_epoch: int | None) -> bool:
    """Whether epoch ``epoch`` (from 0) runs: each of the first ``epochs``, then up to ``extend`` more while the
    best score so far (at ``best_epoch``) is at most :data:`EXTEND_PATIENCE` epochs old. A round of at most
    ``2 * EXTEND_PATIENCE`` epochs is not extended: its best epoch is always that recent, rising or not."""
    if epoch < epochs:
        return True
    if epoch >= epochs + extend or best_epoch is None or epochs <= 2 * EXTEND_PATIENCE:
        return False
    return (epoch - 1) - best_epoch <= EXTEND_PATIENCE


def partial_dir(out: str | Path) -> Path:
    """Where an unfinished run keeps its resume state: the sibling ``<out>.partial``."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


class Unreachable(ValueError):
    """The budget cannot be met (found only after training: the partial run is removed)."""


@dataclass
class HeldOut:
    """The calibration data split into what distillation sees and what it never sees (to measure agreement).

    Attributes:
        images, labels: ``{"distill": [...], "held_out": [...]}`` tensors (labels ``None`` without labels).
            A held-out slab is kept as its whole volume: it is predicted with its context, as inference sees
            it (a slab thinner than a patch would otherwise be mostly padding), and scored on ``scored`` only.
        scored: per held-out image, the index of the region scored (``None``: all of it).
        description: what was held out, in words (for the report).
    """

    images: dict[str, list[torch.Tensor]]
    labels: dict[str, list[torch.Tensor]] | None
    scored: list[tuple | None]
    description: str


def hold_out(names: Sequence[str], images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor] | None,
             fraction: float, patch: Sequence[int], foreground: Sequence[torch.Tensor]) -> HeldOut:
    """Keep ``fraction`` of the calibration data out of distillation: ``round(fraction * n)`` whole volumes (at
    least one; the last by name), or with a single volume a slab of that fraction at one end of one of its
    axes (see the comment below; ``foreground`` is the original's segmentation, ``> 0`` where it sees something).
    A slab is anatomy distillation never saw, next to what it did: a stricter test than another patient's
    volume, and the only one a single volume allows."""
    order = sorted(range(len(images)), key=lambda i: names[i])
    if fraction <= 0 or len(images) >= 2:
        n = max(1, round(fraction * len(images))) if fraction > 0 else 0
        split = {"distill": order[: len(order) - n], "held_out": order[len(order) - n:]}
        pick = lambda seq, part: [seq[i] for i in split[part]]  # noqa: E731
        held = [names[i] for i in split["held_out"]]
        words = f"{len(held)} of {len(images)} calibration volumes ({', '.join(held)})" if held else "nothing"
        return HeldOut({p: pick(images, p) for p in split}, {p: pick(labels, p) for p in split} if labels else None,
                       [None] * n, words)
    # A slab of the one volume: across an axis where what distillation keeps still holds whole patches (a volume
    # cut thinner than the patch trains on padding, which the network never meets again), and at whichever end
    # holds the share of the original's foreground closest to the whole volume's, so that it is representative.
    room = [min(x.shape[1 + a] * (1 - fraction) - patch[a] for x in images) for a in range(3)]
    axes = [a for a in range(3) if room[a] >= 0] or [int(np.argmax(room))]
    candidates = [(axis, end) for axis in axes for end in (True, False)]

    def held(t: torch.Tensor, axis: int, end: bool) -> tuple[int, int]:
        n = t.shape[t.dim() - 3 + axis]
        k = max(1, round(n * fraction))
        return (n - k, k) if end else (0, k)

    def unrepresentative(axis: int, end: bool) -> float:
        gap = 0.0
        for f in foreground:
            start, k = held(f, axis, end)
            gap += abs(float(f.narrow(f.dim() - 3 + axis, start, k).float().mean()) - float(f.float().mean()))
        return gap

    axis, end = min(candidates, key=lambda c: unrepresentative(*c))

    def keep(t: torch.Tensor) -> torch.Tensor:
        start, k = held(t, axis, end)
        dim, n = t.dim() - 3 + axis, t.shape[t.dim() - 3 + axis]
        return t.narrow(dim, 0, start) if end else t.narrow(dim, k, n - k)

    def region(t: torch.Tensor) -> tuple:
        start, k = held(t, axis, end)
        return (Ellipsis, slice(start, start + k), *([slice(None)] * (2 - axis)))

    label_parts = None if labels is None else {"distill": [keep(y) for y in labels], "held_out": list(labels)}
    side = "last" if end else "first"
    words = (f"the {side} {fraction:.0%} of spatial axis {axis} of each of the {len(images)} calibration volume(s) "
             f"({sum(held(x, axis, end)[1] for x in images)} voxel slice(s), predicted within their volume)")
    return HeldOut({"distill": [keep(x) for x in images], "held_out": list(images)}, label_parts,
                   [region(x) for x in images], words)


class CompressRun:
    """One compression run: its settings, inputs and resume state, and the services its stages share
    (progress bars, seeded patches, checkpoints, the training loop, counting)."""

    def __init__(self, config: CompressConfig, resume: bool, console: Console, source: Source | None = None,
                 part: str = "model") -> None:
        self.cfg = config
        self.source, self.part = source, part
        self.console = console
        self.out = Path(config.out)
        self.partial = partial_dir(self.out)
        self.resume = resume
        self.device = resolve_device(config.device)
        self.state: dict[str, Any] = {"format": RUN_FORMAT, "config": self._settings(), "completed": [],
                                      "timings": {}}

    def _settings(self) -> dict[str, Any]:
        """The settings that must match for ``--resume`` (not where it runs or whether it may overwrite)."""
        data = self.cfg.to_dict()
        for key in ("device", "overwrite"):
            data.pop(key)
        return data

    # ---- checks before anything is written -------------------------------------------------------------
    def check_out(self) -> None:
        """Before anything is read or written: ``--out`` may be replaced only if prunekit3d wrote it, and no input
        may lie inside it (or inside ``DIR.partial``)."""
        inputs = (self.cfg.checkpoint, self.cfg.calib, self.cfg.labels, self.cfg.spec)
        check_output_dir(self.out, inputs=inputs, overwrite=self.cfg.overwrite)
        check_inputs_outside(self.partial, inputs, what="--out")
        if self.resume and not (self.partial / "state.json").is_file():
            raise FileNotFoundError(f"nothing to resume: {self.partial} holds no interrupted run; run without --resume")
        if not self.resume and self.partial.exists():
            raise FileExistsError(f"{self.partial} holds an interrupted run: pass --resume to continue it, or delete "
                                  "it to start over")

    def load_inputs(self) -> None:
        """The teacher (``part`` of the source) and the calibration images as its input, checked against it."""
        cfg = self.cfg
        if self.source is None:
            self.source = open_source(cfg.checkpoint, model=cfg.model, model_kwargs=cfg.model_kwargs,
                                      spec_file=cfg.spec, folds=cfg.folds)
        self.teacher, self.spec = self.source.teachers[self.part], self.source.spec
        self.teacher.requires_grad_(False)
        self.preprocessing: Preprocessing | None = None
        if self.source.calibration is not None:  # the format preprocesses raw images itself (nnU-Net)
            if cfg.labels is not None or cfg.preprocessing is not None:
                raise ValueError(f"{self.source.path} preprocesses its images itself ({self.source.kind}): drop "
                                 "--labels / --preprocessing")
            names, images = zip(*self.source.calibration(cfg.calib))
            names, images, labels = list(names), list(images), None
        else:
            volumes = read_volumes(cfg.calib)
            if cfg.labels is not None:
                read_labels(cfg.labels, volumes)
            self.preprocessing = cfg.record(self.source.preprocessing)
            prepared = [self.preprocessing.prepare(v) for v in volumes]
            names, images = [v.name for v in volumes], [p.image for p in prepared]
            labels = [p.label.long() for p in prepared] if cfg.labels is not None else None  # resampled too
        name, conv = first_conv(self.teacher)
        channels = {x.shape[0] for x in images}
        if channels != {conv.in_channels}:
            raise ValueError(
                f"the calibration images have {sorted(channels)} channel(s) but the network takes {conv.in_channels} "
                f"(its first convolution {name!r}); pass images with {conv.in_channels} channel(s)"
            )
        self.in_channels = conv.in_channels
        self.patch = self._fit_patch(cfg.patch or self.source.patch or (64, 64, 64), images)
        self.example = torch.zeros(1, self.in_channels, *self.patch)
        self.teacher.to(self.device)
        self.teacher.eval()
        whole = [self.segment(self.teacher, x) for x in images]
        self.split = hold_out(names, images, labels, cfg.holdout, self.patch, [s > 0 for s in whole])
        # The original's own segmentation: where distillation patches centre, and what agreement compares with.
        # A part that is a whole volume reuses it; the cut-down volume of a held-out slab is segmented as it is.
        segmented = {id(x): s for x, s in zip(images, whole)}
        self.teacher_seg = {part: [segmented[id(x)] if id(x) in segmented else self.segment(self.teacher, x)
                                   for x in self.split.images[part]] for part in ("distill", "held_out")}
        sampling = self.split.labels["distill"] if labels is not None else self.teacher_seg["distill"]
        augment = distillation_augmentation() if cfg.augment else ()
        self.sampler = PatchSampler(self.split.images["distill"], sampling, self.patch,
                                    foreground_fraction=cfg.foreground_fraction, augment=augment)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        self.calib_batches = [
            self.sampler.sample(min(cfg.batch, cfg.calib_patches - i), generator)[0].to(self.device)
            for i in range(0, cfg.calib_patches, cfg.batch)
        ]

    def segment(self, model: nn.Module, image: torch.Tensor) -> torch.Tensor:
        """``model``'s segmentation of a whole volume (sliding window, eval mode)."""
        return segmentation(sliding_window_logits(model.eval(), image, self.patch))

    def agreement(self, model: nn.Module, part: str = "held_out") -> float:
        """Mean Dice of ``model``'s segmentations with the original's on the ``part`` volumes (held out: on the
        scored region of each)."""
        return self.mean_dice(model, self.teacher_seg[part], part)

    def mean_dice(self, model: nn.Module, references: Sequence[torch.Tensor], part: str) -> float:
        """Mean Dice of ``model``'s segmentations of the ``part`` volumes with ``references`` (their scored region)."""
        classes = max(2, int(output_logits(self.teacher(self.example.to(self.device))).shape[1]))
        regions = self.split.scored if part == "held_out" else [None] * len(references)
        scores = []
        for x, reference, region in zip(self.split.images[part], references, regions):
            pick = region if region is not None else (Ellipsis,)
            scores.append(mean_dice(reference[pick], self.segment(model, x)[pick], classes))
        return float(np.mean(scores))

    def _runs(self, patch: Sequence[int]) -> Exception | None:
        """``None`` if the teacher runs on a patch of this size, else the error."""
        try:
            with torch.no_grad():
                output_logits(self.teacher(torch.zeros(1, self.in_channels, *patch)))
        except Exception as err:  # any failure here means the patch does not fit the network
            return err
        return None

    def _fit_patch(self, patch: Sequence[int], images: Sequence[torch.Tensor]) -> tuple[int, ...]:
        """``patch``, each side cut down to the smallest image's extent rounded up to a multiple of 16 if the
        network runs on that (a patch larger than every image only adds padding to compute)."""
        smallest = np.min([x.shape[1:] for x in images], axis=0)
        fitted = tuple(int(min(p, -(-e // 16) * 16)) for p, e in zip(patch, smallest))
        if fitted != tuple(patch) and self._runs(fitted) is None:
            self.console.print(f"patch {list(patch)} -> {list(fitted)}: no calibration image is larger")
            return fitted
        err = self._runs(patch)
        if err is not None:
            raise ValueError(
                f"the network cannot run on a patch of {list(patch)} ({first_line(err)}); choose a --patch whose sides "
                "the network's total stride divides (e.g. 64 or 96)"
            )
        return tuple(patch)

    def measure_original(self) -> None:
        self.params_before = count_params(self.teacher)
        self.flops_before = count_flops(self.teacher.cpu(), self.example)[0]
        self.teacher.to(self.device)

    # ---- progress, seeds, checkpoints ------------------------------------------------------------------
    def progress(self) -> Progress:
        return Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"), console=self.console, disable=self.console.quiet,
        )

    def generator(self, phase: int, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + phase * 10_007 + epoch)

    def batch(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A batch of distillation patches, with their labels only if the user gave labels (supervision)."""
        images, labels = self.sampler.sample(self.cfg.batch, generator)
        supervised = labels is not None and self.cfg.labels is not None
        return images.to(self.device), (labels.to(self.device) if supervised else None)

    def save_state(self) -> None:
        write_json(self.partial / "state.json", self.state)

    def checkpoint(self, model: nn.Module, optimizer: torch.optim.Optimizer, progress: dict[str, Any]) -> None:
        save_checkpoint(self.partial / "student", model, optimizer, progress)

    def load_latest(self, student: nn.Module) -> None:
        """On resume, the weights (and masks) of an interrupted stand-in or blocks phase."""
        if self.resume and checkpoint_state(self.partial / "student") is not None:
            load_checkpoint(self.partial / "student", student, None, self.device)

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, phase: str) -> dict[str, Any] | None:
        """The saved progress of ``phase`` (loaded into ``model`` and ``optimizer``), or ``None``."""
        saved = checkpoint_state(self.partial / "student") if self.resume else None
        if saved is None or saved.get("phase") != phase:
            return None
        return load_checkpoint(self.partial / "student", model, optimizer, self.device)

    def done(self, phase: str, started: float) -> None:
        self.state["completed"].append(phase)
        self.state["timings"][phase] = round(time.perf_counter() - started + self.state["timings"].get(phase, 0.0), 1)
        self.save_state()

    # ---- phases ----------------------------------------------------------------------------------------
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
        score: Callable[[nn.Module], float] | None = None,
        extend: int = 0,
    ) -> dict[str, Any] | None:
        """``epochs`` epochs of ``step(images, labels) -> loss`` on random patches, checkpointed after every epoch
        and continued from the last checkpoint on resume. The learning rate stays constant: a cosine decay
        measured worse on held-out data (``benchmarks/results/ablation-dynunet-flops0.3.md``).

        With ``score`` (higher is better, e.g. the held-out agreement), the model is scored after every epoch
        and ends with the weights of its best epoch; returns ``{"epoch", "score", "scores"}`` then. With ``extend``
        too, training goes on past ``epochs`` (up to ``extend`` epochs more) while the best score is at most
        ``EXTEND_PATIENCE`` epochs old: a student still recovering from a cut gets the steps it needs, one that has
        levelled off stops on time."""
        saved = self.restore(model, optimizer, phase)
        if saved and pruner is not None:
            pruner.load_state_dict(saved["pruner"])
        first = saved["epoch"] + 1 if saved else 0
        best: dict[str, Any] = dict(saved.get("best", {})) if saved else {}
        best.setdefault("scores", [])
        iters = self.cfg.iters_per_epoch
        model.eval()  # see prunekit3d.recipes.compress.distill: the student learns the function inference computes
        with self.progress() as bar:
            task = bar.add_task(title, total=max(epochs, first) * iters, completed=first * iters, info="")
            epoch = first
            while keeps_distilling(epoch, epochs, extend, best.get("epoch")):  # unscored: no best, no extension
                bar.update(task, total=max(epochs, epoch + 1) * iters)
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
                if score is not None:
                    value = score(model)
                    best["scores"].append(round(value, 5))
                    if value > best.get("score", -1.0):
                        best.update(epoch=epoch, score=value)
                        save_checkpoint(self.partial / f"best-{phase}", model, None, {"epoch": epoch})  # weights only
                    progress["best"] = best
                self.checkpoint(model, optimizer, progress)
                epoch += 1
        if score is not None and "epoch" in best:
            load_checkpoint(self.partial / f"best-{phase}", model, None, self.device)
        self.drop_graph(model)
        return best if score is not None else None

    def drop_graph(self, model: nn.Module) -> None:
        """One forward without autograd. Networks that keep intermediate outputs as attributes (MONAI DynUNet's
        deep-supervision heads) otherwise still hold tensors of the last training step's graph, which deepcopy
        (slim, save) refuses."""
        ref = next(model.parameters())
        with torch.no_grad():
            model(self.example.to(ref.device))

    @property
    def allocation(self) -> str:
        """The channel allocation in use: chosen once by the channel phase (``state``), else the setting (a run
        resumed from before the choice, or one that pruned no channels)."""
        return self.state.get("allocation", self.cfg.allocation)

    def count(self, model: nn.Module, kind: str) -> float:
        """Parameters, multiply-adds on one patch, or latency relative to the original's, of ``model``."""
        if kind == "latency":
            return self.latency_ratio(model)
        model = model.cpu()
        value = count_params(model) if kind == "params" else count_flops(model, self.example)[0]
        model.to(self.device)
        return value

    def reference(self, kind: str) -> float:
        """The original's count of ``kind`` (latency is measured relative to it: 1)."""
        return {"params": self.params_before, "flops": self.flops_before, "latency": 1.0}[kind]

    def latency_ratio(self, model: nn.Module, repeats: int = 5) -> float:
        """``model``'s latency over the original's on one patch, timed in alternation on the run's device; on a
        CPU both run on oneDNN (:func:`prunekit3d.use_onednn`), the path inference uses."""
        pair = [copy.deepcopy(m).to(self.device).eval() for m in (self.teacher, model)]
        if self.device.type == "cpu":
            pair = [use_onednn(m) for m in pair]
        original, candidate = paired_latency(pair, [1, self.in_channels, *self.patch], warmup=2, repeats=repeats)
        return candidate / original
