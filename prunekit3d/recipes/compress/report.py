"""The report of ``compress``: what the compressed network costs and keeps, measured against the original.

``report.json`` holds parameters, FLOPs, latency (original and compressed timed in alternation), memory,
agreement Dice with the original, Dice against labels if given, the budget and the plan (blocks replaced,
branches pruned, channel rounds); ``report.md`` says the same in a table and words.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.table import Table
from torch import nn

from prunekit3d.io import save
from prunekit3d.io.files import atomic_directory
from prunekit3d.recipes.compress.run import CompressRun
from prunekit3d.report import ModelReport, comparison_rows, comparison_table, measure, paired_latency
from prunekit3d.runtime import use_onednn

__all__ = ["LATENCY_PATHS", "CompressResult", "markdown_report", "measure_result", "write_result"]

#: Where the reported latency was measured (by whether the run is on a CPU).
LATENCY_PATHS = {True: "CPU, oneDNN convolutions (prunekit3d.use_onednn), as prunekit3d predict runs",
                 False: "the run's device, as the model is"}


@dataclass
class CompressResult:
    """What a run wrote: the output directory, its report (as in ``report.json``) and the compressed network."""

    out: Path
    report: dict[str, Any]
    model: nn.Module = field(repr=False)

    def tables(self) -> dict[str, Table]:
        """One before / after table per compressed part (``"model"``, or the folds of an nnU-Net folder)."""
        if "parts" not in self.report:
            return {"model": self.table()}
        return {part: CompressResult(self.out / part, r, self.model).table()
                for part, r in self.report["parts"].items()}

    def contents(self) -> str:
        """What ``out`` holds, in words."""
        kinds = [k for k in ("bundle", "nnunet") if (self.out / k).is_dir()]
        made = {"bundle": "bundle/ (the MONAI bundle, compressed)", "nnunet": "nnunet/ (the nnU-Net model folder, "
                "compressed: nnUNetv2_predict_from_modelfolder -m " + str(self.out / "nnunet") + ")"}
        where = "the artifact" if "parts" not in self.report else "one artifact per fold (fold_<k>/)"
        return ", ".join([f"{where} (prunekit3d.load), report.json, report.md", *(made[k] for k in kinds)])

    def table(self, extra: Sequence[tuple[str, str, str]] = (), title: str | None = None) -> Table:
        """The before / after table: costs, agreement Dice, Dice vs labels (if measured), plus ``extra`` rows."""
        r = self.report
        rows = [(name, b, a) for name, b, a in quality_rows(r)]
        budget = r.get("budget")
        if title is None:
            title = f"prunekit3d compress -> {self.out}"
            if budget:
                title += f" (budget: {budget['asked']:g} of the {budget['kind']}, reached {budget['reached']:.3f})"
        before, after = ModelReport.from_dict(r["before"]), ModelReport.from_dict(r["after"])
        table = comparison_table(before, after, [*rows, *extra], title=title)
        table.caption = "\n".join(f"warning: {w}" for w in r.get("warnings", [])) or None
        return table


def measure_result(run: CompressRun, model: nn.Module) -> tuple[dict[str, Any], ModelReport, ModelReport]:
    """``report.json``'s content: costs before / after (latency paired), agreement, the budget and the plan."""
    size = [1, run.in_channels, *run.patch]
    with run.progress() as bar:
        task = bar.add_task("measuring before / after", total=3, info="")
        before = measure(run.teacher, size, name="original", device=run.device, warmup=1, repeats=3)
        bar.update(task, advance=1)
        after = measure(model, size, name="compressed", device=run.device, warmup=1, repeats=3)
        # The latencies compared: timed in alternation, so that the machine's load drifts out of the ratio; on a
        # CPU on both paths, PyTorch's default and oneDNN (which small 3-D convolutions need to be fast).
        default = paired_latency([run.teacher, model], size, warmup=1, repeats=7)
        deployed = default
        if run.device.type == "cpu":
            deployed = paired_latency([use_onednn(copy.deepcopy(m)) for m in (run.teacher, model)], size, warmup=1,
                                      repeats=7)
        before, after = (replace(r, latency_ms=ms) for r, ms in zip((before, after), deployed))
        bar.update(task, advance=1)
        held_out = run.agreement(model, "held_out") if run.split.images["held_out"] else None
        distilled = run.agreement(model, "distill")
        bar.update(task, advance=1)
    budget = run.cfg.budget
    report: dict[str, Any] = {
        "params_before": before.params,
        "params_after": after.params,
        "flops_before": before.flops,
        "flops_after": after.flops,
        "latency_ms_before": before.latency_ms,
        "latency_ms_after": after.latency_ms,
        "latency_path": LATENCY_PATHS[run.device.type == "cpu"],
        "latency_default_path_ms_before": default[0],
        "latency_default_path_ms_after": default[1],
        # The honest figure: agreement on calibration data that distillation never saw.
        "agreement_dice": held_out if held_out is not None else distilled,
        "agreement_dice_distilled": distilled,
        "agreement_measured_on": run.split.description if held_out is not None else "the distillation data itself",
    }
    if "best_epoch" in run.state:  # the last round's held-out agreement per epoch, and the epoch kept
        report["best_epoch"] = run.state["best_epoch"]
    if run.split.labels is not None:
        part = "held_out" if held_out is not None else "distill"
        labels = [y.long() for y in run.split.labels[part]]
        report["dice_vs_labels_before"] = run.mean_dice(run.teacher, labels, part)
        report["dice_vs_labels_after"] = run.mean_dice(model, labels, part)
    if budget is not None:
        kind, ratio = budget
        key = "latency_ms" if kind == "latency" else kind
        reached = report[f"{key}_after"] / report[f"{key}_before"]
        report["budget"] = {"kind": kind, "asked": ratio, "reached": reached, "met": reached <= ratio}
    else:
        report["budget"] = None
    report["warnings"] = warnings_for(run, report)
    report["plan"] = {
        "wrapped_blocks": list(run.state.get("stand_in_errors", {})),
        "stand_in_errors": run.state.get("stand_in_errors", {}),
        "replaced_originals": run.state.get("replaced", []),
        "active_branches": run.state.get("active_branches", {}),
        "pruning_events": [
            {k: h[k] for k in ("kind", "epoch", "branches", "reason")} for h in run.state.get("pruner", [])
        ],
        "light_branches_pruned": sum(
            run.cfg.branches - len(run.state["active_branches"].get(n, []))
            for n in run.state.get("replaced", [])
        ),
        "channel_rounds": [r for r in run.state.get("channel_rounds", []) if r],
        "allocation": run.allocation,
        "round_to": run.cfg.round_to,
    }
    for key in ("allocation_landing", "allocation_reason"):  # where the allocation was chosen by landing
        if key in run.state:
            report["plan"][key] = run.state[key]
    report["before"], report["after"] = before.to_dict(), after.to_dict()
    report["calibration"] = {
        "images": len(run.split.images["distill"]), "held_out": run.split.description, "patch": list(run.patch),
        "preprocessing": str(run.preprocessing) if run.preprocessing is not None else run.source.kind,
    }
    report["timings_s"] = run.state["timings"]
    report["config"] = run.cfg.to_dict()
    return report, before, after


def quality_rows(report: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(quantity, original, compressed)`` rows: agreement (held out, and on the distillation data), Dice."""
    rows = [("agreement Dice with the original (held out)", "1.000", f"{report['agreement_dice']:.3f}")]
    if report["agreement_measured_on"] != "the distillation data itself":
        rows.append(("agreement Dice on the distillation data", "1.000", f"{report['agreement_dice_distilled']:.3f}"))
    if "dice_vs_labels_before" in report:
        rows.append(("Dice vs labels", f"{report['dice_vs_labels_before']:.3f}",
                     f"{report['dice_vs_labels_after']:.3f}"))
    return rows


def warnings_for(run: CompressRun, report: dict[str, Any]) -> list[str]:
    """What a user must know before trusting the result: low agreement, a budget that barely moved the cost."""
    out = []
    if report["agreement_dice"] < run.cfg.min_agreement:
        out.append(f"agreement with the original {report['agreement_dice']:.3f} on {report['agreement_measured_on']} "
                   f"is below --min-agreement {run.cfg.min_agreement:g}: the compressed network does not compute "
                   "what the original does; raise the budget or the distillation epochs")
    budget = report["budget"]
    if budget is not None and budget["kind"] == "latency" and not budget["met"]:
        out.append(f"the final timing gives {budget['reached']:.3f} of the original's latency, above --target-latency "
                   f"{budget['asked']:g}, which pruning met when it timed the network: timings on a busy "
                   "machine vary by several percent; re-time with prunekit3d report, or ask a lower budget")
    if budget is not None and budget["kind"] == "params":
        flops = report["flops_after"] / report["flops_before"]
        latency = report["latency_ms_after"] / report["latency_ms_before"]
        if max(flops, latency) > 0.8:
            out.append(f"--target-params {budget['asked']:g} left {flops:.2f} of the FLOPs and {latency:.2f} of the "
                       "latency: inference is barely cheaper; use --target-flops or --target-latency for speed")
    return out


def write_result(
    run: CompressRun, model: nn.Module, report: dict[str, Any], before: ModelReport, after: ModelReport
) -> None:
    """``DIR``: the artifact, ``report.json`` and ``report.md``, written beside it and renamed into place."""
    plans = [p for h in run.state.get("pruner", []) if h.get("kind") == "prune" for p in [h.get("plan")] if p]
    extra = {"compress": {k: report[k] for k in ("params_before", "params_after", "agreement_dice", "budget")},
             "patch_size": list(run.patch)}
    if run.preprocessing is not None:  # nnU-Net preprocesses in its own pipeline, which its folder records
        extra = run.preprocessing.into_extra(extra)
    with atomic_directory(run.out, overwrite=run.cfg.overwrite) as tmp:
        save(model, tmp, spec=run.spec, plans=plans, extra=extra)
        if run.cfg.int8:  # INT8 of the compressed network on the run's own calibration patches, beside the artifact
            from prunekit3d.deploy import INT8_DIR, int8_summary, quantize_network

            quantized = quantize_network(copy.deepcopy(model).cpu(), run.calib_batches, tmp / INT8_DIR,
                                         preprocessing=run.preprocessing, patch=run.patch, source=str(run.out))
            report["int8"] = {"dir": INT8_DIR, **int8_summary(quantized.report)}
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(markdown_report(report, before, after), encoding="utf-8")


def markdown_report(report: dict[str, Any], before: ModelReport, after: ModelReport) -> str:
    """``report.md``: the before / after table, the budget and the plan in words."""
    lines = ["# prunekit3d compress", "", "| quantity | original | compressed | compressed / original |",
             "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {b} | {a} | {ratio} |" for name, b, a, ratio in comparison_rows(before, after)]
    lines += [f"| {name} | {b} | {a} | |" for name, b, a in quality_rows(report)]
    lines += ["", f"Agreement measured on {report['agreement_measured_on']}, which distillation never saw."
              if report["agreement_measured_on"] != "the distillation data itself"
              else "Agreement measured on the distillation data itself (nothing was held out)."]
    best = report.get("best_epoch")
    if best and len(best.get("scores", [])) > 1:  # the kept epoch is the one that scored best on the same data
        lines[-1] += (f" The same figure chose the epoch kept (epoch {best['epoch'] + 1}, the best of "
                      f"{len(best['scores'])}: {min(best['scores']):.3f}-{max(best['scores']):.3f}), so on images "
                      "nothing saw expect it lower.")
    lines += ["", *(f"**Warning:** {w}" for w in report.get("warnings", []))]
    threads = f"{before.threads} thread{'s' if before.threads != 1 else ''}"
    size = "x".join(map(str, before.input_size))
    lines += ["", f"Input {size} on {before.device} ({threads}); latency: {report['latency_path']}, the original and "
              "the compressed network timed in alternation (PyTorch's default path: "
              f"{report['latency_default_path_ms_before']:.1f} -> {report['latency_default_path_ms_after']:.1f} ms); "
              f"memory: {before.memory_method}.", ""]
    int8 = report.get("int8")
    if int8:  # what the INT8 folder beside the artifact holds, and where it is measured to agree with float
        latency = ", ".join(f"{k} {v:.1f} ms" for k, v in int8.get("latency_ms", {}).items())
        agreement = ", ".join(f"{k} {v['agreement_dice']:.3f}" for k, v in int8.get("agreement", {}).items())
        lines += [f"INT8 in `{int8['dir']}/`: {int8['size_ratio']:.2f}x smaller than float ONNX; latency {latency}; "
                  f"INT8 vs float agreement on the calibration patches: {agreement}.", ""]
    budget = report.get("budget")
    if budget:
        lines.append(f"Budget: keep at most {budget['asked']:g} of the {budget['kind']}; reached "
                     f"{budget['reached']:.3f} ({'met' if budget['met'] else 'NOT met'}).")
    plan = report["plan"]
    rounds = plan["channel_rounds"]
    lines += [
        "",
        f"Plan: {len(plan['replaced_originals'])} of {len(plan['wrapped_blocks'])} wrapped blocks replaced by their "
        f"light branches, {plan['light_branches_pruned']} light branch(es) of those pruned for good; "
        + (f"{len(rounds)} round(s) of channel pruning ({plan['allocation']} allocation"
           + (f", widths of multiples of {plan['round_to']} or powers of two below" if plan["round_to"] > 1 else "")
           + "), "
           f"{rounds[0]['params_before']:,} -> {rounds[-1]['params_after']:,} parameters." if rounds
           else "no channel pruning.")
        + (f" {plan['allocation_reason'][0].upper()}{plan['allocation_reason'][1:]}."
           if "allocation_reason" in plan else ""),
        "",
        "| block | stand-in error | replaced | active branches |",
        "| --- | ---: | :---: | --- |",
    ]
    for name, err in plan["stand_in_errors"].items():
        replaced = "yes" if name in plan["replaced_originals"] else "no"
        lines.append(f"| {name} | {err:.3f} | {replaced} | {plan['active_branches'].get(name, [])} |")
    return "\n".join(lines) + "\n"
