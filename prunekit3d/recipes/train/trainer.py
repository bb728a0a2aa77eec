"""The PSP-Seg training recipe with progressive pruning: ``prunekit3d train`` as a Python function.

One epoch, as :meth:`Trainer.run` drives it (each step is a method a subclass may override)::

    on_epoch_start -- train_epoch (train_step x iters) -- validate -- on_epoch_end
                                                                        |-- pruner.on_epoch_end: prune / restore / stop
                                                                        |-- structure changed: freeze masked branches,
                                                                        |   rebuild DDP (same optimizer, momentum kept)
                                                                        |-- after_pruning="reinit": re-initialise once
                                                                        '-- history.json, checkpoint/ (rank 0, atomic)
    finish: slim + prunekit3d.save -> model/, report.json (params, FLOPs, DSC, NSD)

Per training step: ``L = DiceCE with deep supervision + fd_weight * (L_fd + L_aux)``, SGD (Nesterov) with
poly decay, gradient-norm clip, AMP on CUDA. Validation: sliding-window inference on every validation case,
DSC and NSD per foreground class (MONAI metrics, on the preprocessed grid: after resampling if
``spacing`` is set).

Determinism and resuming: every epoch's sampling, augmentation and calibration batches are seeded from
``(seed, epoch, rank)``, so a run resumed from the checkpoint of epoch ``e`` draws exactly what an
uninterrupted run draws from epoch ``e + 1`` on; the checkpoint holds the weights with their masks, the
optimizer, the pruner's state and the history.

Masked branches are frozen while masked and their gates' momentum dropped (:mod:`~prunekit3d.recipes.train.masks`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.data import DataLoader, MetaTensor
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from prunekit3d.evaluate import dice_and_nsd, sliding_window_logits
from prunekit3d.fd import FDLoss
from prunekit3d.io import load, save
from prunekit3d.io.files import check_inputs_outside, check_output_dir, write_json
from prunekit3d.models import psp_seg
from prunekit3d.recipes import distributed
from prunekit3d.recipes.checkpoint import load_checkpoint, save_checkpoint
from prunekit3d.recipes.train.config import TrainConfig
from prunekit3d.recipes.train.data import TrainingData, seed_of
from prunekit3d.recipes.train.losses import segmentation_loss
from prunekit3d.recipes.train.masks import forget_masked_momentum, freeze_masked_branches, reinitialise
from prunekit3d.report import count_flops, count_params
from prunekit3d.schedule import ProgressivePruner, kept_plans
from prunekit3d.slim import slim
from prunekit3d.wrap import redundant_modules

__all__ = ["TrainResult", "Trainer", "train"]

_TRAIN, _CALIBRATION, _REINIT = 0, 1, 2  # seed streams


@dataclass
class TrainResult:
    """What a run wrote: the ``out`` directory, its history and its report (as in the JSON files)."""

    out: Path
    history: dict[str, Any]
    report: dict[str, Any]


def train(config: TrainConfig, *, resume: bool = False, console: Console | None = None) -> TrainResult:
    """Train PSP-Seg on an MSD data set with progressive pruning; see :class:`Trainer`.

    Example::

        >>> from prunekit3d.recipes import TrainConfig, train
        >>> from prunekit3d.sample import sample_dataset
        >>> result = train(TrainConfig(data=sample_dataset(), out="runs/sample", patch=(64, 64, 32), epochs=40,
        ...                            iters_per_epoch=10, patience=2, calib_batches=4, stop_fraction=0.8))
        >>> result.report["params"]   # {"start": ..., "end": ...}
    """
    return Trainer(config, resume=resume, console=console).run()


def _plain(t: torch.Tensor) -> torch.Tensor:
    return t.as_tensor() if isinstance(t, MetaTensor) else t


def _flops(model: nn.Module, patch: tuple[int, ...], in_channels: int, device: torch.device) -> int:
    return count_flops(model, torch.zeros(1, in_channels, *patch, device=device))[0]


class Trainer:
    """One training run of :class:`TrainConfig`; :meth:`run` does it all.

    Override a hook to change one part, e.g. ``train_step`` for another loss or ``on_epoch_end`` to log
    somewhere else (call ``super()``). Under ``torchrun`` every process runs the same trainer on its own
    share of the patches; calibration errors and losses are all-reduced, so all take the same decisions,
    and only rank 0 writes.

    Writes into ``config.out``: ``config.json``, ``split.json``, ``history.json`` (every epoch),
    ``checkpoint/`` (every epoch), and at the end ``model/`` (:func:`prunekit3d.save`) and ``report.json``.
    """

    def __init__(self, config: TrainConfig, *, resume: bool = False, console: Console | None = None) -> None:
        self.config = config
        self.resume = resume
        self._console = console

    # ---- the run -------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self.runtime = distributed.start(self.config.device)
        try:
            self.setup()
            with self.progress:
                self.epochs_bar = self.progress.add_task(
                    "epochs", total=self.config.epochs, completed=self.start_epoch, loss=""
                )
                for epoch in range(self.start_epoch, self.config.epochs):
                    self.on_epoch_start(epoch)
                    losses = self.train_epoch(epoch)
                    due = (epoch + 1) % self.config.val_every == 0 or epoch == self.config.epochs - 1
                    metrics = self.validate() if due else None
                    self.on_epoch_end(epoch, losses, metrics)
            return self.finish()
        finally:
            if hasattr(self, "fd_loss") and self.fd_loss is not None:
                self.fd_loss.close()
            distributed.stop(self.runtime)

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Data, model, losses, optimizer, pruner; then the checkpoint if resuming."""
        cfg, rt = self.config, self.runtime
        self.out = Path(cfg.out)
        self.console = self._console or Console()
        if not rt.main:
            self.console = Console(quiet=True)
        self._check_out()
        self.data = TrainingData(cfg)
        self.dataset, self.split, self.fingerprint = self.data.dataset, self.data.split, self.data.fingerprint
        self.train_data, self.val_data = self.data.train, self.data.val
        self.in_channels = len(self.dataset.modalities)
        torch.manual_seed(cfg.seed)
        self.model = psp_seg(cfg.variant, self.in_channels, self.dataset.num_classes, mode=cfg.mode).to(rt.device)
        try:
            self.model.encoder.check_input(torch.zeros(1, self.in_channels, *cfg.patch))
        except ValueError as err:
            patch = " ".join(map(str, cfg.patch))
            raise ValueError(f"--patch {patch} does not fit PSP-Seg-{cfg.variant}: {err}") from None
        self.seg_loss = segmentation_loss(len(self.model.decoder.heads))
        self.mask_value = self.data.mask_value() if cfg.fd else None
        self.fd_loss = None
        if cfg.fd:
            stages = [f"encoder.stages.{i}" for i in range(len(self.model.encoder_stages))]
            self.fd_loss = FDLoss(self.model, mask_value=self.mask_value, encoder=[*stages, "encoder.bottleneck"],
                                  decoder_half="decoder.stages.1")
        self.optimizer = self._make_optimizer()
        self.scaler = torch.amp.GradScaler("cuda", enabled=rt.cuda)
        self.monitor = ["total", "fd", "aux"] if cfg.fd else ["total"]
        self.pruner = ProgressivePruner(
            self.model, self.calibration_batches, total_epochs=cfg.epochs, patience=cfg.patience,
            tolerance=cfg.tolerance, step=cfg.step, stop_fraction=cfg.stop_fraction,
            calibration_batches=math.ceil(cfg.calib_batches / rt.world), monitor=self.monitor, console=self.console,
        )
        self.iteration, self.start_epoch, self.reinitialised = 0, 0, False
        self.schedule = [0, cfg.epochs * cfg.iters_per_epoch]  # poly decay: [first iteration, iterations]
        self._param_counts: dict[tuple, int] = {}
        if self.resume:
            self._load()
        else:
            self.history = self._new_history()
        if rt.main and not self.resume:
            self.out.mkdir(parents=True, exist_ok=True)
            write_json(self.out / "manifest.json", {"format": "prunekit3d.train-run", "format_version": 1})
            write_json(self.out / "config.json", cfg.to_dict())
            write_json(self.out / "split.json", self.split)
        self.structure_changed()
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[loss]}"), console=self.console, disable=not rt.main or self.console.quiet,
            transient=True,
        )

    def _check_out(self) -> None:
        """``--out`` holds no input; it is new or empty, or (with ``--resume``) an earlier run's."""
        ckpt = self.out / "checkpoint"
        check_inputs_outside(self.out, (self.config.data, self.config.split))
        if self.resume and not ckpt.is_dir():
            raise FileNotFoundError(f"--resume: {ckpt} does not exist; start without --resume")
        if not self.resume and ckpt.exists():
            raise FileExistsError(
                f"{self.out} already holds a run; pass --resume to continue it or choose another --out"
            )
        if not self.resume:
            check_output_dir(self.out, overwrite=False)  # never writes into a folder of the user's

    def _new_history(self) -> dict[str, Any]:
        start = self.active_parameters()
        return {
            "config": self.config.to_dict(),
            "dataset": {"name": self.dataset.name, "modalities": self.dataset.modalities,
                        "labels": self.dataset.labels},
            "split": self.split,
            "fingerprint": self.fingerprint,
            "mask_value": self.mask_value,
            "world_size": self.runtime.world,
            "params_start": start,
            "flops_start": _flops(slim(self.model), self.config.patch, self.in_channels, self.runtime.device)
            if self.runtime.main else None,
            "epochs": [],
            "events": [],
        }

    def _make_optimizer(self) -> torch.optim.Optimizer:
        cfg = self.config
        return torch.optim.SGD(self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)

    # ---- data ------------------------------------------------------------------------------------
    def _seed(self, *parts: int) -> int:
        return seed_of(self.config.seed, *parts)

    def loader(self, epoch: int, stream: int, patches: int) -> DataLoader:
        """Random training patches, seeded by ``(seed, epoch, rank, stream)``: reproducible after a resume."""
        return self.data.loader(self._seed(epoch, self.runtime.rank, stream), patches, pin_memory=self.runtime.cuda)

    def calibration_batches(self):
        """The pruner's calibration data: training patches (augmented), seeded by the current epoch."""
        n = self.pruner.calibration_batches * self.config.batch
        for batch in self.loader(self.epoch, _CALIBRATION, n):
            yield {"image": _plain(batch["image"])}

    # ---- hooks -----------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_started = time.perf_counter()
        torch.manual_seed(self._seed(epoch, self.runtime.rank, _TRAIN))
        self.net.train()

    def learning_rate(self) -> float:
        start, total = self.schedule
        return self.config.lr * (1 - min(self.iteration - start, total - 1) / total) ** self.config.poly_power

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimisation step on a batch; returns its losses."""
        cfg, device = self.config, self.runtime.device
        x, y = _plain(batch["image"]).to(device), _plain(batch["label"]).to(device)
        self.lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        with torch.autocast(device.type, enabled=self.runtime.cuda):
            seg = self.seg_loss(self.net(x), y)
            if self.fd_loss is not None:
                l_fd, l_aux = self.fd_loss(x, y)
            else:
                l_fd = l_aux = torch.zeros((), device=device)
            total = seg + cfg.fd_weight * (l_fd + l_aux)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1
        return {name: float(v.detach()) for name, v in (("total", total), ("seg", seg), ("fd", l_fd), ("aux", l_aux))}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """``iters_per_epoch`` steps; the epoch's mean losses, averaged over all processes."""
        cfg = self.config
        bar = self.progress.add_task(f"epoch {epoch}", total=cfg.iters_per_epoch, loss="")
        sums: dict[str, float] = {}
        for batch in self.loader(epoch, _TRAIN, cfg.iters_per_epoch * cfg.batch):
            losses = self.train_step(batch)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v
            self.progress.update(bar, advance=1, loss=f"loss {losses['total']:.4f}")
        self.progress.remove_task(bar)
        keys = sorted(sums)
        total = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=self.runtime.device)
        mean = distributed.all_sum(total) / (cfg.iters_per_epoch * self.runtime.world)
        return dict(zip(keys, mean.tolist()))

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Sliding-window DSC and NSD per foreground class, mean over the validation cases (all processes)."""
        cfg, rt = self.config, self.runtime
        classes = self.dataset.labels[1:]
        model = self.model.eval()
        sums = torch.zeros(2, 2, len(classes), dtype=torch.float64)  # [dsc, nsd] x [sum, count] x class
        for i in range(rt.rank, len(self.val_data), rt.world):  # each process its share of the cases
            case = self.val_data[i]
            image = case["image"]
            spacing = [float(s) for s in image.pixdim]
            logits = sliding_window_logits(model, _plain(image), cfg.patch, overlap=cfg.sw_overlap, mode="gaussian",
                                           batch=cfg.batch, autocast=rt.cuda)
            scores = dice_and_nsd(logits, _plain(case["label"])[0], spacing, cfg.nsd_tolerance or max(spacing))
            for m, s in enumerate(scores):
                s = s.double()
                sums[m, 0] += torch.nan_to_num(s, nan=0.0)
                sums[m, 1] += (~s.isnan()).double()
        sums = distributed.all_sum(sums.to(rt.device)).cpu()
        self.net.train()
        result: dict[str, Any] = {}
        for m, name in enumerate(("dsc", "nsd")):
            per_class = {
                c: float(sums[m, 0, j] / sums[m, 1, j]) if sums[m, 1, j] > 0 else None for j, c in enumerate(classes)
            }
            known = [v for v in per_class.values() if v is not None]
            result[name] = per_class
            result[f"mean_{name}"] = sum(known) / len(known) if known else None
        return result

    def on_epoch_end(self, epoch: int, losses: dict[str, float], metrics: dict[str, Any] | None) -> None:
        """Let the pruner decide, apply what changed, log, save history and checkpoint."""
        decision = self.pruner.on_epoch_end(epoch, {k: losses[k] for k in self.monitor})
        if decision is not None:
            self.history["events"].append(decision.to_dict())
            if decision.structure_changed:
                self.structure_changed()
                forget_masked_momentum(self.model, self.optimizer)
        if self.config.after_pruning == "reinit" and self.pruner.stopped and not self.reinitialised:
            self.reinitialise(epoch)
        entry = {
            "epoch": epoch,
            "lr": self.lr,  # of the epoch's last step
            "losses": losses,
            "val": metrics,
            "params": self.active_parameters(),
            "step": self.pruner.step,
            "seconds": time.perf_counter() - self.epoch_started,
        }
        self.history["epochs"].append(entry)
        val = ""
        if metrics and metrics["mean_dsc"] is not None:
            val = f" DSC {metrics['mean_dsc']:.3f} NSD {metrics['mean_nsd']:.3f}"
        self.progress.console.print(
            f"epoch {epoch}: loss {losses['total']:.4f} (seg {losses['seg']:.4f}, fd {losses['fd']:.4f}, "
            f"aux {losses['aux']:.4f}){val}, {entry['params'] / 1e6:.3f} M params, {entry['seconds']:.1f} s"
        )
        self.progress.update(self.epochs_bar, advance=1)
        if self.runtime.main:
            write_json(self.out / "history.json", self.history)
            save_checkpoint(self.out / "checkpoint", self.model, self.optimizer, self._state(epoch))

    # ---- structure -----------------------------------------------------------------------------
    def structure_changed(self) -> None:
        """After prune / restore (and at the start): freeze the masked branches, rebuild DDP.

        DDP expects a gradient for every parameter that requires one; masked branches get none, so
        they are frozen and DDP is rebuilt around the parameters in use. The optimizer stays: it skips
        parameters without gradient and keeps the momentum of the others.
        """
        freeze_masked_branches(self.model)
        if self.runtime.world > 1:
            ids = [self.runtime.device.index] if self.runtime.cuda else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        else:
            self.net = self.model

    def reinitialise(self, epoch: int) -> None:
        """Pruning is over: re-initialise the pruned architecture and train it from scratch (fresh optimizer,
        poly decay restarted over the remaining epochs)."""
        torch.manual_seed(self._seed(epoch, _REINIT))  # the same weights on every process
        reinitialise(self.model)
        self.optimizer = self._make_optimizer()
        remaining = (self.config.epochs - epoch - 1) * self.config.iters_per_epoch
        self.schedule = [self.iteration, max(remaining, 1)]
        self.reinitialised = True
        self.structure_changed()
        self.history["events"].append({"kind": "reinit", "epoch": epoch, "structure_changed": False,
                                       "reason": "pruning ended: re-initialised the pruned architecture"})
        self.console.print(f"[bold]epoch {epoch}: reinit[/]: the pruned architecture trains from scratch")

    def active_parameters(self) -> int:
        """Parameters of the slim network for the current masks (what ``prunekit3d.save`` would write)."""
        key = tuple(tuple(m.active.tolist()) for _, m in redundant_modules(self.model))
        if key not in self._param_counts:
            self._param_counts[key] = count_params(slim(self.model))
        return self._param_counts[key]

    # ---- persistence -----------------------------------------------------------------------------
    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "iteration": self.iteration,
            "schedule": self.schedule,
            "reinitialised": self.reinitialised,
            "pruner": self.pruner.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
        }

    def _load(self) -> None:
        saved_config = json.loads((self.out / "config.json").read_text(encoding="utf-8"))
        runtime_only = {"device", "workers"}
        differ = [k for k, v in self.config.to_dict().items() if k not in runtime_only and saved_config.get(k) != v]
        if differ:
            there = ", ".join(f"{k}={saved_config.get(k)!r}" for k in sorted(differ))
            raise ValueError(
                f"--resume with other settings than the run in {self.out} ({there} there); "
                "pass the same settings (see its config.json)"
            )
        state = load_checkpoint(self.out / "checkpoint", self.model, self.optimizer, self.runtime.device)
        self.pruner.load_state_dict(state["pruner"])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration, self.schedule = int(state["iteration"]), list(state["schedule"])
        self.reinitialised = bool(state["reinitialised"])
        self.history = state["history"]
        self.start_epoch = int(state["epoch"]) + 1
        self.console.print(f"resumed from {self.out / 'checkpoint'} after epoch {state['epoch']}")

    def finish(self) -> TrainResult:
        """Save the slim model and write ``report.json`` (rank 0); every process returns the result."""
        cfg, rt = self.config, self.runtime
        report: dict[str, Any] = {}
        if rt.main:
            extra = {"patch": list(cfg.patch), "spacing": cfg.spacing, "labels": self.dataset.labels,
                     "modalities": self.dataset.modalities, "fingerprint": self.fingerprint}
            save(self.model, self.out / "model", plans=kept_plans(self.history["events"]), extra=extra, overwrite=True)
            slim_model = load(self.out / "model", map_location=rt.device)
            epochs, events = self.history["epochs"], self.history["events"]
            first_prune = next((e["epoch"] for e in events if e["kind"] == "prune"), cfg.epochs)
            validated = [e for e in epochs if e["val"] is not None]
            report = {
                "params": {"start": self.history["params_start"], "end": count_params(slim_model)},
                "flops": {"start": self.history["flops_start"],
                          "end": _flops(slim_model, cfg.patch, self.in_channels, rt.device),
                          "input": [1, self.in_channels, *cfg.patch]},
                "validation": validated[-1]["val"] if validated else None,
                "validation_before_first_prune": next(
                    (e["val"] for e in reversed(validated) if e["epoch"] < first_prune), None
                ) if first_prune < cfg.epochs else None,
                "events": {k: sum(e["kind"] == k for e in events) for k in ("prune", "restore", "stop", "reinit")},
                "model": str(self.out / "model"),
            }
            write_json(self.out / "report.json", report)
        return TrainResult(self.out, self.history, report)
