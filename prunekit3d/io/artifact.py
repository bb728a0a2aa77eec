"""Save and load a pruned model as a checked, pickle-free artifact directory.

``save`` slims the model (if it still holds redundant modules) and writes the plain slim network's
weights plus a manifest of how to rebuild its architecture; ``load`` replays that recipe on a fresh
base network and loads the weights::

    save:  model --record steps (wrap spec, mask pattern)--> slim(model) --state_dict--> weights.safetensors
                                                                                 \\--> manifest.json
    load:  manifest.json --base spec--> from_spec() (or model=) --replay steps--> slim skeleton
           weights.safetensors --sha256, keys, shapes--> load_state_dict(strict=True) --> slim model

See :mod:`prunekit3d.io` for the directory layout and the manifest fields.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from prunekit3d.channels import ChannelPlan, apply_channel_plan, channel_record
from prunekit3d.io.errors import ArtifactError
from prunekit3d.io.files import atomic_directory, check_output_dir, sha256
from prunekit3d.io.spec import check_spec, from_spec
from prunekit3d.io.weights import fit_state, read_weights, split_tied
from prunekit3d.plan import PrunePlan
from prunekit3d.prune import active_branches
from prunekit3d.slim import GatedBlock, SlimParallel, set_active_branches, slim
from prunekit3d.wrap import WrapSpec, apply_wrap_spec, redundant_modules, unwrap, wrap_spec

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "STEPS_ATTR",
    "WEIGHTS",
    "load",
    "load_manifest",
    "record_steps",
    "replay_steps",
    "save",
]

FORMAT = "prunekit3d.artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
#: Attribute of a loaded model holding the structural steps that built it, so that saving it again
#: (e.g. after fine-tuning the slim model) records them.
STEPS_ATTR = "prunekit3d_steps"

Step = dict[str, Any]


# ---- structural steps: what turns the base network into the saved architecture ---------------------
def _replay_wrap(model: nn.Module, step: Step) -> nn.Module:
    return apply_wrap_spec(model, WrapSpec.from_dict(step["spec"]))


def _replay_slim(model: nn.Module, step: Step) -> nn.Module:
    return slim(set_active_branches(model, step["active"]), inplace=True)


#: Replay function per step kind; a new structural operation (e.g. channel pruning) adds one entry.
def _replay_channels(model: nn.Module, step: Step) -> nn.Module:
    return apply_channel_plan(model, ChannelPlan.from_dict(step["plan"]))


_REPLAY: dict[str, Callable[[nn.Module, Step], nn.Module]] = {
    "wrap": _replay_wrap,
    "slim": _replay_slim,
    "channels": _replay_channels,
}


def _record_steps(model: nn.Module) -> tuple[nn.Module, list[Step]]:
    """The plain model to save and the steps that rebuild its architecture from the base network."""
    steps = [dict(s) for s in getattr(model, STEPS_ATTR, [])]
    if (not steps and not redundant_modules(model)
            and any(isinstance(m, (GatedBlock, SlimParallel)) for m in model.modules())):
        raise ValueError(
            f"this {type(model).__name__} was slimmed by prunekit3d.slim, which drops the masks that rebuild it; "
            "save the model before slim() (save slims it itself), or save a model returned by load()"
        )
    # Channel rounds replay where they happened: on the plain network, or between wrap and slim.
    rounds = channel_record(model)
    steps += [{"kind": "channels", "plan": p.to_dict()} for p in rounds.at("plain")]
    if redundant_modules(model):
        blocks = wrap_spec(model)
        if blocks.blocks:
            steps.append({"kind": "wrap", "spec": blocks.to_dict()})
        steps += [{"kind": "channels", "plan": p.to_dict()} for p in rounds.at("redundant")]
        steps.append({"kind": "slim", "active": active_branches(model)})
        model = slim(model)
    return model, steps


def _replay(base: nn.Module, steps: Sequence[Step], where: Path) -> nn.Module:
    model = base
    for i, step in enumerate(steps):
        kind = step.get("kind") if isinstance(step, Mapping) else None
        if kind not in _REPLAY:
            raise ArtifactError(
                f"{where}: step {i} is {kind!r}, which this prunekit3d cannot replay (it knows {sorted(_REPLAY)}); "
                "the artifact may come from a newer prunekit3d"
            )
        try:
            model = _REPLAY[kind](model, step)
        except (ValueError, TypeError, KeyError, IndexError) as err:
            raise ArtifactError(f"{where}: step {i} ({kind}) does not fit the base model: {err}") from err
    return model


def record_steps(model: nn.Module) -> tuple[nn.Module, list[Step]]:
    """The plain (slim) network of ``model`` and the structural steps that rebuild it from its base network.

    ``model`` is not changed (a wrapped model is slimmed in a copy). The steps are plain JSON, the
    manifest's ``steps`` field; :func:`replay_steps` turns a fresh base network into the same architecture.
    """
    return _record_steps(unwrap(model))


def replay_steps(base: nn.Module, steps: Sequence[Step], where: str | os.PathLike = "steps") -> nn.Module:
    """Replay ``steps`` (from :func:`record_steps` or a manifest) on the fresh, unwrapped network ``base``.

    Raises:
        ArtifactError: a step of unknown kind, or one that does not fit ``base`` (named with ``where``).
    """
    return _replay(base, steps, Path(where))


# ---- manifest -------------------------------------------------------------------------------------
def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _checksum(manifest: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "checksum"})).hexdigest()


def _jsonable(value: Any, what: str) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be JSON-serialisable (numbers, strings, lists, dicts): {err}") from None
    return value


def _class_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the artifact at ``path``, checked (format, version, its own checksum); files are not read.

    Raises:
        ArtifactError: no such directory or manifest, bad JSON, another format, a newer version, or a
            manifest edited after saving (checksum mismatch).
    """
    root = Path(path)
    file = root / MANIFEST
    if not root.is_dir():
        raise ArtifactError(f"{root}: no artifact here (not a directory); save one with prunekit3d.save(model, path)")
    if not file.is_file():
        raise ArtifactError(f"{file} is missing: {root} is not a prunekit3d artifact, or it was not saved completely")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{file} is not valid JSON ({err}); the file is damaged") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{file} is not a prunekit3d manifest (its 'format' is not {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{file} has format version {version!r}; this prunekit3d reads up to {FORMAT_VERSION}: upgrade prunekit3d"
        )
    if manifest.get("checksum") != _checksum(manifest):
        raise ArtifactError(f"{file}: checksum mismatch, the manifest was changed after saving; save the model again")
    for key, kind in (("model", dict), ("steps", list), ("weights", dict), ("files", dict)):
        if not isinstance(manifest.get(key), kind):
            raise ArtifactError(f"{file}: field {key!r} is missing or not a {kind.__name__}")
    return manifest


def _verify_files(root: Path, manifest: Mapping[str, Any]) -> None:
    if WEIGHTS not in manifest["files"]:
        raise ArtifactError(f"{root / MANIFEST} lists no {WEIGHTS}")
    for name, info in manifest["files"].items():
        if Path(name).name != name or name in ("", ".", ".."):
            raise ArtifactError(f"{root / MANIFEST} lists {name!r}; artifact files are plain names in the directory")
        file = root / name
        if not file.is_file():
            raise ArtifactError(f"{file} is missing; the artifact is incomplete")
        size = file.stat().st_size
        if size != info.get("bytes"):
            raise ArtifactError(f"{file} has {size} bytes, the manifest says {info.get('bytes')} (truncated?)")
        if sha256(file) != info.get("sha256"):
            raise ArtifactError(f"{file}: sha256 checksum mismatch, the file was changed or damaged after saving")


# ---- save / load ------------------------------------------------------------------------------------
def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    spec: Mapping[str, Any] | None = None,
    plans: Sequence[PrunePlan | Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as an artifact directory (slimmed if it holds redundant modules), atomically.

    ``model`` itself is not changed (it is slimmed in a copy). The directory appears complete or not
    at all; with ``overwrite=True`` an existing artifact is replaced the same way.

    Args:
        model: the pruned (or wrapped, or PSP-Seg, or plain) network, or one returned by :func:`load`.
        path: the directory to create.
        spec: JSON spec of the *base* network for :func:`from_spec`; defaults to ``model.spec``. Without
            one, :func:`load` needs ``model=`` (a fresh base network instance).
        plans: the prune plans applied so far, oldest first (kept in the manifest as history).
        extra: any JSON-able metadata, e.g. ``{"patch_size": [128, 128, 128]}``.
        overwrite: replace an existing artifact (or other prunekit3d output) at ``path``; never a directory
            prunekit3d did not write (:func:`prunekit3d.io.files.check_output_dir`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example::

        >>> save(pruned, "runs/dynunet_pruned", spec={"import_path": "monai.networks.nets.DynUNet", "kwargs": kw})
        >>> small = load("runs/dynunet_pruned")  # the slim network, weights loaded, in eval mode
    """
    target = Path(path)
    model = unwrap(model)
    spec = getattr(model, "spec", None) if spec is None else spec
    spec = None if spec is None else check_spec(spec)
    plans = [_jsonable(p.to_dict() if isinstance(p, PrunePlan) else dict(p), "a plan") for p in plans]
    extra = _jsonable(dict(extra or {}), "extra")
    check_output_dir(target, overwrite=overwrite, what="path")
    model, steps = _record_steps(model)
    with atomic_directory(target, overwrite=overwrite) as tmp:
        weights, tied = split_tied(model.state_dict())
        safetensors.torch.save_file(weights, tmp / WEIGHTS, metadata={"format": "pt"})
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "prunekit3d_version": _version(),
            "torch_version": torch.__version__,
            "model": {"spec": spec, "class": _class_name(model)},
            "steps": steps,
            "weights": {"file": WEIGHTS, "tied": tied, "parameters": sum(p.numel() for p in model.parameters())},
            "plans": plans,
            "extra": extra,
            "files": {WEIGHTS: {"sha256": sha256(tmp / WEIGHTS), "bytes": (tmp / WEIGHTS).stat().st_size}},
        }
        manifest["checksum"] = _checksum(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return target


def _version() -> str:
    from prunekit3d import __version__  # at call time: the package __init__ may import this module

    return __version__


def _base_model(
    manifest: Mapping[str, Any], model: nn.Module | None, where: Path, allow_imports: Iterable[str]
) -> nn.Module:
    if model is not None:
        model = unwrap(model)
        if any(m.has_original for _, m in redundant_modules(model)):
            raise ArtifactError(
                f"model= is already wrapped ({type(model).__name__} holds wrapped blocks); pass a fresh, "
                "unwrapped base network: load() replays the wrapping itself"
            )
        return model
    spec = manifest["model"].get("spec")
    if spec is None:
        raise ArtifactError(
            f"{where} records no model spec (the {manifest['model'].get('class')} had none when saved): "
            "pass a freshly built base network, load(path, model=...), or save with spec=..."
        )
    try:
        return from_spec(spec, allow_imports=allow_imports)
    except ValueError as err:
        raise ArtifactError(f"{where}: cannot build the base network from its spec: {err}") from err


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    map_location: str | torch.device = "cpu",
    allow_imports: Iterable[str] = (),
) -> nn.Module:
    """Rebuild the saved (slim) network and load its weights; nothing is unpickled, nothing unlisted imported.

    The manifest's spec builds the base network only from the import allow-list
    (:func:`prunekit3d.io.spec.check_import_path`): an artifact from elsewhere cannot make ``load``
    import or run a module you did not allow.

    Args:
        path: an artifact directory written by :func:`save`.
        model: the UNWRAPPED base network to rebuild on, for artifacts saved without a spec (e.g. an
            nnU-Net network built from its plans). It is changed in place; pass a fresh instance.
        map_location: device of the returned model.
        allow_imports: import prefixes the spec may build from beyond the defaults (``prunekit3d``,
            ``monai.networks``, ``dynamic_network_architectures``) and ``PRUNEKIT3D_ALLOW_IMPORTS``,
            e.g. ``["mypkg"]`` for an artifact of your own ``mypkg.Net``.

    Returns:
        The slim network in eval mode, carrying ``.spec`` (if known) and the structural steps, so that
        ``save(load(p), q)`` writes an equivalent artifact.

    Raises:
        ArtifactError: a file is missing, truncated or changed (checksums), the base network cannot be
            built (also: its import path is not allowed), or the weights do not fit it (the first
            missing/unexpected key or mismatching shape).
    """
    root = Path(path)
    manifest = load_manifest(root)
    _verify_files(root, manifest)  # before anything the manifest names is imported or read
    given_class = None if model is None else _class_name(unwrap(model))
    base = _base_model(manifest, model, root / MANIFEST, allow_imports)
    built = _replay(base, manifest["steps"], root / MANIFEST)
    file = root / WEIGHTS
    try:
        state = fit_state(read_weights(file), manifest["weights"].get("tied", {}), built, file)
    except ArtifactError as err:
        saved_class = manifest["model"].get("class")
        if given_class is not None and given_class != saved_class:
            raise ArtifactError(
                f"{err} (the artifact was saved from a {saved_class}; model= is a {given_class})"
            ) from err
        raise
    built.load_state_dict(state, strict=True)
    setattr(built, STEPS_ATTR, manifest["steps"])
    return built.to(map_location).eval()
