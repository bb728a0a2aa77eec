"""Data: volumes as users store them, the data sets training reads, preprocessing and patch sampling.

- :mod:`~prunekit3d.data.volumes`: NIfTI images and labels (files, folders, MSD folders) as :class:`Volume`.
- :mod:`~prunekit3d.data.msd`: Medical Segmentation Decathlon data sets and their train/val split.
- :mod:`~prunekit3d.data.preprocessing`: stored intensities -> network input (MONAI transforms, nnU-Net's
  CT normalisation, the per-image z-score); :mod:`~prunekit3d.data.network_input`: the record of one
  network's preprocessing (:class:`Preprocessing`), applied to an image and inverted for its prediction.
- :mod:`~prunekit3d.data.patches`: random patches for training and distillation.
"""

from prunekit3d.data.msd import MSDDataset, read_msd, split_cases
from prunekit3d.data.patches import PatchSampler, training_augmentation
from prunekit3d.data.preprocessing import (
    NORMALISATIONS,
    NetworkInput,
    Normalise,
    Preprocessing,
    intensity_fingerprint,
    normalise_volume,
    preprocessing,
)
from prunekit3d.data.volumes import Volume, read_labels, read_volumes

__all__ = [
    "MSDDataset",
    "NORMALISATIONS",
    "NetworkInput",
    "Normalise",
    "PatchSampler",
    "Preprocessing",
    "Volume",
    "intensity_fingerprint",
    "normalise_volume",
    "preprocessing",
    "read_labels",
    "read_msd",
    "read_volumes",
    "split_cases",
    "training_augmentation",
]
