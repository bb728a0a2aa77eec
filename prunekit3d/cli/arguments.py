"""Argument groups that several commands share."""

from __future__ import annotations

import argparse

__all__ = ["add_model_arguments"]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """``--model``/``--model-kwargs``/``--spec``: the network a state dict belongs to."""
    group = parser.add_argument_group("network (for a state dict; an artifact records its own)")
    group.add_argument("--model", metavar="DOTTED.PATH", help="network class, e.g. monai.networks.nets.DynUNet")
    group.add_argument("--model-kwargs", metavar="JSON", help="its keyword arguments as a JSON object")
    group.add_argument("--spec", metavar="FILE", help='JSON spec {"import_path": ..., "kwargs": {...}} instead')
