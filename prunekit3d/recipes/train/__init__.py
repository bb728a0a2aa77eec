"""``prunekit3d train``: PSP-Seg on a Medical Segmentation Decathlon data set, with functional decoupling and
progressive pruning, ending in a slim saved model.

- :mod:`~prunekit3d.recipes.train.config`: :class:`TrainConfig`, the run's settings (PSP-Seg's published recipe).
- :mod:`~prunekit3d.recipes.train.data`: the data set, its split, fingerprint, cached cases and loaders.
- :mod:`~prunekit3d.recipes.train.losses`: nnU-Net's Dice + CE with deep supervision.
- :mod:`~prunekit3d.recipes.train.masks`: masked branches frozen, momentum dropped, re-initialisation.
- :mod:`~prunekit3d.recipes.train.trainer`: :class:`Trainer`, the epoch loop as overridable hooks.
"""

from prunekit3d.recipes.train.config import MODULES, TrainConfig
from prunekit3d.recipes.train.masks import reinitialise
from prunekit3d.recipes.train.trainer import Trainer, TrainResult, train

__all__ = ["MODULES", "TrainConfig", "TrainResult", "Trainer", "reinitialise", "train"]
