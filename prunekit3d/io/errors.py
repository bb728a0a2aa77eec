"""The one error type of persistence."""

from __future__ import annotations

__all__ = ["ArtifactError"]


class ArtifactError(ValueError):
    """A saved artifact is missing, damaged, or does not fit the model it is loaded into.

    The message names the file and the problem (a checksum, a key, two shapes).
    """
