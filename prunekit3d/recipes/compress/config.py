"""The settings of one compression run: what ``prunekit3d compress`` parses its flags into.

>>> cfg = CompressConfig(checkpoint="dynunet.pt", out="small", calib="images/", target_params=0.5)
>>> CompressConfig.from_dict(cfg.to_dict()) == cfg
True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prunekit3d.data.network_input import Preprocessing
from prunekit3d.records import JsonRecord

__all__ = ["CompressConfig"]


@dataclass
class CompressConfig(JsonRecord):
    """Everything that defines one compression run (what ``prunekit3d compress`` parses its flags into).

    Input:
        checkpoint: a prunekit3d artifact directory or a state dict (``.pt``/``.pth``/``.safetensors``).
        model, model_kwargs: the network class by import path and its keyword arguments (for a state dict), or
        spec: a JSON file ``{"import_path": ..., "kwargs": ...}`` / ``{"name": ...}``.
        calib: calibration images: a NIfTI file, a folder of them, or an MSD data set folder.
        labels: labels of the calibration images (a supervised loss is added to the distillation).
        folds: the folds of an nnU-Net model folder to compress (default: all present).
        preprocessing: how the calibration images become the network's input -- the preprocessing the network
            was trained with (default: what the model's format records -- a bundle's transforms, an artifact's
            record, nnU-Net's own preprocessing -- else a per-image z-score): "zscore", "zscore:nonzero", "ct:LO:HI",
            "ct:LO:HI:MEAN:STD", "percentile:LO:HI",
            "none" or a JSON file (:class:`~prunekit3d.data.network_input.Preprocessing`). Recorded in the
            artifact; ``prunekit3d predict`` re-applies it.
        spacing: resample the calibration images to this voxel spacing (mm) first; ``None`` keeps theirs.
        holdout: fraction of the calibration data never distilled on, to measure agreement on unseen data
            (``round(holdout * n)`` whole volumes, at least one, the last by name; with a single volume a slab
            of it; 0 = none).
        min_agreement: warn when the held-out agreement with the original ends below this.
        out: the output directory.
        overwrite: replace a non-empty ``out``.
        int8: also write ``out/int8/``, the compressed network quantized to INT8 (ONNX, calibrated on the run's
            calibration patches; a folder ``prunekit3d predict --backend openvino --int8`` runs), and report it.

    Budget (a fraction of the original network's count; at most one of the two):
        target_params, target_flops: keep at most this fraction of the parameters / FLOPs (multiply-adds).
        target_latency: keep at most this fraction of the original's latency on ``device`` (one patch, timed
            in alternation with the original; on a CPU both run on oneDNN, the path ``prunekit3d predict`` uses).
        channels: remove this fraction of the channels of every layer group (forces channel pruning).

    Schedule (epochs of ``iters_per_epoch`` steps on ``batch`` random patches of size ``patch``; default: the
    patch the model's format records, else 64^3):
        blockwise_epochs: block-wise distillation of the light branches.
        epochs: end-to-end distillation with progressive pruning of light branches.
        finetune_epochs: end-to-end distillation of the slim network, shared by the channel-pruning rounds.
            96 instead of 48 (held-out benchmark, --target-flops 0.3, both folds, three seeds each, paired): held-out
            Dice +2.9 ± 2.2 points and agreement +0.04 on PlainConvUNet, +0.2 ± 5.9 points on DynUNet, in 1.7x
            the time (460 s instead of 270 s on 2 cores); with one seed on fold 0, BasicUNet +2.7 points and
            SegResNet -7.0. 48 keeps the default run within 10 minutes. The last round goes on past its share,
            up to twice it, while its held-out agreement still sets new bests
            (:func:`~prunekit3d.recipes.compress.run.keeps_distilling`).
        channel_rounds: channel pruning is spread over this many rounds (when channels must go at all).
        prune_rounds: how many of those rounds prune: the budget is reached at this round and the rounds after
            it distil at the final widths (None: every round prunes).
        lr: Adam learning rate (constant).
        calib_patches: fixed patches the pruner calibrates on.
        foreground_fraction: probability that a distillation patch is centred on the original's foreground
            (its own segmentation of the calibration volumes, or the labels if given).
        augment: flip and intensity-jitter the distillation patches.
        temperature: of the KL term of the distillation loss.
        feature_weight: weight of attention transfer at every encoder level and the 1/2-resolution decoder
            feature (:class:`~prunekit3d.recipes.compress.distill.FeatureMatch`); 0 = logits only.
        importance: channel importance, "taylor" (|weight x gradient| of the distillation loss on the
            calibration patches: which channels the original's output depends on) or "magnitude" (group L2 norm).
            Measured on the held-out benchmark at --target-flops 0.3, three seeds each: Taylor kept held-out Dice
            0.666 / 0.557 (DynUNet / PlainConvUNet) where magnitude kept 0.595 / 0.463, and agreement with the
            original 0.80 / 0.78 against 0.73 / 0.62.
        allocation: which groups lose channels: "uniform" (the same fraction of each) or "global" (one ranking
            of all channels by importance). Where "uniform" would land below 0.8 of a params / FLOP budget
            (coarse widths: group norms), "global" is measured too and the nearer one used.
        round_to: pruned layers keep multiples of this many channels, or power-of-two fractions of it below
            (:func:`~prunekit3d.channels.prune.kernel_widths`); 1 (default): any width. CPU kernels hold channels
            in blocks of 16 floats (AVX-512): a 22-channel layer runs as slowly as a 32-channel one, so 16 makes
            a FLOP budget faster (held-out benchmark at --target-flops 0.5: oneDNN latency x0.62-0.77 instead of
            x0.72-0.85), but the coarse widths move more of the network (held-out Dice 1-9 points lower: one
            ratio lands far below the budget on those widths, and the global ranking cuts some layers to 4-8
            channels). Under --target-latency the search lands on those widths by itself.
        branches, exp_ratio: light branches per block (7, 4 or 1) and their width.
        max_block_error: an original block is replaced only if its stand-in error is at most this
            (1 = no better than dropping the block). Low by default: on a trained network a replaced block
            costs agreement, and four light branches run no faster than one 3x3x3 convolution on a CPU.
        patience, tolerance, step: the progressive pruner's (see :class:`~prunekit3d.schedule.ProgressivePruner`).

    Run:
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:N". seed: seeds every random draw.
    """

    record_name = "compress settings"

    checkpoint: str
    out: str
    calib: str
    model: str | None = None
    model_kwargs: dict[str, Any] | None = None
    spec: str | None = None
    labels: str | None = None
    folds: list[int | str] | None = None
    preprocessing: str | None = None
    spacing: tuple[float, float, float] | None = None
    holdout: float = 0.2
    min_agreement: float = 0.95
    target_params: float | None = None
    target_flops: float | None = None
    target_latency: float | None = None
    channels: float | None = None
    patch: tuple[int, int, int] | None = None
    batch: int = 2
    blockwise_epochs: int = 4
    epochs: int = 4
    finetune_epochs: int = 48
    channel_rounds: int = 3
    prune_rounds: int | None = None
    iters_per_epoch: int = 10
    lr: float = 1e-3
    calib_patches: int = 8
    foreground_fraction: float = 0.5
    augment: bool = False
    temperature: float = 1.0
    feature_weight: float = 1.0
    importance: str = "taylor"
    allocation: str = "uniform"
    round_to: int = 1
    branches: int = 4
    exp_ratio: float = 0.5
    max_block_error: float = 0.02
    patience: int = 1
    tolerance: float = 0.01
    step: int = 1
    device: str = "auto"
    seed: int = 0
    overwrite: bool = False
    int8: bool = False

    def __post_init__(self) -> None:
        self.checkpoint, self.out, self.calib = str(self.checkpoint), str(self.out), str(self.calib)
        for name in ("spec", "labels"):
            value = getattr(self, name)
            setattr(self, name, None if value is None else str(value))
        if self.spacing is not None:
            self.spacing = tuple(float(v) for v in self.spacing)  # type: ignore[assignment]
        if self.patch is not None:
            values = [self.patch] if isinstance(self.patch, int) else list(self.patch)
            self.patch = tuple(int(v) for v in (values * 3 if len(values) == 1 else values))  # type: ignore[assignment]
        rules = [  # (what is needed, the settings it reads, whether it holds)
            ("at most one of target_params, target_flops, target_latency",
             ("target_params", "target_flops", "target_latency"),
             sum(v is not None for v in (self.target_params, self.target_flops, self.target_latency)) <= 1),
            ("0 < target_params <= 1", ("target_params",), self.target_params is None or 0 < self.target_params <= 1),
            ("0 < target_flops <= 1", ("target_flops",), self.target_flops is None or 0 < self.target_flops <= 1),
            ("0 < target_latency <= 1", ("target_latency",),
             self.target_latency is None or 0 < self.target_latency <= 1),
            ("0 < channels < 1 (the fraction of channels removed)", ("channels",),
             self.channels is None or 0 < self.channels < 1),
            ("patch: 3 sizes >= 1", ("patch",), self.patch is None or (len(self.patch) == 3 and min(self.patch) >= 1)),
            ("batch >= 1", ("batch",), self.batch >= 1),
            ("epochs, blockwise_epochs, finetune_epochs >= 0", ("epochs", "blockwise_epochs", "finetune_epochs"),
             min(self.epochs, self.blockwise_epochs, self.finetune_epochs) >= 0),
            ("iters_per_epoch >= 1", ("iters_per_epoch",), self.iters_per_epoch >= 1),
            ("calib_patches >= 1, channel_rounds >= 1", ("calib_patches", "channel_rounds"),
             self.calib_patches >= 1 and self.channel_rounds >= 1),
            ("1 <= prune_rounds <= channel_rounds", ("prune_rounds", "channel_rounds"),
             self.prune_rounds is None or 1 <= self.prune_rounds <= self.channel_rounds),
            ("lr > 0", ("lr",), self.lr > 0),
            ("0 <= holdout < 1", ("holdout",), 0 <= self.holdout < 1),
            ("0 <= min_agreement <= 1", ("min_agreement",), 0 <= self.min_agreement <= 1),
            ("0 <= foreground_fraction <= 1", ("foreground_fraction",), 0 <= self.foreground_fraction <= 1),
            ("temperature > 0", ("temperature",), self.temperature > 0),
            ("feature_weight >= 0", ("feature_weight",), self.feature_weight >= 0),
            ("importance in ['magnitude', 'taylor']", ("importance",), self.importance in ("magnitude", "taylor")),
            ("allocation in ['uniform', 'global']", ("allocation",), self.allocation in ("uniform", "global")),
            ("round_to >= 1 (1: any width)", ("round_to",), self.round_to >= 1),
            ("max_block_error >= 0", ("max_block_error",), self.max_block_error >= 0),
            ("patience >= 1, step >= 1, tolerance >= 0", ("patience", "step", "tolerance"),
             self.patience >= 1 and self.step >= 1 and self.tolerance >= 0),
        ]
        broken = [f"{rule} (given: {', '.join(f'{name}={getattr(self, name)!r}' for name in names)})"
                  for rule, names, ok in rules if not ok]
        if broken:
            raise ValueError(f"invalid compress settings: needs {'; '.join(broken)}")
        if self.folds is not None:
            self.folds = [int(f) if str(f).isdigit() else str(f) for f in self.folds]
        self.record()  # a preprocessing that does not parse fails here, in one line

    @property
    def budget(self) -> tuple[str, float] | None:
        """``("params" | "flops" | "latency", fraction)`` or ``None``."""
        if self.target_params is not None:
            return "params", float(self.target_params)
        if self.target_flops is not None:
            return "flops", float(self.target_flops)
        if self.target_latency is not None:
            return "latency", float(self.target_latency)
        return None

    def record(self, recorded: Preprocessing | None = None) -> Preprocessing:
        """The preprocessing as a record (what the artifact stores): the one given, else the one the model's format
        ``recorded``, else a per-image z-score."""
        if self.preprocessing is None and recorded is not None:
            return recorded if self.spacing is None else Preprocessing.from_dict({**recorded.to_dict(),
                                                                                   "spacing": list(self.spacing)})
        return Preprocessing.parse(self.preprocessing or "zscore", self.spacing)
