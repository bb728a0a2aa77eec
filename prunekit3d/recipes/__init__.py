"""Recipes: complete runs built from the library's parts.

- :mod:`~prunekit3d.recipes.train`: ``prunekit3d train``, PSP-Seg with functional decoupling and progressive
  pruning on an MSD data set, ending in a slim saved model.
- :mod:`~prunekit3d.recipes.compress`: ``prunekit3d compress``, a trained network distilled and pruned to a
  budget, label-free.
- :mod:`~prunekit3d.recipes.demo`: ``prunekit3d demo``, compress on the bundled sample CT.
- :mod:`~prunekit3d.recipes.checkpoint`: the resumable checkpoint both training recipes write.
- :mod:`~prunekit3d.recipes.distributed`: the device and, under ``torchrun``, the process group.

    >>> from prunekit3d.recipes import TrainConfig, train
    >>> result = train(TrainConfig(data="Task09_Spleen", out="runs/spleen", variant="S"))
    >>> result.report["params"], result.report["validation"]["mean_dsc"]
"""

from prunekit3d.data import MSDDataset, read_msd, split_cases
from prunekit3d.recipes.train import TrainConfig, Trainer, TrainResult, train

__all__ = ["MSDDataset", "TrainConfig", "TrainResult", "Trainer", "read_msd", "split_cases", "train"]
