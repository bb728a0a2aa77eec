"""Functional decoupling (FD): make the encoder describe the foreground only, for any 3-D U-Net.

Two losses, from one extra encoder-only pass on a masked copy of the input::

    x ---------------------- model(x) (your training forward) --+-- encoder features e_i (with gradients)
                                                                 +-- decoder feature d at 1/2 resolution
    x_masked = x where label > 0, else mask_value
      \\-- no_grad, encoder only (stops at the bottleneck) ------- encoder features m_i (constants)

    L_fd  = sum_i mean(1 - cos_channels(e_i, m_i))             over every encoder level and the bottleneck
    L_aux = BCE_with_logits(mean_channels(d), foreground at d's resolution)

Use in any training loop (plain, MONAI engine, nnU-Net ``train_step``) in this order::

    fd = FDLoss(model, example_input, mask_value=foreground_percentile(training_pairs)[0])
    for x, label in loader:
        logits = model(x)                 # 1. the normal forward: hooks keep e_i and d
        l_fd, l_aux = fd(x, label)        # 2. the masked pass and both losses
        loss = seg_loss(logits, label) + 0.1 * (l_fd + l_aux)
        loss.backward()
    fd.close()                            # or: with FDLoss(...) as fd:

Build ``FDLoss`` after :func:`prunekit3d.wrap` (and again after anything that replaces modules, like
slimming): its hooks sit on the module objects it found. Masking branches (prune/restore) is fine.

Which features: :func:`find_fd_features` traces one forward and reads the resolution profile of the
module outputs (see its docstring); pass ``encoder=[names]`` and ``decoder_half=name`` to choose.
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunekit3d.modes import eval_mode
from prunekit3d.wrap import _tensors, unwrap

__all__ = ["FDFeatures", "FDLoss", "find_fd_features", "foreground_percentile"]


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


# ---- detection ------------------------------------------------------------------------------------


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

    modules = list(dict.fromkeys(model.modules()))
    handles = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in modules]
    handles += [m.register_forward_hook(post, with_kwargs=True) for m in modules]
    try:
        # eval: no deep-supervision side paths, no dropout; the sizes are the same
        with eval_mode(model), torch.no_grad():
            output = model(example_input)
    finally:
        for h in handles:
            h.remove()
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


# ---- mask value -----------------------------------------------------------------------------------


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


# ---- the loss -------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the last encoder hook in the masked pass, so that the decoder never runs."""


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        hint = difflib.get_close_matches(name, [n for n, _ in model.named_modules()], n=3)
        raise ValueError(
            f"{type(model).__name__} has no module {name!r}"
            + (f"; did you mean {hint}?" if hint else "")
            + " Use names from model.named_modules()."
        ) from None


@contextmanager
def _frozen_running_stats(norms: list[nn.Module]) -> Iterator[None]:
    """The masked input must not move batch-norm running statistics: put them back afterwards."""
    saved = [[b.clone() for b in m.buffers(recurse=False)] for m in norms if m.training]
    try:
        yield
    finally:
        for m, buffers in zip([m for m in norms if m.training], saved):
            for b, old in zip(m.buffers(recurse=False), buffers):
                b.copy_(old)


def _foreground(label: torch.Tensor | Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Boolean foreground ``(B, 1, *S)`` from class-index labels ``(B, 1, *S)`` or ``(B, *S)``."""
    if isinstance(label, (list, tuple)):  # nnU-Net's deep-supervision targets: full resolution first
        label = label[0]
    if label.dim() == x.dim() - 1:
        label = label[:, None]
    if label.dim() != x.dim() or label.shape[1] != 1 or label.shape[0] != x.shape[0] or label.shape[2:] != x.shape[2:]:
        raise ValueError(
            f"label {tuple(label.shape)} does not fit the input {tuple(x.shape)}: pass class indices of shape "
            f"(B, 1, *S) or (B, *S) at the input's resolution (0 = background; not one-hot)"
        )
    return label > 0


class FDLoss:
    """The functional-decoupling loss ``L_fd`` and the auxiliary decoder loss ``L_aux`` for any 3-D U-Net.

    Call order per training step: ``logits = model(x)`` first (forward hooks keep the encoder
    features and the 1/2-resolution decoder feature, with their gradients), then ``l_fd, l_aux =
    fd(x, label)``, which runs the encoder alone on the masked input, without gradients, and stops
    after the bottleneck. Only the real-input features carry gradients.

    - Masked input: ``x`` where ``label > 0``, ``mask_value`` elsewhere (per channel if a sequence).
    - ``L_fd = sum_i mean(1 - cosine_similarity(e_i, m_i, dim=channels))`` over the encoder features.
    - ``L_aux = BCE_with_logits(d.mean(channels), foreground)`` with the foreground downsampled to the
      decoder feature's size by nearest neighbour (the usual rule for deep-supervision targets, so
      the foreground matches what a segmentation loss at that scale sees).

    Both are computed in float32 (also under autocast) and stay finite on a patch without foreground.
    The masked pass runs in the model's current mode; batch-norm running statistics are restored
    after it. The hooks hold only the latest forward's features (``fd(...)`` releases them). Works
    with a ``DistributedDataParallel`` model (the hooks sit on the inner network).

    Args:
        model: the network, plain or DDP-wrapped, after :func:`prunekit3d.wrap` if you wrap it.
        example_input: a 5-D input for the one traced forward of :func:`find_fd_features`; not needed
            when both ``encoder`` and ``decoder_half`` are given.
        mask_value: the background value of the masked input, e.g. ``foreground_percentile(...)[0]``.
        encoder: override: module names, one per encoder level, the bottleneck last.
        decoder_half: override: the decoder module whose output is the feature at 1/2 resolution.

    Example::

        >>> with FDLoss(model, torch.randn(1, 1, 64, 64, 64), mask_value=-0.9) as fd:
        ...     logits = model(x)
        ...     l_fd, l_aux = fd(x, label)
        ...     (seg_loss(logits, label) + 0.1 * (l_fd + l_aux)).backward()
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor | None = None,
        *,
        mask_value: float | Sequence[float],
        encoder: Sequence[str] | None = None,
        decoder_half: str | None = None,
    ) -> None:
        net = unwrap(model)
        if isinstance(encoder, str) or (encoder is not None and (not encoder or len(set(encoder)) != len(encoder))):
            raise ValueError(f"encoder must be distinct module names, the bottleneck last; got {encoder!r}")
        if encoder is None or decoder_half is None:
            if example_input is None:
                raise ValueError("pass example_input (one 5-D training patch) or both encoder= and decoder_half=")
            found = find_fd_features(net, example_input)
            self.features = FDFeatures(
                list(encoder) if encoder is not None else found.encoder,
                decoder_half if decoder_half is not None else found.decoder_half,
                found.encoder_sizes if encoder is None else [],
                found.decoder_half_size if decoder_half is None else [],
            )
        else:
            self.features = FDFeatures(list(encoder), decoder_half, [], [])
        if self.features.decoder_half in self.features.encoder:
            raise ValueError(f"decoder_half {self.features.decoder_half!r} is also an encoder module; name two modules")
        self._net = net
        self._mask_value = torch.as_tensor(mask_value, dtype=torch.float32).reshape(1, -1, 1, 1, 1)
        norm_types = nn.modules.batchnorm._NormBase  # batch and instance norms, the ones with running stats
        self._norms = [m for m in net.modules() if isinstance(m, norm_types) and m.track_running_stats]
        self._real: dict[str, torch.Tensor] = {}
        self._masked: dict[str, torch.Tensor] | None = None  # set only while the masked pass runs
        modules = {name: _module(net, name) for name in [*self.features.encoder, self.features.decoder_half]}
        self._handles = [
            modules[name].register_forward_hook(self._hook(name, is_encoder=name != self.features.decoder_half))
            for name in modules
        ]

    def _hook(self, name: str, is_encoder: bool):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._masked is None:
                self._real[name] = output
            elif is_encoder:
                self._masked[name] = output
                if len(self._masked) == len(self.features.encoder):
                    raise _StopForward  # every encoder feature is in: skip the decoder

        return hook

    def __call__(
        self, x: torch.Tensor, label: torch.Tensor | Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L_fd, L_aux)`` for the batch ``x`` that the model just ran on, with its ``label``."""
        real, self._real = self._real, {}  # drop the references whatever happens next
        wanted = [*self.features.encoder, self.features.decoder_half]
        if any(name not in real for name in wanted):
            raise RuntimeError(
                "FDLoss has no features from the model's forward: call logits = model(x) before fd(x, label), "
                "once per step, and build FDLoss again after anything replaced modules (wrap, slim). "
                f"Missing: {[n for n in wanted if n not in real]}"
            )
        foreground = _foreground(label, x)
        if self._mask_value.numel() not in (1, x.shape[1]):
            raise ValueError(f"mask_value has {self._mask_value.numel()} values for {x.shape[1]} input channels")
        masked_input = torch.where(foreground, x, self._mask_value.to(x.device, x.dtype))
        masked = self._encode(masked_input)
        terms = []
        for name in self.features.encoder:
            e, m = real[name], masked[name]
            if not isinstance(e, torch.Tensor) or e.shape != m.shape:
                raise RuntimeError(
                    f"feature {name!r} of the forward has shape {getattr(e, 'shape', None)} but the masked pass gave "
                    f"{tuple(m.shape)}: pass fd the same x the model just ran on"
                )
            terms.append((1 - F.cosine_similarity(e.float(), m.float(), dim=1)).mean())
        decoder = real[self.features.decoder_half]
        if not isinstance(decoder, torch.Tensor) or decoder.dim() != 5:
            raise RuntimeError(f"decoder_half {self.features.decoder_half!r} must return a 5-D feature map")
        target = F.interpolate(foreground.float(), size=decoder.shape[2:], mode="nearest-exact")
        l_aux = F.binary_cross_entropy_with_logits(decoder.float().mean(1, keepdim=True), target)
        return torch.stack(terms).sum(), l_aux

    def _encode(self, masked_input: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encoder features of the masked input, no gradients; the last encoder hook stops the forward."""
        self._masked = {}
        try:
            with torch.no_grad(), _frozen_running_stats(self._norms):
                self._net(masked_input)
        except _StopForward:
            pass
        finally:
            masked, self._masked = self._masked, None
        if len(masked) < len(self.features.encoder):
            missing = [n for n in self.features.encoder if n not in masked]
            raise RuntimeError(f"the masked forward never reached encoder modules {missing}: are they in the model?")
        return masked

    def close(self) -> None:
        """Remove the hooks; the model is as it was before."""
        for h in self._handles:
            h.remove()
        self._handles, self._real = [], {}

    def __enter__(self) -> FDLoss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
