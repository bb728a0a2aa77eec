"""A compressed network rebuilt from JSON alone: a base network spec plus prunekit3d's structural steps.

Frameworks that build a network from a class name and JSON keyword arguments (nnU-Net's plans, a MONAI
bundle's ``network_def``) can build a prunekit3d network through :class:`SlimNetwork`::

    SlimNetwork(base={"name": ... | "import_path": ..., ...}, steps=[...])
        base --from_spec--> base network --replay steps (wrap, channels, slim)--> slim network (self.network)

    load_state_dict(state):  state["prunekit3d_architecture"] (the steps as JSON bytes)
        same steps   --> load the weights
        other steps  --> rebuild self.network from base + those steps, then load the weights

The state dict carries its own architecture, so one built instance takes the weights of networks
compressed to different architectures from the same base (nnU-Net builds one network per model
folder and loads every fold's weights into it in turn). Nothing here runs code from the JSON: the
base goes through :func:`prunekit3d.io.spec.from_spec` (an ``nn.Module`` class or a registry name),
the steps are data replayed by :func:`prunekit3d.io.artifact.replay_steps`.

Example::

    >>> slim, steps = record_steps(pruned)                      # pruned: a wrapped + pruned network
    >>> net = SlimNetwork(base=spec, steps=steps)               # what a plans file or network_def names
    >>> net.load_state_dict(SlimNetwork.from_model(pruned, spec).state_dict())
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from prunekit3d.io.artifact import STEPS_ATTR, record_steps, replay_steps
from prunekit3d.io.spec import check_spec, from_spec

__all__ = ["ARCHITECTURE_KEY", "SlimNetwork", "decode_steps", "encode_steps"]

#: State-dict key of the steps (canonical JSON as a uint8 tensor): the weights say which architecture they fit.
ARCHITECTURE_KEY = "prunekit3d_architecture"


def encode_steps(steps: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """``steps`` as canonical JSON bytes in a uint8 tensor (a plain tensor: any weights-only loader reads it)."""
    text = json.dumps(list(steps), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8)


def decode_steps(encoded: torch.Tensor) -> list[dict[str, Any]]:
    """The steps :func:`encode_steps` wrote; a ValueError names a tensor that holds none."""
    if not isinstance(encoded, torch.Tensor) or encoded.dtype != torch.uint8 or encoded.dim() != 1:
        raise ValueError(f"{ARCHITECTURE_KEY} must be a 1-D uint8 tensor of JSON bytes")
    try:
        steps = json.loads(bytes(encoded.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{ARCHITECTURE_KEY} does not hold JSON steps ({err}); the weights are damaged") from None
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        raise ValueError(f"{ARCHITECTURE_KEY} must hold a JSON list of steps")
    return steps


class SlimNetwork(nn.Module):
    """The network that ``steps`` make of the base network ``base``, built from JSON alone.

    Args:
        base: JSON spec of the base network (:func:`prunekit3d.from_spec`: a registry name or an
            ``nn.Module`` class by import path).
        steps: the structural steps (:func:`prunekit3d.io.artifact.record_steps`, a manifest's
            ``steps``); empty builds the base network itself.
        deep_supervision: set ``decoder.deep_supervision`` of the built network (nnU-Net's and
            PSP-Seg's decoders) to this, now and after every rebuild; ``None`` leaves it as built.

    ``forward`` is the built network's. ``self.network`` is the built network (it carries the steps as
    ``prunekit3d_steps``, so compressing it again records them); ``self.decoder`` is its decoder.
    """

    def __init__(
        self, base: Mapping[str, Any], steps: Sequence[Mapping[str, Any]] = (), deep_supervision: bool | None = None
    ) -> None:
        super().__init__()
        self.base = check_spec(base)
        self.deep_supervision = deep_supervision
        self.network = self._build(steps)
        self.register_buffer(ARCHITECTURE_KEY, encode_steps(self.steps))

    @property
    def steps(self) -> list[dict[str, Any]]:
        """The structural steps of the current architecture (a copy)."""
        return copy.deepcopy(getattr(self.network, STEPS_ATTR, []))

    @property
    def decoder(self) -> nn.Module:
        """The built network's decoder: nnU-Net switches deep supervision through ``network.decoder``."""
        return self.network.decoder

    def _build(self, steps: Sequence[Mapping[str, Any]]) -> nn.Module:
        steps = [dict(s) for s in steps]
        # Replaying channel plans traces the network with autograd: also when the caller loads weights
        # under inference_mode / no_grad (nnU-Net's predictor loads each fold's weights there).
        with torch.inference_mode(False), torch.enable_grad():
            network = replay_steps(from_spec(self.base), steps, where="SlimNetwork steps")
        setattr(network, STEPS_ATTR, steps)
        if self.deep_supervision is not None:
            network.decoder.deep_supervision = self.deep_supervision
        return network

    def rebuild(self, steps: Sequence[Mapping[str, Any]]) -> None:
        """Replace the network by the one ``steps`` make of the base, on the same device, in the same mode.

        The networks built so far are kept (not as submodules) and reused: switching back and forth
        between folds replays each architecture once.
        """
        reference = next(iter([*self.network.parameters(), *self.network.buffers()]), None)
        cache: dict[bytes, nn.Module] = self.__dict__.setdefault("_built", {})
        cache[bytes(getattr(self, ARCHITECTURE_KEY).cpu().tolist())] = self.network
        key = bytes(encode_steps(steps).tolist())
        network = cache.pop(key, None) or self._build(steps)
        if reference is not None:
            network = network.to(reference.device)
        self.network = network.train(self.training)
        setattr(self, ARCHITECTURE_KEY, encode_steps(self.steps).to(getattr(self, ARCHITECTURE_KEY).device))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load weights, first rebuilding the network if they carry another architecture (see the module docstring)."""
        encoded = state_dict.get(ARCHITECTURE_KEY)
        if encoded is not None and not torch.equal(encoded.cpu(), getattr(self, ARCHITECTURE_KEY).cpu()):
            self.rebuild(decode_steps(encoded))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.network(*args, **kwargs)

    @classmethod
    def from_model(cls, model: nn.Module, base: Mapping[str, Any], **kwargs: Any) -> SlimNetwork:
        """A :class:`SlimNetwork` holding ``model`` (wrapped, pruned or plain) as its slim network, weights copied.

        ``base`` is the spec of the network ``model`` was made from; the rebuilt architecture is checked
        against ``model``'s, key by key and shape by shape. ``kwargs`` go to the constructor (e.g.
        ``deep_supervision``).
        """
        slim, steps = record_steps(model)
        built = cls(base=base, steps=steps, **kwargs)
        state = slim.state_dict()
        expected = built.network.state_dict()
        wrong = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
        if wrong or len(state) != len(expected):
            first = wrong[0] if wrong else sorted(set(state) - set(expected))[0]
            raise ValueError(f"the base spec and steps do not rebuild this {type(model).__name__}: {first!r} differs; "
                             "pass the spec of the network the model was made from")
        built.network.load_state_dict(state, strict=True)
        return built.train(model.training)
