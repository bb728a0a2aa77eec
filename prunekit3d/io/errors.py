"""The one error type of persistence."""

from __future__ import annotations

__all__ = ["ArtifactError", "first_line"]


class ArtifactError(ValueError):
    """A saved artifact is missing, damaged, or does not fit the model it is loaded into.

    The message names the file and the problem (a checksum, a key, two shapes).
    """


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (or its type name): what one-line error messages quote."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
