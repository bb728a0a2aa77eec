"""Stage 3 of ``compress``: channel pruning toward the budget in rounds, each followed by distillation::

    DIR.partial/blocks --prune channels (prunekit3d.channels), an equal factor of the way per round--> pruned-<r>
                       --end-to-end distillation--> round-<r>          (without anything to prune: one round)

Pruning a little at a time and letting the network recover in between keeps far more of the original's
function than one cut to the budget. The budget (``target_params`` / ``target_flops``) is a fraction of the
ORIGINAL network's count.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from typing import Any

import torch
from torch import nn

from prunekit3d.channels import IMPORTANCES, prune_channels
from prunekit3d.channels.prune import MAX_RATIO
from prunekit3d.evaluate import output_logits
from prunekit3d.io import load, save
from prunekit3d.modes import kept_modes
from prunekit3d.fd import find_fd_features
from prunekit3d.recipes.compress.distill import FeatureMatch, distill_step, distillation_loss
from prunekit3d.recipes.compress.run import CompressRun, Unreachable

__all__ = ["channel_pruning", "check_reachable", "distillation_gradients", "prune_round"]


def check_reachable(run: CompressRun) -> None:
    """Fail now, not after training, if the budget is below what removing ``MAX_RATIO`` of the channels gives."""
    budget = run.cfg.budget
    if budget is None:
        return
    kind, ratio = budget
    floor = copy.deepcopy(run.teacher).cpu().requires_grad_(True)  # torch-pruning leaves frozen layers alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prune_channels(floor, run.example, ratio=MAX_RATIO, round_to=run.cfg.round_to)
    reached = run.count(floor, kind) / run.reference(kind)
    if reached > ratio:
        raise ValueError(
            f"the budget --target-{kind} {ratio:g} is unreachable: even removing {MAX_RATIO:.0%} of every layer's "
            f"channels keeps {reached:.3f} of the original {kind}; raise the budget"
        )


def channel_pruning(run: CompressRun) -> nn.Module:
    """Phase 3: channel pruning in rounds toward the budget, each round followed by end-to-end distillation.

    Pruning a little at a time and letting the network recover in between keeps far more of the original's
    function than one cut to the budget. With nothing to prune, one round of distillation alone. The last round
    is scored on the held-out calibration data after every epoch, keeps its best epoch, and distils on (up to
    twice its epochs) while that score still rises: the students that end worst are those the last cut set
    furthest back, still climbing when a fixed schedule stops. Each round writes ``pruned-<r>`` (right after
    pruning) and ``round-<r>`` (distilled) into the partial directory.
    """
    cfg = run.cfg
    started = time.perf_counter()
    rounds = run.state.setdefault("channel_rounds", [])
    model = load(run.partial / (f"round-{len(rounds) - 1}" if rounds else "blocks")).to(run.device)
    gradients = None  # Taylor's, of the weights before the first round: the allocation and round 0 share them
    if not rounds:
        needed = _needs_channels(run, model)
        run.state["rounds"] = cfg.channel_rounds if needed else 1
        if "allocation" not in run.state:  # chosen once: a resumed run keeps it (round 0 ranks by itself then)
            if needed and cfg.importance == "taylor":
                gradients = distillation_gradients(run, model)
            run.state["allocation"] = _choose_allocation(run, model, gradients) if needed else cfg.allocation
        run.save_state()
    total = run.state["rounds"]
    epochs = math.ceil(cfg.finetune_epochs / total)
    for r in range(len(rounds), total):
        pruned = run.partial / f"pruned-{r}"
        if pruned.is_dir():
            model = load(pruned).to(run.device)
        else:
            run.state["pruned"] = None
            if r < (cfg.prune_rounds or total) and _needs_channels(run, model):
                model, run.state["pruned"] = prune_round(run, model, r, total, gradients if r == 0 else None)
            save(model, pruned, spec=run.spec, overwrite=True)
            run.save_state()
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        title = f"3/3 channel round {r + 1}/{total} + distillation" if total > 1 else "3/3 distillation"
        last = r == total - 1 and bool(run.split.images["held_out"])
        features = FeatureMatch(run.teacher, model, _feature_points(run)) if cfg.feature_weight > 0 else None
        try:
            best = run.train(f"round-{r}", title, model, optimizer, epochs,
                             lambda images, labels: distill_step(
                                 run.teacher, model, images, optimizer, labels=labels, temperature=cfg.temperature,
                                 features=features, feature_weight=cfg.feature_weight),
                             score=run.agreement if last else None,
                             extend=epochs if last else 0)
        finally:
            if features is not None:
                features.close()
        if best is not None:
            run.state["best_epoch"] = best
        save(model, run.partial / f"round-{r}", spec=run.spec, overwrite=True)
        rounds.append(run.state.pop("pruned", None))
        run.save_state()
    _check_budget_met(run, model)
    run.done("channels", started)
    return model


def _needs_channels(run: CompressRun, model: nn.Module) -> bool:
    budget = run.cfg.budget
    if run.cfg.channels is not None:
        return True
    return budget is not None and run.count(model, budget[0]) > budget[1] * run.reference(budget[0])


def prune_round(run: CompressRun, model: nn.Module, r: int, total: int,
                gradients: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` pruned by round ``r``'s share: an equal factor of the way to the budget per round.

    Every round's ratio is a fraction of the widths before the first round (``DIR.partial/blocks``), so the
    last pruning round ends at the widths one cut to the budget would give: ratios of each round's own widths
    compound their rounding and overshoot (a group-norm network asked for 0.5 of its FLOPs ended at 0.14).
    With ``prune_rounds`` below ``total``, the budget is reached at round ``prune_rounds`` and later rounds
    only distil. Taylor importance reads ``gradients`` (of ``model``'s weights; computed here if not given).
    """
    cfg, budget = run.cfg, run.cfg.budget
    way = (r + 1) / min(total, cfg.prune_rounds or total)  # of the way to the budget after this round
    model = model.cpu()
    start = load(run.partial / "blocks")
    if gradients is None and cfg.importance == "taylor":
        gradients = distillation_gradients(run, model)
    if cfg.channels is not None:
        _set_gradients(model, gradients)
        plan = prune_channels(model, run.example, ratio=1 - (1 - cfg.channels) ** way,
                              relative_to=start, **_criterion(run, run.allocation))
    else:
        assert budget is not None
        kind, ratio = budget
        first = run.count(start, kind)
        target = first * (ratio * run.reference(kind) / first) ** way
        model, plan = _prune_to(run, model, kind, target, start, run.allocation, gradients)
    info = {"round": r, "ratio": plan.ratio, "params_before": plan.params_before, "params_after": plan.params_after,
            "widths": plan.widths}
    return model.to(run.device), info


def _prune_to(run: CompressRun, model: nn.Module, kind: str, target: float, start: nn.Module,
              allocation: str, gradients: dict[str, torch.Tensor] | None) -> tuple[nn.Module, Any]:
    """``model`` (a copy) with the least channel pruning -- one ratio of ``start``'s widths for every group of
    coupled layers -- that brings its parameters or fvcore FLOPs to ``target``: bisection on the ratio, each
    try on a copy (with ``gradients``, for Taylor importance)."""

    def attempt(r: float) -> tuple[nn.Module, Any, float]:
        trial = _set_gradients(copy.deepcopy(model), gradients)
        plan = prune_channels(trial, run.example, ratio=r, relative_to=start, **_criterion(run, allocation))
        return trial, plan, run.count(trial, kind)

    first = run.count(start, kind)
    lo, hi = 0.0, MAX_RATIO
    r = min(MAX_RATIO, max(0.01, 1 - math.sqrt(target / first)))  # convolutions: cost ~ width^2
    found = None
    for _ in range(8):
        trial, plan, value = attempt(r)
        if value <= target:
            found, hi = (trial, plan), r
            if value >= 0.97 * target:  # close enough: prune no more than needed
                break
        else:
            lo = r
        r = (lo + hi) / 2
    if found is None:
        trial, plan, value = attempt(MAX_RATIO)
        if value > target:
            asked = run.cfg.budget[1] if run.cfg.budget else target / run.reference(kind)
            raise Unreachable(
                f"the budget --target-{kind} {asked:g} is unreachable: removing "
                f"{MAX_RATIO:.0%} of the channels leaves {value / run.reference(kind):.3f} of the original "
                f"{kind}; raise the budget"
            )
        found = (trial, plan)
    return found


#: One ratio for every group must land at least this fraction of the budget, else all channels are ranked.
UNIFORM_LANDING = 0.8


def _choose_allocation(run: CompressRun, start: nn.Module, gradients: dict[str, torch.Tensor] | None) -> str:
    """The configured allocation; but "global" where "uniform" cannot come near a params / FLOP budget.

    Group norms and narrow layers make widths coarse (a 16-channel layer with 8 groups keeps 16 or 8): one ratio
    for every group then jumps past the budget (a SegResNet asked for 0.5 of its FLOPs lands at 0.25, its
    full-resolution layers halved with all the others). One ranking of all channels by importance lands nearer
    (x0.44, held-out agreement 0.74 on the benchmark's SegResNet); the one that lands nearer the budget is used.
    """
    cfg = run.cfg
    if cfg.allocation != "uniform" or cfg.budget is None or cfg.budget[0] == "latency":
        return cfg.allocation
    kind, ratio = cfg.budget
    target = ratio * run.reference(kind)
    landed = {}
    for allocation in ("uniform", "global"):
        one_cut, _ = _prune_to(run, start.cpu(), kind, target, start, allocation, gradients)
        landed[allocation] = run.count(one_cut, kind) / run.reference(kind)
        if landed[allocation] >= UNIFORM_LANDING * ratio:
            break
    start.to(run.device)
    run.state["allocation_landing"] = landed
    if landed.get("global", 0.0) <= landed["uniform"]:
        return "uniform"
    run.state["allocation_reason"] = (
        f"one pruning ratio for every layer group would keep {landed['uniform']:.2f} of the {kind} (asked "
        f"{ratio:g}), one ranking of all channels by importance {landed['global']:.2f}: the ranking was used "
        "(--allocation global)")
    return "global"


def _feature_points(run: CompressRun) -> list[str]:
    """Where the student's features follow the teacher's: every encoder level and the 1/2-resolution decoder
    feature (found as FD finds them), if the network lets them be found; else none."""
    try:
        found = find_fd_features(run.teacher, run.example.to(run.device))
    except ValueError:
        return []
    return [*found.encoder, found.decoder_half]


def _criterion(run: CompressRun, allocation: str) -> dict[str, Any]:
    """``prune_channels``'s importance and allocation for this run: which channels go, and from which groups.

    ``allocation``: "uniform" removes the same fraction of every group; "global" ranks all channels by
    importance. Taylor importance reads ``.grad``: :func:`distillation_gradients`, then :func:`_set_gradients`.
    """
    cfg = run.cfg
    return {"importance": IMPORTANCES[cfg.importance](), "global_pruning": allocation == "global",
            "round_to": cfg.round_to}


def distillation_gradients(run: CompressRun, model: nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the distillation loss on the calibration patches by parameter name, for Taylor importance.

    Computed on a copy: a network may keep tensors of a forward pass as attributes (MONAI's DynUNet keeps its
    deep-supervision outputs), and with their autograd graph it could no longer be copied for the pruning trials.
    One pass over the calibration patches per set of weights: the bisection's trials all read the same."""
    probe = copy.deepcopy(model)
    device = next(probe.parameters()).device
    with kept_modes(probe):
        probe.eval()
        for images in run.calib_batches:
            images = images.to(device)
            with torch.no_grad():
                target = output_logits(run.teacher.to(device)(images))
            distillation_loss(output_logits(probe(images)), target, run.cfg.temperature).backward()
    run.teacher.to(run.device)
    return {name: p.grad for name, p in probe.named_parameters() if p.grad is not None}


def _set_gradients(model: nn.Module, gradients: dict[str, torch.Tensor] | None) -> nn.Module:
    """``model`` with ``gradients`` (by parameter name) as its ``.grad``: what Taylor importance reads."""
    if gradients is not None:
        for name, p in model.named_parameters():
            grad = gradients.get(name)
            p.grad = None if grad is None else grad.to(p.device).clone()
    return model


def _check_budget_met(run: CompressRun, model: nn.Module) -> None:
    """A params / FLOP count is exact: above the budget, the run failed. A latency is a timing: the last round
    pruned until one measured within the budget, and the report's own timing says where it ended (a warning if
    above: one more timing on a shared machine can land a few percent higher, and distillation is not thrown away
    for that)."""
    budget = run.cfg.budget
    if budget is None or budget[0] == "latency":
        return
    kind, ratio = budget
    reached = run.count(model, kind) / run.reference(kind)
    if reached > ratio:
        raise Unreachable(
            f"the budget --target-{kind} {ratio:g} is unreachable: after block pruning and "
            f"{run.state['rounds']} round(s) of channel pruning the network keeps {reached:.3f} of the original "
            f"{kind}; raise the budget"
        )

# ---- report -------------------------------------------------------------------------------------------
