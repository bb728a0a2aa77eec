"""nnU-Net's plans networks as a JSON-buildable registry model (``{"name": "nnunet_network", ...}``).

An nnU-Net plans file describes a network as a class name and keyword arguments, some of them class
names too (``conv_op: "torch.nn.modules.conv.Conv3d"``); nnU-Net builds it with ``pydoc.locate``,
which imports anything. This builder does the same construction from the same JSON but resolves only
what a plans network needs, so a spec read from a file cannot import arbitrary code::

    network_class_name  -- must lie in dynamic_network_architectures (nnU-Net's networks), an nn.Module class
    arch_kwargs[k] for k in kw_requires_import -- must be an nn.Module class of torch.nn (Conv3d, InstanceNorm3d, ...)
    cls(input_channels=..., num_classes=..., deep_supervision=..., **arch_kwargs)     # as get_network_from_plans

Example::

    >>> net = create_model("nnunet_network", network_class_name=plans_arch["network_class_name"],
    ...                    arch_kwargs=plans_arch["arch_kwargs"], kw_requires_import=plans_arch["_kw_requires_import"],
    ...                    input_channels=1, num_classes=4)
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from prunekit3d.models.registry import register_model

__all__ = ["NETWORK_PACKAGES", "nnunet_network"]

#: Packages a plans network class may come from.
NETWORK_PACKAGES = ("dynamic_network_architectures",)


def _locate(path: str, packages: Sequence[str], what: str) -> type[nn.Module]:
    """The ``nn.Module`` class ``path`` names, if it lies in one of ``packages``; imports nothing else."""
    parts = path.split(".") if isinstance(path, str) else []
    if len(parts) < 2 or not any(path == p or path.startswith(p + ".") for p in packages):
        raise ValueError(f"{what} {path!r} is not a class of {' or '.join(packages)}; prunekit3d builds plans "
                         "networks only from those packages")
    if any(not p.isidentifier() or p.startswith("_") for p in parts):
        raise ValueError(f"{what} {path!r} is not a plain dotted class name")
    module_name, name = ".".join(parts[:-1]), parts[-1]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{what} {path!r}: cannot import {module_name!r} ({err}); install it") from None
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{what} {path!r} is not an nn.Module class")
    return cls


def nnunet_network(
    network_class_name: str,
    arch_kwargs: Mapping[str, Any],
    input_channels: int,
    num_classes: int,
    kw_requires_import: Sequence[str] = (),
    deep_supervision: bool = True,
) -> nn.Module:
    """Build the network an nnU-Net plans configuration describes (``configurations[c]["architecture"]``).

    Args:
        network_class_name: ``architecture["network_class_name"]``.
        arch_kwargs: ``architecture["arch_kwargs"]``.
        input_channels: image channels (nnU-Net: ``determine_num_input_channels``).
        num_classes: segmentation heads (nnU-Net: ``label_manager.num_segmentation_heads``).
        kw_requires_import: ``architecture["_kw_requires_import"]``: the kwargs holding class names.
        deep_supervision: build with deep supervision on (nnU-Net's decoders hold every head either way).

    Raises:
        ValueError: a class outside ``dynamic_network_architectures`` / ``torch.nn``, or kwargs that do
            not fit the class.
    """
    cls = _locate(network_class_name, NETWORK_PACKAGES, "network_class_name")
    kwargs = dict(arch_kwargs)
    for key in kw_requires_import:
        if kwargs.get(key) is not None:
            kwargs[key] = _locate(kwargs[key], ("torch.nn",), f"arch_kwargs[{key!r}]")
    try:
        return cls(input_channels=input_channels, num_classes=num_classes, deep_supervision=deep_supervision, **kwargs)
    except TypeError as err:
        raise ValueError(f"the plans' arch_kwargs do not fit {network_class_name}: {err}") from None


register_model("nnunet_network", nnunet_network)
