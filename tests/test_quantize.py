"""Static INT8 through ONNX Runtime's quantizer: the INT8 file runs and stays close to float; bad
calibration input gets one clear line and writes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from networks import dynunet

from prunekit3d.backends import OnnxRuntimeModel
from prunekit3d.quantize import INT8_FILE, REPORT_FILE, check_calibration, quantize

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.threads(2)


def test_int8_runs_and_matches_float(tmp_path) -> None:
    net, _ = dynunet()
    calibration = [torch.randn(2, 1, 32, 32, 32) for _ in range(3)]
    result = quantize(net, calibration, tmp_path / "int8", runtimes=["onnxruntime"], repeats=1,
                      preprocessing={"normalisation": "zscore"})
    assert sorted(p.name for p in result.out.iterdir()) == [
        "manifest.json", "model.int8.onnx", "model.onnx", "model.preprocessing.json", "quantize.json"]
    assert json.loads((result.out / "manifest.json").read_text())["format"] == "prunekit3d.quantized"
    report = json.loads((result.out / REPORT_FILE).read_text())
    assert report["quantized_ops"]["Conv"] >= 15 and "InstanceNormalization" not in report["quantized_ops"]
    assert report["size_ratio"] > 2.5  # int8 weights; scales and the float norms' parameters stay
    # Tolerance: INT8 logits within 25% of the float logits' range, and the segmentations mostly agree
    # (random weights on noise; on the demo CT the agreement Dice is ~0.98, docs/deploy.md).
    x = calibration[0]
    with torch.no_grad():
        want = net.eval()(x)
        got = OnnxRuntimeModel(result.int8_onnx)(x)
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= 0.25 * float(want.abs().max())
    assert report["agreement"]["onnxruntime"]["agreement_dice"] >= 0.8
    assert set(report["latency_ms"]) == {"torch", "torch+onednn", "onnxruntime float", "onnxruntime int8"}


def test_an_onnx_source_is_copied_not_touched(tmp_path) -> None:
    net, _ = dynunet()
    calibration = [torch.randn(1, 1, 32, 32, 32)]
    first = quantize(net, calibration, tmp_path / "a", runtimes=[])
    before = first.float_onnx.read_bytes()
    second = quantize(first.float_onnx, calibration, tmp_path / "b", calibrator="percentile", runtimes=[],
                      output_layer_float=True)
    assert first.float_onnx.read_bytes() == before and (second.out / INT8_FILE).is_file()
    assert second.report["kept_float"] and second.report["calibrator"] == "percentile"
    # the decoder's convolutions reading a skip concatenation (DynUNet: one per decoder level) stay float
    third = quantize(first.float_onnx, calibration, tmp_path / "c", runtimes=[], after_concat_float=True)
    assert len(third.report["kept_float"]) == 3
    assert third.report["quantized_ops"]["Conv"] == first.report["quantized_ops"]["Conv"] - 3


@pytest.mark.parametrize(
    ("batches", "message"),
    [
        ([], "no calibration batches"),
        ([torch.randn(1, 2, 16, 16, 16)], "has 2 channels"),
        ([torch.randn(1, 16, 16, 16)], "4-D"),
        (torch.randn(1, 1, 16, 16, 16), "a list of batches, not one tensor"),
        ([torch.full((1, 1, 8, 8, 8), float("nan"))], "NaN"),
        (["patch.nii.gz"], "is a str"),
    ],
)
def test_bad_calibration_gets_one_clear_line(tmp_path, batches, message) -> None:
    net, _ = dynunet()
    with pytest.raises(ValueError, match=message) as info:
        quantize(net, batches, tmp_path / "out", runtimes=[])
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_check_calibration_reads_dynamic_shapes() -> None:
    arrays = check_calibration([torch.randn(1, 1, 8, 8, 8), torch.randn(3, 1, 16, 8, 8).numpy()],
                               ["b", 1, "x", "y", "z"])
    assert [a.shape[0] for a in arrays] == [1, 3] and all(a.dtype.name == "float32" for a in arrays)
