"""MONAI bundles in and out: a bundle's network, weights and preprocessing; the compressed network as a bundle.

Read (:func:`read_bundle`)::

    configs/inference.json --monai.bundle.ConfigParser--> network_def (built), "preprocessing" (a Preprocessing
                                                          record of its transforms), inferer roi_size / overlap
    models/model.safetensors | models/model.pt --safetensors | torch.load(weights_only=True)--> weights

Write (:func:`write_bundle`): a copy of the bundle whose networks are the compressed one::

    OUT/configs/*.json       network_def builds the slim network: prunekit3d's SlimNetwork (spec + structural
                             steps, JSON) where the network has a JSON spec, else "$torch.jit.load(... model.ts)"
    OUT/models/model.pt      state dict of that network_def (plain tensors: what the bundle's CheckpointLoader loads)
    OUT/models/model.ts      TorchScript of the slim network, one full-resolution output, the same state-dict keys
                             as model.pt (so ``--network_def "$torch.jit.load(...)"`` runs without prunekit3d)
    OUT/configs/metadata.json  version bumped, a changelog entry, this run's torch / MONAI / numpy versions
    OUT/prunekit3d.json      "format": "prunekit3d.bundle" and provenance (source bundle, steps, parameters)

Reading a bundle evaluates the Python expressions (``"$..."``) of its ``network_def`` and ``preprocessing``,
as ``monai.bundle run`` would; weights are never unpickled.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunekit3d.data.network_input import Preprocessing, root_cause
from prunekit3d.evaluate import output_logits
from prunekit3d.io.files import BUNDLE_MARKER, atomic_directory, check_output_dir, sha256
from prunekit3d.io.rebuild import ARCHITECTURE_KEY
from prunekit3d.sources.state_dict import check_3d, first_conv, fit_weights, read_state_dict

__all__ = ["BUNDLE_FORMAT", "MARKER", "SLIM_NETWORK", "Bundle", "is_bundle", "read_bundle", "write_bundle"]

CONFIG = Path("configs") / "inference.json"
METADATA = Path("configs") / "metadata.json"
#: Where a bundle keeps its weights, in the order they are looked for.
WEIGHT_FILES = (Path("models") / "model.safetensors", Path("models") / "model.pt")
#: The file marking a bundle prunekit3d wrote (io.files.BUNDLE_MARKER), and its format.
MARKER = BUNDLE_MARKER
BUNDLE_FORMAT = "prunekit3d.bundle"
#: The class a written bundle's network_def names to rebuild the slim network from JSON.
SLIM_NETWORK = "prunekit3d.io.rebuild.SlimNetwork"
TORCHSCRIPT_DEF = "$torch.jit.load(@bundle_root + '/models/model.ts', map_location='cpu')"
#: The keys MONAI's metadata schema requires.
REQUIRED_METADATA = ("version", "monai_version", "pytorch_version", "numpy_version", "optional_packages_version",
                     "task", "description", "authors", "copyright", "network_data_format")
_REFERENCE = re.compile(r"@([A-Za-z_]\w*)")


@dataclass
class Bundle:
    """A MONAI bundle as prunekit3d uses it.

    Attributes:
        root: the bundle folder. config: ``configs/inference.json`` as JSON.
        network: ``network_def`` built, its weights loaded, eval mode, on the CPU.
        spec: the network as a :func:`prunekit3d.from_spec` spec when ``network_def`` is plain JSON, else ``None``.
        preprocessing: the ``"preprocessing"`` transforms as a record, or ``None`` if the config has none.
        patch, overlap: the sliding-window inferer's ``roi_size`` (``None`` without one) and ``overlap``.
        weights: the weight file read.
    """

    root: Path
    config: dict[str, Any]
    network: nn.Module
    spec: dict[str, Any] | None
    preprocessing: Preprocessing | None
    patch: tuple[int, ...] | None
    overlap: float
    weights: Path

    def fresh_network(self) -> nn.Module:
        """``network_def`` built anew (untrained): the base network an artifact without spec replays on."""
        return _build(_parser(self.config, self.root), "network_def", self.root / CONFIG)


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a MONAI bundle folder (``configs/inference.json``)."""
    return (Path(path) / CONFIG).is_file()


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None


def _parser(config: Mapping[str, Any], root: Path) -> Any:
    from monai.bundle import ConfigParser

    parser = ConfigParser(copy.deepcopy(dict(config)))
    parser["bundle_root"] = str(root)  # as `monai.bundle run --bundle_root` does: paths resolve in the bundle
    return parser


def _build(parser: Any, key: str, where: Path) -> Any:
    try:
        return parser.get_parsed_content(key, instantiate=True)
    except Exception as err:  # noqa: BLE001 -- ConfigParser wraps import, reference and argument errors alike
        raise ValueError(f"{where}: {key!r} does not build: {root_cause(err)}") from None


def _plain(value: Any) -> bool:
    """JSON without config references or expressions (``@x``, ``$...``, ``%...``)."""
    if isinstance(value, str):
        return not value.startswith(("@", "$", "%"))
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(not str(k).startswith("_") and _plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float))


def _spec(network_def: Any) -> dict[str, Any] | None:
    """``{"import_path": ..., "kwargs": ...}`` of a plain ``{"_target_": "UNet", ...}`` network_def, else ``None``."""
    if not isinstance(network_def, dict) or not isinstance(network_def.get("_target_"), str):
        return None
    kwargs = {k: v for k, v in network_def.items() if k != "_target_"}
    if not _plain(kwargs):
        return None
    target = network_def["_target_"]
    if "." not in target:
        from monai.bundle import ComponentLocator

        module = ComponentLocator().get_component_module_name(target)
        module = [m for m in module if m.startswith("monai.networks")][:1] if isinstance(module, list) else [module]
        if not module or not module[0]:
            return None
        target = f"{module[0]}.{target}"
    return {"import_path": target, "kwargs": kwargs}


def _definitions(config: Mapping[str, Any], value: Any, root: Path) -> dict[str, Any]:
    """The top-level config entries ``value`` refers to as ``@name``, and those they refer to."""
    found: dict[str, Any] = {}
    todo = [value]
    while todo:
        for name in _REFERENCE.findall(json.dumps(todo.pop())):
            if name in config and name not in found:
                found[name] = config[name]
                todo.append(config[name])
    if "bundle_root" in found:
        found["bundle_root"] = str(root)
    return found


def _inferer(parser: Any, config: Mapping[str, Any], where: Path) -> tuple[tuple[int, ...] | None, float]:
    inferer = config.get("inferer")
    if not isinstance(inferer, dict) or "roi_size" not in inferer:
        return None, 0.25
    roi = _build(parser, "inferer::roi_size", where)
    overlap = _build(parser, "inferer::overlap", where) if "overlap" in inferer else 0.25
    roi = [roi] * 3 if isinstance(roi, int) else list(roi)
    return tuple(int(r) for r in roi), float(overlap)


def read_bundle(path: str | Path) -> Bundle:
    """The network (weights loaded), preprocessing and sliding window of the MONAI bundle at ``path``.

    Raises:
        FileNotFoundError: no ``configs/inference.json`` or no weight file.
        ValueError: the config is not JSON, ``network_def`` does not build or is not a 3-D network, or the
            weights are a pickled model (not plain tensors) or do not fit it.
    """
    root = Path(path)
    where = root / CONFIG
    if not where.is_file():
        yaml = where.with_suffix(".yaml")
        hint = "prunekit3d reads JSON configs; convert it with monai.bundle.ConfigParser" if yaml.is_file() else \
            "a MONAI bundle holds configs/inference.json, configs/metadata.json and models/model.pt"
        raise FileNotFoundError(f"{where} does not exist: {hint}")
    config = _read_json(where, "a MONAI bundle holds configs/inference.json")
    if not isinstance(config, dict) or "network_def" not in config:
        raise ValueError(f"{where} defines no 'network_def'; prunekit3d reads the network of a bundle from it")
    parser = _parser(config, root)
    network = _build(parser, "network_def", where)
    if not isinstance(network, nn.Module):
        raise TypeError(f"{where}: network_def builds a {type(network).__name__}, not a torch.nn.Module")
    if not isinstance(network, torch.jit.ScriptModule):  # TorchScript (a bundle prunekit3d wrote) hides its layers
        check_3d(network, f"the network_def of {where}")
    weights = next((root / f for f in WEIGHT_FILES if (root / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{root} has no {' or '.join(str(f) for f in WEIGHT_FILES)}: the bundle's weights")
    fit_weights(network, read_state_dict(weights), weights, f"the network_def of {where}")
    raw = config.get("preprocessing")
    pre = None if raw is None else Preprocessing.from_monai(raw, _definitions(config, raw, root), where=f"{where}: "
                                                            "preprocessing", hint="a Compose or a transform list")
    patch, overlap = _inferer(parser, config, where)
    return Bundle(root, config, network.eval(), _spec(config["network_def"]), pre, patch, overlap, weights)


# ---- writing ------------------------------------------------------------------------------------------
def _slim_network_def(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The network_def of the slim network: its base network spec and structural steps, as JSON."""
    return {"_target_": SLIM_NETWORK, "base": manifest["model"]["spec"], "steps": manifest["steps"]}


def _state_for(network: nn.Module, slim: nn.Module) -> dict[str, torch.Tensor]:
    """The state of ``network`` (built from ``network_def``) holding ``slim``'s weights, in its own keys."""
    inner = getattr(network, "network", network)  # SlimNetwork holds the built network as .network
    try:
        inner.load_state_dict(slim.state_dict())
    except RuntimeError as err:
        raise ValueError(f"{SLIM_NETWORK} builds another network than the slim one ({err}); "
                         "the two prunekit3d parts disagree") from None
    return network.state_dict()


class _FullResolution(nn.Module):
    """The first (full-resolution) output of a network that returns several (deep supervision)."""

    def __init__(self, network: nn.Module, architecture: torch.Tensor | None = None) -> None:
        super().__init__()
        self.network = network
        if architecture is not None:
            # The key SlimNetwork's weights carry: one models/model.pt then fits both network_defs.
            self.register_buffer(ARCHITECTURE_KEY, architecture)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return output_logits(self.network(x))


def _bumped(version: str) -> str:
    found = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)(.*)", version)
    return f"{found[1]}.{found[2]}.{int(found[3]) + 1}" if found else f"{version}+prunekit3d"


def _metadata(old: Mapping[str, Any], note: str, needs_prunekit3d: bool) -> dict[str, Any]:
    import monai

    from prunekit3d import __version__

    meta = dict(old)
    before = str(meta.get("version", "0.0.0"))
    meta["version"] = _bumped(before)
    meta["changelog"] = {meta["version"]: note, **dict(meta.get("changelog") or {})}
    meta.update(monai_version=monai.__version__, pytorch_version=torch.__version__.split("+")[0],
                numpy_version=np.__version__)
    optional = dict(meta.get("optional_packages_version") or {})
    if needs_prunekit3d:
        optional["prunekit3d"] = __version__
    meta["optional_packages_version"] = optional
    defaults = {"task": "segmentation", "description": note, "authors": "unknown", "copyright": "unknown",
                "network_data_format": {"inputs": {}, "outputs": {}}}
    for key in REQUIRED_METADATA:
        meta.setdefault(key, defaults.get(key))
    return meta


def _copy_bundle(source: Path, target: Path) -> None:
    """Everything of the bundle but its weights (``models/``) and an earlier prunekit3d marker."""
    for entry in source.iterdir():
        if entry.name in ("models", MARKER):
            continue
        if entry.is_dir():
            shutil.copytree(entry, target / entry.name)
        else:
            shutil.copy2(entry, target / entry.name)
    (target / "models").mkdir()


def write_bundle(
    bundle: Bundle | str | Path, artifact: str | Path, out: str | Path, *, overwrite: bool = False
) -> Path:
    """Write the compressed network of ``artifact`` as a copy of ``bundle`` at ``out``, atomically.

    Args:
        bundle: the source bundle (read with :func:`read_bundle` if a path).
        artifact: the compressed network (a prunekit3d artifact of the bundle's network).
        out: the new bundle folder; must not overlap the inputs.
        overwrite: replace ``out`` if it is a bundle prunekit3d wrote.

    Returns:
        ``out``. ``python -m monai.bundle run --config_file OUT/configs/inference.json --bundle_root OUT`` runs it.
    """
    from prunekit3d import __version__
    from prunekit3d.export import export_torchscript
    from prunekit3d.io import load, load_manifest

    source = bundle if isinstance(bundle, Bundle) else read_bundle(bundle)
    out, artifact = Path(out), Path(artifact)
    check_output_dir(out, inputs=[artifact], sources=[source.root], overwrite=overwrite, what="the output bundle")
    manifest = load_manifest(artifact)
    slim = load(artifact, model=None if manifest["model"].get("spec") else source.fresh_network()).eval()
    patch = source.patch or tuple((manifest.get("extra") or {}).get("patch_size") or (96, 96, 96))
    example = torch.zeros(1, first_conv(slim)[1].in_channels, *patch)
    with torch.no_grad():
        single = isinstance(slim(example), torch.Tensor)
    variant = "slim_network" if manifest["model"].get("spec") else "torchscript"
    parameters = {"before": sum(p.numel() for p in source.network.parameters()),
                  "after": sum(p.numel() for p in slim.parameters())}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        _copy_bundle(source.root, tmp)
        scripted = tmp / "models" / "model.ts"
        if variant == "slim_network":
            network_def: Any = _slim_network_def(manifest)
            net = _build(_parser({"network_def": network_def}, tmp), "network_def", tmp / CONFIG)
            state = _state_for(net, slim)
            export_torchscript(_FullResolution(slim, getattr(net, ARCHITECTURE_KEY)), example, scripted)
        else:
            network_def = TORCHSCRIPT_DEF
            export_torchscript(slim if single else _FullResolution(slim), example, scripted)
            state = torch.jit.load(str(scripted), map_location="cpu").state_dict()
        torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp / "models" / "model.pt")
        rewritten = []
        for file in sorted((tmp / "configs").glob("*.json")):
            config = _read_json(file, "")
            if isinstance(config, dict) and config.get("network_def") == source.config["network_def"]:
                config["network_def"] = network_def
                config.setdefault("bundle_root", ".")
                file.write_text(json.dumps(config, indent=4) + "\n", encoding="utf-8")
                rewritten.append(str(file.relative_to(tmp)))
        note = (f"compressed by prunekit3d {__version__}: {parameters['before']:,} -> {parameters['after']:,} "
                "parameters; network_def "
                f"{'rebuilds the slim network' if variant == 'slim_network' else 'loads models/model.ts'}")
        old = _read_json(tmp / METADATA, "") if (tmp / METADATA).is_file() else {}
        (tmp / METADATA).write_text(json.dumps(_metadata(old, note, variant == "slim_network"), indent=4) + "\n",
                                    encoding="utf-8")
        marker = {
            "format": BUNDLE_FORMAT, "format_version": 1, "prunekit3d_version": __version__,
            "torch_version": torch.__version__, "network_def": variant, "configs": rewritten,
            "source": {"bundle": str(source.root.resolve()), "version": old.get("version"),
                       "weights": {"file": str(source.weights.relative_to(source.root)),
                                   "sha256": sha256(source.weights)}},
            "network": {"spec": manifest["model"].get("spec"), "steps": manifest["steps"], "parameters": parameters,
                        "example_input": list(example.shape)},
            "files": {f"models/{n}": {"sha256": sha256(tmp / "models" / n)} for n in ("model.pt", "model.ts")},
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
    return out

