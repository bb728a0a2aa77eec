"""Read an nnU-Net v2 model folder: its plans, dataset.json and every fold's network, built as nnU-Net builds it.

::

    <Trainer>__<Plans>__<configuration>/
        plans.json, dataset.json             --PlansManager / ConfigurationManager--> configuration
        fold_k/checkpoint_final.pth          --read_checkpoint (weights-only)-------> weights, trainer name
                                             --trainer.build_network_architecture--> network (deep supervision off)
                                                                                      + weights, strict --> teacher

The trainer class is looked up the way nnU-Net's predictor does (``recursive_find_trainer_class_by_name``);
where that lookup cannot run (a custom trainer that is not installed, or nnU-Net's optional trainers
failing to import without ``timm``) the network is built from the plans with ``nnUNetTrainer``'s builder,
and the strict weight check says whether that was the right network. The base spec of every network
(``NNUNetModel.base``) is JSON that rebuilds it without nnU-Net (:mod:`prunekit3d.models.nnunet`), checked
against the built network.
"""

from __future__ import annotations

import copy
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from prunekit3d.io import from_spec
from prunekit3d.io.rebuild import SlimNetwork
from prunekit3d.sources.nnunet.checkpoint import Checkpoint, read_checkpoint

__all__ = ["MANIFEST_FORMAT", "NNUNetFold", "NNUNetModel", "base_spec", "build_network", "read_model_folder"]

#: ``format`` of the manifest.json prunekit3d writes into the model folders it makes.
MANIFEST_FORMAT = "prunekit3d.nnunet"
CHECKPOINT = "checkpoint_final.pth"


@dataclass
class NNUNetFold:
    """One fold: ``teacher`` is the trained network (eval mode, deep supervision off), weights loaded."""

    fold: int | str
    teacher: nn.Module
    checkpoint: Checkpoint

    @property
    def network(self) -> nn.Module:
        """The plain network to compress (inside a :class:`SlimNNUNet`, its slim network: its steps go on)."""
        return self.teacher.network if isinstance(self.teacher, SlimNetwork) else self.teacher


@dataclass
class NNUNetModel:
    """An nnU-Net model folder as read: what compressing it and writing it back need."""

    folder: Path
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    configuration: str
    folds: list[NNUNetFold]
    base: dict[str, Any]
    input_channels: int
    num_classes: int
    patch_size: list[int]
    trainer_name: str
    notes: list[str] = field(default_factory=list)
    manifest: dict[str, Any] | None = None

    @property
    def architecture(self) -> dict[str, Any]:
        """``plans["configurations"][configuration]["architecture"]`` after inheritance."""
        return copy.deepcopy(self.configuration_manager().configuration["architecture"])

    def plans_manager(self) -> Any:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        return PlansManager(copy.deepcopy(self.plans))

    def configuration_manager(self) -> Any:
        return self.plans_manager().get_configuration(self.configuration)


def _json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {path.parent} is not an nnU-Net model folder "
                                "(<Trainer>__<Plans>__<configuration> with plans.json, dataset.json, fold_K/)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def _fold_dirs(folder: Path, folds: Sequence[int | str] | None) -> list[tuple[int | str, Path]]:
    if folds is None:
        found = sorted((p for p in folder.glob("fold_*") if (p / CHECKPOINT).is_file()), key=lambda p: p.name)
        chosen = [(int(p.name[5:]) if p.name[5:].isdigit() else p.name[5:], p) for p in found]
        if not chosen:
            raise FileNotFoundError(f"{folder} holds no fold_K/{CHECKPOINT}: train a fold first, or pass the "
                                    "<Trainer>__<Plans>__<configuration> folder itself")
        return chosen
    chosen = [(f, folder / f"fold_{f}") for f in folds]
    missing = [str(p / CHECKPOINT) for _, p in chosen if not (p / CHECKPOINT).is_file()]
    if missing:
        raise FileNotFoundError(f"no checkpoint for the requested fold(s): {', '.join(missing)}")
    return chosen


def _trainer_class(name: str, notes: list[str]) -> type:
    """nnU-Net's trainer class ``name``, or ``nnUNetTrainer`` (with a note) where the lookup cannot run."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    if name == "nnUNetTrainer":
        return nnUNetTrainer
    try:
        return recursive_find_trainer_class_by_name(name)
    except Exception as err:  # noqa: BLE001 -- the lookup imports every trainer module; any of them may fail
        notes.append(f"trainer {name} could not be looked up here ({type(err).__name__}: {str(err)[:120]}); "
                     "built the network from the plans as nnUNetTrainer does")
        return nnUNetTrainer


def build_network(trainer: type, plans_manager: Any, configuration_manager: Any, input_channels: int,
                  num_classes: int, deep_supervision: bool) -> nn.Module:
    """``trainer.build_network_architecture`` called as nnU-Net 2.8 calls it, or with the 2.5-2.7 signature."""
    build = trainer.build_network_architecture
    if "plans_manager" in inspect.signature(build).parameters:
        return build(plans_manager, configuration_manager, input_channels, num_classes, deep_supervision)
    return build(configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs,
                 configuration_manager.network_arch_init_kwargs_req_import, input_channels, num_classes,
                 deep_supervision)


def base_spec(architecture: dict[str, Any], input_channels: int, num_classes: int) -> dict[str, Any]:
    """The JSON spec that rebuilds the plans' network without nnU-Net (a prunekit3d folder: its own base)."""
    if architecture["network_class_name"] == "prunekit3d.sources.nnunet.network.SlimNNUNet":
        return dict(architecture["arch_kwargs"]["base"])
    return {
        "name": "nnunet_network",
        "network_class_name": architecture["network_class_name"],
        "arch_kwargs": architecture["arch_kwargs"],
        "kw_requires_import": list(architecture.get("_kw_requires_import", [])),
        "input_channels": input_channels,
        "num_classes": num_classes,
        # as the teachers are built: the trace of channel pruning then sees the same forward (with deep
        # supervision on, heads that the pruned network never ran would be traced too)
        "deep_supervision": False,
    }


def _check_base(base: dict[str, Any], network: nn.Module, folder: Path, trainer: str) -> None:
    """The base spec must rebuild the trainer's network (a prunekit3d folder's network is base + steps)."""
    if isinstance(network, SlimNetwork):
        return
    rebuilt, state = from_spec(base).state_dict(), network.state_dict()
    if list(rebuilt) != list(state) or any(rebuilt[k].shape != state[k].shape for k in state):
        raise ValueError(f"{folder}: trainer {trainer} builds a network its plans do not describe (a custom "
                         "build_network_architecture); prunekit3d can only rewrite folders whose plans describe "
                         "the network")


def read_model_folder(folder: str | Path, folds: Sequence[int | str] | None = None) -> NNUNetModel:
    """Read an nnU-Net v2 model folder and build every fold's trained network as nnU-Net does.

    Args:
        folder: a ``<Trainer>__<Plans>__<configuration>`` folder (under ``nnUNet_results/DatasetXXX_Name/``).
        folds: the folds to read (``0``, ``1``, ..., ``"all"``); default: every ``fold_*`` with a checkpoint.

    Returns:
        An :class:`NNUNetModel`: per fold the teacher (eval mode, deep supervision off), the base spec,
        channels, classes and the patch size.

    Raises:
        FileNotFoundError, ValueError: with one line naming the problem (missing files, a checkpoint that
            pickles code, a cascade configuration, weights that do not fit the network).
    """
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory; pass an nnU-Net model folder "
                                "<Trainer>__<Plans>__<configuration>")
    plans, dataset_json = _json(folder / "plans.json"), _json(folder / "dataset.json")
    manifest = _json(folder / "manifest.json") if (folder / "manifest.json").is_file() else None
    if manifest is not None and manifest.get("format") != MANIFEST_FORMAT:
        manifest = None
    checkpoints = [(f, read_checkpoint(d / CHECKPOINT)) for f, d in _fold_dirs(folder, folds)]
    configurations = {c.configuration for _, c in checkpoints}
    if len(configurations) != 1:
        raise ValueError(f"{folder}: the folds were trained for different configurations {sorted(configurations)}")
    configuration = configurations.pop()
    plans_manager = PlansManager(copy.deepcopy(plans))
    if configuration not in plans_manager.available_configurations:
        raise ValueError(f"{folder}: the checkpoints are for configuration {configuration!r}, which plans.json lacks")
    config = plans_manager.get_configuration(configuration)
    if config.previous_stage_name is not None:
        raise ValueError(f"{folder}: {configuration} is a cascade stage (it reads the previous stage's "
                         "segmentations); prunekit3d compresses single-stage configurations")
    input_channels = determine_num_input_channels(plans_manager, config, dataset_json)
    num_classes = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    notes: list[str] = []
    trainer_name = checkpoints[0][1].trainer_name
    trainer = _trainer_class(trainer_name, notes)
    base = base_spec(config.configuration["architecture"], input_channels, num_classes)
    model_folds = []
    for fold, checkpoint in checkpoints:
        network = build_network(trainer, plans_manager, config, input_channels, num_classes, False)
        try:
            network.load_state_dict(checkpoint.weights, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{checkpoint.path} does not fit the network of {folder / 'plans.json'} "
                             f"({str(err).splitlines()[0]}...)") from None
        model_folds.append(NNUNetFold(fold, network.eval(), checkpoint))
    _check_base(base, model_folds[0].teacher, folder, trainer_name)
    return NNUNetModel(
        folder=folder, plans=plans, dataset_json=dataset_json, configuration=configuration, folds=model_folds,
        base=base, input_channels=input_channels, num_classes=num_classes, patch_size=list(config.patch_size),
        trainer_name=trainer_name, notes=notes, manifest=manifest,
    )

