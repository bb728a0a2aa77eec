"""Compress a trained 3-D segmentation network to a budget, label-free: ``prunekit3d compress`` as a function.

The original network is the teacher; its wrapped copy is the student. The stages, one module each::

    checkpoint --sources--> teacher --wrap(deepcopy)--> student (redundant modules: original + light branches)
    blocks.stand_in        1 block-wise distillation: each module's light branches learn to replace its block
    blocks.block_pruning   2 originals replaced where the stand-in is good until the budget is met; end-to-end
                             distillation while ProgressivePruner removes light branches -> slim -> DIR.partial/blocks
    channels.channel_pruning  3 if the budget is still not met: channel pruning in rounds toward it, each followed
                             by end-to-end distillation (without anything to prune: one round of distillation)
    report.measure_result  params, FLOPs, latency, memory before / after; agreement Dice on the calibration volumes
    report.write_result    DIR: artifact + report.json + report.md (written beside DIR, renamed into place), and
                             with ``int8`` DIR/int8/: the network quantized on the calibration patches (deploy)

:mod:`~prunekit3d.recipes.compress.run` holds what the stages share (inputs, resume state, the training
loop); :mod:`~prunekit3d.recipes.compress.distill` the distillation losses.

Resuming: every stage and every epoch of a training stage is checkpointed (safetensors + JSON, written
atomically) into the sibling directory ``DIR.partial``; ``compress(config, resume=True)`` continues from the
last checkpoint with the same settings. ``DIR`` appears only complete, and ``DIR.partial`` is removed then.
Inputs are only read.

>>> from prunekit3d.recipes.compress import CompressConfig, compress
>>> result = compress(CompressConfig(checkpoint="dynunet.pt", out="small", calib="Task09_Spleen",
...     model="monai.networks.nets.DynUNet", model_kwargs={...}, target_params=0.5))
>>> result.report["params_after"] / result.report["params_before"] <= 0.5
True
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from rich.console import Console

from prunekit3d.io import load
from prunekit3d.io.files import atomic_directory, check_output_dir, write_json
from prunekit3d.sources.formats import Source, open_source
from prunekit3d.recipes.compress import blocks, channels
from prunekit3d.recipes.compress.config import CompressConfig
from prunekit3d.recipes.compress.report import CompressResult, measure_result, write_result
from prunekit3d.recipes.compress.run import RUN_FORMAT, CompressRun, Unreachable, partial_dir

__all__ = ["CompressConfig", "CompressResult", "CompressRun", "compress", "partial_dir"]


def compress(config: CompressConfig, *, resume: bool = False, console: Console | None = None) -> CompressResult:
    """Compress the network of ``config.checkpoint`` to the budget; see the module docstring.

    A MONAI bundle or an nnU-Net model folder comes back in its own format as well: ``DIR`` holds the
    artifact(s) and reports and ``DIR/bundle`` / ``DIR/nnunet`` the compressed bundle or model folder (every
    fold of an nnU-Net folder compressed on its own, ``DIR/fold_<k>``).

    Args:
        config: the run's settings.
        resume: continue the interrupted run kept in ``<out>.partial`` (same settings required).
        console: where progress and the table are printed (``Console(quiet=True)`` silences it).

    Returns:
        a :class:`CompressResult`; ``config.out`` holds the artifact, ``report.json`` and ``report.md``.

    Raises:
        FileNotFoundError, FileExistsError, ValueError: bad input, named in one line; nothing is written then.
    """
    console = console or Console()
    source = open_source(config.checkpoint, model=config.model, model_kwargs=config.model_kwargs,
                         spec_file=config.spec, folds=config.folds)
    for note in source.notes:
        console.print(f"[yellow]{note}[/]")
    if source.write is None:
        return _compress_one(config, resume, console, source, "model")
    return _compress_parts(config, resume, console, source)


def _compress_one(config: CompressConfig, resume: bool, console: Console, source: Source, part: str) -> CompressResult:
    run = CompressRun(config, resume, console, source, part)
    run.check_out()
    run.load_inputs()
    run.measure_original()
    if resume:
        _continue(run)
    else:
        channels.check_reachable(run)
        run.partial.mkdir(parents=True)
        run.save_state()
    try:
        return _stages(run)
    except Unreachable:
        shutil.rmtree(run.partial, ignore_errors=True)
        raise


def _compress_parts(config: CompressConfig, resume: bool, console: Console, source: Source) -> CompressResult:
    """Every part of a bundle or model folder compressed into ``DIR.parts/<part>``, then ``DIR`` written at once:
    the parts' artifacts and reports, and the source's format rebuilt from them."""
    out = Path(config.out)
    inputs = (config.checkpoint, config.calib, config.labels, config.spec)
    check_output_dir(out, inputs=inputs, overwrite=config.overwrite)
    parts_dir = out.with_name(out.name + ".parts")
    results = {}
    for part in source.teachers:
        done = parts_dir / part
        if resume and (done / "report.json").is_file():
            console.print(f"{part}: compressed before, kept")
            results[part] = CompressResult(done, json.loads((done / "report.json").read_text()), load(done))
            continue
        started = partial_dir(done).is_dir()
        sub = replace(config, out=str(done), overwrite=False)
        if len(source.teachers) > 1:
            console.rule(part)
        results[part] = _compress_one(sub, resume and started, console, source, part)
    single = list(results) == ["model"]
    with atomic_directory(out, overwrite=config.overwrite) as tmp:
        homes = {}
        for part, result in results.items():
            home = tmp if single else tmp / part
            shutil.copytree(result.out, home, dirs_exist_ok=True)
            homes[part] = home
        source.write(homes, tmp / source.kind)
        if not single:
            write_json(tmp / "manifest.json", {"format": "prunekit3d.compress", "format_version": 1,
                                               "source": str(source.path), "kind": source.kind,
                                               "parts": list(results)})
    shutil.rmtree(parts_dir, ignore_errors=True)
    last = results[list(results)[-1]]
    report = last.report if single else {"parts": {p: r.report for p, r in results.items()}}
    return CompressResult(out, report, last.model)


def _continue(run: CompressRun) -> None:
    """Take over the state of the interrupted run, if it was started with the same settings."""
    saved = json.loads((run.partial / "state.json").read_text(encoding="utf-8"))
    if saved.get("format") != RUN_FORMAT:
        raise ValueError(f"{run.partial} was started by another prunekit3d version; delete it to start over")
    mine = {k: v for k, v in run.state["config"].items() if k != "int8"}  # --int8 only adds a step at the end
    if {k: v for k, v in (saved.get("config") or {}).items() if k != "int8"} != mine:
        changed = sorted(k for k in mine if saved.get("config", {}).get(k) != mine[k])
        raise ValueError(f"{run.partial} was started with other settings ({', '.join(changed)} differ); "
                         "resume with the same flags, or delete it to start over")
    run.state = saved


def _stages(run: CompressRun) -> CompressResult:
    completed = run.state["completed"]
    if "blocks" not in completed:
        student = blocks.build_student(run)
        run.save_state()
        run.load_latest(student)
        if "stand-in" not in completed:
            blocks.stand_in(run, student)
        blocks.block_pruning(run, student)
    if "channels" not in completed:
        model = channels.channel_pruning(run)
    else:
        model = load(run.partial / f"round-{run.state['rounds'] - 1}").to(run.device)
    report, before, after = measure_result(run, model)
    write_result(run, model, report, before, after)
    shutil.rmtree(run.partial, ignore_errors=True)
    return CompressResult(run.out, report, model)
