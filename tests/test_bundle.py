"""MONAI bundles in and out: a bundle made here is read, compressed, written, and run by MONAI's own runner."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import prunekit3d as pk
from prunekit3d.data import read_volumes
from prunekit3d.evaluate import mean_dice
from prunekit3d.inference import load_predictor
from prunekit3d.sample import sample_dataset
from prunekit3d.sources.bundle import (
    BUNDLE_FORMAT,
    MARKER,
    REQUIRED_METADATA,
    TORCHSCRIPT_DEF,
    read_bundle,
    write_bundle,
)

pytestmark = pytest.mark.threads(2)

NETWORK_DEF = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "channels": [8, 16, 32],
               "strides": [2, 2], "num_res_units": 1}
PREPROCESSING = {"_target_": "Compose", "transforms": [
    {"_target_": "LoadImaged", "keys": "@image_key"},
    {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
    {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
    {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -57, "a_max": 164, "b_min": 0.0, "b_max": 1.0,
     "clip": True},
    {"_target_": "EnsureTyped", "keys": "@image_key"},
]}
#: A bundle as the MONAI model zoo writes them (spleen_ct_segmentation's inference.json, made small).
CONFIG = {
    "imports": ["$import glob"],
    "bundle_root": ".",
    "image_key": "image",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "/nonexistent",
    "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
    "device": "$torch.device('cpu')",
    "network_def": NETWORK_DEF,
    "network": "$@network_def.to(@device)",
    "preprocessing": PREPROCESSING,
    "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
    "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "num_workers": 0},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 1, "overlap": 0.25},
    "postprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "seg",
         "output_dtype": "$np.uint8", "resample": False, "separate_folder": False},
    ]},
    "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                  "load_dict": {"model": "@network"}}],
    "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                  "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                  "val_handlers": "@handlers"},
    "run": ["$@evaluator.run()"],
}
METADATA = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
    "version": "0.2.0", "changelog": {"0.2.0": "first"}, "monai_version": "1.4.0", "pytorch_version": "2.5.0",
    "numpy_version": "1.26.0", "optional_packages_version": {"nibabel": "5.2.0"}, "task": "organ segmentation",
    "description": "a small test bundle", "authors": "prunekit3d tests", "copyright": "none",
    "network_data_format": {"inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": [32, 32, 32]}},
                            "outputs": {"pred": {"type": "image", "num_channels": 3, "spatial_shape": [32, 32, 32]}}},
}


def _make_bundle(root: Path, state: dict | None = None) -> Path:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "docs").mkdir()
    (root / "configs" / "inference.json").write_text(json.dumps(CONFIG, indent=1))
    (root / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=1))
    (root / "docs" / "README.md").write_text("a test bundle\n")
    if state is None:
        from monai.networks.nets import UNet

        torch.manual_seed(0)
        kwargs = {k: v for k, v in NETWORK_DEF.items() if k != "_target_"}
        state = UNet(**kwargs).state_dict()
    torch.save(state, root / "models" / "model.pt")
    return root


def _ct_crop(folder: Path) -> Path:
    """The sample CT's first 64 x 64 x 30 voxels with its affine: a small test case."""
    volume = read_volumes(sample_dataset())[0]
    folder.mkdir(parents=True)
    path = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume.image[0, :64, :64].astype(np.int16), volume.affine), str(path))
    return path


def test_read_bundle_gives_network_weights_preprocessing_and_window(tmp_path):
    bundle = read_bundle(_make_bundle(tmp_path / "bundle"))
    assert bundle.spec == {"import_path": "monai.networks.nets.unet.UNet",
                           "kwargs": {k: v for k, v in NETWORK_DEF.items() if k != "_target_"}}
    assert pk.from_spec(bundle.spec).state_dict().keys() == bundle.network.state_dict().keys()
    saved = torch.load(tmp_path / "bundle" / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in bundle.network.state_dict().items())
    assert bundle.patch == (32, 32, 32) and bundle.overlap == 0.25
    pre = bundle.preprocessing
    assert pre.scheme == "monai" and pre.definitions == {"image_key": "image"}
    volume = read_volumes(_ct_crop(tmp_path / "images"))[0]
    assert torch.allclose(pre.apply(volume), pk.data.Preprocessing.parse("ct:-57:164").apply(volume))


def test_a_pickled_model_or_a_missing_network_is_refused_with_one_line(tmp_path):
    from monai.networks.nets import UNet

    root = _make_bundle(tmp_path / "pickled")
    torch.save(UNet(**{k: v for k, v in NETWORK_DEF.items() if k != "_target_"}), root / "models" / "model.pt")
    with pytest.raises(ValueError, match="pickles a .*UNet.*never unpickles"):
        read_bundle(root)
    broken = _make_bundle(tmp_path / "broken")
    config = dict(CONFIG, network_def={**NETWORK_DEF, "channels": [4, 8, 16]})
    (broken / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not fit") as err:
        read_bundle(broken)
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="configs/inference.json"):
        read_bundle(tmp_path / "docs-only")


def _compressed_artifact(bundle, where: Path) -> Path:
    """The bundle's network, wrapped, half its channels pruned, saved (slimmed) as an artifact."""
    net = bundle.fresh_network()
    net.load_state_dict(bundle.network.state_dict())
    x = torch.zeros(1, 1, *bundle.patch)
    pk.wrap(net.eval(), x, branches=1)
    pk.prune_channels(net, x, ratio=0.5)
    extra = bundle.preprocessing.into_extra({"patch_size": list(bundle.patch)})
    return pk.save(net, where, spec=bundle.spec, extra=extra)


@pytest.mark.slow
def test_compressed_bundle_runs_with_monai_bundle_run(tmp_path):
    pytest.importorskip("fire", reason="python -m monai.bundle needs fire (pip install fire)")
    pytest.importorskip("ignite", reason="the bundle's SupervisedEvaluator needs pytorch-ignite")
    source = _make_bundle(tmp_path / "bundle")
    bundle = read_bundle(source)
    artifact = _compressed_artifact(bundle, tmp_path / "artifact")
    out = write_bundle(bundle, artifact, tmp_path / "small")

    marker = json.loads((out / MARKER).read_text())
    assert marker["format"] == BUNDLE_FORMAT and marker["configs"] == ["configs/inference.json"]
    assert marker["network"]["parameters"]["after"] < 0.5 * marker["network"]["parameters"]["before"]
    state = torch.load(out / "models" / "model.pt", weights_only=True)  # plain tensors only
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert all(k in meta for k in REQUIRED_METADATA) and meta["version"] == "0.2.1"
    assert "prunekit3d" in meta["changelog"]["0.2.1"] and meta["changelog"]["0.2.0"] == "first"
    assert (out / "docs" / "README.md").is_file() and not (out / "manifest.json").exists()
    assert json.loads((source / "configs" / "inference.json").read_text()) == CONFIG  # the source is untouched

    image = _ct_crop(tmp_path / "images")
    if marker["network_def"] == "slim_network":  # prunekit3d's class rebuilds the network: run that as it is
        _bundle_run(out, image.parent, tmp_path / "pred-slim")
    # The TorchScript network runs where prunekit3d is not installed (its import is blocked in the runner).
    _bundle_run(out, image.parent, tmp_path / "pred", "--network_def", TORCHSCRIPT_DEF, without_prunekit3d=True)
    written = nib.load(str(tmp_path / "pred" / "ct_seg.nii.gz"))
    original = nib.load(str(image))
    assert written.shape == original.shape and np.allclose(written.affine, original.affine)
    by_monai = torch.from_numpy(np.asarray(written.dataobj).astype(np.int64))

    # The same network through prunekit3d's own pipeline: the artifact, its recorded (bundle) preprocessing.
    ours = load_predictor(artifact, device="cpu").segment("ct", [image])
    assert np.mean(ours == by_monai.numpy()) > 0.999
    assert len(np.unique(ours)) > 1  # a real segmentation, not one class everywhere
    again = load_predictor(out, device="cpu").segment("ct", [image])  # and the written bundle read back
    assert mean_dice(torch.from_numpy(again.astype(np.int64)), by_monai, 3) > 0.999


def _bundle_run(bundle: Path, images: Path, pred: Path, *overrides: str, without_prunekit3d: bool = False) -> None:
    """``python -m monai.bundle run`` on ``bundle`` with its data and output folders overridden."""
    block = "sys.modules['prunekit3d'] = None; " if without_prunekit3d else ""
    runner = ["-c", f"import runpy, sys; {block}runpy.run_module('monai.bundle', run_name='__main__')"]
    args = ["run", "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
            "--dataset_dir", str(images), "--output_dir", str(pred), *overrides]
    done = subprocess.run([sys.executable, *runner, *args], capture_output=True, text=True, timeout=300, check=False,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert done.returncode == 0, done.stderr[-3000:]


def test_write_bundle_never_overwrites_inputs_or_foreign_folders(tmp_path):
    bundle = read_bundle(_make_bundle(tmp_path / "bundle"))
    artifact = _compressed_artifact(bundle, tmp_path / "artifact")
    with pytest.raises(ValueError, match="lies inside the source"):
        write_bundle(bundle, artifact, tmp_path / "bundle" / "small")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_bundle(bundle, artifact, foreign)
    with pytest.raises(FileExistsError, match="not a directory prunekit3d wrote"):
        write_bundle(bundle, artifact, foreign, overwrite=True)
    assert (foreign / "keep.txt").read_text() == "mine"
    out = write_bundle(bundle, artifact, tmp_path / "small")
    assert write_bundle(bundle, artifact, out, overwrite=True) == out


def test_slim_weights_fit_a_network_def_that_holds_the_slim_network_under_a_prefix():
    from prunekit3d.sources.bundle import _FullResolution, _state_for

    slim = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Conv3d(2, 3, 1))
    holder = _FullResolution(torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Conv3d(2, 3, 1)))
    state = _state_for(holder, slim)
    assert sorted(state) == sorted(holder.state_dict())
    assert torch.equal(state["network.0.weight"], slim.state_dict()["0.weight"])
    assert _state_for(slim, slim).keys() == slim.state_dict().keys()
    with pytest.raises(ValueError, match="disagree"):
        _state_for(torch.nn.Conv3d(1, 2, 3), slim)


@pytest.mark.slow
def test_prunekit3d_compress_on_a_bundle_gives_a_bundle_monai_runs(tmp_path, capsys):
    """The command a user types, ``prunekit3d compress BUNDLE --calib IMAGES``: the bundle's own transforms
    preprocess the calibration images, and the bundle it writes runs with ``monai.bundle run``."""
    pytest.importorskip("fire", reason="python -m monai.bundle needs fire (pip install fire)")
    pytest.importorskip("ignite", reason="the bundle's SupervisedEvaluator needs pytorch-ignite")
    from prunekit3d.cli import main

    source = _make_bundle(tmp_path / "bundle")
    image = _ct_crop(tmp_path / "images")
    out = tmp_path / "small"
    assert main(["compress", str(source), "--calib", str(image.parent), "--out", str(out), "--target-params", "0.5",
                 "--blockwise-epochs", "1", "--epochs", "1", "--finetune-epochs", "2", "--iters-per-epoch", "2",
                 "--batch", "1", "--holdout", "0", "--device", "cpu"]) == 0
    marker = json.loads((out / "bundle" / MARKER).read_text())
    parameters = marker["network"]["parameters"]
    assert parameters["after"] <= 0.5 * parameters["before"]
    # the bundle's own transforms are the recorded preprocessing (predict re-applies them)
    assert pk.data.Preprocessing.from_manifest(pk.load_manifest(out)) == read_bundle(source).preprocessing
    _bundle_run(out / "bundle", image.parent, tmp_path / "pred", "--network_def", TORCHSCRIPT_DEF,
                without_prunekit3d=True)
    written, original = nib.load(str(tmp_path / "pred" / "ct_seg.nii.gz")), nib.load(str(image))
    assert written.shape == original.shape and np.allclose(written.affine, original.affine)
