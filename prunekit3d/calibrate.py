"""Scoring: measure on calibration data which branches each redundant module can do without.

For every redundant module with more than ``step`` active branches and every set ``S`` of ``step``
active branches::

    error(S) = sum over batches of || y_full - y_without_S ||_2

with the module's input taken from the unpruned network. Everything happens in ONE pass over the
data and nothing is cached across batches: inside each module, every branch's term ``g_k * delta_k(x)``
is computed once per batch and all candidate sets are evaluated from those terms::

    x --> [term_k for each active k] --> z = x + sum_k term_k --> y_full = act(z)   (passed on)
                                     \\--> y_without_S = act(z - sum_{k in S} term_k)  (scored only)

Without an output activation (every block :func:`prunekit3d.wrap` makes) ``y_full - y_without_S`` is
just ``sum_{k in S} term_k``, so all candidates are read off the terms' Gram matrix at the cost of one
matrix product. Sequential modules, whose branches feed each other, re-run their chain once per candidate set, still
batch by batch. Peak memory is one batch's activations, whatever the number of batches.

Scorers are pluggable: a scorer is a callable ``(module, x, candidates) -> (y_full, errors)``;
:class:`ReconstructionError` is the default. During the pass every scored module is in *scoring mode*
(``module.scoring``, which its forward honours; see :mod:`prunekit3d.redundant.modules`), reset afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from prunekit3d.modes import eval_mode
from prunekit3d.plan import ModuleDecision, PrunePlan
from prunekit3d.redundant import RedundantModule, SequentialRedundantModule
from prunekit3d.wrap import redundant_modules, unwrap

__all__ = ["Scorer", "ReconstructionError", "GateMagnitude", "calibrate", "candidate_sets"]

Candidate = tuple[int, ...]
#: Voxels per block of the float64 Gram product (8 MiB per branch term and block).
_GRAM_COLUMNS = 1 << 20


class Scorer(Protocol):
    """Scores candidate sets of one module on one batch; lower means safer to remove."""

    name: str

    def __call__(
        self, module: RedundantModule, x: torch.Tensor, candidates: list[Candidate]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the module's full output (passed on through the network) and one score per candidate."""
        ...


def _without(
    module: RedundantModule, x: torch.Tensor, z: torch.Tensor, terms: Mapping[int, torch.Tensor], s: Candidate
) -> torch.Tensor:
    if len(s) == len(terms):
        return x  # nothing left: the module is the identity
    rest = z
    for k in s:
        rest = rest - terms[k]
    return module.finish(rest)


class ReconstructionError:
    """``||y_full - y_without_S||_2`` per batch, from each branch's term computed once."""

    name = "reconstruction"

    def __call__(
        self, module: RedundantModule, x: torch.Tensor, candidates: list[Candidate]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(module, SequentialRedundantModule):
            return self._rerun(module, x, candidates)
        terms = module.contributions(x)
        z = x
        for t in terms.values():
            z = z + t
        y = module.finish(z)
        if not module.out_activation:
            return y, self._from_gram(terms, candidates)
        errors = torch.stack(
            [torch.linalg.vector_norm(y - _without(module, x, z, terms, s), dtype=torch.float64) for s in candidates]
        )
        return y, errors

    @staticmethod
    def _from_gram(terms: Mapping[int, torch.Tensor], candidates: list[Candidate]) -> torch.Tensor:
        """Without an output activation ``y_full - y_without_S = sum_{k in S} term_k``, so every
        candidate's norm follows from the terms' Gram matrix: one matrix product instead of a pass
        over the activations per candidate."""
        index = {k: i for i, k in enumerate(terms)}
        flat = [t.reshape(-1) for t in terms.values()]
        # float64 from the start, in column blocks: a float32 (or TF32) product over millions of voxels
        # loses the digits that separate close candidates, and a float64 copy of every term at once
        # would double the activations held.
        gram = torch.zeros(len(flat), len(flat), dtype=torch.float64, device=flat[0].device)
        for start in range(0, flat[0].numel(), _GRAM_COLUMNS):
            block = torch.stack([f[start : start + _GRAM_COLUMNS] for f in flat]).double()
            gram += block @ block.T
        pick = torch.zeros(len(candidates), len(index), dtype=torch.float64, device=gram.device)
        for row, s in enumerate(candidates):
            pick[row, [index[k] for k in s]] = 1.0
        squared = ((pick @ gram) * pick).sum(dim=1)
        return squared.clamp_min(0).sqrt()

    @staticmethod
    def _rerun(
        module: RedundantModule, x: torch.Tensor, candidates: list[Candidate]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y = module.compute(x)
        errors = []
        for s in candidates:
            module.mask(s)
            try:
                errors.append(torch.linalg.vector_norm(y - module.compute(x), dtype=torch.float64))
            finally:
                module.unmask(s)
        return y, torch.stack(errors)


class GateMagnitude:
    """Data-free baseline: ``sum_{k in S} |g_k|`` (a gate near zero marks a branch that adds little)."""

    name = "gate-magnitude"

    def __call__(
        self, module: RedundantModule, x: torch.Tensor, candidates: list[Candidate]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        gates = module.gates.detach().abs().double()
        return module.compute(x), torch.stack([gates[list(s)].sum() for s in candidates])


def candidate_sets(module: RedundantModule, step: int) -> list[Candidate]:
    """All sets of ``step`` active branches, in lexicographic order (the tie-break order)."""
    return list(itertools.combinations(module.active_indices(), step))


@contextlib.contextmanager
def _scoring(
    observers: Mapping[RedundantModule, Callable[[RedundantModule, torch.Tensor], torch.Tensor]]
) -> Iterator[None]:
    """Each module in scoring mode (its forward calls its observer) for the block; reset on exit."""
    for m, observe in observers.items():
        m.scoring = observe
    try:
        yield
    finally:
        for m in observers:
            m.scoring = None


def _image(batch: Any, image_key: str) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping) and image_key in batch:
        return batch[image_key]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]  # (image, label) pairs from a plain DataLoader
    got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise TypeError(f"calibration batch must be a tensor or a dict with key {image_key!r}; got {got}")


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    step: int = 1,
    scorer: Scorer | None = None,
    image_key: str = "image",
) -> PrunePlan:
    """Score every candidate set of ``step`` branches in every redundant module; one pass over ``batches``.

    Args:
        model: a model holding redundant modules (after :func:`prunekit3d.wrap`, or a PSP-Seg network).
        batches: any iterable of input tensors, ``(image, label)`` pairs or dicts with ``image_key``.
        step: branches to remove per module; modules with ``<= step`` active branches are skipped.
        scorer: defaults to :class:`ReconstructionError`.
        image_key: key of the input in dict batches (MONAI style).

    Returns:
        A :class:`~prunekit3d.plan.PrunePlan` with every candidate's error and the chosen set per
        module (lowest error; ties go to the first set in lexicographic order). Under
        ``torch.distributed`` the errors are summed over all ranks, so every rank decides the same.

    Example::

        >>> plan = calibrate(wrapped, [torch.randn(1, 1, 32, 32, 32) for _ in range(8)], step=1)
        >>> prune(wrapped, plan)
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    model = unwrap(model)
    scorer = scorer or ReconstructionError()
    scored = {name: m for name, m in redundant_modules(model) if len(m.active_indices()) > step}
    candidates = {name: candidate_sets(m, step) for name, m in scored.items()}
    totals = {name: torch.zeros(len(c), dtype=torch.float64) for name, c in candidates.items()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def observer(name: str) -> Callable[[RedundantModule, torch.Tensor], torch.Tensor]:
        def score(module: RedundantModule, x: torch.Tensor) -> torch.Tensor:
            y, errors = scorer(module, x, candidates[name])
            totals[name] += errors.detach().to("cpu", torch.float64)
            return y

        return score

    count = 0
    with eval_mode(model), _scoring({m: observer(name) for name, m in scored.items()}):
        for batch in batches:
            model(_image(batch, image_key).to(device))
            count += 1
    if dist.is_available() and dist.is_initialized():
        # A rank that got no batch contributes zeros: raising here would leave the others waiting in all_reduce.
        for name in sorted(totals):
            t = totals[name].to(device)
            dist.all_reduce(t)
            totals[name] = t.cpu()
        n = torch.tensor([count], device=device)
        dist.all_reduce(n)
        count = int(n.item())
    if count == 0:  # on every rank alike
        raise ValueError("calibrate got no batches: pass a non-empty iterable of input tensors")
    plan = PrunePlan(step=step, batches=count, scorer=scorer.name)
    for name, cands in candidates.items():
        errors = totals[name].tolist()
        best = min(range(len(cands)), key=lambda i: (errors[i], i))
        plan.modules[name] = ModuleDecision([list(c) for c in cands], errors, list(cands[best]))
    return plan
