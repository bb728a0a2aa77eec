"""Discovery: turn the shape-preserving blocks of any 3-D network into redundant modules.

``wrap`` runs ONE forward pass on an example input with hooks on every module, then picks the
*outermost* blocks that

- take one 5-D tensor and return one tensor of exactly the same shape (channels and resolution),
- contain a 3-D convolution on those channels (so never a lone norm or activation layer, never a
  channels-last transformer block),
- contain no down- or up-sampling (a shape-preserving module that resamples inside, like the
  nested levels of MONAI's UNet, is a sub-network: discovery descends into it),
- are neither the stem (reads the network input) nor a head (writes the network output).

Each picked block ``f`` becomes branch 0 of a redundant module (gate 1) beside new light
branches (gates 0), so the wrapped network computes exactly what it computed before.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Union

import torch
from torch import nn

from prunekit3d.modes import observed_forward
from prunekit3d.redundant import MODES, LightBranch, RedundantModule, kernel_family

__all__ = ["BlockSpec", "WrapSpec", "wrap", "redundant_modules", "find_blocks", "wrap_spec", "apply_wrap_spec",
           "unwrap"]

Targets = Union[Sequence[str], type, tuple[type, ...], Callable[[str, nn.Module], bool], None]


@dataclass
class BlockSpec:
    """How one block was wrapped (enough to rebuild the redundant module on a fresh base model)."""

    name: str
    channels: int
    kernels: list[list[int]]
    exp_ratio: float
    mode: str


@dataclass
class WrapSpec:
    """The wrap settings of a model: one :class:`BlockSpec` per redundant module. JSON round-trips."""

    blocks: list[BlockSpec] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": [asdict(b) for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WrapSpec:
        return cls([BlockSpec(**b) for b in data.get("blocks", [])])


@dataclass
class _Call:
    shape_in: tuple[int, ...] | None  # None: not a single 5-D tensor in and a tensor out
    shape_out: tuple[int, ...] | None
    reads_input: bool
    writes_output: bool


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (names stay stable)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def redundant_modules(model: nn.Module) -> list[tuple[str, RedundantModule]]:
    """``(qualified_name, module)`` of every redundant module in ``model``, in definition order."""
    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, RedundantModule)]


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a nested structure of tuples, lists and mappings, in order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, Mapping):
        for o in obj.values():
            yield from _tensors(o)


def _check_model_and_input(model: nn.Module, example_input: torch.Tensor) -> None:
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 5:
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__
        raise ValueError(
            f"example_input must be a 5-D tensor (batch, channels, depth, height, width); got {shape}. "
            "Pass e.g. torch.randn(1, in_channels, 32, 32, 32)."
        )
    kinds = {type(m) for m in model.modules()}
    has_3d = any(issubclass(k, (nn.Conv3d, nn.ConvTranspose3d)) for k in kinds)
    has_2d = any(issubclass(k, (nn.Conv2d, nn.Conv1d, nn.ConvTranspose2d)) for k in kinds)
    if not has_3d:
        what = "2-D/1-D convolutions and no 3-D ones" if has_2d else "no 3-D convolution"
        raise ValueError(
            f"{type(model).__name__} has {what}: prunekit3d wraps 3-D segmentation networks. "
            "Build the model with spatial_dims=3 (MONAI) or conv_op=nn.Conv3d (nnU-Net)."
        )


def _trace(model: nn.Module, example_input: torch.Tensor) -> dict[nn.Module, list[_Call]]:
    """One forward pass recording, for every module, the shapes it saw (in first-call order)."""
    records: list[tuple[nn.Module, tuple, dict, Any]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        records.append((module, args, kwargs, output))

    output = observed_forward(model, example_input, hook)
    outputs = {id(t) for t in _tensors(output)}
    calls: dict[nn.Module, list[_Call]] = {}
    for module, args, kwargs, out in records:
        ok = (
            len(args) == 1
            and not kwargs
            and isinstance(args[0], torch.Tensor)
            and args[0].dim() == 5
            and isinstance(out, torch.Tensor)
        )
        calls.setdefault(module, []).append(
            _Call(
                shape_in=tuple(args[0].shape) if ok else None,
                shape_out=tuple(out.shape) if ok else None,
                reads_input=any(a is example_input for a in _tensors(args)),
                writes_output=any(id(t) in outputs for t in _tensors(out)),
            )
        )
    return calls


def _resamples(call: _Call) -> bool:
    return call.shape_in is not None and call.shape_out is not None and call.shape_in[2:] != call.shape_out[2:]


def _shape_preserving(calls: list[_Call]) -> bool:
    return bool(calls) and all(c.shape_in is not None and c.shape_in == c.shape_out for c in calls)


def _has_conv_on(module: nn.Module, channels: int) -> bool:
    return any(type(m) is nn.Conv3d and channels in (m.in_channels, m.out_channels) for m in module.modules())


def find_blocks(model: nn.Module, example_input: torch.Tensor, targets: Targets = None) -> dict[str, int]:
    """Names and channel counts of the blocks that :func:`wrap` would replace, in forward order."""
    _check_model_and_input(model, example_input)
    calls = _trace(model, example_input)
    names = {m: n for n, m in model.named_modules()}  # canonical (first) name of each module

    def is_stem_or_head(module: nn.Module) -> bool:
        cs = calls.get(module, [])
        return _shape_preserving(cs) and any(c.reads_input or c.writes_output for c in cs)

    def eligible(module: nn.Module) -> bool:
        cs = calls.get(module, [])
        return (
            _shape_preserving(cs)
            and not is_stem_or_head(module)
            and _has_conv_on(module, cs[0].shape_in[1])  # type: ignore[index]
            and not any(_resamples(c) for m in module.modules() for c in calls.get(m, []))
        )

    if targets is None:
        chosen = _outermost(model, eligible, skip=is_stem_or_head)
    else:
        chosen = _select_targets(model, calls, targets)
    order = {m: i for i, m in enumerate(calls)}
    chosen.sort(key=lambda m: order.get(m, len(order)))
    blocks = {names[m]: calls[m][0].shape_in[1] for m in chosen}  # type: ignore[index]
    if not blocks:
        raise ValueError(
            f"found no shape-preserving block to wrap in {type(model).__name__}: no sub-module maps a 5-D "
            "feature map to the same shape through a 3-D convolution without resampling (stem and heads "
            "excluded). Pass targets=[qualified module names] to choose blocks, or check that the model is "
            "a 3-D CNN (an already wrapped model has nothing left to wrap)."
        )
    return blocks


def _outermost(
    model: nn.Module, eligible: Callable[[nn.Module], bool], skip: Callable[[nn.Module], bool] = lambda m: False
) -> list[nn.Module]:
    chosen: dict[nn.Module, None] = {}
    seen: set[nn.Module] = set()

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if child in seen or isinstance(child, RedundantModule):
                continue
            seen.add(child)
            if eligible(child):
                chosen[child] = None
            elif not skip(child):
                visit(child)

    visit(model)
    return list(chosen)


def _select_targets(model: nn.Module, calls: dict[nn.Module, list[_Call]], targets: Targets) -> list[nn.Module]:
    modules = dict(model.named_modules(remove_duplicate=False))
    modules.pop("", None)
    if isinstance(targets, str):
        targets = [targets]
    if isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets):
        missing = [t for t in targets if t not in modules]
        if missing:
            hint = difflib.get_close_matches(missing[0], list(modules), n=3)
            raise ValueError(
                f"targets name modules that {type(model).__name__} does not have: {missing}. "
                + (f"Did you mean {hint}? " if hint else "")
                + "Use names from model.named_modules()."
            )
        chosen = list(dict.fromkeys(modules[t] for t in targets))
    else:
        if isinstance(targets, type) or (isinstance(targets, tuple) and all(isinstance(t, type) for t in targets)):
            types = targets

            def predicate(name: str, module: nn.Module) -> bool:
                return isinstance(module, types)  # type: ignore[arg-type]
        elif callable(targets):
            predicate = targets  # type: ignore[assignment]
        else:
            raise TypeError("targets must be qualified names, module types, or a predicate(name, module) -> bool")
        names = {m: n for n, m in model.named_modules()}
        # Types and predicates select among the shape-preserving modules; names must be exact.
        chosen = _outermost(model, lambda m: _shape_preserving(calls.get(m, [])) and bool(predicate(names[m], m)))
        if not chosen:
            raise ValueError(
                f"targets={targets!r} matched no shape-preserving module of {type(model).__name__}; "
                "match blocks whose input and output have the same shape, or pass qualified names"
            )
    names = {m: n for n, m in model.named_modules()}
    for module in chosen:
        if not _shape_preserving(calls.get(module, [])):
            seen = [(c.shape_in, c.shape_out) for c in calls.get(module, [])]
            raise ValueError(
                f"target {names[module]!r} is not a shape-preserving block (one 5-D tensor in, same shape out); "
                f"in the example forward it was called {len(seen)} time(s) with (in, out) shapes {seen}. "
                "Choose a block whose input and output have the same channels and resolution."
            )
    return chosen


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` everywhere ``old`` is referenced (models like DynUNet hold blocks under two names)."""
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if module is old and name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, new)


def _place_like(new: nn.Module, original: nn.Module) -> nn.Module:
    ref = next((t for t in [*original.parameters(), *original.buffers()] if t.is_floating_point()), None)
    # Gates and light branches follow the block's device and floating dtype; masks stay boolean.
    return new if ref is None else new.to(device=ref.device, dtype=ref.dtype)


def apply_wrap_spec(model: nn.Module, spec: WrapSpec) -> nn.Module:
    """Replace the blocks named in ``spec`` by redundant modules, without tracing (used by ``load``)."""
    modules = dict(model.named_modules())
    for block in spec.blocks:
        if block.name not in modules:
            raise ValueError(f"wrap spec names block {block.name!r}, which this model does not have")
        if block.mode not in MODES:
            raise ValueError(f"mode={block.mode!r} is unknown; use one of {sorted(MODES)}")
        original = modules[block.name]
        new = MODES[block.mode](block.channels, branches=block.kernels, exp_ratio=block.exp_ratio, original=original)
        _replace(model, original, _place_like(new, original))
    return model


def wrap(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    branches: int | Sequence[Sequence[int]] = 7,
    exp_ratio: float = 0.5,
    targets: Targets = None,
    mode: str = "parallel",
) -> nn.Module:
    """Turn the shape-preserving blocks of ``model`` into redundant modules, in place.

    The wrapped model computes exactly what it computed before (the original block is branch 0 with
    gate 1; the light branches start with gate 0); its original parameters keep their values.
    Deep-copy the model first if you need the original too (e.g. as a distillation teacher).

    Args:
        model: any 3-D network (``nn.Module``) taking a 5-D tensor.
        example_input: a 5-D tensor ``(N, C, D, H, W)`` for the one traced forward pass.
        branches: light branches per block: 7, 4 or 1 (PSP-Seg kernel families) or kernel sizes.
        exp_ratio: hidden width of each light branch as a fraction of the block's channels.
        targets: override discovery: qualified module names, module type(s), or a
            ``predicate(name, module) -> bool`` (the outermost matches are taken).
        mode: ``"parallel"`` (PRM) or ``"sequential"`` (SRM).

    Returns:
        ``model``, with its blocks replaced.

    Example::

        >>> from monai.networks.nets import DynUNet
        >>> net = DynUNet(3, 1, 2, [3, 3, 3], [1, 2, 2], [2, 2]).eval()
        >>> x = torch.randn(1, 1, 32, 32, 32)
        >>> before = net(x)
        >>> net = wrap(net, x)
        >>> torch.allclose(net(x), before, atol=1e-5), len(redundant_modules(net)) > 0
        (True, True)
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; use one of {sorted(MODES)}")
    kernels = [list(k) for k in kernel_family(branches)]
    blocks = find_blocks(model, example_input, targets)
    spec = WrapSpec([BlockSpec(n, c, kernels, float(exp_ratio), mode) for n, c in blocks.items()])
    return apply_wrap_spec(model, spec)


def wrap_spec(model: nn.Module) -> WrapSpec:
    """The :class:`WrapSpec` that rebuilds the blocks :func:`wrap` replaced in ``model`` on its base network.

    Redundant modules that are part of the base network itself (the PSP-Seg networks) are not listed.
    """
    blocks = []
    for name, m in redundant_modules(model):
        if m.has_original:
            kernels = [list(b.kernel) for b in m.branches if isinstance(b, LightBranch)]
            blocks.append(BlockSpec(name, m.channels, kernels, m.exp_ratio, m.mode))
    return WrapSpec(blocks)

