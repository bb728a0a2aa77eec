"""prunekit3d.io.files: what an output directory may replace. Nothing of the user's is ever deleted."""

import json

import pytest
import torch

from prunekit3d.io import save
from prunekit3d.io.files import atomic_directory, check_inputs_outside, check_output_dir, is_prunekit3d_output


def _user_folder(path):
    """A folder of the user's: images and notes, no prunekit3d manifest."""
    (path / "images").mkdir(parents=True)
    (path / "images" / "case_0.nii.gz").write_bytes(b"voxels")
    (path / "notes.txt").write_text("mine")
    return path


def _snapshot(path):
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else b"") for p in path.rglob("*"))


def _artifact(path):
    return save(torch.nn.Conv3d(1, 2, 3), path)


def test_a_folder_prunekit3d_did_not_write_is_refused_and_untouched_even_with_overwrite(tmp_path):
    data = _user_folder(tmp_path / "data")
    before = _snapshot(data)
    with pytest.raises(FileExistsError, match="not a directory prunekit3d wrote"):
        check_output_dir(data, overwrite=True)
    with pytest.raises(FileExistsError, match="not a directory prunekit3d wrote"):
        save(torch.nn.Conv3d(1, 2, 3), data, overwrite=True)
    refused = pytest.raises(FileExistsError, match="not a directory prunekit3d wrote")
    with refused, atomic_directory(data, overwrite=True) as tmp:  # the writers' own check
        (tmp / "manifest.json").write_text(json.dumps({"format": "prunekit3d.artifact"}))
    assert _snapshot(data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temporary or moved-aside directory


def test_a_manifest_of_another_tool_does_not_count(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "someone.else"}))
    assert not is_prunekit3d_output(other)
    (other / "manifest.json").write_text("[1, 2]")
    assert not is_prunekit3d_output(other)
    with pytest.raises(FileExistsError, match="not a directory prunekit3d wrote"):
        check_output_dir(other, overwrite=True)


def test_without_overwrite_even_an_artifact_is_kept(tmp_path):
    out = _artifact(tmp_path / "small")
    with pytest.raises(FileExistsError, match="--overwrite"):
        check_output_dir(out, what="--out")
    assert check_output_dir(out, overwrite=True) == out.resolve()  # an artifact may be replaced when asked


def test_an_artifact_is_replaced_with_overwrite(tmp_path):
    out = _artifact(tmp_path / "small")
    assert is_prunekit3d_output(out)
    save(torch.nn.Conv3d(1, 4, 3), out, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["weights"]["parameters"] == 4 * 27 + 4


@pytest.mark.parametrize("where", ["equal", "under", "deep under"])
def test_an_input_inside_out_is_refused(tmp_path, where):
    data = _user_folder(tmp_path / "data")
    given = {"equal": data, "under": data / "images", "deep under": data / "images" / "case_0.nii.gz"}[where]
    before = _snapshot(data)
    with pytest.raises(ValueError, match="writing there would delete it"):
        check_output_dir(data, inputs=["model.pt", given], overwrite=True)
    assert _snapshot(data) == before


def test_an_input_under_a_prunekit3d_output_is_refused_too(tmp_path):
    out = _artifact(tmp_path / "small")
    with pytest.raises(ValueError, match=r"--out .* holds the input"):
        check_output_dir(out, inputs=[out / "weights.safetensors"], overwrite=True)


def test_symlinks_are_resolved(tmp_path):
    data = _user_folder(tmp_path / "data")
    link = tmp_path / "link"
    link.symlink_to(data, target_is_directory=True)
    with pytest.raises(ValueError, match="holds the input"):  # --out through a link to the data folder
        check_output_dir(link, inputs=[data / "images"])
    with pytest.raises(ValueError, match="holds the input"):  # an input through a link into --out
        check_inputs_outside(data, [link / "images"])
    with pytest.raises(FileExistsError, match="not a directory prunekit3d wrote"):
        check_output_dir(link, overwrite=True)


def test_an_output_inside_an_input_folder_is_allowed(tmp_path):
    # Writing a new directory inside a data folder replaces nothing of it.
    data = _user_folder(tmp_path / "data")
    assert check_output_dir(data / "compressed", inputs=[data]) == (data / "compressed").resolve()


def test_an_output_inside_a_source_model_folder_is_refused(tmp_path):
    # A compressed copy of a model folder or bundle never goes into the folder it copies.
    source = _user_folder(tmp_path / "Dataset001__nnUNetTrainer__nnUNetPlans__3d_fullres")
    with pytest.raises(ValueError, match="lies inside the source"):
        check_output_dir(source / "compressed", sources=[source])
    with pytest.raises(ValueError, match="is the input"):
        check_output_dir(source, sources=[source], overwrite=True)
    assert check_output_dir(tmp_path / "compressed", sources=[source]) == (tmp_path / "compressed").resolve()


def test_a_bundle_prunekit3d_wrote_is_recognised_by_its_marker(tmp_path):
    bundle = _user_folder(tmp_path / "bundle")
    assert not is_prunekit3d_output(bundle)
    (bundle / "prunekit3d.json").write_text(json.dumps({"format": "prunekit3d.bundle"}))
    assert is_prunekit3d_output(bundle)
    (bundle / "prunekit3d.json").write_text(json.dumps({"format": "somebody.else"}))
    assert not is_prunekit3d_output(bundle)


def test_a_file_is_never_an_output_directory(tmp_path):
    file = tmp_path / "model.pt"
    file.write_bytes(b"weights")
    with pytest.raises(FileExistsError, match="is a file"):
        check_output_dir(file, overwrite=True)
    with pytest.raises(FileExistsError, match="is a file"):
        save(torch.nn.Conv3d(1, 2, 3), file, overwrite=True)
    assert file.read_bytes() == b"weights"


def test_a_writer_may_replace_its_own_earlier_directory(tmp_path):
    # A checkpoint has no manifest, but the new one rewrites every entry of the old one.
    ckpt = tmp_path / "checkpoint"
    for step in (1, 2):
        with atomic_directory(ckpt, overwrite=True) as tmp:
            (tmp / "state.json").write_text(json.dumps({"step": step}))
            (tmp / "model.safetensors").write_bytes(b"w")
    assert json.loads((ckpt / "state.json").read_text()) == {"step": 2}
    (ckpt / "theirs.txt").write_text("someone else's")  # an entry the writer does not rewrite
    refused = pytest.raises(FileExistsError, match="not a directory prunekit3d wrote")
    with refused, atomic_directory(ckpt, overwrite=True) as tmp:
        (tmp / "state.json").write_text(json.dumps({"step": 3}))
        (tmp / "model.safetensors").write_bytes(b"w")
    assert json.loads((ckpt / "state.json").read_text()) == {"step": 2}
    assert (ckpt / "theirs.txt").read_text() == "someone else's"


def test_atomic_directory_through_a_link_replaces_the_target_and_keeps_the_link(tmp_path):
    real = _artifact(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    save(torch.nn.Conv3d(1, 4, 3), link, overwrite=True)
    assert link.is_symlink() and json.loads((real / "manifest.json").read_text())["weights"]["parameters"] == 112
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
