"""``prunekit3d quantize``, ``predict --backend onnxruntime|openvino [--int8]`` and ``report``'s backends, on the
demo's trained DynUNet (shipped weights) and the bundled CT, with real ONNX Runtime and OpenVINO."""

from __future__ import annotations

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import prunekit3d as pk
from prunekit3d.backends import openvino_available
from prunekit3d.cli import main
from prunekit3d.data import Preprocessing
from prunekit3d.deploy import AGREEMENT_FLOOR, int8_advice, quantize_artifact
from prunekit3d.evaluate import mean_dice
from prunekit3d.inference import predict
from prunekit3d.recipes.demo import BASELINE_SPEC, PATCH, PREPROCESSING, baseline
from prunekit3d.report import ModelReport
from prunekit3d.sample import sample_dataset

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.threads(2)

CT = sample_dataset() / "imagesTr" / "ct_abdomen.nii.gz"
#: INT8 vs the torch backend on the whole bundled CT (demo baseline, 8 calibration patches). Measured for the
#: residual 16-128 DynUNet: 0.991 of the voxels, Dice 0.939 (ONNX Runtime INT8) and 0.933 (OpenVINO with the
#: post-concat convolutions in float); for the earlier 8-64 DynUNet 0.996 / 0.979. OpenVINO's all-INT8 file on an
#: AVX512-VNNI CPU without AMX, which computes those convolutions wrongly, agreed on 0.902 of the voxels
#: (background dominates) but at Dice 0.635 -- hence both bounds; the Dice bound is the floor below which
#: ``quantize`` advises against a runtime's INT8 (deploy.AGREEMENT_FLOOR).
VOXELS, DICE = 0.98, AGREEMENT_FLOOR


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """The demo's baseline saved as compress saves it: its CT window and patch recorded."""
    model, _ = baseline()
    extra = Preprocessing.parse(PREPROCESSING).into_extra({"patch_size": list(PATCH)})
    return pk.save(model, tmp_path_factory.mktemp("models") / "demo", spec=BASELINE_SPEC, extra=extra)


@pytest.fixture(scope="module")
def quantized(artifact, tmp_path_factory):
    """``prunekit3d quantize`` of the artifact on the CT (default settings, 8 patches)."""
    out = tmp_path_factory.mktemp("int8") / "q"
    assert main(["quantize", str(artifact), "--calib", str(CT), "--out", str(out), "--max-patches", "8",
                 "--repeats", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def torch_segmentation(artifact, tmp_path_factory):
    [written] = predict(artifact, CT, tmp_path_factory.mktemp("seg") / "torch", device="cpu")
    return _classes(written)


def _classes(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(nib.load(str(path)).dataobj).astype(np.int64))


def _agrees(written, reference: torch.Tensor) -> tuple[float, float]:
    image, seg = nib.load(str(CT)), nib.load(str(written))
    assert seg.shape == image.shape and np.array_equal(seg.affine, image.affine)  # the input's grid and affine
    classes = _classes(written)
    return float((classes == reference).float().mean()), mean_dice(classes, reference, 4)


def test_quantize_writes_a_folder_predict_runs_on_its_own(artifact, quantized, torch_segmentation, tmp_path, capsys):
    assert sorted(p.name for p in quantized.iterdir()) == [
        "manifest.json", "model.int8.onnx", "model.onnx", "model.preprocessing.json", "quantize.json"]
    manifest = json.loads((quantized / "manifest.json").read_text())
    assert manifest["format"] == "prunekit3d.quantized"
    assert Preprocessing.from_manifest(manifest) == Preprocessing.parse(PREPROCESSING)  # the artifact's record
    assert manifest["extra"]["patch_size"] == list(PATCH) and manifest["extra"]["in_channels"] == 1
    report = json.loads((quantized / "quantize.json").read_text())
    assert report["calibration_batches"] == 8 and report["input_size"] == [1, 1, *PATCH]
    assert report["size_ratio"] > 2.5 and {"torch", "torch+onednn", "onnxruntime int8"} <= set(report["latency_ms"])

    [written] = predict(quantized, CT, tmp_path / "ort-int8", backend="onnxruntime", int8=True)
    voxels, dice = _agrees(written, torch_segmentation)
    assert voxels > VOXELS and dice > DICE, (voxels, dice)
    record = json.loads((tmp_path / "ort-int8" / "manifest.json").read_text())
    assert record["backend"] == "onnxruntime int8" and record["preprocessing"]["window"] == [-200, 300]
    # the float file of the same folder is the torch network up to float rounding
    [written] = predict(quantized, CT, tmp_path / "ort-float", backend="onnxruntime")
    assert _agrees(written, torch_segmentation)[0] > 0.999


def test_openvino_int8_with_the_post_concat_convolutions_in_float(artifact, torch_segmentation, tmp_path):
    pytest.importorskip("openvino")
    result = quantize_artifact(artifact, CT, tmp_path / "q", max_patches=8, after_concat_float=True, runtimes=[])
    assert len(result.report["kept_float"]) == 3  # one per decoder level of the demo DynUNet
    assert main(["predict", str(result.out), str(CT), "--out", str(tmp_path / "seg"), "--backend", "openvino",
                 "--int8"]) == 0
    voxels, dice = _agrees(tmp_path / "seg" / "ct_abdomen.nii.gz", torch_segmentation)
    assert voxels > VOXELS and dice > DICE, (voxels, dice)


def test_predict_exports_an_artifact_for_an_onnx_backend(artifact, torch_segmentation, tmp_path):
    [written] = predict(artifact, CT, tmp_path / "seg", backend="onnxruntime")
    assert _agrees(written, torch_segmentation)[0] > 0.999
    assert json.loads((tmp_path / "seg" / "manifest.json").read_text())["backend"] == "onnxruntime float (exported)"


def _two_channels(path) -> None:
    data = np.zeros((16, 16, 8, 2), np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (None, "does not exist"),
        (_two_channels, "has 2 channel"),
        (lambda p: p.write_bytes(gzip.compress(b"not a nifti")), "cannot read"),
    ],
    ids=["missing", "channels", "unreadable"],
)
def test_bad_calibration_input_is_one_line_and_writes_nothing(artifact, tmp_path, capsys, make, message):
    calib = tmp_path / "calib.nii.gz"
    if make is not None:
        make(calib)
    out = tmp_path / "q"
    assert main(["quantize", str(artifact), "--calib", str(calib), "--out", str(out), "--repeats", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunekit3d quantize: error:") and message in err and "\n" not in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == (["calib.nii.gz"] if make else [])


def test_onnx_backends_refuse_with_one_line(artifact, quantized, tmp_path):
    cases = [
        (dict(model=artifact, backend="openvino", int8=True), "prunekit3d quantize"),  # no INT8 file yet
        (dict(model=artifact, backend="torch", int8=True), "--backend openvino"),
        (dict(model=quantized, backend="torch"), "quantize output"),
        (dict(model=quantized, backend="onnxruntime", device="cuda"), "runs on the CPU"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            predict(kwargs.pop("model"), CT, tmp_path / "out", **kwargs)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_report_times_every_backend_and_uses_the_faster_torch_path(artifact, quantized, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one table row per line
    out = tmp_path / "report.json"
    assert main(["report", str(artifact), "--input-size", "1", "1", "32", "32", "16", "--onnx", str(quantized),
                 "--repeats", "1", "--no-train-step", "--json", str(out)]) == 0
    saved = ModelReport.from_json(out.read_text())
    runtimes = ["onnxruntime"] + (["openvino"] if openvino_available() else [])
    onnx = [f"{r} {k}" for r in runtimes for k in ("float", "int8")]
    assert list(saved.backends_ms) == ["torch", "torch+onednn", *onnx]
    torch_paths = {k: saved.backends_ms[k] for k in ("torch", "torch+onednn")}
    assert saved.latency_path == min(torch_paths, key=torch_paths.get)
    assert saved.latency_ms == min(torch_paths.values())
    text = " ".join(capsys.readouterr().out.split())  # the caption wraps at the table's width
    fastest = min(saved.backends_ms, key=saved.backends_ms.get)
    assert f"headline CPU path: {fastest}" in text and f"latency (ms), {saved.latency_path}" in text


def test_the_advice_skips_a_fast_int8_runtime_that_disagrees_with_float() -> None:
    report = {"agreement": {"onnxruntime": {"agreement_dice": 0.95}, "openvino": {"agreement_dice": 0.58}},
              "latency_ms": {"onnxruntime int8": 140.0, "openvino int8": 16.0}}
    runtime, warnings = int8_advice(report)
    assert runtime == "onnxruntime" and len(warnings) == 1 and warnings[0].startswith("openvino INT8")
    report["agreement"]["openvino"]["agreement_dice"] = 0.99
    assert int8_advice(report) == ("openvino", [])


def test_an_int8_file_that_disagreed_with_float_on_a_runtime_is_refused_there(quantized, tmp_path):
    folder = tmp_path / "q"
    shutil.copytree(quantized, folder)
    report = json.loads((folder / "quantize.json").read_text())
    report["agreement"]["onnxruntime"]["agreement_dice"] = 0.5  # as OpenVINO measured on concat-fed convolutions
    (folder / "quantize.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="agreed with float at Dice 0.500") as err:
        predict(folder, CT, tmp_path / "seg", backend="onnxruntime", int8=True)
    assert "--float-after-concat" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "seg").exists()
    [written] = predict(folder, CT, tmp_path / "seg", backend="onnxruntime")  # its float file is fine
    assert written.is_file()
