"""Plain data types that round-trip through JSON: the settings, reports and records prunekit3d saves.

A dataclass that inherits :class:`JsonRecord` gets ``to_dict`` (tuples as lists), ``from_dict`` (unknown keys
named in one line), ``to_json`` and ``from_json``::

    >>> @dataclass
    ... class Settings(JsonRecord):
    ...     record_name = "settings"
    ...     patch: tuple[int, int, int] = (64, 64, 64)
    >>> Settings.from_json(Settings().to_json()) == Settings()
    True
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any, ClassVar, TypeVar

__all__ = ["JsonRecord"]

R = TypeVar("R", bound="JsonRecord")


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class JsonRecord:
    """Mixin for dataclasses whose fields are plain JSON values (see the module docstring)."""

    #: How error messages name the record ("compress settings", "model report", ...).
    record_name: ClassVar[str] = "record"

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any]) -> R:
        if not isinstance(data, Mapping):
            raise TypeError(f"a {cls.record_name} is a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.record_name} keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls: type[R], text: str) -> R:
        return cls.from_dict(json.loads(text))
