"""Recipes: complete training runs built from the library's parts.

``prunekit3d train`` is :func:`train` with a :class:`TrainConfig`: PSP-Seg on a Medical Segmentation
Decathlon data set, with functional decoupling and progressive pruning, ending in a slim saved model::

    >>> from prunekit3d.recipes import TrainConfig, train
    >>> result = train(TrainConfig(data="Task09_Spleen", out="runs/spleen", variant="S"))
    >>> result.report["params"], result.report["validation"]["mean_dsc"]
"""

from prunekit3d.recipes.config import TrainConfig
from prunekit3d.recipes.data import MSDDataset, read_msd, split_cases
from prunekit3d.recipes.train import Trainer, TrainResult, train

__all__ = ["MSDDataset", "TrainConfig", "TrainResult", "Trainer", "read_msd", "split_cases", "train"]
