"""The training recipe's data: the MSD data set, its split, its fingerprint, the cached cases and the loaders.

::

    MSD folder --read_msd, split_cases--> train / val cases --intensity_fingerprint (train cases)--> fingerprint
    train cases --preprocessing + training_augmentation, CacheDataset--> random augmented patches (loader)
    val cases   --preprocessing, CacheDataset--------------------------> whole preprocessed cases
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader

from prunekit3d.data import intensity_fingerprint, preprocessing, read_msd, split_cases, training_augmentation
from prunekit3d.fd import foreground_percentile
from prunekit3d.recipes.train.config import TrainConfig

__all__ = ["TrainingData", "seed_of"]


def seed_of(*parts: int) -> int:
    """One 32-bit seed from several integers (run seed, epoch, rank, stream), well mixed."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class TrainingData:
    """Reads, splits, fingerprints and caches the data set of ``config`` (every case is read once here).

    Attributes:
        dataset, split, fingerprint: from :func:`~prunekit3d.data.read_msd`, :func:`~prunekit3d.data.split_cases`
            and :func:`~prunekit3d.data.intensity_fingerprint` (of the training cases).
        train: the training cases, preprocessed and cached; indexing one draws a random augmented patch.
        val: the validation cases, preprocessed and cached whole.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.dataset = read_msd(config.data)
        self.split = split_cases(self.dataset, config.split, config.seed)
        self.fingerprint = intensity_fingerprint(self.dataset, self.split["train"], seed=config.seed)
        self.pre = preprocessing(self.dataset, self.fingerprint, config.spacing)
        augmented = training_augmentation(self.pre, config.patch, config.foreground_fraction)
        self.train = CacheDataset([self.dataset.cases[c] for c in self.split["train"]], augmented, progress=False)
        self.val = CacheDataset([self.dataset.cases[c] for c in self.split["val"]], self.pre, progress=False)

    def loader(self, seed: int, patches: int, *, pin_memory: bool = False) -> DataLoader:
        """``patches`` random training patches in batches of ``config.batch``, drawn with ``seed``."""
        sampler = torch.utils.data.RandomSampler(
            self.train, replacement=True, num_samples=patches, generator=torch.Generator().manual_seed(seed)
        )
        return DataLoader(
            self.train, batch_size=self.config.batch, sampler=sampler, num_workers=self.config.workers,
            generator=torch.Generator().manual_seed(seed + 1), pin_memory=pin_memory,
        )

    def mask_value(self) -> list[float]:
        """FD's background value: the 0.5 percentile of the normalised foreground intensities, per channel.

        For CT it follows from the fingerprint (normalisation is monotone and clips exactly there); other
        channels are z-scored per image, so it is measured on the normalised training cases.
        """
        if all(m.upper() == "CT" for m in self.dataset.modalities):
            return [(f["percentile_00_5"] - f["mean"]) / max(f["std"], 1e-8) for f in self.fingerprint]
        cases = (self.pre(self.dataset.cases[c]) for c in self.split["train"])
        return foreground_percentile(({"image": d["image"], "label": d["label"][0]} for d in cases), q=0.5)
