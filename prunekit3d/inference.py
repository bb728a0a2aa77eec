"""Prediction: segment NIfTI images with a trained or compressed network, as ``prunekit3d predict`` does.

::

    MODEL (artifact | MONAI bundle) --load_predictor--> network + its preprocessing record + patch
    INPUT case (NIfTI file, or nnU-Net channel files) --record.prepare--> network input (C, X', Y', Z')
        --MONAI sliding window--> logits --Invertd onto the image's grid--> argmax --> DIR/<case>.nii.gz
                                                                              (the input's affine and header)

``backend="onnxruntime"`` / ``"openvino"`` runs an ONNX file instead (:func:`prunekit3d.deploy.onnx_predictor`): a
``prunekit3d quantize`` output folder's ``model.onnx`` or, with ``int8``, ``model.int8.onnx`` (also found as an
artifact's ``int8/``, where ``compress --int8`` writes it); any other model exported to ONNX on the fly.

An nnU-Net model folder (``plans.json`` + ``dataset.json``) goes to nnU-Net's own pipeline through
``prunekit3d.sources.nnunet.predict_folder``. Nothing is ever written over an input: ``DIR`` may not be or
hold one, and an existing segmentation is replaced only with ``overwrite`` and only if ``predict`` wrote it
(``DIR/manifest.json``, format ``prunekit3d.predictions``, lists what it wrote). Each file is written
atomically.

>>> predict("compressed/", "images/", "segmentations/")        # doctest: +SKIP
[PosixPath('segmentations/case_001.nii.gz'), ...]
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from prunekit3d.data.network_input import PARSE_HELP, Preprocessing
from prunekit3d.data.volumes import find_cases, read_case
from prunekit3d.evaluate import segmentation, sliding_window_logits
from prunekit3d.io.artifact import FORMAT as ARTIFACT_FORMAT
from prunekit3d.io.artifact import MANIFEST
from prunekit3d.io.errors import first_line
from prunekit3d.io.files import atomic_file, check_inputs_outside, manifest_format, sha256, write_json
from prunekit3d.quantize import QUANTIZED_FORMAT
from prunekit3d.sources.bundle import is_bundle

__all__ = ["BACKENDS", "DEFAULT_PATCH", "PREDICTIONS_FORMAT", "Predictor", "load_predictor", "predict", "resolve_patch",
           "resolve_preprocessing"]

#: Marks ``DIR/manifest.json`` of a folder of segmentations written by :func:`predict`.
PREDICTIONS_FORMAT = "prunekit3d.predictions"
#: The sliding-window patch when neither ``patch`` nor the artifact's ``extra["patch_size"]`` gives one.
DEFAULT_PATCH = (96, 96, 96)
#: Inference backends: PyTorch, or an ONNX file on ONNX Runtime / OpenVINO (CPU; :mod:`prunekit3d.deploy`).
BACKENDS = ("torch", "onnxruntime", "openvino")


@dataclass
class Predictor:
    """A network ready to segment images: the model (eval mode, on its device), how its input is made, and
    the sliding window it runs on. ``device``: where windows go (default: the model's parameters'); ``backend``
    names what runs; ``workdir`` keeps a temporary ONNX export alive as long as the predictor."""

    model: nn.Module
    preprocessing: Preprocessing
    patch: tuple[int, int, int]
    overlap: float
    in_channels: int
    source: str
    device: torch.device | None = None
    backend: str = "torch"
    workdir: Any = field(default=None, repr=False)

    def segment(self, name: str, files: Sequence[Path]) -> np.ndarray:
        """Class indices ``(X, Y, Z)`` of one case on its own grid (uint8 when they fit)."""
        volume = read_case(name, list(files))
        if volume.image.shape[0] != self.in_channels:
            raise ValueError(_channel_error(name, files, volume.image.shape[0], self.in_channels))
        prepared = self.preprocessing.prepare(volume)
        logits = sliding_window_logits(self.model, prepared.image, self.patch, overlap=self.overlap, device=self.device)
        classes = segmentation(prepared.to_original(logits)).numpy()
        return classes.astype(np.uint8 if classes.max(initial=0) < 256 else np.int16)


def _channel_error(name: str, files: Sequence[Path], given: int, expected: int) -> str:
    return (f"case {name!r} ({Path(files[0]).name}{' ...' if len(files) > 1 else ''}) has {given} channel(s), the "
            f"network takes {expected}; give {expected} channel file(s) per case (case_0000.nii.gz, case_0001.nii.gz"
            ", ...) or a 4-D image with channels last")


def _shape(path: Path) -> tuple[int, ...]:
    try:
        return tuple(nib.load(str(path)).shape)
    except Exception as err:  # noqa: BLE001 -- nibabel raises several types for damaged files
        raise ValueError(f"cannot read {path} as NIfTI: {first_line(err)}") from None


def _channels(files: Sequence[Path]) -> int:
    shape = _shape(Path(files[0]))
    if len(files) > 1:
        return len(files)
    return shape[3] if len(shape) == 4 else (shape[4] if len(shape) == 5 and shape[3] == 1 else 1)


def _check_backend(backend: str, int8: bool = False) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"--backend {backend!r}: use one of {list(BACKENDS)}")
    if int8 and backend == "torch":
        raise ValueError("--int8 runs the INT8 ONNX file of a quantize output: add --backend openvino (the fast one on "
                         "x86 CPUs) or --backend onnxruntime")
    extra = {"onnxruntime": "deploy", "openvino": "openvino"}.get(backend)
    if extra is not None and importlib.util.find_spec(backend) is None:
        raise ImportError(f"--backend {backend} needs {backend}: pip install 'prunekit3d[{extra}]'")


def _first_conv_channels(model: nn.Module) -> int:
    """Input channels of the network: its first 3-D convolution's, or in TorchScript its first 5-D weight's."""
    from prunekit3d.sources import first_conv

    if isinstance(model, torch.jit.ScriptModule):
        weight = next((p for p in model.parameters() if p.dim() == 5), None)
        if weight is None:
            raise ValueError(
                "the TorchScript network has no 3-D convolution weight; it is not a 3-D segmentation network"
            )
        return int(weight.shape[1])
    return int(first_conv(model)[1].in_channels)


def resolve_patch(patch: Sequence[int] | None, recorded: Any) -> tuple[int, int, int]:
    """The sliding window's patch: ``--patch`` if given, else the recorded one, else :data:`DEFAULT_PATCH`."""
    values = list(patch) if patch is not None else list(recorded) if recorded else list(DEFAULT_PATCH)
    values = values * 3 if len(values) == 1 else values
    if len(values) != 3 or min(int(v) for v in values) < 1:
        raise ValueError(f"--patch {values}: give 1 or 3 sizes >= 1")
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def resolve_preprocessing(
    recorded: Preprocessing | None, text: str | Preprocessing | None, spacing: Sequence[float] | None, where: str,
    console: Console,
) -> Preprocessing:
    """``--preprocessing`` if given (it overrides the record, said aloud), else the record; one is needed."""
    if text is None:
        if recorded is None:
            raise ValueError(
                f"{where} records no preprocessing (the manifest's extra {'preprocessing'!r}): say how its training "
                f"images were normalised with --preprocessing ({PARSE_HELP}), e.g. --preprocessing zscore"
            )
        return recorded if spacing is None else Preprocessing.from_dict({**recorded.to_dict(), "spacing": spacing})
    given = text if isinstance(text, Preprocessing) else Preprocessing.parse(text, spacing)
    if recorded is not None and recorded != given:
        console.print(f"[yellow]--preprocessing {given} replaces the recorded {recorded}[/yellow]")
    return given


def load_predictor(
    model: str | Path,
    *,
    preprocessing: str | Preprocessing | None = None,
    spacing: Sequence[float] | None = None,
    patch: Sequence[int] | None = None,
    overlap: float | None = None,
    device: str = "auto",
    onednn: bool = True,
    backend: str = "torch",
    int8: bool = False,
    console: Console | None = None,
) -> Predictor:
    """The network of a prunekit3d artifact or a MONAI bundle folder, ready for :meth:`Predictor.segment`.

    Args:
        model: an artifact directory (``manifest.json``; its ``extra["preprocessing"]`` record is needed unless
            ``preprocessing`` is given) or a MONAI bundle (``configs/inference.json``: its network, preprocessing
            and sliding-window inferer).
        preprocessing: ``--preprocessing`` text or a record; replaces the recorded one.
        spacing: resample to this spacing (mm) first; replaces the recorded one.
        patch, overlap: the sliding window; default the artifact's ``extra["patch_size"]`` (else 96^3) / the
            bundle's inferer, and 0.25.
        device: "auto", "cpu", "cuda", "cuda:N". onednn: route small CPU convolutions to oneDNN (faster on CPU).
        backend, int8: "torch", or an ONNX runtime ("onnxruntime", "openvino"; CPU) running the float or, with
            ``int8``, the INT8 file of a quantize output (:func:`prunekit3d.deploy.onnx_predictor`).

    Raises:
        FileNotFoundError, ValueError: one line naming the problem and the fix.
    """
    from prunekit3d.recipes.distributed import resolve_device
    from prunekit3d.runtime import use_onednn

    console = console or Console(stderr=True)
    _check_backend(backend, int8)
    if backend != "torch":
        from prunekit3d.deploy import onnx_predictor

        return onnx_predictor(model, backend=backend, int8=int8, preprocessing=preprocessing, spacing=spacing,
                              patch=patch, overlap=overlap, device=device, console=console)
    root = Path(model)
    if manifest_format(root) == QUANTIZED_FORMAT:
        raise ValueError(f"MODEL {root} is a prunekit3d quantize output (ONNX files): run it with --backend openvino "
                         "or --backend onnxruntime (add --int8 for its INT8 file)")
    if (root / MANIFEST).is_file() and manifest_format(root) == ARTIFACT_FORMAT:
        from prunekit3d.io import load_manifest
        from prunekit3d.sources import build_model

        net, _ = build_model(root, None)
        extra = load_manifest(root).get("extra") or {}
        recorded = Preprocessing.from_manifest({"extra": extra})
        window, default_overlap = extra.get("patch_size") or extra.get("patch"), 0.25  # compress's, train's
    elif is_bundle(root):
        from prunekit3d.sources.bundle import read_bundle

        bundle = read_bundle(root)
        net, recorded, window, default_overlap = bundle.network, bundle.preprocessing, bundle.patch, bundle.overlap
    elif not root.exists():
        raise FileNotFoundError(f"MODEL {root} does not exist; {_MODEL_HINT}")
    else:
        raise ValueError(f"MODEL {root} is not a model folder prunekit3d predicts with; {_MODEL_HINT}")
    pre = resolve_preprocessing(recorded, preprocessing, spacing, str(root), console)
    where = resolve_device(device)
    net = net.to(where).eval()
    if where.type == "cpu" and onednn:
        net = use_onednn(net)
    chosen = default_overlap if overlap is None else float(overlap)
    if not 0 <= chosen < 1:
        raise ValueError(f"--overlap {chosen}: give a fraction 0 <= overlap < 1 of the patch")
    return Predictor(net, pre, resolve_patch(patch, window), chosen, _first_conv_channels(net), str(root))


_MODEL_HINT = ("pass a prunekit3d artifact (manifest.json), a prunekit3d quantize output, a MONAI bundle folder "
               "(configs/inference.json) or an nnU-Net model folder (plans.json, dataset.json)")


def is_nnunet_folder(path: Path) -> bool:
    """Whether ``path`` is an nnU-Net model folder (``plans.json`` and ``dataset.json``)."""
    return (Path(path) / "plans.json").is_file() and (Path(path) / "dataset.json").is_file()


# ---- what may be written ------------------------------------------------------------------------------
def _check_out(out: Path, inputs: Sequence[Path]) -> None:
    """Refuse an ``out`` that is a file, or is or holds an input (symlinks resolved)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; the segmentations go into a directory: pick another path")
    check_inputs_outside(out, inputs)


def _written_before(out: Path) -> dict[str, Any]:
    """The ``files`` of ``out/manifest.json`` if :func:`predict` wrote it; refuses another tool's manifest."""
    file = out / MANIFEST
    if not file.exists():
        return {}
    if manifest_format(out) != PREDICTIONS_FORMAT:
        raise FileExistsError(f"{file} exists and is not a prunekit3d predictions manifest; pick another --out")
    return dict(json.loads(file.read_text(encoding="utf-8")).get("files") or {})


def _check_targets(out: Path, names: Sequence[str], written: dict[str, Any], overwrite: bool) -> None:
    for name in names:
        target = out / name
        if not target.exists():
            continue
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass --overwrite to replace segmentations prunekit3d predict "
                                  "wrote, or pick another --out")
        if name not in written:
            raise FileExistsError(f"{target} exists and was not written by prunekit3d predict (not in "
                                  f"{out / MANIFEST}); --overwrite replaces only those: move it or pick another --out")


def _write_segmentation(classes: np.ndarray, source: Path, target: Path) -> None:
    """``classes`` as NIfTI with the affine and header of ``source`` (its first image file), atomically."""
    image = nib.load(str(source))
    header = image.header.copy()
    header.set_data_dtype(classes.dtype)
    out = type(image)(classes, image.affine, header)
    out.header.set_slope_inter(1, 0)  # class indices, not scaled intensities
    out.header.set_intent("label")
    with atomic_file(target, suffix=".nii.gz") as tmp:
        nib.save(out, str(tmp))


# ---- predict ------------------------------------------------------------------------------------------
def predict(
    model: str | Path,
    inputs: str | Path,
    out: str | Path,
    *,
    backend: str = "torch",
    int8: bool = False,
    overwrite: bool = False,
    console: Console | None = None,
    **options: Any,
) -> list[Path]:
    """Segment every case of ``inputs`` (a NIfTI file or a folder) with ``model``; one ``out/<case>.nii.gz`` each.

    ``model`` is a prunekit3d artifact, a quantize output folder (``backend`` "onnxruntime" / "openvino", ``int8``
    for its INT8 file), a MONAI bundle folder or an nnU-Net model folder; ``options`` are
    :func:`load_predictor`'s (``preprocessing``, ``spacing``, ``patch``, ``overlap``, ``device``, ``onednn``).
    Everything is checked before the first case runs: the model, every input's header and channel count, and
    that no file would be written over an input or over a file ``predict`` did not write (``overwrite``
    replaces only segmentations an earlier ``predict`` wrote into ``out``).

    Returns:
        The segmentation files written, in case order.

    Raises:
        FileNotFoundError, FileExistsError, ValueError, ImportError: one line naming the problem and the fix.
    """
    console = console or Console(stderr=True)
    model, inputs, out = Path(model), Path(inputs), Path(out)
    _check_backend(backend, int8)
    cases = find_cases(inputs, "INPUT")
    _check_out(out, [inputs, model, *(f for files in cases.values() for f in files)])
    if is_nnunet_folder(model):
        if backend != "torch":
            raise ValueError(f"{model} is an nnU-Net model folder, which predicts through nnU-Net (--backend torch); "
                             "compress it to a prunekit3d artifact to run it on ONNX Runtime or OpenVINO")
        from prunekit3d.recipes.distributed import resolve_device

        device = options.get("device", "auto")
        return _predict_nnunet(model, inputs, out, device=str(resolve_device(device)), overwrite=overwrite)
    predictor = load_predictor(model, console=console, backend=backend, int8=int8, **options)
    for name, files in cases.items():
        given = _channels(files)
        if given != predictor.in_channels:
            raise ValueError(_channel_error(name, files, given, predictor.in_channels))
    names = {case: f"{case}.nii.gz" for case in cases}
    written = _written_before(out)
    _check_targets(out, list(names.values()), written, overwrite)
    record = {"format": PREDICTIONS_FORMAT, "format_version": 1, "model": str(model), "backend": predictor.backend,
              "preprocessing": predictor.preprocessing.to_dict(), "patch": list(predictor.patch), "files": written}
    paths = []
    with _progress(console) as bar:
        task = bar.add_task("predict", total=len(cases), case="")
        for case, files in cases.items():
            bar.update(task, case=case)
            target = out / names[case]
            _write_segmentation(predictor.segment(case, files), files[0], target)
            record["files"][names[case]] = {"input": [str(f) for f in files], "sha256": sha256(target)}
            write_json(out / MANIFEST, record)  # after every case: an interrupted run still owns what it wrote
            paths.append(target)
            bar.update(task, advance=1)
    return paths


def _progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("{task.fields[case]}"), console=console, disable=console.quiet)


def _predict_nnunet(model: Path, inputs: Path, out: Path, **options: Any) -> list[Path]:
    """nnU-Net model folders predict through nnU-Net's own pipeline (``prunekit3d.sources.nnunet``)."""
    try:
        nnunet = importlib.import_module("prunekit3d.sources.nnunet")
        predict_folder = nnunet.predict_folder
    except (ImportError, AttributeError) as err:
        raise ImportError(f"{model} is an nnU-Net model folder; predicting with it needs nnunetv2 and prunekit3d's "
                          f"nnU-Net support (pip install -e '.[nnunet]'): {first_line(err)}") from None
    return list(predict_folder(model, inputs, out, **options))
