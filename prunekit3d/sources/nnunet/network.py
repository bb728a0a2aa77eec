"""The network class a compressed nnU-Net model folder's plans name: :class:`SlimNNUNet`.

nnU-Net builds the network of a configuration as
``cls(input_channels=..., num_classes=..., deep_supervision=..., **arch_kwargs)``
(``get_network_from_plans``); for a folder prunekit3d wrote, the plans hold::

    "architecture": {
        "network_class_name": "prunekit3d.sources.nnunet.network.SlimNNUNet",
        "arch_kwargs": {"base": {"name": "nnunet_network", ...} | {"import_path": ..., ...},   # the original network
                        "steps": [...],                        # prunekit3d's structural steps (first fold's)
                        "strides": [...], "kernel_sizes": [...]},  # for nnU-Net's ConfigurationManager
        "_kw_requires_import": []}

Every fold's weights carry their own steps (``prunekit3d_architecture``), so folds compressed to
different architectures share one plans file: see :class:`prunekit3d.io.rebuild.SlimNetwork`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prunekit3d.io.rebuild import SlimNetwork

__all__ = ["CLASS_NAME", "SlimNNUNet"]

#: What plans.json's ``network_class_name`` says.
CLASS_NAME = "prunekit3d.sources.nnunet.network.SlimNNUNet"


class SlimNNUNet(SlimNetwork):
    """:class:`~prunekit3d.io.rebuild.SlimNetwork` with the constructor nnU-Net calls.

    Args:
        input_channels, num_classes: what nnU-Net derives from dataset.json; checked against the network.
        base, steps: the original network's JSON spec and prunekit3d's steps.
        deep_supervision: nnU-Net's switch (off for inference, on for training).
        strides, kernel_sizes: the pooling and kernels of the network's stages, only recorded: nnU-Net
            reads ``arch_kwargs["strides"]`` for its deep-supervision scales.
    """

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        base: Mapping[str, Any],
        steps: Sequence[Mapping[str, Any]] = (),
        deep_supervision: bool | None = None,
        strides: Sequence[Sequence[int]] | None = None,
        kernel_sizes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__(base, steps, deep_supervision=deep_supervision)
        self.strides, self.kernel_sizes = strides, kernel_sizes
        first = next((m for m in self.network.modules() if hasattr(m, "in_channels") and hasattr(m, "weight")), None)
        if first is not None and first.in_channels != input_channels:
            raise ValueError(f"the plans' network takes {first.in_channels} input channels but dataset.json has "
                             f"{input_channels}: the model folder's plans.json and dataset.json do not belong together")
        self.input_channels, self.num_classes = input_channels, num_classes
