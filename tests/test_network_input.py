"""The preprocessing record: presets, JSON and text round trips, MONAI transform lists, the way back."""

import json

import numpy as np
import pytest
import torch

import prunekit3d as pk
from prunekit3d.data import NetworkInput, Preprocessing, Volume, normalise_volume, read_labels, read_volumes
from prunekit3d.data.network_input import PARSE_HELP
from prunekit3d.sample import sample_dataset

PRESETS = ["zscore", "zscore:nonzero", "zscore:above:-500", "ct:-57:164", "ct:-1000:1000:50:300",
           "percentile:0.5:99.5", "none"]


def _volume(channels: int = 1, seed: int = 0) -> Volume:
    rng = np.random.default_rng(seed)
    image = rng.normal(40, 300, (channels, 16, 12, 10)).astype(np.float32)
    image[:, :3] = 0.0  # a zero border, as after nnU-Net's crop or a skull-stripped MRI
    label = (rng.random((16, 12, 10)) > 0.7).astype(np.int64) + (np.arange(10) > 6)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    affine[:3, 3] = [-20.0, 10.0, 5.0]
    return Volume("case", image, label, affine=affine)


@pytest.mark.parametrize("text", PRESETS)
def test_presets_round_trip_through_text_and_json(text):
    pre = Preprocessing.parse(text)
    assert str(pre) == text
    assert Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre
    x = pre.apply(_volume())
    assert type(x) is torch.Tensor and x.dtype == torch.float32 and x.shape == (1, 16, 12, 10)


@pytest.mark.parametrize("text", ["ct:1", "ct:5:1", "zscore:foo", "percentile:1:200", "bogus", "zscore:above:x",
                                  "ct:0:1:5:0"])
def test_bad_preprocessing_text_is_refused_with_one_line(text):
    with pytest.raises(ValueError) as err:
        Preprocessing.parse(text)
    assert "\n" not in str(err.value)
    assert PARSE_HELP in str(err.value) or "needs" in str(err.value)


def test_ct_window_clips_and_scales_as_scale_intensity_range():
    v = _volume()
    x = Preprocessing.parse("ct:-57:164").apply(v).numpy()
    np.testing.assert_allclose(x, (v.image.clip(-57, 164) + 57) / 221, atol=1e-6)
    y = Preprocessing.parse("ct:-200:300:40:120").apply(v).numpy()
    np.testing.assert_allclose(y, (v.image.clip(-200, 300) - 40) / 120, atol=1e-5)


def test_zscore_is_per_channel_and_old_normalise_volume_agrees():
    v = _volume(channels=2)
    v.image[1] = v.image[1] * 0.01 + 7
    x = Preprocessing.parse("zscore").apply(v)
    assert torch.allclose(x.mean((1, 2, 3)), torch.zeros(2), atol=1e-5)
    assert torch.allclose(x.std((1, 2, 3), unbiased=False), torch.ones(2), atol=1e-4)
    assert torch.allclose(normalise_volume(v, "zscore"), x)
    assert torch.equal(normalise_volume(v, "none"), torch.from_numpy(v.image))


def test_foreground_zscores_use_the_foreground_statistics():
    v = _volume()
    nonzero = Preprocessing.parse("zscore:nonzero").apply(v)[0]
    inside = torch.from_numpy(v.image[0] != 0)
    assert torch.all(nonzero[~inside] == 0)  # MONAI nonzero=True: zeros stay zero
    assert abs(float(nonzero[inside].mean())) < 1e-5 and abs(float(nonzero[inside].std(unbiased=False)) - 1) < 1e-4
    above = Preprocessing.parse("zscore:above:100").apply(v)[0]
    body = torch.from_numpy(v.image[0] > 100)
    assert abs(float(above[body].mean())) < 1e-5 and abs(float(above[body].std(unbiased=False)) - 1) < 1e-4
    assert float(above[~body].max()) < float(above[body].min())  # the rest normalised with the same statistics


def test_percentile_clips_to_the_image_percentiles_then_zscores():
    v = _volume()
    x = Preprocessing.parse("percentile:5:95").apply(v).numpy()
    lo, hi = np.percentile(v.image, [5, 95])
    clipped = v.image.clip(lo, hi)
    np.testing.assert_allclose(x, (clipped - clipped.mean()) / clipped.std(), atol=1e-4)


@pytest.mark.parametrize("spacing, orientation", [((0.75, 0.75, 1.5), None), (None, "PIL"), ((3.0, 3.0, 3.0), "LPS")])
def test_spacing_and_orientation_resample_and_invert_onto_the_image_grid(spacing, orientation):
    v = _volume()
    prepared = Preprocessing.parse("ct:-57:164", spacing=spacing, orientation=orientation).prepare(v)
    assert isinstance(prepared, NetworkInput)
    expected = np.array(v.image.shape[1:], dtype=float)
    if spacing is not None:
        expected = expected * np.array([1.5, 1.5, 3.0]) / np.array(spacing)
    if orientation == "PIL":
        expected = expected[[1, 2, 0]]
    assert np.abs(np.array(prepared.image.shape[1:]) - expected).max() <= 1, (prepared.image.shape, expected)
    assert prepared.label.shape == prepared.image.shape[1:]
    back = prepared.to_original(prepared.label[None].float(), nearest=True)
    assert back.shape == (1, *v.image.shape[1:])
    agree = float((back[0].round().long() == torch.from_numpy(v.label)).float().mean())
    assert agree > (0.999 if spacing != (3.0, 3.0, 3.0) else 0.6), agree  # 3 mm in-plane loses detail, not place


def test_a_bundle_transform_list_runs_as_the_same_preset(tmp_path):
    transforms = {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
        {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -57, "a_max": 164, "b_min": 0.0,
         "b_max": 1.0, "clip": True},
        {"_target_": "EnsureTyped", "keys": "@image_key"},
    ]}
    file = tmp_path / "pre.json"
    file.write_text(json.dumps(transforms))
    pre = Preprocessing.parse(str(file))
    assert pre.scheme == "monai" and len(pre.transforms) == 5
    pre = Preprocessing.from_monai(transforms, {"image_key": "image"})
    v = _volume()
    assert torch.allclose(pre.apply(v), Preprocessing.parse("ct:-57:164").apply(v))
    again = Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict())))
    assert again == pre and torch.allclose(again.apply(v), pre.apply(v))
    record = tmp_path / "record.json"
    record.write_text(json.dumps(pre.to_dict()))
    assert Preprocessing.parse(str(record), spacing=(2, 2, 2)).spacing == (2.0, 2.0, 2.0)


@pytest.mark.parametrize("transforms, message", [
    ([{"_target_": "ScaleIntensityRange", "a_min": 0, "a_max": 1, "b_min": 0, "b_max": 1}], "dictionary versions"),
    ([{"_target_": "NoSuchTransformd", "keys": "image"}], "NoSuchTransformd"),
    ([{"_target_": "NormalizeIntensityd", "keys": "label"}], "label"),
])
def test_broken_transform_lists_fail_with_one_line(transforms, message):
    with pytest.raises(ValueError, match=message) as err:
        Preprocessing.from_monai(transforms).apply(_volume())
    assert "\n" not in str(err.value)


def test_the_record_travels_in_an_artifact_manifest(tmp_path):
    pre = Preprocessing.parse("ct:-57:164", spacing=(1.5, 1.5, 2.0), orientation="RAS")
    net = torch.nn.Conv3d(1, 2, 3)
    pk.save(net, tmp_path / "a", extra=pre.into_extra({"patch_size": [32, 32, 32]}))
    manifest = pk.load_manifest(tmp_path / "a")
    assert Preprocessing.from_manifest(manifest) == pre
    assert manifest["extra"]["patch_size"] == [32, 32, 32]
    pk.save(net, tmp_path / "b")
    assert Preprocessing.from_manifest(pk.load_manifest(tmp_path / "b")) is None


def test_the_sample_ct_keeps_its_affine_and_labels_through_a_resampling():
    volume = read_volumes(sample_dataset())[0]
    read_labels(sample_dataset(), [volume])
    assert volume.affine is not None and volume.affine.shape == (4, 4)
    prepared = Preprocessing.parse("zscore", spacing=(2.0, 2.0, 2.0)).prepare(volume)
    assert np.abs(np.array(prepared.image.shape[1:]) - [183, 151.5, 45]).max() <= 1
    assert set(prepared.label.unique().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("text", PRESETS)
def test_preprocessing_never_changes_the_volume(text):
    v = _volume()
    before = v.image.copy()
    Preprocessing.parse(text).prepare(v)  # no resampling first: a transform would see the array itself
    assert np.array_equal(v.image, before)


def test_artifacts_from_before_the_record_are_read_as_what_they_did():
    assert Preprocessing.from_manifest({"extra": {"normalize": "zscore"}}) == Preprocessing("zscore")
    fingerprint = [{"percentile_00_5": -980.0, "percentile_99_5": 240.0, "mean": 60.0, "std": 55.0}]
    trained = {"extra": {"modalities": ["CT"], "fingerprint": fingerprint, "spacing": [1.5, 1.5, 3.0]}}
    pre = Preprocessing.from_manifest(trained)
    assert str(pre) == "ct:-980:240:60:55 [orientation RAS, spacing (1.5, 1.5, 3.0)]"
    # ... which is what training fed the network (Normalise after orientation and resampling):
    from monai.data import MetaTensor

    from prunekit3d.data import Normalise

    v = _volume()
    expected = Normalise("image", ["CT"], fingerprint)({"image": MetaTensor(torch.from_numpy(v.image))})["image"]
    assert torch.allclose(Preprocessing.from_dict({**pre.to_dict(), "spacing": None, "orientation": None}).apply(v),
                          expected.as_tensor(), atol=1e-5)
    assert Preprocessing.from_manifest({"extra": {"modalities": ["MR"], "fingerprint": fingerprint}}).scheme == "zscore"
    assert Preprocessing.from_manifest({"extra": {"modalities": ["CT", "MR"], "fingerprint": fingerprint * 2}}) is None
