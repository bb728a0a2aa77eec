"""A small model registry: build any registered network by name, timm style.

A model file registers one builder per name; users and the CLI call :func:`create_model` with
JSON-able keyword arguments, so a saved ``{"name": ..., **kwargs}`` spec rebuilds the network::

    >>> from prunekit3d.models import create_model, list_models
    >>> list_models()
    ['nnunet_network', 'psp_seg_b', 'psp_seg_l', 'psp_seg_s']
    >>> model = create_model("psp_seg_s", in_channels=1, out_channels=3)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from torch import nn

__all__ = ["create_model", "list_models", "register_model"]

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, builder: Callable[..., nn.Module]) -> None:
    """Register ``builder(**kwargs) -> nn.Module`` under ``name`` (names are unique)."""
    if name in _BUILDERS:
        raise ValueError(f"a model named {name!r} is already registered; pick another name")
    _BUILDERS[name] = builder


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_BUILDERS)


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` (e.g. ``in_channels``, ``out_channels``).

    Raises:
        ValueError: ``name`` is not registered (the message lists close matches and all names).
    """
    try:
        builder = _BUILDERS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _BUILDERS, n=3)
        hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
        raise ValueError(f"unknown model {name!r}: {hint}registered models are {list_models()}") from None
    return builder(**kwargs)
