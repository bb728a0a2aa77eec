"""The training recipe end to end on tiny data: MSD reading, split, events, restore, resume, reinit, CLI.

Every run is PSP-Seg-S on 32x32x16 patches for a handful of one- to three-step epochs. The pruning
tests train with a tiny learning rate, so the epoch losses are dominated by which patches were drawn;
with ``patience=1`` an epoch that sets no new minimum then ends a window about every third epoch, which
makes events certain in practice without scripting them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from rich.console import Console

import prunekit3d.io as pio
from prunekit3d.recipes import Trainer, TrainConfig, read_msd, split_cases, train
from prunekit3d.cli.train import add_train_arguments, run_train
from prunekit3d.data import Normalise, intensity_fingerprint
from prunekit3d.sample import sample_dataset
from prunekit3d.wrap import redundant_modules

QUIET = Console(quiet=True)


def synthetic_msd(root: Path, cases: int = 3, shape: tuple[int, int, int] = (40, 40, 20), seed: int = 0) -> Path:
    """A small MSD data set: CT-like volumes (HU) with an 'organ' ball (1) and a 'lesion' ball (2)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    training = []
    for i in range(cases):
        label = np.zeros(shape, np.uint8)
        for cls, radius in ((1, 8), (2, 4)):
            centre = rng.uniform([radius] * 3, np.array(shape) - radius)
            label[np.linalg.norm((grid - centre) * [1, 1, 1.5], axis=-1) < radius] = cls
        body = np.linalg.norm((grid - np.array(shape) / 2)[..., :2], axis=-1) < shape[0] * 0.45  # soft tissue, air
        image = np.select([label == 1, label == 2, body], [60, 160, 30], -700) + rng.normal(0, 20, shape)
        name = f"case_{i:03d}"
        nib.save(nib.Nifti1Image(image.astype(np.int16), affine), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{name}.nii.gz")
        training.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {"name": "synthetic", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ", "2": "lesion"},
            "numTraining": cases, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def tiny_config(data: Path, out: Path, **overrides) -> TrainConfig:
    """A pruning-heavy CPU schedule: noise-dominated losses, patience 1, step 1, prune until the end."""
    settings = dict(data=data, out=out, patch=(32, 32, 16), batch=1, epochs=12, iters_per_epoch=1, lr=1e-5, fd=False,
                    patience=1, tolerance=1e9, step=1, calib_batches=1, stop_fraction=1.0, val_every=100, device="cpu")
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return synthetic_msd(tmp_path_factory.mktemp("msd") / "Dataset")


@pytest.fixture(scope="module")
def pruned_run(data, tmp_path_factory):
    """The reference run: 12 epochs, prune-only (huge tolerance), through the CLI."""
    out = tmp_path_factory.mktemp("runs") / "pruned"
    cfg = tiny_config(data, out)
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    config_file = out.parent / "config.json"
    config_file.write_text(cfg.to_json())
    assert run_train(parser.parse_args(["--config", str(config_file)])) == 0
    return cfg, json.loads((out / "history.json").read_text()), json.loads((out / "report.json").read_text())


# ---- data ---------------------------------------------------------------------------------------


def test_config_round_trips_and_rejects_bad_values(tmp_path):
    cfg = TrainConfig(data=tmp_path, out=tmp_path / "o", patch=64, spacing=(1, 1, 2.5), variant="b", module="srm")
    assert cfg.patch == (64, 64, 64) and cfg.variant == "B" and cfg.mode == "sequential"
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="after_pruning"):
        TrainConfig(data="d", out="o", after_pruning="prune")
    with pytest.raises(ValueError, match="unknown training config keys"):
        TrainConfig.from_dict({"data": "d", "out": "o", "epoch": 3})


def test_read_msd_and_default_split(data, tmp_path):
    ds = read_msd(data)
    assert ds.modalities == ["CT"] and ds.labels == ["background", "organ", "lesion"]
    assert list(ds.cases) == ["case_000", "case_001", "case_002"]
    split = split_cases(ds, seed=0)
    assert len(split["val"]) == 1 and sorted(split["train"] + split["val"]) == list(ds.cases)
    assert split == split_cases(ds, seed=0)
    chosen = tmp_path / "split.json"
    chosen.write_text(json.dumps({"train": ["case_000"], "val": ["case_002"]}))
    assert split_cases(ds, chosen) == {"train": ["case_000"], "val": ["case_002"]}
    chosen.write_text(json.dumps({"train": ["case_000"], "val": ["liver_7"]}))
    with pytest.raises(ValueError, match="liver_7"):
        split_cases(ds, chosen)
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        read_msd(tmp_path)


def test_bundled_sample_is_msd_with_four_classes():
    root = sample_dataset()
    ds = read_msd(root)
    assert ds.labels == ["background", "liver", "kidneys", "spleen"] and ds.modalities == ["CT"]
    assert split_cases(ds) == {"train": ["ct_abdomen"], "val": ["ct_abdomen"]}  # one case validates on itself
    image, label = nib.load(ds.cases["ct_abdomen"]["image"]), nib.load(ds.cases["ct_abdomen"]["label"])
    assert image.shape == label.shape == (122, 101, 30) and np.allclose(image.affine, label.affine)
    assert set(np.unique(np.asanyarray(label.dataobj)).tolist()) == {0, 1, 2, 3}
    assert (root / "LICENSE-Apache-2.0.txt").is_file() and "TotalSegmentator" in (root / "README.md").read_text()


def test_nnunet_v2_layout_and_normalisation(data, tmp_path):
    root = tmp_path / "Dataset002_Synthetic"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in ("case_000", "case_001"):
        (root / "imagesTr" / f"{case}_0000.nii.gz").write_bytes((data / "imagesTr" / f"{case}.nii.gz").read_bytes())
        (root / "labelsTr" / f"{case}.nii.gz").write_bytes((data / "labelsTr" / f"{case}.nii.gz").read_bytes())
    labels = {"background": 0, "organ": 1, "lesion": 2}
    meta = {"channel_names": {"0": "MRI"}, "labels": labels, "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta))
    ds = read_msd(root)
    assert list(ds.cases) == ["case_000", "case_001"] and ds.labels == ["background", "organ", "lesion"]
    fingerprint = intensity_fingerprint(ds, ["case_000"])
    image = torch.tensor([[[[-700.0, 0.0], [60.0, 5000.0]]]])
    ct = Normalise("image", ["CT"], fingerprint)({"image": image})["image"]
    f = fingerprint[0]
    assert ct.max() == pytest.approx((f["percentile_99_5"] - f["mean"]) / f["std"])  # clipped to the window
    assert ct.min() == pytest.approx((f["percentile_00_5"] - f["mean"]) / f["std"])
    mr = Normalise("image", ["MRI"], fingerprint)({"image": image})["image"]
    assert mr.mean() == pytest.approx(0, abs=1e-6) and mr.std() == pytest.approx(1, abs=1e-6)  # per-image z-score


# ---- training runs ------------------------------------------------------------------------------


def test_pruned_run_writes_events_and_a_smaller_loadable_model(pruned_run):
    cfg, history, report = pruned_run
    out = Path(cfg.out)
    prunes = [e for e in history["events"] if e["kind"] == "prune"]
    assert len(prunes) >= 2
    for event in prunes:
        assert event["branches"] and all(name.startswith(("encoder.", "decoder.")) for name in event["branches"])
        assert event["plan"]["step"] == 1 and event["plan"]["batches"] == 1
    assert [e["epoch"] for e in history["epochs"]] == list(range(cfg.epochs))
    params = [e["params"] for e in history["epochs"]]
    assert all(params[e["epoch"]] < params[e["epoch"] - 1] for e in prunes)
    model = pio.load(out / "model")
    assert sum(p.numel() for p in model.parameters()) == report["params"]["end"] == params[-1]
    assert report["params"]["end"] < report["params"]["start"]
    assert report["flops"]["end"] < report["flops"]["start"]
    assert set(report["validation"]["dsc"]) == {"organ", "lesion"}
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 32, 16))[0].shape == (1, 3, 32, 32, 16)
    assert (out / "checkpoint" / "model.safetensors").is_file() and (out / "split.json").is_file()


def test_resume_after_a_pruning_event_reproduces_the_history(pruned_run, tmp_path):
    cfg, reference, _ = pruned_run

    class Interrupted(Exception):
        pass

    class StopAfterFirstPrune(Trainer):
        def on_epoch_end(self, epoch, losses, metrics):
            super().on_epoch_end(epoch, losses, metrics)
            if any(e["kind"] == "prune" for e in self.history["events"]):
                raise Interrupted(epoch)

    rerun = TrainConfig.from_dict({**cfg.to_dict(), "out": str(tmp_path / "run")})
    with pytest.raises(Interrupted) as stopped:
        StopAfterFirstPrune(rerun, console=QUIET).run()
    assert stopped.value.args[0] < cfg.epochs - 1
    with pytest.raises(FileExistsError, match="--resume"):
        train(rerun, console=QUIET)
    resumed = train(rerun, resume=True, console=QUIET).history
    assert resumed["events"] == reference["events"]
    assert [e["losses"] for e in resumed["epochs"]] == [e["losses"] for e in reference["epochs"]]


def test_tolerance_zero_restores_and_lowers_the_step(data, tmp_path):
    history = train(tiny_config(data, tmp_path / "run", epochs=10, tolerance=0.0), console=QUIET).history
    kinds = [e["kind"] for e in history["events"]]
    assert "restore" in kinds
    at = kinds.index("restore")
    restore, pruned = history["events"][at], history["events"][at - 1]
    assert pruned["kind"] == "prune" and restore["branches"] == pruned["branches"]
    assert restore["step"] == pruned["step"] - 1 == 0 and "prune" not in kinds[at:]  # step 0: pruning is over
    params = {e["epoch"]: e["params"] for e in history["epochs"]}
    assert params[pruned["epoch"]] < params[pruned["epoch"] - 1] == params[restore["epoch"]]  # the branches are back


def test_fd_training_lowers_the_loss(data, tmp_path):
    history = train(tiny_config(data, tmp_path / "run", epochs=3, iters_per_epoch=3, lr=1e-3, fd=True, val_every=3,
                                patience=10), console=QUIET).history
    losses = [e["losses"] for e in history["epochs"]]
    assert all(v["fd"] > 0 and v["aux"] > 0 for v in losses)
    assert losses[-1]["total"] < losses[0]["total"]
    assert history["mask_value"][0] < -1  # the normalised 0.5 percentile of the foreground lies far below 0
    assert history["epochs"][-1]["val"]["mean_nsd"] is not None


def test_reinit_after_pruning_restarts_weights_and_schedule(data, tmp_path):
    gates = {}

    class Watch(Trainer):
        def on_epoch_end(self, epoch, losses, metrics):
            super().on_epoch_end(epoch, losses, metrics)
            gates[epoch] = torch.cat([m.gates.detach().clone() for _, m in redundant_modules(self.model)])

    cfg = tiny_config(data, tmp_path / "run", epochs=3, iters_per_epoch=2, stop_fraction=0.3, lr=1e-2,
                      after_pruning="reinit")
    history = Watch(cfg, console=QUIET).run().history
    assert [e["kind"] for e in history["events"]] == ["stop", "reinit"]
    assert torch.count_nonzero(gates[0]) == 0 and torch.count_nonzero(gates[1]) > 0  # re-initialised, then trained
    # lr of each epoch's last step: the poly schedule starts over (4 steps left) after the reinit at epoch 0
    lrs = [e["lr"] for e in history["epochs"]]
    assert lrs[0] == pytest.approx(cfg.lr * (1 - 1 / 6) ** 0.9)
    assert lrs[1] == pytest.approx(cfg.lr * (1 - 1 / 4) ** 0.9) and lrs[2] == pytest.approx(cfg.lr * (1 - 3 / 4) ** 0.9)
