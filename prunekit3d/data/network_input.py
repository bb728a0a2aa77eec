"""The preprocessing record: how a stored image becomes one trained network's input, and the way back.

:class:`Preprocessing` is plain data (JSON), saved in an artifact's manifest (``extra["preprocessing"]``),
parsed from ``--preprocessing TEXT`` and run as one MONAI ``Compose`` of dictionary transforms::

    image (C, X, Y, Z) + affine -- [Orientationd] -- [Spacingd] -- intensity scheme --> float32 input (C, X', Y', Z')
    prediction on the input's grid --Invertd (the same transforms, backwards)--> prediction on the image's grid

:meth:`Preprocessing.prepare` returns a :class:`NetworkInput`: the input tensor, the label resampled onto it,
and :meth:`NetworkInput.to_original` for predictions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    ClipIntensityPercentilesd,
    Compose,
    EnsureTyped,
    Invertd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ResampleToMatch,
    ScaleIntensityRanged,
    Spacingd,
)

from prunekit3d.data.volumes import Volume, read_volumes
from prunekit3d.records import JsonRecord

__all__ = ["EXTRA_KEY", "PARSE_HELP", "SCHEMES", "NetworkInput", "Preprocessing", "root_cause"]

#: The intensity schemes of a :class:`Preprocessing` record.
SCHEMES = ("zscore", "ct", "percentile", "none", "monai")
#: Where an artifact's manifest keeps the record: ``manifest["extra"][EXTRA_KEY]``.
EXTRA_KEY = "preprocessing"
#: What ``--preprocessing`` accepts (:meth:`Preprocessing.parse`).
PARSE_HELP = ("zscore | zscore:nonzero | zscore:above:T | ct:LO:HI | ct:LO:HI:MEAN:STD | percentile:LO:HI | none "
              "| FILE.json (a record, or a MONAI transform list in bundle-config syntax)")
#: Transforms of a MONAI list that read files: the record's input is already loaded, channel first.
_LOADING = {"LoadImage", "LoadImaged", "EnsureChannelFirst", "EnsureChannelFirstd", "AddChannel", "AddChanneld"}
_AXES = {frozenset("LR"), frozenset("AP"), frozenset("SI")}


class _ForegroundZScored(MapTransform):
    """Per channel: z-score the whole image with the mean and std of its voxels above ``threshold``
    (MONAI's ``NormalizeIntensity(nonzero=True)`` covers the nonzero mask, not a threshold)."""

    def __init__(self, keys: KeysCollection, threshold: float) -> None:
        super().__init__(keys)
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key].float().clone()  # keeps the MetaTensor's affine and applied operations
            for c in range(x.shape[0]):
                inside = x[c][x[c] > self.threshold]
                if inside.numel() < 2:
                    raise ValueError(f"zscore:above:{self.threshold:g}: channel {c} has no voxel above "
                                     f"{self.threshold:g}; pick a lower threshold")
                x[c] = (x[c] - inside.mean()) / inside.std(unbiased=False).clamp_min(1e-8)
            d[key] = x
        return d


@dataclass
class NetworkInput:
    """One image prepared for the network, and the way back onto its own grid.

    Attributes:
        image: the network input ``(C, X', Y', Z')``, float32, a plain tensor.
        label: the case's label resampled onto the input's grid (nearest), ``(X', Y', Z')`` int64, or ``None``.
    """

    image: torch.Tensor
    label: torch.Tensor | None
    _data: dict = field(repr=False)
    _transform: Compose = field(repr=False)
    _key: str = field(repr=False)

    def to_original(self, prediction: torch.Tensor, *, nearest: bool = False) -> torch.Tensor:
        """``prediction`` ``(K, X', Y', Z')`` on the input's grid -> ``(K, X, Y, Z)`` on the image's grid (MONAI
        ``Invertd``: undoes orientation, resampling and any invertible crop; intensity steps need no undoing).
        ``nearest`` for class indices; logits and probabilities are interpolated."""
        meta = self._data[self._key]
        if not meta.applied_operations:
            return prediction
        inverse = Invertd("pred", self._transform, orig_keys=self._key, nearest_interp=nearest)
        pred = MetaTensor(prediction.detach().cpu().float(), affine=meta.affine)  # Invertd reads MetaTensors only
        out = inverse({self._key: meta, "pred": pred})["pred"]
        return out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)


@dataclass(frozen=True)
class Preprocessing(JsonRecord):
    """How a stored image becomes the network's input: plain data that round-trips through JSON.

    Schemes (``scheme``; every channel alike):

    - ``"zscore"``: ``(x - mean) / std`` with the image's own statistics, over the whole image, or over its
      ``foreground``: ``"nonzero"`` (MONAI ``nonzero=True``: statistics and normalisation inside the
      nonzero mask, zeros stay zero) or a number ``T`` (statistics of the voxels above ``T``, whole image
      normalised -- e.g. the body of a CT above -500 HU).
    - ``"ct"``: clip to ``window`` ``(lo, hi)`` (HU), then scale to [0, 1] as a bundle's ``ScaleIntensityRanged``
      does, or, with ``mean`` and ``std``, z-score with those fixed values (nnU-Net's CT scheme).
    - ``"percentile"``: clip to the image's ``window`` percentiles (e.g. ``(0.5, 99.5)``), then z-score.
    - ``"none"``: as stored.
    - ``"monai"``: ``transforms``, a MONAI dictionary-transform list in bundle-config syntax
      (``[{"_target_": "ScaleIntensityRanged", "keys": "image", ...}, ...]``, run through
      ``monai.bundle.ConfigParser``; ``definitions`` are the config entries it refers to as ``@name``;
      ``key`` is its image key). Loading steps (``LoadImaged``, ``EnsureChannelFirstd``) are skipped: the
      image arrives loaded, channel first.

    Before the scheme: ``orientation`` (axis codes, e.g. ``"RAS"``) and ``spacing`` (mm, bilinear) if set.

    Example::

        >>> pre = Preprocessing.parse("ct:-57:164", spacing=(1.5, 1.5, 2.0))
        >>> x = pre.apply(volume)                        # float32 (C, X', Y', Z'), a plain tensor
        >>> save(model, "small", extra=pre.into_extra({"patch_size": [96, 96, 96]}))
        >>> Preprocessing.from_manifest(load_manifest("small")) == pre
        True
    """

    record_name = "preprocessing record"

    scheme: str = "zscore"
    window: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None
    foreground: str | float | None = None
    spacing: tuple[float, float, float] | None = None
    orientation: str | None = None
    transforms: list[dict[str, Any]] | None = None
    definitions: dict[str, Any] | None = None
    key: str = "image"

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name, n in (("window", 2), ("spacing", 3)):
            value = getattr(self, name)
            if value is not None:
                put(name, tuple(float(v) for v in value))
                if len(getattr(self, name)) != n:
                    raise ValueError(f"preprocessing: {name} needs {n} numbers, got {list(value)}")
        if isinstance(self.foreground, (int, float)) and not isinstance(self.foreground, bool):
            put("foreground", float(self.foreground))
        if self.orientation is not None:
            put("orientation", str(self.orientation).upper())
        if self.transforms is not None:
            put("transforms", [dict(t) for t in self.transforms])
        broken = [rule for rule, ok in self._rules().items() if not ok]
        if broken:
            given = {k: v for k, v in self.to_dict().items() if v is not None and k not in ("key", "transforms")}
            raise ValueError(f"invalid preprocessing {given}: needs {'; '.join(broken)}")

    def _rules(self) -> dict[str, bool]:
        w, s = self.window, self.scheme
        return {
            f"scheme in {list(SCHEMES)}": s in SCHEMES,
            "a window (lo, hi) with lo < hi for ct and percentile": (w is None) == (s not in ("ct", "percentile"))
            and (w is None or w[0] < w[1]),
            "percentiles within 0 .. 100": s != "percentile" or (w is not None and 0 <= w[0] and w[1] <= 100),
            "mean and std together, std > 0, for ct only": (self.mean is None) == (self.std is None)
            and (self.std is None or (s == "ct" and self.std > 0)),
            "foreground 'nonzero' or a number, for zscore only": self.foreground is None
            or (s == "zscore" and (self.foreground == "nonzero" or isinstance(self.foreground, float))),
            "transforms (a non-empty list of {'_target_': ...} dicts) exactly for scheme monai":
            (self.transforms is not None) == (s == "monai")
            and all(isinstance(t.get("_target_"), str) for t in self.transforms or [{"_target_": ""}])
            and (s != "monai" or bool(self.transforms)),
            "spacing > 0": self.spacing is None or min(self.spacing) > 0,
            "orientation: 3 axis codes, one of L/R, A/P, S/I each (e.g. RAS)": self.orientation is None
            or (len(self.orientation) == 3 and {frozenset(p) for p in _AXES
                                                 if len(p & set(self.orientation)) == 1} == _AXES),
        }

    # ---- JSON, text, manifests ---------------------------------------------------------------------
    def __str__(self) -> str:
        """The ``--preprocessing`` text of the scheme (spacing and orientation added in brackets)."""
        if self.scheme == "monai":
            text = f"monai ({len(self.transforms or [])} transforms)"
        elif self.scheme == "zscore" and self.foreground is not None:
            text = "zscore:nonzero" if self.foreground == "nonzero" else f"zscore:above:{self.foreground:g}"
        else:
            numbers = [*(self.window or ()), *(() if self.mean is None else (self.mean, self.std))]
            text = ":".join([self.scheme, *(f"{v:g}" for v in numbers)])
        spatial = [f"{k} {v}" for k, v in (("orientation", self.orientation), ("spacing", self.spacing)) if v]
        return text + (f" [{', '.join(spatial)}]" if spatial else "")

    @classmethod
    def parse(
        cls, text: str, spacing: Sequence[float] | None = None, orientation: str | None = None
    ) -> Preprocessing:
        """The record of ``--preprocessing TEXT [--spacing X Y Z] [--orientation RAS]``.

        ``TEXT``: ``zscore``, ``zscore:nonzero``, ``zscore:above:T``, ``ct:LO:HI`` (clip, scale to [0, 1]),
        ``ct:LO:HI:MEAN:STD`` (clip, z-score with these), ``percentile:LO:HI`` (clip, z-score), ``none``, or a
        JSON file holding a record (:meth:`to_dict`), a MONAI transform list, or ``{"_target_": "Compose",
        "transforms": [...]}``. ``spacing``/``orientation`` override the file's.
        """
        text = str(text).strip()
        if text.endswith(".json"):  # a file by its ending only: a file named "zscore" must not change the meaning
            record = cls._from_file(Path(text))
        else:
            record = cls._from_text(text)
        changes: dict[str, Any] = {}
        if spacing is not None:
            changes["spacing"] = spacing
        if orientation is not None:
            changes["orientation"] = orientation
        return cls.from_dict({**record.to_dict(), **changes}) if changes else record

    @classmethod
    def _from_text(cls, text: str) -> Preprocessing:
        name, *args = text.split(":")
        bad = ValueError(f"--preprocessing {text!r} is not one of: {PARSE_HELP}")
        try:
            numbers = [float(a) for a in args]
        except ValueError:
            numbers = []
        if name in ("none", "zscore") and not args:
            return cls(name)
        if text == "zscore:nonzero":
            return cls("zscore", foreground="nonzero")
        if name == "zscore" and len(args) == 2 and args[0] == "above":
            try:
                return cls("zscore", foreground=float(args[1]))
            except ValueError:
                raise bad from None
        if name == "percentile" and len(numbers) == 2 == len(args):
            return cls("percentile", window=numbers)
        if name == "ct" and len(numbers) == len(args) in (2, 4):
            mean, std = numbers[2:] if len(numbers) == 4 else (None, None)
            return cls("ct", window=numbers[:2], mean=mean, std=std)
        raise bad

    @classmethod
    def _from_file(cls, path: Path) -> Preprocessing:
        hint = "a record ({'scheme': ...}), a MONAI transform list, or {'_target_': 'Compose', 'transforms': [...]}"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"--preprocessing {path} does not exist; give a JSON file or {PARSE_HELP}"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"--preprocessing {path} is not valid JSON ({err})") from None
        if isinstance(data, Mapping) and "scheme" in data:
            return cls.from_dict(data)
        return cls.from_monai(data, where=str(path), hint=hint)

    @classmethod
    def from_monai(
        cls, transforms: Any, definitions: Mapping[str, Any] | None = None, *, where: str = "", hint: str = ""
    ) -> Preprocessing:
        """A ``"monai"`` record from a transform list or a ``Compose`` dict in bundle-config syntax."""
        if isinstance(transforms, Mapping) and isinstance(transforms.get("transforms"), list):
            transforms = transforms["transforms"]
        if not isinstance(transforms, list) or not all(isinstance(t, Mapping) for t in transforms):
            raise ValueError(f"{where or 'the transforms'} must be {hint or 'a list of {_target_: ...} dicts'}")
        keys = [t.get("keys") for t in transforms if _target_name(t) in ("LoadImaged", "EnsureChannelFirstd")]
        key = keys[0][0] if keys and isinstance(keys[0], list) else (keys[0] if keys else "image")
        return cls("monai", transforms=list(transforms), definitions=dict(definitions or {}) or None,
                   key=key if isinstance(key, str) and not key.startswith(("@", "$")) else "image")

    def into_extra(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``extra`` (an artifact manifest's metadata for :func:`prunekit3d.save`) with this record in it."""
        return {**dict(extra or {}), EXTRA_KEY: self.to_dict()}

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Preprocessing | None:
        """The record an artifact's manifest (:func:`prunekit3d.load_manifest`) holds, or ``None``.

        Artifacts written before the record existed are read too: ``compress``'s ``extra["normalize"]``
        ("zscore" / "none") and ``train``'s single-modality ``extra["fingerprint"]`` (CT: clip to the
        foreground's 0.5 / 99.5 percentiles, z-score with its mean / std; else per-image z-score; RAS, spacing).
        """
        extra = manifest.get("extra") or {}
        if extra.get(EXTRA_KEY) is not None:
            return cls.from_dict(extra[EXTRA_KEY])
        if extra.get("normalize") in ("zscore", "none"):
            return cls(extra["normalize"])
        modalities, fingerprint = extra.get("modalities"), extra.get("fingerprint")
        if isinstance(modalities, list) and len(modalities) == 1 and isinstance(fingerprint, list) and fingerprint:
            spatial = {"spacing": extra.get("spacing"), "orientation": "RAS"}
            if str(modalities[0]).upper() != "CT":
                return cls("zscore", **spatial)
            f = fingerprint[0]
            return cls("ct", window=(f["percentile_00_5"], f["percentile_99_5"]), mean=f["mean"],
                       std=max(f["std"], 1e-8), **spatial)
        return None

    # ---- running it ------------------------------------------------------------------------------------
    def transform(self) -> Compose:
        """The record as one MONAI ``Compose`` of dictionary transforms on :attr:`key`."""
        k = self.key
        chain: list = []
        if self.orientation is not None:
            chain.append(Orientationd(k, axcodes=self.orientation, labels=None))
        if self.spacing is not None:
            chain.append(Spacingd(k, pixdim=self.spacing, mode="bilinear"))
        w = self.window
        if self.scheme == "zscore" and isinstance(self.foreground, float):
            chain.append(_ForegroundZScored(k, self.foreground))
        elif self.scheme == "zscore":
            chain.append(NormalizeIntensityd(k, nonzero=self.foreground == "nonzero", channel_wise=True))
        elif self.scheme == "ct" and self.mean is None:
            chain.append(ScaleIntensityRanged(k, a_min=w[0], a_max=w[1], b_min=0.0, b_max=1.0, clip=True))
        elif self.scheme == "ct":  # a range mapped onto itself with clip=True is a clip
            chain.append(ScaleIntensityRanged(k, a_min=w[0], a_max=w[1], b_min=w[0], b_max=w[1], clip=True))
            chain.append(NormalizeIntensityd(k, subtrahend=self.mean, divisor=self.std))
        elif self.scheme == "percentile":
            chain.append(ClipIntensityPercentilesd(k, lower=w[0], upper=w[1], channel_wise=True))
            chain.append(NormalizeIntensityd(k, channel_wise=True))
        elif self.scheme == "monai":
            chain += self._monai_transforms()
        return Compose([*chain, EnsureTyped(k, dtype=torch.float32)])

    def _monai_transforms(self) -> list:
        from monai.bundle import ConfigParser

        kept = [t for t in self.transforms or [] if _target_name(t) not in _LOADING]
        parser = ConfigParser({**(self.definitions or {}), "_prunekit3d_transforms": kept})
        try:
            built = parser.get_parsed_content("_prunekit3d_transforms")
        except Exception as err:  # noqa: BLE001 -- ConfigParser wraps import, reference and argument errors alike
            raise ValueError(
                f"the MONAI transforms of the preprocessing record do not build: {root_cause(err)}"
            ) from None
        plain = [type(t).__name__ for t in built if not isinstance(t, MapTransform)]
        if plain:
            raise ValueError(f"the preprocessing transforms {plain} are array transforms; use their dictionary "
                             f"versions (e.g. ScaleIntensityRanged) with keys {self.key!r}, as bundle configs do")
        return list(built)

    def prepare(self, volume: Volume | str | Path) -> NetworkInput:
        """Run the record on one case (a :class:`Volume`, or a NIfTI file / nnU-Net channel-file group's first)."""
        if not isinstance(volume, Volume):
            found = read_volumes(volume, "image")
            if len(found) != 1:
                raise ValueError(f"{volume} holds {len(found)} cases; prepare one at a time")
            volume = found[0]
        affine = torch.as_tensor(np.eye(4) if volume.affine is None else volume.affine, dtype=torch.float64)
        # a copy: some MONAI transforms (NormalizeIntensity with nonzero=True) write into their input
        image = MetaTensor(torch.tensor(volume.image, dtype=torch.float32), affine=affine)
        compose = self.transform()
        try:
            data = compose({self.key: image})
        except Exception as err:  # noqa: BLE001 -- MONAI wraps any failing transform's error in RuntimeError
            raise ValueError(f"preprocessing {self} fails on {volume.name!r}: {root_cause(err)}") from None
        out = data[self.key]
        label = None
        if volume.label is not None:
            label = MetaTensor(torch.from_numpy(volume.label)[None].float(), affine=affine)
            if out.applied_operations:
                label = ResampleToMatch(mode="nearest")(label, img_dst=out)
            label = label.as_tensor()[0].round().long()
        return NetworkInput(out.as_tensor().float().contiguous(), label, data, compose, self.key)

    def apply(self, volume: Volume | str | Path) -> torch.Tensor:
        """The network input of one case: float32 ``(C, X', Y', Z')``, a plain tensor."""
        return self.prepare(volume).image


def _target_name(transform: Mapping[str, Any]) -> str:
    return str(transform.get("_target_", "")).rsplit(".", 1)[-1]


def root_cause(err: BaseException) -> str:
    """The innermost cause of an error MONAI nested (a transform's error inside "applying transform ...", a
    config's inside "Component to instantiate must ..."), as one line."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    text = re.sub(r"\s+", " ", lines[-1]) if lines else ""
    return f"{type(err).__name__}: {text}" if isinstance(err, KeyError) or not text else text
