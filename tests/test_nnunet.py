"""nnU-Net v2 end to end, real nnU-Net and nothing mocked: plan, train, read, compress, write, stock predict.

One session fixture builds a tiny nnU-Net dataset from the bundled CT (4 overlapping crops), runs
``nnUNetv2_plan_and_preprocess``, shrinks the planned patch and network for CI, and trains nnU-Net's own
``nnUNetTrainer`` on two folds for a few iterations. Skipped only where nnunetv2 is not installed.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")
nib = pytest.importorskip("nibabel")

import prunekit3d as pk  # noqa: E402
from prunekit3d.io.rebuild import ARCHITECTURE_KEY, decode_steps  # noqa: E402
from prunekit3d.sample import sample_dataset  # noqa: E402
from prunekit3d.sources.nnunet import (  # noqa: E402
    EXT_TRAINER_DIR,
    calibration_images,
    predict_folder,
    read_checkpoint,
    read_model_folder,
    write_model_folder,
)

DATASET = "Dataset501_Tiny"
CROPS = [(slice(0, 80), slice(0, 64)), (slice(42, 122), slice(0, 64)), (slice(0, 80), slice(37, 101)),
         (slice(42, 122), slice(37, 101))]


def _raw_dataset(raw: Path) -> None:
    sample = Path(sample_dataset())
    image = nib.load(str(sample / "imagesTr" / "ct_abdomen.nii.gz"))
    label = np.asarray(nib.load(str(sample / "labelsTr" / "ct_abdomen.nii.gz")).dataobj).astype(np.uint8)
    data = np.asarray(image.dataobj)
    folder = raw / DATASET
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for i, (sx, sy) in enumerate(CROPS):
        affine = image.affine.copy()
        affine[:3, 3] = image.affine[:3, :3] @ [sx.start, sy.start, 0] + image.affine[:3, 3]
        nib.save(nib.Nifti1Image(data[sx, sy], affine), str(folder / "imagesTr" / f"case_{i:03d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image(label[sx, sy], affine), str(folder / "labelsTr" / f"case_{i:03d}.nii.gz"))
    dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "kidneys": 2, "spleen": 3},
               "numTraining": len(CROPS), "file_ending": ".nii.gz"}
    (folder / "dataset.json").write_text(json.dumps(dataset))


def _small_plans(pre: Path) -> None:
    """CI-sized: a 32^3 patch and a 4-stage network of 8..64 channels (the preprocessing stays as planned)."""
    file = pre / DATASET / "nnUNetPlans.json"
    plans = json.loads(file.read_text())
    config = plans["configurations"]["3d_fullres"]
    config["patch_size"], config["batch_size"] = [32, 32, 32], 2
    config["architecture"]["arch_kwargs"].update(
        n_stages=4, features_per_stage=[8, 16, 32, 64], kernel_sizes=[[3, 3, 3]] * 4,
        strides=[[1, 1, 1]] + [[2, 2, 2]] * 3, n_conv_per_stage=[2] * 4, n_conv_per_stage_decoder=[2] * 3,
    )
    file.write_text(json.dumps(plans, indent=1))
    splits = [{"train": ["case_000", "case_001", "case_002"], "val": ["case_003"]},
              {"train": ["case_001", "case_002", "case_003"], "val": ["case_000"]}]
    (pre / DATASET / "splits_final.json").write_text(json.dumps(splits))


def _train(trainer_class: type, pre: Path, fold: int, epochs: int = 2, **knobs: object) -> object:
    """nnU-Net's run_training path for one device, the trainer class passed in (its -tr lookup needs timm)."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    plans = json.loads((pre / DATASET / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((pre / DATASET / "dataset.json").read_text())
    trainer = trainer_class(plans=plans, configuration="3d_fullres", fold=fold, dataset_json=dataset_json,
                            device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = epochs, 4, 1
    for name, value in knobs.items():
        setattr(trainer, name, value)
    maybe_load_checkpoint(trainer, False, False, None)
    trainer.run_training()
    return trainer


@pytest.fixture(scope="session")
def nnunet_env(tmp_path_factory):
    """nnUNet_raw / _preprocessed / _results with a planned tiny dataset and nnUNetTrainer trained on folds 0, 1."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    root = tmp_path_factory.mktemp("nnunet")
    env = {"nnUNet_raw": root / "raw", "nnUNet_preprocessed": root / "pre", "nnUNet_results": root / "results"}
    saved = {k: os.environ.get(k) for k in [*env, "nnUNet_def_n_proc", "nnUNet_n_proc_DA", "nnUNet_compile"]}
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.update(nnUNet_def_n_proc="1", nnUNet_compile="f", nnUNet_n_proc_DA="1")
    _raw_dataset(env["nnUNet_raw"])
    subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", "501", "-c",
                    "3d_fullres", "-np", "1"], check=True, capture_output=True, env=dict(os.environ))
    os.environ["nnUNet_n_proc_DA"] = "0"  # training: augmentation in the main process
    _small_plans(env["nnUNet_preprocessed"])
    torch.manual_seed(0)
    for fold in (0, 1):
        _train(nnUNetTrainer, env["nnUNet_preprocessed"], fold)
    test_images = root / "test_images"
    test_images.mkdir()
    (test_images / "case_001_0000.nii.gz").symlink_to(env["nnUNet_raw"] / DATASET / "imagesTr" / "case_001_0000.nii.gz")
    yield {**env, "model": env["nnUNet_results"] / DATASET / "nnUNetTrainer__nnUNetPlans__3d_fullres",
           "images": test_images, "root": root}
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _stock_predict(model: Path, images: Path, out: Path, folds: list[str]) -> None:
    command = [str(Path(sys.executable).parent / "nnUNetv2_predict_from_modelfolder"), "-i", str(images), "-o",
               str(out), "-m", str(model), "-f", *folds, "--disable_tta", "-device", "cpu", "-npp", "1", "-nps", "1"]
    run = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-2000:]


def _original_prediction(env: dict) -> np.ndarray:
    """Stock nnU-Net's prediction of the test image with the original folder (both folds), made once a session."""
    out = env["root"] / "pred_original"
    if not (out / "case_001.nii.gz").is_file():
        _stock_predict(env["model"], env["images"], out, ["0", "1"])
    return np.asarray(nib.load(str(out / "case_001.nii.gz")).dataobj)


def _dice(a: np.ndarray, b: np.ndarray, classes: int) -> float:
    scores = [2 * np.sum((a == c) & (b == c)) / max(np.sum(a == c) + np.sum(b == c), 1) for c in range(1, classes)]
    return float(np.mean(scores))


def test_checkpoint_that_pickles_a_module_is_refused(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": torch.nn.Conv3d(1, 1, 1), "trainer_name": "x", "init_args": {}}, path)
    with pytest.raises(ValueError, match="pickles a torch.nn.modules.conv.Conv3d"):
        read_checkpoint(path)


@pytest.mark.threads(2)
def test_compress_write_and_stock_predict(nnunet_env, capsys):
    model = read_model_folder(nnunet_env["model"])
    assert [f.fold for f in model.folds] == [0, 1] and model.input_channels == 1 and model.num_classes == 4
    # nnU-Net's own preprocessing: raw images give exactly what nnUNetv2_preprocess wrote
    raw = calibration_images(model, nnunet_env["nnUNet_raw"] / DATASET / "imagesTr")
    pre = calibration_images(model, nnunet_env["nnUNet_preprocessed"] / DATASET)
    assert len(raw) == 4 and raw[0].dtype == np.float32 and raw[0].shape == (1, 30, 64, 80)
    assert max(float(np.abs(a - b).max()) for a, b in zip(raw, pre)) == 0.0

    x = torch.zeros(1, 1, *model.patch_size)
    networks, params = [], []
    for fold in model.folds:
        net = pk.wrap(copy.deepcopy(fold.network), x, branches=1)
        patches = [torch.from_numpy(np.pad(im[None, :, :, :32, :32], [(0, 0), (0, 0), (0, 2), (0, 0), (0, 0)]))
                   for im in raw[:2]]  # 32^3 from (1, 30, 64, 80)
        plan = pk.calibrate(net, patches, step=1)
        pk.prune(net, plan)
        before = sum(p.numel() for p in fold.network.parameters())
        pk.prune_channels(net, x, target_params=before // 2)
        networks.append(net)
        params.append(before)
    out = nnunet_env["root"] / "compressed" / "nnUNetTrainer_pk__nnUNetPlans__3d_fullres"
    write_model_folder(out, model, networks, report={"params_before": params})

    # no pickled module: the checkpoints load with weights_only=True and no allow-list
    for fold in (0, 1):
        checkpoint = torch.load(out / f"fold_{fold}" / "checkpoint_final.pth", weights_only=True)
        assert checkpoint["trainer_name"] == "nnUNetTrainer"
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["format"] == "prunekit3d.nnunet"
            and manifest["source"]["folder"] == str(nnunet_env["model"].resolve()))
    steps = [decode_steps(read_checkpoint(out / f"fold_{f}" / "checkpoint_final.pth").weights[ARCHITECTURE_KEY])
             for f in (0, 1)]
    assert steps[0] != steps[1]  # two architectures in one folder: each fold's weights carry theirs
    compressed = read_model_folder(out)
    after = [sum(p.numel() for p in f.teacher.parameters()) for f in compressed.folds]
    assert all(a <= b // 2 * 1.05 for a, b in zip(after, params))

    _stock_predict(out, nnunet_env["images"], nnunet_env["root"] / "pred_compressed", ["0", "1"])
    ours = predict_folder(out, nnunet_env["images"], nnunet_env["root"] / "pred_ours", mirroring=False)
    read = lambda p: np.asarray(nib.load(str(p)).dataobj)  # noqa: E731
    original = _original_prediction(nnunet_env)
    stock = read(nnunet_env["root"] / "pred_compressed" / "case_001.nii.gz")
    assert original.shape == stock.shape == (80, 64, 30)
    # Our predictor path is nnU-Net's, from weights read weights-only. Bit for bit when both run alike; the stock
    # CLI runs in another process (its own thread count), where float sums may flip an argmax at a near-tie.
    assert np.mean(stock == read(ours[0])) > 0.9995
    from prunekit3d.report import count_flops

    flops = [(count_flops(f.teacher, x)[0], count_flops(c.teacher, x)[0])
             for f, c in zip(model.folds, compressed.folds)]
    with capsys.disabled():
        print(f"\nnnU-Net compressed: params {params} -> {after}; FLOPs (1x1x32^3) {flops}; Dice vs original "
              f"predictions {_dice(stock, original, 4):.3f}")


@pytest.mark.threads(2)
def test_prunekit3d_compress_on_a_results_folder_then_stock_predict(nnunet_env, capsys):
    """The command a user types: ``prunekit3d compress FOLDER --calib RAW --target-params 0.5``, label-free,
    calibrated through nnU-Net's own preprocessing; stock nnU-Net predicts with the folder it writes."""
    from prunekit3d.cli import main

    out = nnunet_env["root"] / "pk-compressed"
    args = ["compress", str(nnunet_env["model"]), "--calib", str(nnunet_env["nnUNet_raw"] / DATASET / "imagesTr"),
            "--out", str(out), "--target-params", "0.5", "--blockwise-epochs", "1", "--epochs", "1",
            "--finetune-epochs", "3", "--channel-rounds", "1", "--iters-per-epoch", "2", "--batch", "1",
            "--device", "cpu"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "nnunet" and manifest["parts"] == ["fold_0", "fold_1"]
    for fold in (0, 1):
        report = json.loads((out / f"fold_{fold}" / "report.json").read_text())
        assert report["params_after"] / report["params_before"] <= 0.5 and report["budget"]["met"]
        assert report["agreement_measured_on"] == "1 of 4 calibration volumes (case_003)"
        checkpoint = torch.load(out / "nnunet" / f"fold_{fold}" / "checkpoint_final.pth", weights_only=True)
        assert checkpoint["trainer_name"] == "nnUNetTrainer"  # plain values only: no pickled module
    _stock_predict(out / "nnunet", nnunet_env["images"], nnunet_env["root"] / "pred_pk", ["0", "1"])
    ours = np.asarray(nib.load(str(nnunet_env["root"] / "pred_pk" / "case_001.nii.gz")).dataobj)
    original = _original_prediction(nnunet_env)
    assert ours.shape == original.shape
    with capsys.disabled():
        print(f"\nprunekit3d compress (nnU-Net folder, 2 folds, --target-params 0.5): Dice of stock nnU-Net's "
              f"predictions, compressed vs original folder: {_dice(ours, original, 4):.3f}")


@pytest.mark.threads(2)
def test_psp_trainer_trains_and_predicts_with_stock_nnunet(nnunet_env):
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from prunekit3d.sources.nnunet.trainer import nnUNetTrainerPSP

    # the nnUNet_extTrainer part of nnU-Net's -tr lookup finds the class in EXT_TRAINER_DIR
    found = recursive_find_python_class(EXT_TRAINER_DIR, "nnUNetTrainerPSP", None, base_folder=EXT_TRAINER_DIR)
    assert found is not None and found.__name__ == "nnUNetTrainerPSP"
    torch.manual_seed(0)
    trainer = _train(nnUNetTrainerPSP, nnunet_env["nnUNet_preprocessed"], 0, epochs=4, patience=1,
                     calibration_batches=1, stop_fraction=0.75, step=1)
    assert trainer.pruner.stopped and trainer.pruner.history[-1]["kind"] == "stop"
    folder = nnunet_env["nnUNet_results"] / DATASET / "nnUNetTrainerPSP__nnUNetPlans__3d_fullres"
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"
    plans = json.loads((folder / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"] == "prunekit3d.sources.nnunet.network.SlimNNUNet"
    assert arch["arch_kwargs"]["base"]["kwargs"]["config"]["widths"] == [16, 32, 64, 128]
    assert [s["kind"] for s in decode_steps(checkpoint["network_weights"][ARCHITECTURE_KEY])] == ["slim"]
    _stock_predict(folder, nnunet_env["images"], nnunet_env["root"] / "pred_psp", ["0"])
    seg = np.asarray(nib.load(str(nnunet_env["root"] / "pred_psp" / "case_001.nii.gz")).dataobj)
    assert seg.shape == (80, 64, 30) and set(np.unique(seg)) <= {0, 1, 2, 3}
    # and it compresses further: prunekit3d reads the PSP folder as a model folder
    again = read_model_folder(folder)
    assert again.base["import_path"] == "prunekit3d.models.pspseg.PSPSeg"


@pytest.mark.skipif(subprocess.run([sys.executable, "-c", "import timm"], capture_output=True).returncode != 0,
                    reason="nnUNetv2_train -tr needs nnU-Net's trainer discovery, which imports timm "
                           "(its torchvision does not load on the CPU torch build)")
def test_nnunetv2_train_cli_finds_psp_trainer(nnunet_env):
    env = {**os.environ, "nnUNet_extTrainer": EXT_TRAINER_DIR}
    command = [str(Path(sys.executable).parent / "nnUNetv2_train"), "501", "3d_fullres", "1", "-tr", "nnUNetTrainerPSP",
               "-device", "cpu", "--val"]
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    assert "Could not find requested nnunet trainer" not in run.stdout + run.stderr
