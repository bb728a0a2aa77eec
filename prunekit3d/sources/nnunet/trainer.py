"""``nnUNetTrainerPSP``: PSP-Seg trained by nnU-Net, with the FD loss and the progressive pruner.

nnU-Net's trainer runs as usual (its data loading, augmentation, deep-supervision loss, SGD with poly
decay, validation); this subclass changes four hooks::

    initialize        the plans' architecture becomes PSP-Seg sized from the plans (below), as a SlimNNUNet
    train_step        L = nnU-Net's loss + fd_weight * (L_fd + L_aux)            (prunekit3d.FDLoss)
    on_train_epoch_end  ProgressivePruner.on_epoch_end: prune / restore / stop; masked branches frozen
    on_train_end      slim the pruned network; checkpoint_final.pth holds it with trainer_name "nnUNetTrainer"

PSP-Seg sized from the plans: input channels and classes from dataset.json, ``levels = 1 + min over the
axes of the plans' stride-2 poolings`` (PSP-Seg pools every axis at once, so the patch nnU-Net planned
is divisible by ``2 ** (levels - 1)``), capped at the variant's levels; the variant's first ``levels``
widths. The plans written into the output folder describe it (``SlimNNUNet`` with PSP-Seg as base and
strides ``[[1,1,1], [2,2,2], ...]``, so nnU-Net's deep-supervision scales match PSP-Seg's heads); every
fold's final weights carry their own pruned architecture, so folds pruned differently share the plans.
The output folder predicts with stock ``nnUNetv2_predict`` and compresses further with prunekit3d.

Registration:
``export nnUNet_extTrainer=$(python -c "import prunekit3d.sources.nnunet as n; print(n.EXT_TRAINER_DIR)")``
then ``nnUNetv2_train DATASET 3d_fullres FOLD -tr nnUNetTrainerPSP``. One device (no DDP); no torch.compile
(the masks change the graph). Knobs are class attributes (subclass to change them).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from rich.console import Console
from torch import autocast

from prunekit3d.fd import FDLoss, foreground_percentile
from prunekit3d.io.files import write_json
from prunekit3d.models.pspseg import VARIANTS
from prunekit3d.schedule import ProgressivePruner
from prunekit3d.sources.nnunet.checkpoint import write_checkpoint
from prunekit3d.sources.nnunet.network import CLASS_NAME, SlimNNUNet
from prunekit3d.sources.nnunet.write import slim_architecture
from prunekit3d.wrap import redundant_modules

__all__ = ["nnUNetTrainerPSP", "psp_architecture"]


def psp_architecture(architecture: dict[str, Any], in_channels: int, out_channels: int, variant: str = "S",
                     mode: str = "parallel") -> dict[str, Any]:
    """The plans' ``architecture`` of PSP-Seg ``variant`` sized from an nnU-Net architecture (its strides)."""
    if architecture["network_class_name"] == CLASS_NAME:
        return architecture  # already a prunekit3d network
    strides = np.asarray(architecture["arch_kwargs"]["strides"])
    poolings = int((strides == 2).sum(axis=0).min())
    config = VARIANTS[variant].to_dict()
    levels = max(2, min(1 + poolings, len(config["widths"])))
    config["widths"] = config["widths"][:levels]
    dims = strides.shape[1]
    base = {"import_path": "prunekit3d.models.pspseg.PSPSeg",
            "kwargs": {"config": config, "in_channels": in_channels, "out_channels": out_channels,
                       "deep_supervision": True, "mode": mode}}
    return slim_architecture(base, [], [[1] * dims] + [[2] * dims] * (levels - 1), [[3] * dims] * levels)


def _request(args: tuple, kwargs: dict) -> tuple[dict[str, Any], int, int, bool]:
    """(architecture, in, out, deep supervision) from either build_network_architecture call of nnU-Net 2.5-2.8.

    2.8: ``(plans_manager, configuration_manager, in, out, deep_supervision)``;
    2.5-2.7: ``(network_class_name, arch_kwargs, kw_requires_import, in, out, deep_supervision)``.
    """
    ds = kwargs.pop("enable_deep_supervision", None)
    if isinstance(args[0], str):
        name, arch_kwargs, req, in_ch, out_ch, *rest = args
        architecture = {"network_class_name": name, "arch_kwargs": arch_kwargs, "_kw_requires_import": list(req)}
    else:
        _, config, in_ch, out_ch, *rest = args
        architecture = config.configuration["architecture"]
    ds = rest[0] if rest else (True if ds is None else ds)
    return architecture, int(in_ch), int(out_ch), bool(ds)


def freeze_masked(model: torch.nn.Module) -> None:
    """Masked branches get no gradient: freeze them, so that they come back unchanged if an event is undone."""
    for _, m in redundant_modules(model):
        for k, branch in enumerate(m.branches):
            branch.requires_grad_(bool(m.active[k]))
        m.gates.requires_grad_(bool(m.active.any()))


class nnUNetTrainerPSP(nnUNetTrainer):
    """nnU-Net trainer of PSP-Seg with functional decoupling and progressive pruning (module docstring)."""

    variant = "S"
    mode = "parallel"
    fd_weight = 0.1
    patience = 10
    tolerance = 1e-3
    step = 2
    stop_fraction = 0.4
    calibration_batches = 20

    @classmethod
    def build_network_architecture(cls, plans_manager: Any, configuration_manager: Any, num_input_channels: Any,
                                   num_output_channels: Any, *legacy: Any, **kwargs: Any) -> torch.nn.Module:
        """PSP-Seg (as :class:`SlimNNUNet`) for either signature nnU-Net 2.5-2.8 calls this with."""
        architecture, in_ch, out_ch, ds = _request((plans_manager, configuration_manager, num_input_channels,
                                                    num_output_channels, *legacy), kwargs)
        arch = psp_architecture(architecture, in_ch, out_ch, cls.variant, cls.mode)
        return SlimNNUNet(in_ch, out_ch, deep_supervision=ds, **arch["arch_kwargs"])

    def _do_i_compile(self) -> bool:
        return False  # pruning events change the graph

    def initialize(self) -> None:
        if self.is_ddp:
            raise RuntimeError("nnUNetTrainerPSP trains on one device: run it without -num_gpus")
        if not self.was_initialized:
            # The plans (also in the checkpoints' init_args: the same dict) now describe PSP-Seg.
            name = self.configuration_name
            in_ch = determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)
            out_ch = self.label_manager.num_segmentation_heads
            plans = self.plans_manager.plans
            arch = psp_architecture(self.configuration_manager.configuration["architecture"], in_ch, out_ch,
                                    self.variant, self.mode)
            plans["configurations"][name]["architecture"] = arch
            self.plans_manager = PlansManager(plans)
            self.configuration_manager = self.plans_manager.get_configuration(name)
        super().initialize()
        self.fd_loss: FDLoss | None = None
        self.pruner: ProgressivePruner | None = None

    # ---- training ------------------------------------------------------------------------------------
    def _mask_value(self) -> list[float]:
        """FD's background value: the 0.5 percentile of the normalised foreground, per channel."""
        props = self.plans_manager.foreground_intensity_properties_per_channel
        schemes = self.configuration_manager.normalization_schemes
        if all(s == "CTNormalization" for s in schemes):
            return [(props[str(c)]["percentile_00_5"] - props[str(c)]["mean"]) / max(props[str(c)]["std"], 1e-8)
                    for c in range(len(schemes))]
        batches = [next(self.dataloader_train) for _ in range(4)]
        return foreground_percentile((b["data"], b["target"][0] if isinstance(b["target"], list) else b["target"])
                                     for b in batches)

    def on_train_start(self) -> None:
        super().on_train_start()
        stages = [f"network.encoder.stages.{i}" for i in range(len(self.network.network.encoder_stages))]
        self.fd_loss = FDLoss(self.network, mask_value=self._mask_value(),
                              encoder=[*stages, "network.encoder.bottleneck"],
                              decoder_half="network.decoder.stages.1")
        self.pruner = ProgressivePruner(
            self.network, self._calibration, total_epochs=self.num_epochs, patience=self.patience,
            tolerance=self.tolerance, step=self.step, stop_fraction=self.stop_fraction,
            calibration_batches=self.calibration_batches, monitor=["total", "fd", "aux"],
            console=Console(quiet=self.local_rank != 0),
        )
        freeze_masked(self.network)

    def _calibration(self):
        for _ in range(self.calibration_batches):
            yield {"image": next(self.dataloader_train)["data"].to(self.device)}

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = ([t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list)
                  else target.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            seg = self.loss(self.network(data), target)
            l_fd, l_aux = self.fd_loss(data, target)
            total = seg + self.fd_weight * (l_fd + l_aux)
        params = [p for p in self.network.parameters() if p.requires_grad]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.optimizer.step()
        return {"loss": total.detach().cpu().numpy(), "fd": l_fd.detach().cpu().numpy(),
                "aux": l_aux.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        losses = {"total": float(np.mean([o["loss"] for o in train_outputs])),
                  "fd": float(np.mean([o["fd"] for o in train_outputs])),
                  "aux": float(np.mean([o["aux"] for o in train_outputs]))}
        decision = self.pruner.on_epoch_end(self.current_epoch, losses)
        if decision is not None:
            self.print_to_log_file(f"PSP pruning: {decision.kind} ({decision.reason})")
            if decision.structure_changed:
                freeze_masked(self.network)
                for _, m in redundant_modules(self.network):  # masked gates get zero gradient: drop their momentum
                    momentum = self.optimizer.state.get(m.gates, {}).get("momentum_buffer")
                    if momentum is not None:
                        momentum[~m.active] = 0

    # ---- the end: slim, and a checkpoint stock nnU-Net predicts with -------------------------------
    def on_train_end(self) -> None:
        if self.fd_loss is not None:
            self.fd_loss.close()
        kwargs = self.configuration_manager.network_arch_init_kwargs
        self.network = SlimNNUNet.from_model(
            self.network.network, kwargs["base"], input_channels=self.network.input_channels,
            num_classes=self.network.num_classes, deep_supervision=False, strides=kwargs["strides"],
            kernel_sizes=kwargs["kernel_sizes"],
        ).to(self.device).eval()
        self._final = True
        write_json(f"{self.output_folder}/prunekit3d_pruning.json", {
            "history": self.pruner.history if self.pruner else [],
            "parameters": sum(p.numel() for p in self.network.parameters()),
            "steps": self.network.steps,
        })
        super().on_train_end()

    def save_checkpoint(self, filename: str) -> None:
        if not getattr(self, "_final", False):
            super().save_checkpoint(filename)
            return
        if self.local_rank == 0 and not self.disable_checkpointing:
            write_checkpoint(filename, self.network.state_dict(), plans=self.plans_manager.plans,
                             configuration=self.configuration_name, fold=self.fold, dataset_json=self.dataset_json,
                             mirroring_axes=self.inference_allowed_mirroring_axes, epoch=self.current_epoch + 1)

