"""Which features the FD loss compares: the encoder levels, the bottleneck and the 1/2-resolution decoder
feature of any 3-D U-Net, found from the resolution profile of one traced forward (:func:`find_fd_features`).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from prunekit3d.modes import observed_forward
from prunekit3d.wrap import _tensors, unwrap

__all__ = ["FDFeatures", "find_fd_features"]


@dataclass
class FDFeatures:
    """The modules whose outputs FD compares. Round-trips through JSON with ``asdict`` / ``FDFeatures(**d)``.

    Attributes:
        encoder: qualified names, one per encoder resolution level (highest first), the bottleneck last.
        decoder_half: qualified name of the decoder module whose output is the feature at 1/2 resolution.
        encoder_sizes: spatial size of each encoder feature in the traced forward (empty if names were given).
        decoder_half_size: spatial size of the decoder feature in the traced forward (empty if given).
    """

    encoder: list[str]
    decoder_half: str
    encoder_sizes: list[list[int]]
    decoder_half_size: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class _Call:
    module: nn.Module
    start: int  # clock when the forward began
    end: int = -1  # clock when it returned
    size_in: tuple[int, ...] | None = None  # spatial size of its first 5-D tensor argument
    size_out: tuple[int, ...] | None = None  # spatial size of its output, if one 5-D tensor
    output: torch.Tensor | None = None  # kept for the trace only: is it a network output?

    @property
    def volume_out(self) -> int:
        return math.prod(self.size_out) if self.size_out else 0

    def upsamples(self) -> bool:
        return bool(self.size_in and self.size_out) and math.prod(self.size_out) > math.prod(self.size_in)


def _trace_calls(model: nn.Module, example_input: torch.Tensor) -> tuple[list[_Call], list[torch.Tensor]]:
    """Every module call of one eval-mode forward, with start/end clocks and spatial sizes."""
    clock = itertools.count()
    calls: list[_Call] = []
    open_calls: dict[nn.Module, list[_Call]] = {}

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = next((t for t in _tensors((args, kwargs)) if t.dim() == 5), None)
        call = _Call(module, next(clock), size_in=tuple(first.shape[2:]) if first is not None else None)
        open_calls.setdefault(module, []).append(call)
        calls.append(call)

    def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call = open_calls[module].pop()
        call.end = next(clock)
        if isinstance(output, torch.Tensor) and output.dim() == 5:
            call.size_out, call.output = tuple(output.shape[2:]), output

    output = observed_forward(model, example_input, post, pre)
    return [c for c in calls if c.module is not model], list(_tensors(output))


def _smaller(a: Sequence[int], b: Sequence[int]) -> bool:
    """``a`` is a strictly lower resolution than ``b`` (no dimension larger, not equal)."""
    return all(x <= y for x, y in zip(a, b)) and tuple(a) != tuple(b)


def _undetectable(model: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"cannot find the encoder and decoder of {type(model).__name__} for the FD loss: {why}. "
        "Name the modules instead: FDLoss(model, encoder=[one module per encoder level, the bottleneck last], "
        "decoder_half='decoder module whose output is at 1/2 resolution') with names from model.named_modules()."
    )


def find_fd_features(model: nn.Module, example_input: torch.Tensor) -> FDFeatures:
    """Find the encoder features and the 1/2-resolution decoder feature from one traced forward.

    The rules, on the module outputs that are 5-D tensors ``(N, C, D, H, W)`` in the order the
    modules return (modules called more than once and outputs of the network are never chosen):

    - The *bottleneck* is the last output at the lowest resolution before the decoder starts; the
      decoder starts with the first call that upsamples (output larger than input) after the lowest
      resolution was first reached.
    - One *encoder feature per resolution level* above it: the last output at that level before the
      resolution drops. Resolutions must go down monotonically up to the bottleneck.
    - The *decoder feature at 1/2 resolution* is the last output, from a call that began after the
      decoder started, at the size of the first encoder level below the input size (so anisotropic
      first strides work), excluding the inner parts of an upsampling module.

    So a container whose output is its last child's output may be named instead of the child (same
    tensor). In MONAI's UNet the bottom level is the skip connection around the bottom block, i.e.
    the last down block and the bottom block concatenated.

    Args:
        model: a 3-D segmentation network (unwrapped from DDP automatically).
        example_input: a 5-D tensor ``(N, C, D, H, W)``, e.g. one training patch.

    Example::

        >>> from monai.networks.nets import BasicUNet
        >>> net = BasicUNet(3, 1, 2, features=(8, 8, 16, 32, 64, 8))
        >>> f = find_fd_features(net, torch.randn(1, 1, 32, 32, 32))
        >>> f.encoder, f.decoder_half
        (['conv_0', 'down_1', 'down_2', 'down_3', 'down_4'], 'upcat_2')
    """
    model = unwrap(model)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 5:
        raise ValueError("example_input must be a 5-D tensor (batch, channels, depth, height, width)")
    calls, outputs = _trace_calls(model, example_input)
    size_in = tuple(example_input.shape[2:])
    names = {m: n for n, m in model.named_modules()}
    counts = Counter(c.module for c in calls)
    shaped = [c for c in calls if c.size_out is not None]
    if not shaped:
        raise _undetectable(model, "no module returned a 5-D feature map")
    lowest = min(c.volume_out for c in shaped)
    if lowest >= math.prod(size_in):
        raise _undetectable(model, f"no module output is smaller than the input size {size_in}")
    reached = min(c.end for c in shaped if c.volume_out == lowest)
    ups = [c for c in calls if c.upsamples() and c.start > reached]
    if not ups:
        raise _undetectable(model, "nothing upsamples after the lowest resolution (no decoder)")
    decoder_start = min(c.start for c in ups)

    def candidate(c: _Call) -> bool:
        return c.size_out is not None and counts[c.module] == 1 and not any(c.output is o for o in outputs)

    ordered = sorted((c for c in calls if candidate(c)), key=lambda c: c.end)
    before = [c for c in ordered if c.end < decoder_start]
    bottom = [c for c in before if c.volume_out == lowest]
    if not bottom:
        raise _undetectable(model, "the lowest-resolution output comes from a shared module or is a network output")
    bottleneck = bottom[-1]
    chain = [c for c in before if c.end <= bottleneck.end]
    encoder: list[_Call] = []
    for cur, nxt in itertools.pairwise(chain):
        if nxt.size_out != cur.size_out:
            if not _smaller(nxt.size_out, cur.size_out):  # type: ignore[arg-type]
                raise _undetectable(
                    model, f"resolution rises inside the encoder ({names[cur.module]!r} {cur.size_out} -> "
                    f"{names[nxt.module]!r} {nxt.size_out})"
                )
            encoder.append(cur)
    encoder.append(bottleneck)
    half = next(c.size_out for c in encoder if _smaller(c.size_out, size_in))  # type: ignore[arg-type]

    def inside_upsampler(c: _Call) -> bool:
        return any(u.start < c.start and u.end > c.end and u.volume_out > c.volume_out for u in ups)

    decoder = [c for c in ordered if c.start >= decoder_start and c.size_out == half and not inside_upsampler(c)]
    if not decoder:
        raise _undetectable(model, f"no decoder module returns a feature at 1/2 resolution {half}")
    return FDFeatures(
        encoder=[names[c.module] for c in encoder],
        decoder_half=names[decoder[-1].module],
        encoder_sizes=[list(c.size_out) for c in encoder],  # type: ignore[arg-type]
        decoder_half_size=list(half),  # type: ignore[arg-type]
    )
