"""The FD loss ``L_fd`` and the auxiliary decoder loss ``L_aux`` from one masked, encoder-only pass (see
:mod:`prunekit3d.fd` for the data path and the call order)."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit3d.fd.features import FDFeatures, find_fd_features
from prunekit3d.wrap import unwrap

__all__ = ["FDLoss"]


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
