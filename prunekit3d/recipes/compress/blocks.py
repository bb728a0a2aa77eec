"""Stages 1 and 2 of ``compress``: the light branches learn to stand in for the original blocks, then the
originals are replaced where that is safe and distillation prunes the light branches the output can spare::

    teacher --deepcopy, wrap--> student (every block: original + light branches, exactly the teacher at start)
    1 stand-in      block-wise distillation: each module's light branches learn to replace its original block
    2 blocks        originals replaced where the stand-in is good (lowest error first) until the budget is met;
                    end-to-end distillation while ProgressivePruner removes light branches -> DIR.partial/blocks

Replacing an original block by light branches is what makes block pruning save: the light branches of a
kept original are dropped, so a block never costs more than it did.
"""

from __future__ import annotations

import copy
import time

import torch
from rich.console import Console
from torch import nn

from prunekit3d.io import save
from prunekit3d.recipes.compress.distill import (
    distill_step,
    init_stand_ins,
    stand_in_errors,
    stand_in_parameters,
    stand_in_step,
)
from prunekit3d.recipes.compress.run import CompressRun
from prunekit3d.report import count_flops
from prunekit3d.schedule import ProgressivePruner
from prunekit3d.wrap import WrapSpec, apply_wrap_spec, redundant_modules, wrap, wrap_spec

__all__ = ["apply_replacements", "block_pruning", "build_student", "choose_replacements", "stand_in"]


def build_student(run: CompressRun) -> nn.Module:
    """The wrapped copy of the teacher (the same wrap spec on resume)."""
    student = copy.deepcopy(run.teacher).cpu()
    if "wrap_spec" in run.state:
        return apply_wrap_spec(student, WrapSpec.from_dict(run.state["wrap_spec"])).to(run.device)
    try:
        wrap(student, run.example, branches=run.cfg.branches, exp_ratio=run.cfg.exp_ratio)
    except ValueError as err:
        run.console.print(f"[yellow]block pruning skipped: {err}[/]")
    run.state["wrap_spec"] = wrap_spec(student).to_dict()
    return student.to(run.device)


def stand_in(run: CompressRun, student: nn.Module) -> None:
    """Phase 1: block-wise distillation of the light branches (each learns to replace its original)."""
    modules = run.wrapped_modules(student)
    started = time.perf_counter()
    if modules and run.cfg.blockwise_epochs:
        init_stand_ins(run.teacher, modules, run.calib_batches[0])
        optimizer = torch.optim.Adam(stand_in_parameters(modules), lr=run.cfg.lr)
        run.train("stand-in", "1/3 block-wise distillation", student, optimizer, run.cfg.blockwise_epochs,
                   lambda images, _: stand_in_step(run.teacher, modules, images, optimizer))
    run.state["stand_in_errors"] = stand_in_errors(run.teacher, modules, run.calib_batches) if modules else {}
    run.done("stand-in", started)


def _block_costs(run: CompressRun, student: nn.Module) -> dict[str, dict[str, float]]:
    """Per wrapped module: parameters and multiply-adds of the original and of its light branches."""
    modules = run.wrapped_modules(student)
    model = student.cpu().eval()
    flops = count_flops(model, run.example).by_module
    costs = {}
    for name, m in modules.items():
        whole, original = flops.get(name, 0), flops.get(f"{name}.branches.0", 0)
        light = sum(p.numel() for k, b in enumerate(m.branches) if k and m.active[k] for p in b.parameters())
        costs[name] = {
            "params_original": sum(p.numel() for p in m.branches[0].parameters()),
            "params_light": light,
            "flops_original": original,
            "flops_light": whole - original,
        }
    student.to(run.device)
    return costs


def choose_replacements(run: CompressRun, student: nn.Module) -> list[str]:
    """Replace originals, best stand-in first, while it is good enough and the budget is not yet met."""
    modules = run.wrapped_modules(student)
    errors = run.state["stand_in_errors"]
    costs = _block_costs(run, student)
    budget = run.cfg.budget
    kind = {"params": "params", "flops": "flops", "latency": "flops"}[budget[0]] if budget else "params"
    total = run.reference(kind)  # a latency budget is approached through multiply-adds here
    # Kept originals drop their light branches, so start from the original's own count.
    current = float(total)
    replaced = []
    for name in sorted(modules, key=lambda n: errors[n]):
        c = costs[name]
        saving = c[f"{kind}_original"] - c[f"{kind}_light"]
        if errors[name] > run.cfg.max_block_error or saving <= 0:
            continue
        if budget is not None and current <= budget[1] * total:
            break
        replaced.append(name)
        current -= saving
    return replaced


def apply_replacements(run: CompressRun, student: nn.Module, replaced: list[str]) -> None:
    """Mask the replaced originals, and every light branch of the blocks that keep their original."""
    for name, m in run.wrapped_modules(student).items():
        drop = [0] if name in replaced else [k for k in range(1, len(m.branches))]
        m.mask([k for k in drop if m.active[k]])


def block_pruning(run: CompressRun, student: nn.Module) -> None:
    """Phase 2: replace originals, then distil end to end while the pruner removes light branches."""
    started = time.perf_counter()
    cfg = run.cfg
    if "replaced" not in run.state:
        run.state["replaced"] = choose_replacements(run, student)
        run.save_state()
    apply_replacements(run, student, run.state["replaced"])
    prunable = any(len(m.active_indices()) > cfg.step for _, m in redundant_modules(student))
    pruner = None
    if cfg.epochs and (run.state["replaced"] or prunable):  # otherwise the student is still the teacher
        optimizer = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=cfg.lr)
        pruner = ProgressivePruner(
            student, lambda: iter(run.calib_batches), total_epochs=cfg.epochs, patience=cfg.patience,
            tolerance=cfg.tolerance, step=cfg.step, stop_fraction=1.0, calibration_batches=len(run.calib_batches),
            monitor=["distill"], console=Console(quiet=True),
        )
        run.train("blocks", "2/3 distillation + block pruning", student, optimizer, cfg.epochs,
                   lambda images, labels: distill_step(run.teacher, student, images, optimizer, labels=labels,
                                                      temperature=cfg.temperature),
                   pruner)
    run.state["pruner"] = pruner.history if pruner is not None else []
    run.state["active_branches"] = {n: m.active_indices() for n, m in redundant_modules(student)}
    # Nothing replaced and nothing to prune: the student is the teacher, so keep the teacher's own layers.
    untouched = pruner is None and not run.state["replaced"]
    save(run.teacher if untouched else student, run.partial / "blocks", spec=run.spec, overwrite=True)
    run.done("blocks", started)
