"""PSP-Seg reference networks S, B, L: a U-Net whose inner stages are redundant modules.

Data path for ``n`` stage widths ``w_0 .. w_{n-1}`` (S, B: n = 5; L: n = 6); ``(+)`` adds::

    level 0:    x -- stem -- [ResConv] ------------------------------- (+) -- [ResConv] -- head --> logits[0]
                                 |                                       ^
                               Down                                      Up
                                 |                                       |
    level 1:                   [PRM] ------------------- (+) -- [PRM] ---+---------------- head --> logits[1]
                                 |                         ^
                               Down                        Up
                                 :                         :
    level n-1:                 Down -- [PRM] bottleneck ---+

- ``ResConv``: ``x + LeakyReLU(IN(Conv 3x3x3(x)))``, plain residual conv blocks at full resolution.
- ``PRM``: a redundant module (parallel, or sequential with ``mode="sequential"``) of light branches,
  ``out_activation=True``, no original branch; its gates start at 0, so it starts as ``LeakyReLU(x)``.
- ``Down``: ``LeakyReLU(Conv 1x1x1 stride 2(x) + IN(Conv 3x3x3(LeakyReLU(IN(Conv 3x3x3 stride 2(x))))))``.
- ``Up``: nearest-neighbour x2 upsampling, then Conv 1x1x1 ``w_{i+1} -> w_i``; the skip is *added*.
- ``head``: Conv 1x1x1 to ``out_channels``; one per decoder level except the bottleneck with deep
  supervision (``n - 1`` outputs), only the full-resolution one without.

Every stage holds ``blocks`` modules (1 in all variants, as in the published networks); with affine
instance norms this gives 5.38 M (S), 13.23 M (B) and 33.19 M (L) parameters for 1 input channel,
3 classes and deep supervision (the paper: 5.37, 13.2, 33.1 M with non-affine norms).

Outputs follow nnU-Net: with ``decoder.deep_supervision`` on, a list of logits, full resolution first,
in train *and* eval mode (nnU-Net's validation step indexes ``output[0]`` in eval mode); off, one
tensor. nnU-Net's trainer switches it through ``model.decoder.deep_supervision = False``.

For the functional-decoupling loss: ``model.encoder(x)`` returns the output of every encoder stage and
of the bottleneck (``model.encoder_stages``, ``model.bottleneck``); the decoder feature at 1/2 resolution
is the output of ``model.half_res_decoder_stage`` (hook it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit3d.models.registry import register_model
from prunekit3d.redundant import MODES, RedundantModule
from prunekit3d.redundant.branches import NEGATIVE_SLOPE

__all__ = [
    "DownBlock",
    "PSPSeg",
    "PSPSegConfig",
    "PSPSegDecoder",
    "PSPSegEncoder",
    "ResidualConvBlock",
    "UpBlock",
    "VARIANTS",
    "psp_seg",
]


@dataclass(frozen=True)
class PSPSegConfig:
    """Architecture of one PSP-Seg variant. Round-trips through JSON with ``to_dict``/``from_dict``.

    Args:
        widths: channels of each resolution level, full resolution first; the last is the bottleneck.
        exp_ratio: hidden width of every light branch as a fraction of its channels.
        branches: light branches per redundant module (a kernel family: 7, 4 or 1).
        blocks: modules per stage (residual conv blocks at full resolution, redundant modules below).
    """

    widths: tuple[int, ...]
    exp_ratio: float
    branches: int
    blocks: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if len(self.widths) < 2 or min(self.widths) < 1:
            raise ValueError(f"widths must be at least two positive channel counts, got {list(self.widths)}")
        if self.blocks < 1:
            raise ValueError(f"blocks must be >= 1, got {self.blocks}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "widths": list(self.widths),
            "exp_ratio": self.exp_ratio,
            "branches": self.branches,
            "blocks": self.blocks,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PSPSegConfig:
        return cls(**data)


#: The published variants (Li et al. 2025, table of reference networks).
VARIANTS: dict[str, PSPSegConfig] = {
    "S": PSPSegConfig(widths=(16, 32, 64, 128, 256), exp_ratio=0.5, branches=4),
    "B": PSPSegConfig(widths=(16, 32, 64, 128, 256), exp_ratio=2.0, branches=7),
    "L": PSPSegConfig(widths=(16, 32, 64, 128, 256, 320), exp_ratio=2.0, branches=7),
}


def _conv(cin: int, cout: int, kernel: int = 1, stride: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, kernel, stride=stride, padding=kernel // 2)


def _norm(channels: int) -> nn.InstanceNorm3d:
    return nn.InstanceNorm3d(channels, affine=True)


class ResidualConvBlock(nn.Module):
    """Full-resolution block: ``x -- Conv 3x3x3 -- IN -- LeakyReLU --(+ x)--> y``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv(channels, channels, 3)
        self.norm = _norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.leaky_relu(self.norm(self.conv(x)), NEGATIVE_SLOPE)


class DownBlock(nn.Module):
    """Residual stride-2 downsampling ``cin -> cout``::

        x -- Conv 3x3x3 /2 -- IN -- LeakyReLU -- Conv 3x3x3 -- IN --+-- LeakyReLU --> y
        x -- Conv 1x1x1 /2 -----------------------------------------+
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = _conv(cin, cout, 3, stride=2)
        self.norm1 = _norm(cout)
        self.conv2 = _conv(cout, cout, 3)
        self.norm2 = _norm(cout)
        self.bypass = _conv(cin, cout, 1, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.norm1(self.conv1(x)), NEGATIVE_SLOPE)
        return F.leaky_relu(self.bypass(x) + self.norm2(self.conv2(h)), NEGATIVE_SLOPE)


class UpBlock(nn.Module):
    """Upsampling ``cin -> cout``: ``x -- nearest x2 -- Conv 1x1x1 --> y``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _redundant_stage(cls: type[RedundantModule], channels: int, config: PSPSegConfig) -> nn.Sequential:
    return nn.Sequential(
        *(
            cls(channels, branches=config.branches, exp_ratio=config.exp_ratio, out_activation=True)
            for _ in range(config.blocks)
        )
    )


def _stage(level: int, cls: type[RedundantModule], config: PSPSegConfig) -> nn.Sequential:
    """Level 0 holds residual conv blocks, every lower level redundant modules."""
    if level == 0:
        return nn.Sequential(*(ResidualConvBlock(config.widths[0]) for _ in range(config.blocks)))
    return _redundant_stage(cls, config.widths[level], config)


class PSPSegEncoder(nn.Module):
    """Stem, ``n - 1`` stages each followed by a :class:`DownBlock`, and the bottleneck.

    ``forward(x)`` returns ``n`` features: the output of every stage (the skips, full resolution
    first) and, last, the bottleneck's.
    """

    def __init__(self, config: PSPSegConfig, in_channels: int, cls: type[RedundantModule]) -> None:
        super().__init__()
        w = config.widths
        self.in_channels = in_channels
        self.stem = _conv(in_channels, w[0], 1)
        self.stages = nn.ModuleList(_stage(i, cls, config) for i in range(len(w) - 1))
        self.downs = nn.ModuleList(DownBlock(w[i], w[i + 1]) for i in range(len(w) - 1))
        self.bottleneck = _redundant_stage(cls, w[-1], config)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming the problem if ``x`` cannot pass through the network."""
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"PSP-Seg expects a tensor (batch, {self.in_channels}, D, H, W); got {shape}")
        factor = 2 ** len(self.downs)
        size = tuple(x.shape[2:])
        if any(s % factor for s in size):
            fit = tuple(max(1, math.ceil(s / factor)) * factor for s in size)
            raise ValueError(
                f"spatial size {size} must be divisible by {factor} (2^{len(self.downs)}, one halving per "
                f"downsampling) in every dimension; pad or crop the input, e.g. to {fit}"
            )
        if math.prod(s // factor for s in size) < 2:
            raise ValueError(
                f"spatial size {size} leaves a single voxel at the bottleneck, where instance norm is "
                f"undefined; make at least one dimension {2 * factor} or larger"
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        x = self.stem(x)
        features = []
        for stage, down in zip(self.stages, self.downs):
            x = stage(x)
            features.append(x)
            x = down(x)
        features.append(self.bottleneck(x))
        return features


class PSPSegDecoder(nn.Module):
    """Decoder: at each level ``i`` (deepest first), ``x = stages[i](ups[i](x) + skip_i)``; 1x1 heads.

    ``heads[i]`` reads level ``i``; with deep supervision there is one per level ``0 .. n-2``,
    without only ``heads[0]``. Switch the list output off with ``decoder.deep_supervision = False``.
    """

    def __init__(
        self, config: PSPSegConfig, out_channels: int, cls: type[RedundantModule], deep_supervision: bool
    ) -> None:
        super().__init__()
        w = config.widths
        levels = len(w) - 1
        self.ups = nn.ModuleList(UpBlock(w[i + 1], w[i]) for i in range(levels))
        self.stages = nn.ModuleList(_stage(i, cls, config) for i in range(levels))
        self.heads = nn.ModuleList(_conv(w[i], out_channels, 1) for i in range(levels if deep_supervision else 1))
        self.deep_supervision = deep_supervision

    @property
    def deep_supervision(self) -> bool:
        return self._deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        if enabled and len(self.heads) < len(self.stages):
            raise ValueError(
                "this network was built without deep-supervision heads; build it with deep_supervision=True"
            )
        self._deep_supervision = bool(enabled)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x = features[-1]
        logits = []
        for i in reversed(range(len(self.stages))):
            x = self.stages[i](self.ups[i](x) + features[i])
            if i == 0 or self.deep_supervision:
                logits.append(self.heads[i](x))
        logits.reverse()  # full resolution first, as nnU-Net's deep-supervision loss expects
        return logits if self.deep_supervision else logits[0]


class PSPSeg(nn.Module):
    """A PSP-Seg network of architecture ``config`` (see the module docstring for the data path).

    Args:
        config: the architecture, e.g. ``VARIANTS["S"]``, or its ``to_dict()`` (so a JSON spec builds it).
        in_channels: image channels.
        out_channels: classes (logit channels).
        deep_supervision: return the logits of every decoder level but the bottleneck (a list, full
            resolution first) instead of the full-resolution logits alone.
        mode: redundant module type, a key of :data:`prunekit3d.redundant.MODES` ("parallel" or
            "sequential").

    Input: ``(B, in_channels, D, H, W)`` with ``D, H, W`` divisible by ``2 ** (len(widths) - 1)``.

    Example::

        >>> model = PSPSeg(VARIANTS["S"], in_channels=1, out_channels=3)
        >>> [tuple(y.shape) for y in model(torch.zeros(1, 1, 32, 32, 32))]
        [(1, 3, 32, 32, 32), (1, 3, 16, 16, 16), (1, 3, 8, 8, 8), (1, 3, 4, 4, 4)]
    """

    def __init__(
        self,
        config: PSPSegConfig | Mapping[str, Any],
        in_channels: int,
        out_channels: int,
        deep_supervision: bool = True,
        mode: str = "parallel",
    ) -> None:
        super().__init__()
        if isinstance(config, Mapping):  # a JSON spec: {"import_path": "...PSPSeg", "kwargs": {"config": {...}}}
            config = PSPSegConfig.from_dict(dict(config))
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: use one of {sorted(MODES)}")
        self.config = config
        self.mode = mode
        self.encoder = PSPSegEncoder(config, in_channels, MODES[mode])
        self.decoder = PSPSegDecoder(config, out_channels, MODES[mode], deep_supervision)
        self.apply(_he_init)

    @property
    def encoder_stages(self) -> nn.ModuleList:
        """The encoder stages whose outputs are the skips (and, with the bottleneck, the FD features)."""
        return self.encoder.stages

    @property
    def bottleneck(self) -> nn.Sequential:
        return self.encoder.bottleneck

    @property
    def half_res_decoder_stage(self) -> nn.Sequential:
        """The decoder stage at 1/2 resolution, whose output feeds the auxiliary foreground loss."""
        return self.decoder.stages[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.decoder(self.encoder(x))


def _he_init(module: nn.Module) -> None:
    # He init for LeakyReLU as nnU-Net does; gates keep their start values (0).
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=NEGATIVE_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def psp_seg(
    variant: str,
    in_channels: int,
    out_channels: int,
    deep_supervision: bool = True,
    mode: str = "parallel",
) -> PSPSeg:
    """Build PSP-Seg ``variant`` ("S", "B" or "L") from JSON-able arguments.

    The returned model carries ``model.spec``, the keyword arguments of
    :func:`prunekit3d.models.create_model` that rebuild it: ``create_model(**model.spec)``.

    Example::

        >>> model = psp_seg("S", in_channels=1, out_channels=3)
        >>> round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        5.38
    """
    key = variant.upper() if isinstance(variant, str) else variant
    if key not in VARIANTS:
        raise ValueError(f"unknown PSP-Seg variant {variant!r}: use one of {sorted(VARIANTS)}")
    model = PSPSeg(VARIANTS[key], in_channels, out_channels, deep_supervision=deep_supervision, mode=mode)
    model.spec = {
        "name": f"psp_seg_{key.lower()}",
        "in_channels": in_channels,
        "out_channels": out_channels,
        "deep_supervision": deep_supervision,
        "mode": mode,
    }
    return model


for _key in VARIANTS:
    register_model(f"psp_seg_{_key.lower()}", partial(psp_seg, _key))
