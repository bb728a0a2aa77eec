"""Deployment: INT8 of an artifact into a folder ``prunekit3d predict`` runs on its own, and ONNX predictors.

::

    ARTIFACT (its recorded preprocessing and patch) + --calib images
        --find_cases / read_case--> volumes (channels checked) --the RECORDED Preprocessing.prepare--> network input
        --PatchSampler (uniform crops, seeded)--> patches (1, C, *patch) --prunekit3d.quantize.quantize--> DIR/
    DIR/manifest.json (format "prunekit3d.quantized"): extra = the preprocessing record, patch_size, in_channels
        (an artifact manifest's keys), so ``prunekit3d predict DIR ... --backend openvino --int8`` needs nothing else

Calibration patches are windows of the size ``predict`` slides (the artifact's ``patch_size``), through the
same preprocessing, so that the activation ranges the quantizer calibrates are those inference meets.
``compress --int8`` quantizes on its own calibration patches into ``OUT/int8/`` (:func:`quantize_network`).

:func:`onnx_predictor` is ``predict --backend onnxruntime|openvino``: a quantize folder (or an artifact holding
one in ``int8/``) runs its ``model.onnx`` or, with ``int8``, ``model.int8.onnx``; any other model folder is
exported to ONNX in a temporary directory first (float only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from prunekit3d.data.network_input import Preprocessing
from prunekit3d.data.patches import PatchSampler
from prunekit3d.data.volumes import find_cases, read_case
from prunekit3d.io.files import manifest_format
from prunekit3d.quantize import (
    CALIBRATORS, FLOAT_FILE, INT8_FILE, MANIFEST, QUANTIZED_FORMAT, REPORT_FILE, QuantizeResult, onnx_input_shape,
    quantize,
)

__all__ = ["AGREEMENT_FLOOR", "INT8_DIR", "calibration_patches", "int8_advice", "int8_summary", "int8_warnings",
           "manifest_entry", "onnx_files", "onnx_predictor", "quantize_artifact", "quantize_network", "quantize_table",
           "quantized_folder"]

#: Where ``compress --int8`` puts the quantize folder inside its output directory.
INT8_DIR = "int8"


def manifest_entry(folder: Path, key: str, default: str) -> str:
    """A file name a quantize folder's ``manifest.json`` records (``"float"``, ``"int8"``, ``"report"``)."""
    data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    name = data.get(key, default) if isinstance(data, dict) else default
    return name if isinstance(name, str) and Path(name).name == name else default


def quantized_folder(path: str | os.PathLike) -> Path | None:
    """The quantize output folder ``path`` is, or holds as ``int8/`` (``compress --int8``); ``None`` if neither."""
    root = Path(path)
    for folder in (root, root / INT8_DIR):
        if folder.is_dir() and manifest_format(folder) == QUANTIZED_FORMAT:
            return folder
    return None


def onnx_files(paths: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Label -> ONNX file for ``prunekit3d report --onnx``: a quantize folder gives ``float`` and ``int8`` (prefixed
    with its name when several are given), an ``.onnx`` file its own name."""
    found: dict[str, Path] = {}
    for given in paths:
        path = Path(given)
        folder = quantized_folder(path)
        prefix = f"{path.name} " if len(paths) > 1 else ""
        if folder is not None:
            found.update({f"{prefix}float": folder / manifest_entry(folder, "float", FLOAT_FILE),
                          f"{prefix}int8": folder / manifest_entry(folder, "int8", INT8_FILE)})
        elif path.is_file() and path.suffix == ".onnx":
            found[path.name.removesuffix(".onnx")] = path
        elif not path.exists():
            raise FileNotFoundError(f"--onnx {path} does not exist; pass a prunekit3d quantize output folder or an "
                                    ".onnx file")
        else:
            raise ValueError(f"--onnx {path} is neither a prunekit3d quantize output folder nor an .onnx file")
    return found


# ---- calibration patches and the quantization ---------------------------------------------------------------
def calibration_patches(
    calib: str | os.PathLike, preprocessing: Preprocessing, patch: Sequence[int], *, in_channels: int,
    count: int = 16, seed: int = 0,
) -> list[torch.Tensor]:
    """``count`` random ``(1, C, *patch)`` patches of the images of ``calib`` (a NIfTI file or folder), each case
    run through ``preprocessing`` first. At most ``count`` cases are read (a seeded choice when there are more).

    Raises:
        FileNotFoundError: ``calib`` does not exist. ValueError: no image, an unreadable one, or one whose channel
        count is not ``in_channels`` -- one line each.
    """
    if count < 1:
        raise ValueError(f"--max-patches {count}: give at least 1")
    cases = find_cases(calib, "--calib")
    generator = torch.Generator().manual_seed(seed)
    names = sorted(cases)
    if len(names) > count:
        names = [names[i] for i in sorted(torch.randperm(len(names), generator=generator)[:count].tolist())]
    images = []
    for name in names:
        volume = read_case(name, cases[name])
        if volume.image.shape[0] != in_channels:
            raise ValueError(f"--calib case {name!r} ({Path(cases[name][0]).name}) has {volume.image.shape[0]} "
                             f"channel(s); the network takes {in_channels}: pass images of its modality/channels")
        images.append(preprocessing.prepare(volume).image)
    patches, _ = PatchSampler(images, None, patch).sample(count, generator)
    return [p[None].contiguous() for p in patches]


def quantize_network(
    model: nn.Module, batches: Sequence[torch.Tensor], out: str | os.PathLike, *,
    preprocessing: Preprocessing | None, patch: Sequence[int], source: str = "", calibrator: str = "minmax",
    after_concat_float: bool = False, overwrite: bool = False, runtimes: Sequence[str] | None = None,
    threads: int | None = None, repeats: int = 7,
) -> QuantizeResult:
    """:func:`prunekit3d.quantize.quantize` of ``model`` (on the CPU) into ``out``, with what ``predict`` needs in
    ``out/manifest.json``: the preprocessing record, ``patch_size`` and ``in_channels``."""
    from prunekit3d.sources import first_conv

    channels = int(first_conv(model)[1].in_channels)
    extra: dict[str, Any] = {"patch_size": [int(p) for p in patch], "in_channels": channels, "source": source}
    if preprocessing is not None:
        extra = preprocessing.into_extra(extra)
    return quantize(model.eval(), [b.detach().cpu() for b in batches], out, calibrator=calibrator,  # traced on batch 0
                    after_concat_float=after_concat_float,
                    preprocessing=None if preprocessing is None else preprocessing.to_dict(),
                    runtimes=runtimes, threads=threads, repeats=repeats, overwrite=overwrite, extra=extra)


def quantize_artifact(
    artifact: str | os.PathLike, calib: str | os.PathLike, out: str | os.PathLike, *,
    calibrator: str = "minmax", patch: Sequence[int] | None = None, max_patches: int = 16,
    preprocessing: str | None = None, after_concat_float: bool = False, seed: int = 0, overwrite: bool = False,
    runtimes: Sequence[str] | None = None, threads: int | None = None, repeats: int = 7,
    console: Console | None = None,
) -> QuantizeResult:
    """``prunekit3d quantize``: INT8 of a prunekit3d artifact, calibrated on ``max_patches`` patches of ``calib``
    through the artifact's recorded preprocessing (``preprocessing`` text replaces it), into ``out``.

    Everything is checked before anything is written: the artifact, ``out`` (replaced only with ``overwrite``
    and only if prunekit3d wrote it), the calibration images (exist, readable, channels).

    Raises:
        FileNotFoundError, FileExistsError, ValueError: one line naming the problem and the fix.
    """
    from prunekit3d.inference import resolve_patch, resolve_preprocessing
    from prunekit3d.io import load, load_manifest
    from prunekit3d.io.artifact import FORMAT
    from prunekit3d.io.files import check_output_dir
    from prunekit3d.sources import first_conv

    root = Path(artifact)
    if not root.exists():
        raise FileNotFoundError(f"ARTIFACT {root} does not exist; pass a prunekit3d artifact directory (manifest.json)")
    if manifest_format(root) != FORMAT:
        raise ValueError(f"ARTIFACT {root} is not a prunekit3d artifact (manifest.json of format {FORMAT!r}); "
                         "compress or save the network first (prunekit3d compress, prunekit3d.save)")
    if calibrator not in CALIBRATORS:
        raise ValueError(f"--calibrator {calibrator!r}: use one of {list(CALIBRATORS)}")
    check_output_dir(out, inputs=[root, calib], overwrite=overwrite)
    manifest = load_manifest(root)
    extra = manifest.get("extra") or {}
    console = console or Console(stderr=True)
    record = resolve_preprocessing(Preprocessing.from_manifest(manifest), preprocessing, None, str(root), console)
    window = resolve_patch(patch, extra.get("patch_size") or extra.get("patch"))
    model = load(root).eval()
    channels = int(first_conv(model)[1].in_channels)
    batches = calibration_patches(calib, record, window, in_channels=channels, count=max_patches, seed=seed)
    return quantize_network(model, batches, out, preprocessing=record, patch=window, source=str(root),
                            calibrator=calibrator, after_concat_float=after_concat_float, overwrite=overwrite,
                            runtimes=runtimes, threads=threads, repeats=repeats)


# ---- the report -----------------------------------------------------------------------------------------------
#: Below this agreement Dice of INT8 with float on the calibration patches, a runtime's INT8 is not recommended.
AGREEMENT_FLOOR = 0.9


def int8_advice(report: dict[str, Any]) -> tuple[str | None, list[str]]:
    """The runtime to run the INT8 file on -- the fastest whose INT8 agrees with float (:data:`AGREEMENT_FLOOR`) --
    and a warning line for each runtime whose INT8 does not."""
    agreement = report.get("agreement", {})
    latency = report.get("latency_ms", {})
    good = [r for r, a in agreement.items() if a["agreement_dice"] >= AGREEMENT_FLOOR and f"{r} int8" in latency]
    warnings = [f"{r} INT8 agrees with float at Dice {a['agreement_dice']:.3f} only (below {AGREEMENT_FLOOR}) on the "
                "calibration patches: do not deploy it; try --float-after-concat or another --calibrator"
                for r, a in agreement.items() if a["agreement_dice"] < AGREEMENT_FLOOR]
    return (min(good, key=lambda r: latency[f"{r} int8"]) if good else None), warnings


def _check_int8_agreement(folder: Path, backend: str) -> None:
    """Refuse an INT8 file on a runtime where quantize measured it to disagree with float: it would segment wrongly."""
    report = folder / manifest_entry(folder, "report", REPORT_FILE)
    measured = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {}
    dice = (measured.get("agreement", {}).get(backend) or {}).get("agreement_dice")
    if dice is not None and dice < AGREEMENT_FLOOR:
        good, _ = int8_advice(measured)
        instead = f"--backend {good}" if good else "the float model (drop --int8)"
        raise ValueError(f"{folder}: on {backend} the INT8 model agreed with float at Dice {dice:.3f} only (below "
                         f"{AGREEMENT_FLOOR}, {report.name}): use {instead}, or quantize again "
                         "with --float-after-concat")


def int8_warnings(paths: Sequence[str | os.PathLike]) -> list[str]:
    """:func:`int8_advice`'s warnings for the quantize folders among ``paths`` (from their ``quantize.json``)."""
    lines = []
    for path in paths:
        folder = quantized_folder(path)
        report = folder / manifest_entry(folder, "report", REPORT_FILE) if folder is not None else None
        if report is not None and report.is_file():
            lines += [f"{folder}: {w}" for w in int8_advice(json.loads(report.read_text(encoding="utf-8")))[1]]
    return lines


def int8_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline of a ``quantize.json`` report: sizes, the fastest INT8 path, latency and agreement."""
    keys = ("float_bytes", "int8_bytes", "size_ratio", "calibrator", "calibration_batches", "fastest_int8",
            "latency_ms", "agreement", "input_size", "threads", "float_op_types", "kept_float", "quantized_ops")
    return {k: report[k] for k in keys if k in report}


def quantize_table(report: dict[str, Any], title: str) -> Table:
    """One table of a ``quantize.json`` report: file sizes, paired latency per backend, INT8 vs float agreement."""
    table = Table(title=title)
    for col in ("", "MB / ms", "vs torch", "INT8 vs float: Dice, max |logit diff|"):
        table.add_column(col, justify="left" if col == "" else "right")
    if "int8_bytes" in report:
        table.add_row("float ONNX (MB)", f"{report['float_bytes'] / 2**20:.2f}", "", "")
        table.add_row("INT8 ONNX (MB)", f"{report['int8_bytes'] / 2**20:.2f}", f"{report['size_ratio']:.2f}x less",
                      "")
    latency = report.get("latency_ms", {})
    base = latency.get("torch")
    for label, ms in latency.items():
        runtime, _, kind = label.partition(" ")
        agree = report.get("agreement", {}).get(runtime) if kind == "int8" else None
        mark = ", fastest INT8" if label == report.get("fastest_int8") else ""
        table.add_row(f"{label}{mark} (ms)", f"{ms:.1f}", f"{base / ms:.2f}x" if base else "",
                      f"{agree['agreement_dice']:.3f}, {agree['max_logit_diff']:.2f}" if agree else "")
    size = "x".join(map(str, report.get("input_size", []))) or "-"
    kept = report.get("kept_float", [])
    table.caption = (f"{report.get('calibrator', '')} calibrator, {report.get('calibration_batches', '?')} calibration "
                     f"batches; latency at {size} on {report.get('threads', '?')} thread(s), timed in alternation; "
                     f"float: {', '.join(report.get('float_op_types', [])) or '-'}"
                     + (f" and {len(kept)} node(s) (quantize.json kept_float)" if kept else ""))
    return table


# ---- predict with an ONNX runtime -----------------------------------------------------------------------------
def onnx_predictor(
    model: str | os.PathLike, *, backend: str, int8: bool = False, preprocessing: str | Preprocessing | None = None,
    spacing: Sequence[float] | None = None, patch: Sequence[int] | None = None, overlap: float | None = None,
    device: str = "auto", threads: int | None = None, console: Console | None = None, **ignored: Any,
) -> Any:
    """A :class:`prunekit3d.inference.Predictor` running an ONNX file on ``backend`` (``"onnxruntime"``,
    ``"openvino"``) on the CPU; see the module docstring for which file. ``ignored``: ``onednn`` (torch only)."""
    from prunekit3d.backends import RUNTIMES
    from prunekit3d.inference import Predictor, load_predictor, resolve_patch, resolve_preprocessing

    if backend not in RUNTIMES:
        raise ValueError(f"--backend {backend!r}: use one of {['torch', *RUNTIMES]}")
    if str(device) not in ("auto", "cpu"):
        raise ValueError(f"--backend {backend} runs on the CPU; drop --device {device} (or use --backend torch)")
    console = console or Console(stderr=True)
    root = Path(model)
    folder = quantized_folder(root)
    if folder is None:
        if int8:
            raise ValueError(f"--int8 runs the INT8 file of a quantize output folder and {root} holds none: run "
                             f"`prunekit3d quantize {root} --calib IMAGES --out DIR` first, then predict with DIR")
        found = load_predictor(root, preprocessing=preprocessing, spacing=spacing, patch=patch, overlap=overlap,
                               device="cpu", onednn=False, console=console)
        from prunekit3d.export import export_onnx

        workdir = tempfile.TemporaryDirectory(prefix="prunekit3d-onnx-")  # removed with the predictor
        # not zeros: instance norms of a constant input divide rounding noise by eps, and the parity check fails
        example = torch.randn(1, found.in_channels, *found.patch, generator=torch.Generator().manual_seed(0))
        path = export_onnx(found.model, example, Path(workdir.name) / FLOAT_FILE)
        return dataclasses.replace(found, model=RUNTIMES[backend](path, threads), device=torch.device("cpu"),
                                   backend=f"{backend} float (exported)", workdir=workdir)
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    extra = manifest.get("extra") or {}
    if int8:
        _check_int8_agreement(folder, backend)
    file = folder / (manifest_entry(folder, "int8", INT8_FILE) if int8 else manifest_entry(folder, "float", FLOAT_FILE))
    pre = resolve_preprocessing(Preprocessing.from_manifest(manifest), preprocessing, spacing, str(folder), console)
    chosen = 0.25 if overlap is None else float(overlap)
    if not 0 <= chosen < 1:
        raise ValueError(f"--overlap {chosen}: give a fraction 0 <= overlap < 1 of the patch")
    channels = extra.get("in_channels") or onnx_input_shape(file)[1]
    if not isinstance(channels, int):
        raise ValueError(f"{file} has a dynamic channel axis and {folder / MANIFEST} records no in_channels")
    return Predictor(RUNTIMES[backend](file, threads), pre, resolve_patch(patch, extra.get("patch_size")), chosen,
                     int(channels), str(folder), device=torch.device("cpu"),
                     backend=f"{backend} {'int8' if int8 else 'float'}")
