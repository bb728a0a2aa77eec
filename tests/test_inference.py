"""``prunekit3d predict``: the recorded preprocessing, the input's grid, affine and header, and what it refuses."""

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

import prunekit3d as pk
from prunekit3d.cli import main
from prunekit3d.data import Preprocessing, read_labels, read_volumes
from prunekit3d.evaluate import label_dice, mean_dice
from prunekit3d.inference import PREDICTIONS_FORMAT, predict
from prunekit3d.recipes.demo import BASELINE_SPEC, PATCH, PREPROCESSING, baseline
from prunekit3d.sample import sample_dataset

pytestmark = pytest.mark.threads(2)

CT = sample_dataset() / "imagesTr" / "ct_abdomen.nii.gz"
LABEL = sample_dataset() / "labelsTr" / "ct_abdomen.nii.gz"


@pytest.fixture(scope="module")
def demo_artifact(tmp_path_factory):
    """The demo's baseline (shipped weights) saved as compress saves it: its CT window, its patch."""
    model, _ = baseline()
    extra = Preprocessing.parse(PREPROCESSING).into_extra({"patch_size": list(PATCH)})
    return pk.save(model, tmp_path_factory.mktemp("models") / "demo", spec=BASELINE_SPEC, extra=extra)


@pytest.fixture(scope="module")
def bare_artifact(tmp_path_factory):
    """A small DynUNet artifact that records no preprocessing."""
    from monai.networks.nets import DynUNet

    net = DynUNet(3, 1, 4, [3, 3, 3], [1, 2, 2], [2, 2], filters=[4, 8, 16])
    spec = {"import_path": "monai.networks.nets.DynUNet", "kwargs": {
        "spatial_dims": 3, "in_channels": 1, "out_channels": 4, "kernel_size": [3, 3, 3], "strides": [1, 2, 2],
        "upsample_kernel_size": [2, 2], "filters": [4, 8, 16]}}
    return pk.save(net, tmp_path_factory.mktemp("models") / "bare", spec=spec)


@pytest.fixture(scope="module")
def demo_prediction(demo_artifact, tmp_path_factory):
    """``predict`` of the demo artifact on the sample CT, with the defaults (oneDNN on)."""
    out = tmp_path_factory.mktemp("predictions") / "seg"
    return predict(demo_artifact, CT, out, device="cpu")


def _classes(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(nib.load(str(path)).dataobj).astype(np.int64))


def _truth() -> torch.Tensor:
    return torch.from_numpy(np.asarray(nib.load(str(LABEL)).dataobj).astype(np.int64))


def test_predict_writes_the_input_grid_and_the_dice_compress_measures(demo_artifact, demo_prediction):
    out = demo_prediction[0].parent
    assert demo_prediction == [out / "ct_abdomen.nii.gz"]
    seg, image = nib.load(str(demo_prediction[0])), nib.load(str(CT))
    assert seg.shape == image.shape and np.array_equal(seg.affine, image.affine)
    assert seg.get_data_dtype() == np.uint8 and seg.header.get_intent()[0] == "label"
    assert np.array_equal(seg.header.get_zooms(), image.header.get_zooms())
    # What compress's report computes as Dice vs labels (the recorded preprocessing, its patch, MONAI sliding window):
    volume = read_volumes(CT)[0]
    read_labels(LABEL, [volume])
    model = pk.load(demo_artifact)
    reported = label_dice(model, [Preprocessing.parse(PREPROCESSING).apply(volume)], [torch.from_numpy(volume.label)],
                          PATCH)
    dice = mean_dice(_classes(demo_prediction[0]), _truth(), 4)
    assert reported > 0.6 and abs(dice - reported) < 0.01, (dice, reported)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == PREDICTIONS_FORMAT and list(manifest["files"]) == ["ct_abdomen.nii.gz"]
    assert manifest["preprocessing"]["scheme"] == "ct" and manifest["patch"] == list(PATCH)


def test_predict_resamples_to_a_spacing_and_back_onto_the_input_grid(bare_artifact, tmp_path):
    [written] = predict(bare_artifact, CT, tmp_path / "seg", preprocessing="zscore", spacing=(6.0, 6.0, 6.0),
                        patch=[64, 64, 32], device="cpu")
    seg = nib.load(str(written))
    assert seg.shape == nib.load(str(CT)).shape and np.array_equal(seg.affine, nib.load(str(CT)).affine)
    assert json.loads((tmp_path / "seg" / "manifest.json").read_text())["preprocessing"]["spacing"] == [6, 6, 6]


def test_a_missing_preprocessing_record_is_one_line_naming_the_flag(bare_artifact, tmp_path):
    with pytest.raises(ValueError, match="records no preprocessing.*--preprocessing") as err:
        predict(bare_artifact, CT, tmp_path / "seg", device="cpu")
    assert "\n" not in str(err.value) and not (tmp_path / "seg").exists()
    [written] = predict(bare_artifact, CT, tmp_path / "seg", preprocessing="ct:-57:164", device="cpu",
                        patch=[64, 64, 32])
    assert nib.load(str(written)).shape == nib.load(str(CT)).shape
    assert json.loads((tmp_path / "seg" / "manifest.json").read_text())["preprocessing"]["window"] == [-57, 164]


def test_bad_inputs_fail_with_one_line_before_anything_is_written(demo_artifact, tmp_path):
    folder = tmp_path / "two-channels"
    folder.mkdir()
    for c in range(2):  # nnU-Net channel files: one case of two channels, the network takes one
        shutil.copy(CT, folder / f"case_{c:04d}.nii.gz")
    with pytest.raises(ValueError, match="'case'.* 2 channel.*takes 1"):
        predict(demo_artifact, folder, tmp_path / "out", device="cpu")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.nii.gz").write_bytes(gzip.compress(b"not a nifti"))
    with pytest.raises(ValueError, match="cannot read .*x.nii.gz"):
        predict(demo_artifact, broken, tmp_path / "out", device="cpu")
    with pytest.raises(ValueError, match="not a model folder"):
        predict(tmp_path, CT, tmp_path / "out", device="cpu")
    with pytest.raises(ValueError, match="prunekit3d quantize"):  # --int8 needs a quantize output
        predict(demo_artifact, CT, tmp_path / "out", backend="onnxruntime", int8=True)
    assert not (tmp_path / "out").exists()


def test_predict_never_writes_over_an_input_or_a_foreign_file(demo_artifact, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(CT, images / "ct_abdomen.nii.gz")
    before = (images / "ct_abdomen.nii.gz").read_bytes()
    for out in (images, tmp_path):  # is the input folder, holds the input
        with pytest.raises(ValueError, match="input"):
            predict(demo_artifact, images, out, device="cpu")
    out = tmp_path / "seg"
    predict(demo_artifact, images, out, device="cpu")
    with pytest.raises(FileExistsError, match="--overwrite"):
        predict(demo_artifact, images, out, device="cpu")
    predict(demo_artifact, images, out, device="cpu", overwrite=True)  # its own earlier output: replaced
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "ct_abdomen.nii.gz").write_bytes(b"someone's segmentation")
    with pytest.raises(FileExistsError, match="not written by prunekit3d predict"):
        predict(demo_artifact, images, foreign, device="cpu", overwrite=True)
    assert (foreign / "ct_abdomen.nii.gz").read_bytes() == b"someone's segmentation"
    assert ((images / "ct_abdomen.nii.gz").read_bytes() == before
            and sorted(images.iterdir()) == [images / "ct_abdomen.nii.gz"])


def test_the_command_line(demo_artifact, demo_prediction, tmp_path, capsys):
    assert main(["predict", str(demo_artifact), str(CT), "--out", str(tmp_path / "seg"), "--device", "cpu",
                 "--patch", *map(str, PATCH), "--no-onednn"]) == 0
    # PyTorch's own convolutions and oneDNN's (the default) give the same segmentation, up to float rounding
    agreement = (_classes(tmp_path / "seg" / "ct_abdomen.nii.gz") == _classes(demo_prediction[0])).float().mean()
    assert float(agreement) > 0.9999
    capsys.readouterr()
    assert main(["predict", str(demo_artifact), str(CT), "--out", str(tmp_path / "seg")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunekit3d predict: error:") and "--overwrite" in err and "\n" not in err
    nnunet = tmp_path / "Dataset001__nnUNetPlans__3d_fullres"
    nnunet.mkdir()
    for name in ("plans.json", "dataset.json"):
        (nnunet / name).write_text("{}")
    # an nnU-Net folder goes to nnU-Net's predictor: one without trained folds gets one line, nothing written
    assert main(["predict", str(nnunet), str(CT), "--out", str(tmp_path / "nn")]) == 2
    err = capsys.readouterr().err.strip()
    assert "checkpoint_final.pth" in err and "\n" not in err and not (tmp_path / "nn").exists()
