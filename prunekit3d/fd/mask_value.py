"""The value FD writes into the background of the masked input: a low percentile of the foreground
intensities of the training data (PSP-Seg: the 0.5 percentile), one per channel.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["foreground_percentile"]


def _volumes(item: Any, image_key: str, label_key: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(image (C, *S), foreground (*S))`` pairs from a pair, a dict, or a batch of either."""
    if isinstance(item, Mapping):
        image, label = item[image_key], item[label_key]
    elif isinstance(item, (list, tuple)) and len(item) == 2:
        image, label = item
    else:
        raise TypeError(f"expected (image, label) pairs or dicts with {image_key!r}/{label_key!r}; got {type(item)}")
    image, label = torch.as_tensor(np.asarray(image)), torch.as_tensor(np.asarray(label))
    if image.dim() == 5:  # a batch (B, C, *S)
        for i in range(image.shape[0]):
            yield from _volumes((image[i], label[i]), image_key, label_key)
        return
    if image.dim() == 3:
        image = image[None]
    if label.dim() == 4 and label.shape[0] == 1:
        label = label[0]
    if image.dim() != 4 or label.shape != image.shape[1:]:
        raise ValueError(
            f"image {tuple(image.shape)} and label {tuple(label.shape)} do not match: expected an image "
            "(C, D, H, W) or (D, H, W) and a label (D, H, W) or (1, D, H, W) of class indices"
        )
    yield image, label > 0


def foreground_percentile(
    pairs: Iterable[Any],
    q: float = 0.5,
    *,
    samples_per_volume: int | None = 10_000,
    seed: int = 0,
    image_key: str = "image",
    label_key: str = "label",
) -> list[float]:
    """The ``q``-th percentile of the foreground intensities of a data set, one value per channel.

    Streams: volumes are read one at a time and only ``samples_per_volume`` random foreground voxels
    of each are kept (drawn with replacement, as nnU-Net's fingerprint does; ``None`` keeps all of
    them for the exact value). With nnU-Net the same number is already in ``dataset_fingerprint.json``:
    ``foreground_intensity_properties_per_channel[c]["percentile_00_5"]``.

    Args:
        pairs: ``(image, label)`` pairs or dicts with ``image_key``/``label_key`` (tensors or arrays);
            images ``(C, D, H, W)`` or ``(D, H, W)``, labels of class indices, 0 = background; a batched
            ``(B, C, D, H, W)`` image with ``(B, 1, D, H, W)`` labels also works.
        q: percentile in [0, 100]; PSP-Seg's mask value is the 0.5 percentile.
        samples_per_volume: foreground voxels kept per volume and channel, or ``None`` for all.
        seed: seed of the voxel sampling.

    Example::

        >>> mask_value = foreground_percentile(zip(images, labels))[0]
    """
    if not 0 <= q <= 100:
        raise ValueError(f"q is a percentile in [0, 100], got {q}")
    generator = torch.Generator().manual_seed(seed)
    kept: list[list[np.ndarray]] = []
    for item in pairs:
        for image, foreground in _volumes(item, image_key, label_key):
            if not kept:
                kept = [[] for _ in range(image.shape[0])]
            if image.shape[0] != len(kept):
                raise ValueError(f"volumes have {len(kept)} and {image.shape[0]} channels; all must match")
            for c in range(image.shape[0]):
                values = image[c][foreground].float()
                if samples_per_volume is not None and values.numel() > samples_per_volume:
                    values = values[torch.randint(values.numel(), (samples_per_volume,), generator=generator)]
                kept[c].append(values.numpy())
    if not kept or not any(v.size for v in kept[0]):
        raise ValueError("no foreground voxel (label > 0) in the given volumes: cannot compute the mask value")
    return [float(np.percentile(np.concatenate(channel), q)) for channel in kept]
