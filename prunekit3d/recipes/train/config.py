"""The training recipe's settings as one plain dataclass that round-trips through JSON.

The defaults are PSP-Seg's published recipe (Li et al. 2025): patch 128^3, batch 2, 1000 epochs x 250
iterations, SGD (momentum 0.99, Nesterov, lr 1e-3, weight decay 3e-5) with poly decay, gradient-norm clip
12, ``L = L_seg + 0.1 * (L_fd + L_aux)``, pruning with patience 10, tolerance 0.001, step 2, 100
calibration batches, stopping after 40% of the epochs.

>>> cfg = TrainConfig(data="Task03_Liver", out="runs/liver", epochs=10)
>>> TrainConfig.from_json(cfg.to_json()) == cfg
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prunekit3d.models import VARIANTS
from prunekit3d.records import JsonRecord

__all__ = ["MODULES", "TrainConfig"]

#: ``--module`` name -> PSP-Seg ``mode`` (parallel or sequential redundant modules).
MODULES = {"prm": "parallel", "srm": "sequential"}


@dataclass
class TrainConfig(JsonRecord):
    """Everything that defines one training run (what ``prunekit3d train`` parses its flags into).

    Data:
        data: directory in Medical Segmentation Decathlon layout (``dataset.json``, ``imagesTr/``, ``labelsTr/``).
        out: directory the run writes into (history, checkpoint, model, report).
        split: JSON file ``{"train": [case, ...], "val": [case, ...]}``; ``None``: a seeded 80/20 split.
        spacing: resample every case to this voxel spacing in mm; ``None`` keeps the data's own.
        patch: training patch (and sliding-window) size; each side divisible by the network's total stride.
        batch: patches per step (per process under ``torchrun``).
        foreground_fraction: probability that a patch is centred on a foreground voxel (nnU-Net: 0.33).

    Network and loss:
        variant: PSP-Seg variant "S", "B" or "L".
        module: "prm" (parallel redundant modules) or "srm" (sequential).
        fd: add the functional-decoupling and auxiliary losses, ``fd_weight * (L_fd + L_aux)``.

    Optimisation:
        epochs, iters_per_epoch: the schedule's length.
        lr, momentum, weight_decay: SGD with Nesterov momentum; ``poly_power``: ``lr * (1 - t/T) ** power``.
        grad_clip: gradient-norm clip (0 switches it off).

    Pruning (see :class:`prunekit3d.schedule.ProgressivePruner`):
        patience, tolerance, step, calib_batches, stop_fraction.
        after_pruning: "finetune" keeps training the pruned network; "reinit" re-initialises it (gates 0,
            Kaiming convs) once pruning has ended and trains it from scratch for the remaining epochs.

    Validation:
        val_every: validate every this many epochs (and always after the last one).
        sw_overlap: sliding-window overlap.
        nsd_tolerance: NSD boundary tolerance in mm; ``None``: one voxel (the largest spacing).

    Run:
        device: "auto" (CUDA if available), "cpu", "cuda" or "cuda:N".
        workers: data-loader worker processes (0 keeps everything in the main process).
        seed: seeds the split, the initial weights, every epoch's sampling and augmentation.
    """

    record_name = "training config"

    data: str
    out: str
    split: str | None = None
    spacing: tuple[float, float, float] | None = None
    patch: tuple[int, int, int] = (128, 128, 128)
    batch: int = 2
    foreground_fraction: float = 0.33
    variant: str = "S"
    module: str = "prm"
    fd: bool = True
    fd_weight: float = 0.1
    epochs: int = 1000
    iters_per_epoch: int = 250
    lr: float = 1e-3
    momentum: float = 0.99
    weight_decay: float = 3e-5
    poly_power: float = 0.9
    grad_clip: float = 12.0
    patience: int = 10
    tolerance: float = 1e-3
    step: int = 2
    calib_batches: int = 100
    stop_fraction: float = 0.4
    after_pruning: str = "finetune"
    val_every: int = 1
    sw_overlap: float = 0.5
    nsd_tolerance: float | None = None
    device: str = "auto"
    workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        self.data, self.out = str(self.data), str(self.out)
        self.split = None if self.split is None else str(self.split)
        self.patch = _triple(self.patch, int, "patch")
        self.spacing = None if self.spacing is None else _triple(self.spacing, float, "spacing")
        self.variant = str(self.variant).upper()
        rules = {
            f"variant in {sorted(VARIANTS)}": self.variant in VARIANTS,
            f"module in {sorted(MODULES)}": self.module in MODULES,
            "after_pruning in ['finetune', 'reinit']": self.after_pruning in ("finetune", "reinit"),
            "patch sizes >= 1": min(self.patch) >= 1,
            "spacing > 0": self.spacing is None or min(self.spacing) > 0,
            "batch >= 1": self.batch >= 1,
            "epochs >= 1": self.epochs >= 1,
            "iters_per_epoch >= 1": self.iters_per_epoch >= 1,
            "0 <= foreground_fraction <= 1": 0 <= self.foreground_fraction <= 1,
            "lr >= 0": self.lr >= 0,
            "grad_clip >= 0": self.grad_clip >= 0,
            "val_every >= 1": self.val_every >= 1,
            "0 <= sw_overlap < 1": 0 <= self.sw_overlap < 1,
            "nsd_tolerance > 0": self.nsd_tolerance is None or self.nsd_tolerance > 0,
            "workers >= 0": self.workers >= 0,
        }
        broken = [rule for rule, ok in rules.items() if not ok]
        if broken:
            raise ValueError(f"invalid training config: needs {', '.join(broken)}")

    @property
    def mode(self) -> str:
        """PSP-Seg's redundant-module mode for :func:`prunekit3d.models.psp_seg`."""
        return MODULES[self.module]


def _triple(value: Any, kind: type, name: str) -> tuple:
    values = [value] if isinstance(value, (int, float)) else list(value)
    values = values * 3 if len(values) == 1 else values
    if len(values) != 3:
        raise ValueError(f"{name} needs 1 or 3 numbers (one per spatial axis), got {value!r}")
    return tuple(kind(v) for v in values)
