"""The bundled sample: one abdominal CT with liver, kidneys and spleen labels, in MSD layout.

>>> from prunekit3d.sample import sample_dataset
>>> (sample_dataset() / "dataset.json").is_file()
True

Provenance and license: ``README.md`` and ``LICENSE-Apache-2.0.txt`` beside ``dataset.json``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["sample_dataset"]


def sample_dataset() -> Path:
    """The directory of the bundled sample (holds ``dataset.json``, ``imagesTr/``, ``labelsTr/``)."""
    root = Path(__file__).resolve().parent
    if not (root / "dataset.json").is_file():
        raise FileNotFoundError(
            f"the bundled sample is missing from {root}: reinstall prunekit3d (the wheel must include "
            "prunekit3d/sample/**, see pyproject.toml package-data)"
        )
    return root
