"""Distillation: the compressed network learns from the original one, so no labels are needed.

Two losses, each with its training step:

Block-wise (:func:`stand_in_step`): each redundant module's light branches learn to stand in for the
original block they sit beside, one block at a time, all blocks in one pass::

    image --teacher (no grad)--> for every wrapped block b: its input x_b and output f_b(x_b)
    x_b --student module b, original branch masked: x_b + sum_k g_k LNB_k(x_b)--> y_b
    loss_b = ||y_b - f_b(x_b)||^2 / ||f_b(x_b) - x_b||^2

``loss_b`` is the *stand-in error*: 0 means the light branches replace the block exactly, 1 means they do
no better than dropping the block (the identity). Each module reads the teacher's block input, so the blocks
train independently and a poor stand-in early in the network does not disturb the later ones.

End-to-end (:func:`distill_step`): the whole student matches the teacher's output::

    image --teacher--> t --\\
    image --student--> s ---+--> KL(softmax(t) || softmax(s))   (sigmoid + BCE for one output channel)
                             +--> + Dice-CE(s, argmax t)       (the teacher's segmentation: every class counts)
                             \\--> + Dice-CE(s, label)          (only with labels: a supervised fine-tune)

Both networks run in eval mode: normalisation statistics, dropout and the output format (no deep-supervision
heads) stay what inference uses, so the student learns exactly the function it will compute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prunekit3d.evaluate import output_logits
from prunekit3d.redundant import RedundantModule

__all__ = [
    "capture_blocks",
    "FeatureMatch",
    "attention_map",
    "distill_step",
    "distillation_loss",
    "init_stand_ins",
    "logit_distillation",
    "stand_in_errors",
    "stand_in_parameters",
    "stand_in_step",
    "supervised_loss",
]


def logit_distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL divergence of the student's class probabilities from the teacher's at ``temperature``, per voxel,
    averaged and scaled by ``temperature ** 2`` (so its gradients keep their size, as in Hinton et al. 2015).

    One output channel is read as a sigmoid (binary) prediction: binary cross-entropy against the
    teacher's probability, minus the teacher's entropy, which is the same KL divergence.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student output {tuple(student.shape)} and teacher output {tuple(teacher.shape)} differ")
    s, t = student.float() / temperature, teacher.float() / temperature
    if s.shape[1] == 1:
        p = torch.sigmoid(t)
        entropy = F.binary_cross_entropy_with_logits(t, p)
        kl = F.binary_cross_entropy_with_logits(s, p) - entropy
    else:
        kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="none", log_target=True).sum(1).mean()
    return kl * temperature**2


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """:func:`logit_distillation` plus Dice + cross-entropy against the teacher's segmentation (its argmax).

    The KL term is an average over voxels, which background dominates; the Dice term weighs every class
    alike, so small structures keep the teacher's shape.
    """
    hard = (teacher[:, 0] > 0).long() if teacher.shape[1] == 1 else teacher.argmax(1)
    return logit_distillation(student, teacher, temperature) + supervised_loss(student, hard)


def supervised_loss(student: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Dice + cross-entropy of the student's output against integer labels ``(B, D, H, W)``."""
    s = student.float()
    if s.shape[1] == 1:
        target = (label > 0).float().unsqueeze(1)
        probs = torch.sigmoid(s)
        ce = F.binary_cross_entropy_with_logits(s, target)
    else:
        target = F.one_hot(label.long().clamp(0, s.shape[1] - 1), s.shape[1]).movedim(-1, 1).float()
        probs = torch.softmax(s, 1)
        ce = F.cross_entropy(s, label.long().clamp(0, s.shape[1] - 1))
    dims = tuple(range(2, s.dim()))
    dice = (2 * (probs * target).sum(dims) + 1e-5) / (probs.sum(dims) + target.sum(dims) + 1e-5)
    return ce + 1 - dice.mean()


@contextlib.contextmanager
def capture_blocks(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """While open, every forward of ``model`` stores ``{name: (block input, block output)}`` (detached)."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no blocks named {missing[:3]}")
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            store[name] = (args[0].detach(), output.detach())

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def stand_in_parameters(modules: Mapping[str, RedundantModule]) -> list[nn.Parameter]:
    """The light branches' weights and the modules' gates (the original blocks are not trained here)."""
    params: list[nn.Parameter] = []
    for m in modules.values():
        params.append(m.gates)
        for k, branch in enumerate(m.branches):
            if not m.is_original(k):
                params.extend(branch.parameters())
    return params


@torch.no_grad()
def init_stand_ins(teacher: nn.Module, modules: Mapping[str, RedundantModule], images: torch.Tensor) -> None:
    """Start every module's light branches at the scale of the change its original block makes.

    A light branch ends in an affine instance norm, so its output has zero mean and unit variance per
    channel, whatever the block it stands in for. Setting each branch's last norm to the per-channel mean
    and standard deviation of ``f(x) - x`` on ``images`` and its gate to ``1 / branches`` puts the stand-in
    at the right scale from the first step (a freshly wrapped module has light gates 0, whose weights
    would get no gradient at all).
    """
    with capture_blocks(teacher, list(modules)) as captured:
        teacher(images)
    for name, m in modules.items():
        x, y = captured[name]
        delta = (y - x).float().transpose(0, 1).flatten(1)  # (C, everything else)
        light = [k for k in range(len(m.branches)) if not m.is_original(k)]
        for k in light:
            norm = m.branches[k].norm2
            norm.weight.copy_(delta.std(1))
            norm.bias.copy_(delta.mean(1))
            m.gates[k] = 1.0 / len(light)


def _stand_in_terms(
    module: RedundantModule, x: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||y - f(x)||^2, ||f(x) - x||^2)`` of one module with its original branch masked."""
    was = module.active.clone()
    module.active[0] = False  # the light branches alone: what is left once the original goes
    try:
        y = module(x)
    finally:
        module.active.copy_(was)
    return (y.float() - target.float()).square().sum(), (target.float() - x.float()).square().sum()


def stand_in_step(
    teacher: nn.Module,
    modules: Mapping[str, RedundantModule],
    images: torch.Tensor,
    optimizer: torch.optim.Optimizer,
) -> float:
    """One block-wise distillation step on ``images``; returns the mean stand-in error over the modules."""
    with capture_blocks(teacher, list(modules)) as captured, torch.no_grad():
        teacher(images)
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for name, m in modules.items():
        x, target = captured[name]
        err, scale = _stand_in_terms(m, x, target)
        losses.append(err / scale.clamp_min(1e-12))
    loss = torch.stack(losses).mean()
    loss.backward()
    optimizer.step()
    return float(loss.detach())


@torch.no_grad()
def stand_in_errors(
    teacher: nn.Module, modules: Mapping[str, RedundantModule], batches: Sequence[torch.Tensor]
) -> dict[str, float]:
    """Stand-in error of every module over ``batches``: ``sum ||y - f(x)||^2 / sum ||f(x) - x||^2``."""
    err = dict.fromkeys(modules, 0.0)
    scale = dict.fromkeys(modules, 0.0)
    for images in batches:
        with capture_blocks(teacher, list(modules)) as captured:
            teacher(images)
        for name, m in modules.items():
            e, s = _stand_in_terms(m, *captured[name])
            err[name] += float(e)
            scale[name] += float(s)
    return {name: err[name] / max(scale[name], 1e-12) for name in modules}


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """Where a feature map is active, independent of its channels: ``mean_c(f^2)``, flattened and L2-normalised
    per sample (attention transfer, Zagoruyko & Komodakis 2017). A pruned layer keeps fewer channels than the
    original's, so this is what both can be compared by."""
    a = feature.float().pow(2).mean(1).flatten(1)
    return F.normalize(a, dim=1)


class FeatureMatch:
    """The attention maps of the same named modules of teacher and student, for one forward of each.

    Args:
        teacher, student: the two networks (the student's modules keep the teacher's names: channel pruning and
            slimming replace blocks in place).
        names: the modules compared, e.g. the encoder levels and the 1/2-resolution decoder feature
            (:func:`prunekit3d.find_fd_features`). Hooks are removed by :meth:`close`.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, names: Sequence[str]) -> None:
        self.names = list(names)
        self.maps: dict[str, dict[str, torch.Tensor]] = {"teacher": {}, "student": {}}
        self.handles = [
            dict(net.named_modules())[name].register_forward_hook(self._keep(role, name))
            for role, net in (("teacher", teacher), ("student", student)) for name in self.names
        ]

    def _keep(self, role: str, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor) and output.dim() == 5:
                self.maps[role][name] = attention_map(output)

        return hook

    def loss(self) -> torch.Tensor:
        """Mean squared distance of the attention maps of the latest forwards, summed over the modules (x 1000,
        the paper's scale, which puts it at the size of the logit terms)."""
        t, s = self.maps["teacher"], self.maps["student"]
        terms = [(s[n] - t[n].detach()).pow(2).mean() for n in self.names if n in s and n in t]
        return 1000 * torch.stack(terms).sum() if terms else torch.zeros(())

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def distill_step(
    teacher: nn.Module,
    student: nn.Module,
    images: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    labels: torch.Tensor | None = None,
    clip: float = 12.0,
    temperature: float = 1.0,
    features: FeatureMatch | None = None,
    feature_weight: float = 1.0,
) -> float:
    """One end-to-end distillation step (plus the supervised loss with ``labels``, plus ``feature_weight`` times
    the feature term with ``features``); returns the loss."""
    with torch.no_grad():
        target = output_logits(teacher(images))
    optimizer.zero_grad(set_to_none=True)
    out = output_logits(student(images))
    loss = distillation_loss(out, target, temperature)
    if features is not None:
        loss = loss + feature_weight * features.loss()
    if labels is not None:
        loss = loss + supervised_loss(out, labels)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if clip > 0 and params:
        torch.nn.utils.clip_grad_norm_(params, clip)
    optimizer.step()
    return float(loss.detach())
