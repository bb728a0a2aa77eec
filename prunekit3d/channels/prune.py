"""Policy: how many channels each group of coupled layers loses, to a ratio or to a budget.

Mechanism (which layers are coupled) comes from :mod:`prunekit3d.channels.graph`, scores from
:mod:`prunekit3d.channels.importance`; this module only decides::

    model -- build_graph --> groups of coupled channels (heads, gates, ignored layers left out)
          -- importance --> a score per channel of every group
          -- ratio / budget --> lowest-scoring channels removed, group by group (or ranked globally)
          -- record --> ChannelPlan appended to the model's channel record
"""

from __future__ import annotations

import contextlib
import difflib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from prunekit3d.channels.graph import (
    build_graph,
    channel_groups,
    output_layers,
    prunable_groups,
    sync_splits,
    sync_widths,
)
from prunekit3d.channels.importance import Importance, importance_scorer
from prunekit3d.channels.record import ChannelPlan, add_round
from prunekit3d.redundant import RedundantModule
from prunekit3d.report import count_flops, count_params
from prunekit3d.wrap import unwrap

__all__ = ["MAX_RATIO", "count_flops", "count_params", "kernel_widths", "prune_channels"]

#: No group of coupled channels ever loses more than this fraction (budgets and global ranking).
MAX_RATIO = 0.9
#: Ratio increment of the budget search (each increment is one pruning step).
BUDGET_STEP = 0.025


@dataclass
class _Target:
    """One group's removal candidates: scores per channel position (averaged over its blocks)."""

    root: nn.Module
    fn: Callable
    scores: torch.Tensor  # one per position within a block
    blocks: int  # channel blocks (group norm groups); a position is removed from every block
    initial: int  # positions per block before the round
    round_to: int = 1

    def keep(self, ratio: float) -> int:
        wanted = self.initial * (1.0 - ratio)
        return max(1, math.ceil(wanted - 1e-9)) if self.round_to <= 1 else self.snap(wanted)

    def snap(self, positions: float) -> int:
        """The kernel-friendly count of positions nearest ``positions`` (see :func:`kernel_widths`)."""
        allowed = [w // self.blocks for w in kernel_widths(self.initial * self.blocks, self.round_to)
                   if w % self.blocks == 0]
        return min(allowed, key=lambda p: (abs(p - positions), -p)) if allowed else positions

    def indices(self, positions: Sequence[int]) -> list[int]:
        size = len(self.scores)
        return sorted(p + b * size for p in positions for b in range(self.blocks))


def kernel_widths(width: int, round_to: int) -> list[int]:
    """The widths a layer of ``width`` channels may be pruned to: multiples of ``round_to``, the powers-of-two
    fractions of ``round_to`` below it, and ``width`` itself (ascending).

    A CPU's convolution kernels hold channels in vector-wide blocks (16 floats with AVX-512): a 22-channel layer
    runs as slowly as a 32-channel one, and odd widths below 16 take other, slower kernels
    (``benchmarks/conv_width.py``). ``round_to=1`` allows every width.
    """
    if round_to <= 1:
        return list(range(1, width + 1))
    allowed = {*range(round_to, width + 1, round_to), width}
    fraction = round_to
    while fraction % 2 == 0:
        fraction //= 2
        allowed.add(fraction)
    return sorted(w for w in allowed if w <= width)


@contextlib.contextmanager
def _zero_missing_grads(model: nn.Module, needed: bool) -> Iterator[None]:
    """Taylor scores need a gradient on every scored layer; layers the loss never reached score 0."""
    if not needed:
        yield
        return
    params = dict(model.named_parameters())
    if not any(p.grad is not None for p in params.values()):
        raise ValueError(
            "importance='taylor' scores channels by weight x gradient, but the model holds no gradients: "
            "run loss.backward() on real data first (or use importance='magnitude')"
        )
    missing = [name for name, p in params.items() if p.grad is None]
    for name in missing:
        params[name].grad = torch.zeros_like(params[name])
    try:
        yield
    finally:
        for name, p in model.named_parameters():  # pruning replaced the parameters; names are stable
            if name in missing:
                p.grad = None


@contextlib.contextmanager
def _keep_frozen(model: nn.Module) -> Iterator[None]:
    """Pruned layers get new parameters, trainable by default; frozen ones stay frozen (by name)."""
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    try:
        yield
    finally:
        for name, p in model.named_parameters():
            if name in frozen:
                p.requires_grad_(False)


def _resolve_ignored(model: nn.Module, ignored: Sequence[str | nn.Module] | None) -> list[nn.Module]:
    modules = dict(model.named_modules())
    out = []
    for item in ignored or ():
        if isinstance(item, nn.Module):
            out.append(item)
        elif item in modules:
            out.append(modules[item])
        else:
            hint = difflib.get_close_matches(str(item), list(modules), n=3)
            raise ValueError(
                f"ignored names a module that {type(model).__name__} does not have: {item!r}"
                + (f"; did you mean {hint}?" if hint else "; use names from model.named_modules()")
            )
    return out


def _stage(model: nn.Module) -> str:
    return "redundant" if any(isinstance(m, RedundantModule) for m in model.modules()) else "plain"


def _widths(model: nn.Module) -> dict[str, int]:
    return {
        name: m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
        for name, m in model.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    }


def _removals(targets: list[_Target], ratio: float, global_pruning: bool) -> list[tuple[_Target, list[int]]]:
    """Positions to remove from each target so that every group (or all together) keeps ``1 - ratio``."""
    if not global_pruning:
        out = []
        for t in targets:
            n = len(t.scores) - t.keep(ratio)
            if n > 0:
                out.append((t, torch.argsort(t.scores)[:n].tolist()))
        return out
    # Global: one ranking of all (normalised) scores, each group capped at MAX_RATIO.
    total = sum(len(t.scores) for t in targets) - math.ceil(sum(t.initial for t in targets) * (1.0 - ratio) - 1e-9)
    room = [max(0, len(t.scores) - t.keep(MAX_RATIO)) for t in targets]
    ranked = sorted((float(s), i, p) for i, t in enumerate(targets) for p, s in enumerate(t.scores.tolist()))
    chosen: dict[int, list[int]] = {}
    for _, i, p in ranked:
        if total <= 0:
            break
        if len(chosen.get(i, [])) < room[i]:
            chosen.setdefault(i, []).append(p)
            total -= 1
    out = []
    for i, t in enumerate(targets):
        positions = chosen.get(i, [])
        kept = len(t.scores) - len(positions)
        snapped = t.snap(kept) if t.round_to > 1 else kept  # the nearest kernel-friendly width: a few more or fewer
        if snapped != kept:
            positions = torch.argsort(t.scores)[: max(0, len(t.scores) - snapped)].tolist()
        if positions:
            out.append((t, positions))
    return out


def _step(
    graph: tp.DependencyGraph,
    scorer: Callable[[tp.Group], torch.Tensor | None],
    ignored: list[nn.Module],
    initial: dict[tuple[nn.Module, bool], int],
    ratio: float,
    global_pruning: bool,
    start_width: Callable[[nn.Module, bool], int | None],
    round_to: int,
) -> None:
    """Score every group on the current weights and prune each to ``ratio`` of its initial channels."""
    targets = []
    for root, fn, group in prunable_groups(graph, ignored):
        scores = scorer(group)
        if scores is None:  # no weighted layer in the group
            continue
        blocks = channel_groups(graph, group)
        # Taylor scores of a group the loss never reached are 0 / 0 after normalising: they rank first.
        per_block = torch.nan_to_num(scores.detach().float().cpu().view(blocks, -1).mean(0), nan=0.0)
        key = (root, graph.is_out_channel_pruning_fn(fn))
        width = start_width(*key)
        initial.setdefault(key, len(per_block) if width is None else width // blocks)
        targets.append(_Target(root, fn, per_block, blocks, initial[key], round_to))
    for target, positions in _removals(targets, ratio, global_pruning):
        # Indices are relative to the root layer, whose channels no other group touches, so a group is
        # built right before it is pruned: concatenation offsets then reflect the groups pruned so far.
        group = graph.get_pruning_group(target.root, target.fn, target.indices(positions))
        if graph.check_pruning_group(group):
            group.prune()
            sync_splits(graph)  # the next group maps its indices through the split sizes as they are now
    sync_widths(graph.model)


def _prune_to_budget(
    model: nn.Module,
    example_input: torch.Tensor,
    target_params: int | None,
    target_flops: int | None,
    step: Callable[[float], float],
) -> float:
    """Prune ``BUDGET_STEP`` more of every group at a time until the budget is met; the last ratio."""
    if target_params is not None:
        measure, budget = (lambda: count_params(model)), target_params
    else:
        measure, budget = (lambda: count_flops(model, example_input)), int(target_flops)  # type: ignore[arg-type]
    done = 0.0
    for k in range(1, round(MAX_RATIO / BUDGET_STEP) + 1):
        if measure() <= budget:
            return done
        done = step(round(k * BUDGET_STEP, 6))
    if measure() > budget:
        warnings.warn(
            f"channel pruning stopped at ratio {MAX_RATIO} with {measure():,} > budget {budget:,}: "
            "the heads and the layers left out hold too much; prune blocks first or raise the budget",
            stacklevel=3,
        )
    return done


def _check_input(example_input: torch.Tensor) -> None:
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 5:
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input).__name__
        raise ValueError(
            f"example_input must be a 5-D tensor (batch, channels, depth, height, width); got {shape}. "
            "Pass e.g. torch.randn(1, in_channels, 32, 32, 32)."
        )
    if example_input.shape[0] != 1:
        # Instance norm folds the batch into channels while tracing; one sample keeps channels apart.
        raise ValueError(f"example_input must hold one sample (batch size 1), got batch size {example_input.shape[0]}")


def prune_channels(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    ratio: float | None = None,
    target_params: int | None = None,
    target_flops: int | None = None,
    importance: Importance = "magnitude",
    global_pruning: bool = False,
    ignored: Sequence[str | nn.Module] | None = None,
    relative_to: nn.Module | None = None,
    round_to: int = 1,
) -> ChannelPlan:
    """Remove the least important channels of ``model`` in place, keeping every coupled layer consistent.

    torch-pruning's dependency graph (built by :func:`prunekit3d.channels.graph.build_graph`) groups
    the layers whose channels must shrink together: a conv's outputs with the next layers' inputs, a
    block's channels with its residual path, skip connections, concatenations, and inside redundant
    and slim modules each light branch's hidden channels. The heads' outputs, the network input and
    the gates are never pruned.

    Give exactly one of ``ratio`` (fraction of every group's channels to remove), ``target_params`` or
    ``target_flops`` (prune step by step, ``BUDGET_STEP`` of the channels at a time, until the model is
    within the budget; a warning says if ``MAX_RATIO`` is reached first).

    Args:
        model: any 3-D network, plain, wrapped, block-pruned or slim (``DataParallel`` is unwrapped).
        example_input: one sample ``(1, C, D, H, W)`` for tracing (and for counting FLOPs).
        ratio: fraction of channels to remove, ``0 < ratio < 1``.
        target_params: parameter budget of the pruned model.
        target_flops: FLOP budget of one forward pass on ``example_input``, in multiply-adds: the unit of
            :func:`prunekit3d.report.count_flops` (what ``prunekit3d report`` prints), so a fraction of a
            reported figure prunes to that fraction.
        importance: ``"magnitude"`` (group L2 norm), ``"taylor"`` (|weight x gradient|; backpropagate a
            loss on real data first) or a torch-pruning importance (``callable(group) -> scores``).
        global_pruning: rank channels across all groups (each capped at ``MAX_RATIO``) instead of
            removing ``ratio`` from every group.
        ignored: modules (or their qualified names) whose output channels stay.
        relative_to: an earlier state of ``model`` (layers matched by name) whose widths ``ratio`` is a
            fraction of, instead of the current ones. Rounds that prune a growing fraction of one start end at
            the widths one cut would give; fractions of each round's own widths compound their rounding (a
            group-norm layer of 2 channels per group loses nothing to 0.25, then half to 0.5, while its
            neighbours lose 0.25 and then half of the rest).
        round_to: every pruned layer keeps a width the kernels run fast (:func:`kernel_widths`): a multiple of
            ``round_to`` or a power-of-two fraction of it, the one nearest what the ratio or ranking asked (16
            for AVX-512 CPUs; 1 = any width). A layer's own width is always allowed.

    Returns:
        the :class:`ChannelPlan` of this round, also appended to ``channel_record(model)`` so that
        :func:`prunekit3d.save` stores it.

    Pruned layers get new parameter tensors: build the optimizer afterwards. The graph follows one
    training-mode forward; a layer that forward never runs (e.g. nnU-Net's deep-supervision heads of
    a network built without deep supervision) keeps its widths and no longer fits if switched on.

    Example::

        >>> from monai.networks.nets import BasicUNet
        >>> net = BasicUNet(3, 1, 2, features=(8, 8, 16, 32, 64, 8))
        >>> plan = prune_channels(net, torch.randn(1, 1, 32, 32, 32), ratio=0.5)
        >>> plan.reduction() > 0.6, net(torch.randn(1, 1, 32, 32, 32)).shape
        (True, torch.Size([1, 2, 32, 32, 32]))
    """
    _check_input(example_input)
    given = {"ratio": ratio, "target_params": target_params, "target_flops": target_flops}
    if sum(v is not None for v in given.values()) != 1:
        raise ValueError(f"give exactly one of ratio, target_params, target_flops; got {given}")
    if int(round_to) != round_to or round_to < 1:
        raise ValueError(f"round_to must be a whole number of channels >= 1 (1 = any width), got {round_to}")
    if ratio is not None and not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be between 0 and 1 (the fraction of channels removed), got {ratio}")
    for name in ("target_params", "target_flops"):
        if given[name] is not None and given[name] <= 0:
            raise ValueError(f"{name} must be a positive count, got {given[name]}")
    scorer, scorer_name = importance_scorer(importance)
    model = unwrap(model)
    stage = _stage(model)
    params_before, widths_before = count_params(model), _widths(model)

    graph = build_graph(model, example_input)
    ignored_layers = output_layers(graph) + _resolve_ignored(model, ignored)
    initial: dict[tuple[nn.Module, bool], int] = {}

    names = {m: n for n, m in model.named_modules()}
    earlier = dict(unwrap(relative_to).named_modules()) if relative_to is not None else {}

    def start_width(layer: nn.Module, out: bool) -> int | None:
        then = earlier.get(names.get(layer, ""))
        for attr in ("out_channels", "out_features") if out else ("in_channels", "in_features"):
            if hasattr(then, attr):
                return int(getattr(then, attr))
        return None

    def step(r: float) -> float:
        _step(graph, scorer, ignored_layers, initial, r, global_pruning, start_width, int(round_to))
        return r

    taylor = isinstance(scorer, tp.importance.GroupTaylorImportance)
    with _zero_missing_grads(model, needed=taylor), _keep_frozen(model):
        if ratio is not None:
            done = step(ratio)
        else:
            done = _prune_to_budget(model, example_input, target_params, target_flops, step)
    widths_after = _widths(model)
    plan = ChannelPlan(
        stage=stage,
        input_shape=list(example_input.shape),
        importance=scorer_name,
        global_pruning=global_pruning,
        ratio=float(done),
        params_before=params_before,
        params_after=count_params(model),
        widths={n: [w, widths_after[n]] for n, w in widths_before.items() if widths_after.get(n, w) != w},
        history=[[str(n), bool(out), [int(i) for i in idxs]] for n, out, idxs in graph.pruning_history()],
        round_to=int(round_to),
    )
    add_round(model, plan)
    return plan
