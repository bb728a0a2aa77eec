import json
import os
import pickle
import shutil
import sys

import pytest
import safetensors
import torch
from networks import first_output, plain_conv_unet

import prunekit3d as pk
from prunekit3d.calibrate import calibrate
from prunekit3d.io import ArtifactError, from_spec, load, load_manifest, save
from prunekit3d.models import psp_seg
from prunekit3d.prune import active_branches, prune
from prunekit3d.slim import slim

DYNUNET = {
    "import_path": "monai.networks.nets.DynUNet",
    "kwargs": {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 3,
        "kernel_size": [3, 3, 3, 3],
        "strides": [1, 2, 2, 2],
        "upsample_kernel_size": [2, 2, 2],
        "filters": [8, 16, 32, 64],
        "res_block": True,
    },
}


def _randomise_gates(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in pk.redundant_modules(model):
            m.gates.add_(torch.randn(m.gates.shape, generator=g) * 0.3)


def _outputs(y):
    return list(y) if isinstance(y, (list, tuple)) else [y]


@torch.no_grad()
def _max_diff(a, b, x):
    return max((u - v).abs().max().item() for u, v in zip(_outputs(a(x)), _outputs(b(x)), strict=True))


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def pruned_dynunet():
    """A DynUNet wrapped, calibrated and pruned twice (two events), with its plans and a test input."""
    torch.manual_seed(0)
    model = from_spec(DYNUNET)
    x = torch.randn(1, 1, 16, 16, 16)  # wrapping and comparing outputs; calibration batches are 32^3
    pk.wrap(model, x, branches=4)
    _randomise_gates(model)
    plans = []
    for _ in range(2):
        plan = calibrate(model, [torch.randn(1, 1, 32, 32, 32) for _ in range(2)], step=1)
        prune(model, plan)
        plans.append(plan)
    return model.eval(), plans, x


@pytest.fixture(scope="module")
def dynunet_artifact(pruned_dynunet, tmp_path_factory):
    model, plans, _ = pruned_dynunet
    return save(model, tmp_path_factory.mktemp("artifacts") / "dynunet", plans=plans, extra={"patch_size": [32] * 3})


@pytest.fixture
def artifact(dynunet_artifact, tmp_path):
    """A private copy of the DynUNet artifact that a test may damage."""
    return shutil.copytree(dynunet_artifact, tmp_path / "copy")


# ---- round trips on real networks -----------------------------------------------------------------
def test_dynunet_pruned_twice_round_trips_through_its_spec(pruned_dynunet, dynunet_artifact):
    model, plans, x = pruned_dynunet
    loaded = load(dynunet_artifact)
    reference = slim(model).eval()
    assert not pk.redundant_modules(loaded) and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))  # same slim architecture, same weights
    assert _max_diff(loaded, model, x) <= 1e-5  # and what the masked network computes
    manifest = load_manifest(dynunet_artifact)
    assert _params(loaded) == _params(reference) == manifest["weights"]["parameters"] < _params(model)
    assert [s["kind"] for s in manifest["steps"]] == ["wrap", "slim"]
    assert manifest["steps"][0]["spec"] == pk.wrap_spec(model).to_dict()
    assert manifest["steps"][1]["active"] == active_branches(model)
    assert all(len(a) == 3 for a in manifest["steps"][1]["active"].values())  # 5 branches, 2 events of step 1
    assert manifest["plans"] == [p.to_dict() for p in plans]
    assert manifest["model"]["spec"] == DYNUNET and manifest["extra"] == {"patch_size": [32, 32, 32]}
    assert any(k.startswith("skip_layers.") for k in manifest["weights"]["tied"])  # DynUNet's second names


def test_saving_a_loaded_model_again_round_trips(dynunet_artifact, pruned_dynunet, tmp_path):
    _, _, x = pruned_dynunet
    loaded = load(dynunet_artifact)
    with torch.no_grad():
        for p in loaded.parameters():  # stands in for fine-tuning the slim network
            p.mul_(1.01)
    again = load(save(loaded, tmp_path / "again"))
    assert load_manifest(tmp_path / "again")["steps"] == load_manifest(dynunet_artifact)["steps"]
    with torch.no_grad():
        assert torch.equal(again(x), loaded(x))


def test_a_plain_network_round_trips_with_no_steps(tmp_path):
    model = from_spec(DYNUNET).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    loaded = load(save(model, tmp_path / "plain"))
    assert load_manifest(tmp_path / "plain")["steps"] == []
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_psp_seg_s_round_trips_through_the_registry_spec(tmp_path):
    model = psp_seg("S", in_channels=1, out_channels=2)
    _randomise_gates(model)
    for i, (_, m) in enumerate(pk.redundant_modules(model)):
        m.mask([i % 4, (i + 1) % 4][: 1 + i % 2])  # a mixed pattern: one or two of four branches off
    model.eval()
    x = torch.randn(1, 1, 32, 16, 16)  # the smallest input with two bottleneck voxels
    loaded = load(save(model, tmp_path / "psp"))
    manifest = load_manifest(tmp_path / "psp")
    assert manifest["model"]["spec"] == model.spec and loaded.spec == model.spec
    assert [s["kind"] for s in manifest["steps"]] == ["slim"]  # its redundant modules are part of the base
    assert _max_diff(loaded, model, x) <= 1e-5
    assert _params(loaded) == _params(slim(model)) == manifest["weights"]["parameters"]


def test_plain_conv_unet_with_tied_encoder_loads_into_a_given_instance(tmp_path):
    model, _ = plain_conv_unet()
    x = torch.randn(1, 1, 16, 16, 16)
    pk.wrap(model, x, branches=4)
    _randomise_gates(model)
    for _, m in pk.redundant_modules(model):
        m.mask([1])
    model.eval()
    path = save(model, tmp_path / "nnunet")
    with safetensors.safe_open(path / "weights.safetensors", framework="pt") as f:
        stored = list(f.keys())
    assert stored and not any(k.startswith("decoder.encoder.") for k in stored)  # one copy of the encoder
    assert load_manifest(path)["model"]["spec"] is None
    with pytest.raises(ArtifactError, match=r"model="):
        load(path)
    loaded = load(path, model=plain_conv_unet()[0])
    assert loaded.decoder.encoder is loaded.encoder  # still tied after loading
    assert _max_diff(loaded, model, x) <= 1e-5
    with torch.no_grad():
        assert torch.equal(first_output(loaded(x)), first_output(slim(model).eval()(x)))


# ---- damaged or mismatching artifacts ---------------------------------------------------------------
def test_missing_directory_manifest_or_weights(artifact, tmp_path):
    with pytest.raises(ArtifactError, match="not a directory"):
        load(tmp_path / "nowhere")
    (artifact / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"weights\.safetensors is missing"):
        load(artifact)
    (artifact / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        load_manifest(artifact)


def test_truncated_weights(artifact):
    file = artifact / "weights.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=rf"weights\.safetensors has {len(data) // 2} bytes.*truncated"):
        load(artifact)


def test_changed_weights_fail_the_checksum(artifact):
    file = artifact / "weights.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF  # same size, one weight byte different
    file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"weights\.safetensors: sha256 checksum mismatch"):
        load(artifact)


def test_edited_manifest_fails_its_checksum(artifact):
    file = artifact / "manifest.json"
    manifest = json.loads(file.read_text())
    manifest["steps"][1]["active"][next(iter(manifest["steps"][1]["active"]))] = [0]
    file.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"manifest\.json: checksum mismatch"):
        load(artifact)


def test_manifest_that_is_not_json(artifact):
    file = artifact / "manifest.json"
    file.write_text(file.read_text()[:-20])
    with pytest.raises(ArtifactError, match=r"manifest\.json is not valid JSON"):
        load_manifest(artifact)


def test_wrong_model_instance_names_the_key_and_both_shapes(artifact):
    kwargs = dict(DYNUNET["kwargs"], filters=[4, 16, 32, 64])
    with pytest.raises(ArtifactError) as info:
        load(artifact, model=from_spec(dict(DYNUNET, kwargs=kwargs)))
    message = str(info.value)
    assert "weights.safetensors" in message and "'input_block.conv1.conv.weight'" in message
    assert "(8, 1, 3, 3, 3) in the file" in message and "(4, 1, 3, 3, 3) in the model" in message


def test_a_wrapped_instance_is_refused_as_the_base(artifact, pruned_dynunet):
    with pytest.raises(ArtifactError, match="unwrapped base network"):
        load(artifact, model=pruned_dynunet[0])


def test_saving_an_already_slim_model_is_refused(pruned_dynunet, tmp_path):
    with pytest.raises(ValueError, match="before slim"):
        save(slim(pruned_dynunet[0]), tmp_path / "slim")
    assert not (tmp_path / "slim").exists()


# ---- writing: overwrite, atomicity, no pickle -------------------------------------------------------
def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_overwrite_is_refused_unless_asked(artifact, pruned_dynunet, tmp_path):
    model, _, x = pruned_dynunet
    before = (artifact / "manifest.json").read_text()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(model, artifact)
    assert (artifact / "manifest.json").read_text() == before
    save(model, artifact, extra={"run": 2}, overwrite=True)
    assert load_manifest(artifact)["extra"] == {"run": 2} and _leftovers(artifact.parent) == []
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a directory prunekit3d wrote"):
        save(model, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_a_failure_while_writing_leaves_nothing(pruned_dynunet, tmp_path):
    model, _, _ = pruned_dynunet

    def fail(module, state, prefix, local_metadata):
        raise RuntimeError("disk full")

    handle = model.register_state_dict_post_hook(fail)
    try:
        with pytest.raises(RuntimeError, match="disk full"):
            save(model, tmp_path / "out")
    finally:
        handle.remove()
    assert list(tmp_path.iterdir()) == []  # no target, no temporary directory


def test_a_directory_that_appears_while_saving_is_kept(pruned_dynunet, tmp_path):
    model, _, _ = pruned_dynunet
    target = tmp_path / "out"

    def someone_else_writes(module, state, prefix, local_metadata):
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")

    handle = model.register_state_dict_post_hook(someone_else_writes)
    try:
        with pytest.raises(FileExistsError, match="overwrite=True"):
            save(model, target)
    finally:
        handle.remove()
    assert [p.name for p in target.iterdir()] == ["theirs.txt"] and _leftovers(tmp_path) == []


def test_a_failed_replace_keeps_the_old_artifact(artifact, pruned_dynunet, monkeypatch):
    model, _, x = pruned_dynunet
    before = load(artifact)
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in os.fspath(src):  # moving the new directory into place fails
            raise OSError("simulated rename failure")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="simulated"):
        save(model, artifact, extra={"run": 2}, overwrite=True)
    monkeypatch.undo()
    assert load_manifest(artifact)["extra"] == {"patch_size": [32, 32, 32]}
    assert _leftovers(artifact.parent) == []
    with torch.no_grad():
        assert torch.equal(load(artifact)(x), before(x))


def test_load_never_unpickles(dynunet_artifact, pruned_dynunet, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("pickle was used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = load(dynunet_artifact)
    assert _max_diff(loaded, pruned_dynunet[0], pruned_dynunet[2]) <= 1e-5


# ---- from_spec ----------------------------------------------------------------------------------------
def test_from_spec_builds_registry_and_import_path_models():
    assert type(from_spec({"name": "psp_seg_s", "in_channels": 1, "out_channels": 2})).__name__ == "PSPSeg"
    net = from_spec(DYNUNET)
    assert type(net).__name__ == "DynUNet" and net.spec == DYNUNET


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"import_path": "no_such_package.nets.Net"}, "'no_such_package' is not importable"),
        ({"import_path": "monai.networks.nets.DynUNett"}, "has no attribute 'DynUNett'.*'DynUNet'"),
        ({"import_path": "os.system", "kwargs": {"command": "true"}}, "outside the import allow-list"),
        ({"import_path": "subprocess.Popen", "kwargs": {"args": ["true"]}}, "outside the import allow-list"),
        ({"import_path": "monai.networksfoo.Net"}, "outside the import allow-list"),  # whole components only
        ({"import_path": "monai.apps.Net"}, "outside the import allow-list"),
        ({"import_path": "monai.networks.nets.dynunet.nn.Conv3d"}, "is the module 'torch.nn' imported there"),
        ({"import_path": "monai.networks.nets.DynUNet.__init__"}, "walks through '__init__'"),
        ({"import_path": "monai.networks.nets.DynUNet; rm"}, "dotted Python names"),
        ({"import_path": "prunekit3d.io.spec.from_spec"}, "not an nn.Module class"),
        (dict(DYNUNET, kwargs=dict(DYNUNET["kwargs"], norm_name=["instance", {"affine": torch.nn.ReLU}])),
         r"spec\['kwargs'\]\['norm_name'\]\[1\]\['affine'\] is a builtins.type"),
        (dict(DYNUNET, kwargs=dict(DYNUNET["kwargs"], strides={1: 2})), "has the key 1"),
        (dict(DYNUNET, kwargs=dict(DYNUNET["kwargs"], dropout=float("nan"))), "no NaN"),
        (dict(DYNUNET, kwargs=dict(DYNUNET["kwargs"], widths=[8])), r"does not take \['widths'\]"),
        ({"import_path": "monai.networks.nets.DynUNet", "kwargs": {"spatial_dims": 3}}, r"needs \['in_channels'"),
        ({"name": "psp_seg_x"}, "unknown model 'psp_seg_x'"),
        ({"name": "psp_seg_s", "in_channels": 1, "out_channels": 2, "depth": 3}, "depth"),
        ({"name": "psp_seg_s", "import_path": "a.B"}, "exactly one of"),
        ({"import_path": "monai.networks.nets.DynUNet", "kwargs": {"act": torch.nn.ReLU}}, "plain JSON"),
    ],
)
def test_from_spec_errors_name_the_problem(spec, message):
    with pytest.raises(ValueError, match=message):
        from_spec(spec)


def test_atomic_file_replaces_only_on_success(tmp_path):
    from prunekit3d.io.files import atomic_file, write_json

    target = tmp_path / "sub" / "report.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_file(target) as tmp:
            tmp.write_text("half", encoding="utf-8")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"a": 1}  # the old file is still whole
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]  # no temporary left behind


# ---- untrusted artifacts: nothing outside the import allow-list is imported ------------------------------
UNLISTED = '''
from pathlib import Path
import torch
Path(__file__).with_name("IMPORTED").write_text("ran")  # what a malicious package would do on import


class Net(torch.nn.Conv3d):
    def __init__(self):
        super().__init__(1, 2, 3)
'''


def _respec(artifact, import_path):
    """The artifact's manifest naming ``import_path``, re-signed: the checksum certifies only itself."""
    from prunekit3d.io.artifact import _checksum

    file = artifact / "manifest.json"
    manifest = json.loads(file.read_text())
    manifest["model"]["spec"] = {"import_path": import_path, "kwargs": {}}
    manifest["checksum"] = _checksum(manifest)
    file.write_text(json.dumps(manifest))


@pytest.fixture
def unlisted_package(tmp_path, monkeypatch):
    package = tmp_path / "site" / "some_unlisted_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(UNLISTED)
    monkeypatch.syspath_prepend(str(package.parent))
    yield package
    sys.modules.pop("some_unlisted_pkg", None)


@pytest.mark.parametrize("import_path", ["os.system", "subprocess.Popen", "some_unlisted_pkg.Net"])
def test_an_artifact_naming_an_unlisted_import_is_refused_before_anything_is_imported(
    import_path, unlisted_package, tmp_path
):
    artifact = save(torch.nn.Conv3d(1, 2, 3), tmp_path / "downloaded")
    _respec(artifact, import_path)
    modules = set(sys.modules)
    with pytest.raises(ArtifactError,
                       match=r"outside the import allow-list.*allow_imports=\[.*PRUNEKIT3D_ALLOW_IMPORTS"):
        load(artifact)
    assert set(sys.modules) == modules  # not even a parent package was imported
    assert not (unlisted_package / "IMPORTED").exists()


def test_an_allowed_import_builds_through_the_argument_or_the_environment(unlisted_package, tmp_path, monkeypatch):
    conv = torch.nn.Conv3d(1, 2, 3)
    artifact = save(conv, tmp_path / "mine")
    _respec(artifact, "some_unlisted_pkg.Net")
    loaded = load(artifact, allow_imports=["some_unlisted_pkg"])
    assert type(loaded).__name__ == "Net" and (unlisted_package / "IMPORTED").exists()
    assert torch.equal(loaded.weight, conv.weight)
    sys.modules.pop("some_unlisted_pkg")
    monkeypatch.setenv("PRUNEKIT3D_ALLOW_IMPORTS", "other_pkg, some_unlisted_pkg")
    assert type(load(artifact)).__name__ == "Net"
    monkeypatch.delenv("PRUNEKIT3D_ALLOW_IMPORTS")
    net = from_spec({"import_path": "some_unlisted_pkg.Net"}, allow_imports=["some_unlisted_pkg.Net"])
    assert type(net).__name__ == "Net"


def test_registry_names_need_no_allow_list(monkeypatch):
    monkeypatch.setenv("PRUNEKIT3D_ALLOW_IMPORTS", "")
    assert type(from_spec({"name": "psp_seg_s", "in_channels": 1, "out_channels": 2})).__name__ == "PSPSeg"
