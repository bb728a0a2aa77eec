"""Atomic file and directory writes, and file checksums.

``atomic_file(path)`` yields a temporary path beside ``path`` that replaces it (one rename) only when
the block succeeds; ``write_json(path, data)`` writes through it.

``atomic_directory(target)`` yields an empty temporary directory beside ``target``; only when the
block succeeds does it take ``target``'s place::

    .<name>.tmp-XXXX/  --write files, fsync-->  rename onto <name>      (target missing or empty)
    <name>/ --rename--> .<name>.old-XXXX/, then .<name>.tmp-XXXX/ --rename--> <name>, then delete the old one

On failure the temporary directory is deleted and ``target`` is left as it was (an old directory
moved aside is moved back), so no reader ever sees a half-written directory under ``target``.

What may be replaced (a tool handed a team's only model and data folders must never delete them):

- :func:`check_output_dir` is what every writer of an output directory calls first, before any work:
  ``out`` must not be a file, must not hold (or be) any of the run's inputs, and, if it is not empty,
  it is replaced only with ``overwrite`` and only if prunekit3d wrote it (:func:`is_prunekit3d_output`:
  a top-level ``manifest.json`` -- or a bundle's ``prunekit3d.json`` -- whose ``"format"`` starts with
  ``"prunekit3d."``).
- ``atomic_directory(overwrite=True)`` checks again when it swaps (defence in depth): it replaces a
  prunekit3d output, or a directory whose every entry the new one rewrites (a writer replacing its
  own earlier write, such as a checkpoint), never anything else.

Paths are compared after resolving symlinks, so a link to a data folder is the data folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLE_MARKER",
    "FORMAT_PREFIX",
    "atomic_directory",
    "atomic_file",
    "check_inputs_outside",
    "check_output_dir",
    "fsync",
    "is_prunekit3d_output",
    "manifest_format",
    "sha256",
    "write_json",
]

#: Every directory prunekit3d writes carries a top-level ``manifest.json`` whose ``"format"`` starts with
#: this (``"prunekit3d.artifact"``, ...): what marks it as safe to replace with ``overwrite``.
FORMAT_PREFIX = "prunekit3d."
MANIFEST = "manifest.json"
#: A MONAI bundle keeps its own files in configs/ and no manifest: this file marks one that prunekit3d wrote.
BUNDLE_MARKER = "prunekit3d.json"
#: The files that mark a directory as prunekit3d's: the manifest, or a bundle's marker beside its configs/.
MARKERS = (MANIFEST, BUNDLE_MARKER)


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    """Flush a file or directory to disk (a rename is durable only once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def manifest_format(path: str | os.PathLike, name: str = MANIFEST) -> str | None:
    """The ``"format"`` that the JSON file ``path/name`` records, or ``None`` (no such file, not JSON, no format)."""
    try:
        manifest = json.loads((Path(path) / name).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    kind = manifest.get("format") if isinstance(manifest, dict) else None
    return kind if isinstance(kind, str) else None


def is_prunekit3d_output(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory prunekit3d wrote: its ``manifest.json`` (or, in a MONAI bundle, whose own
    files live in ``configs/``, its ``prunekit3d.json``) has a ``prunekit3d.*`` format."""
    return any((manifest_format(path, name) or "").startswith(FORMAT_PREFIX) for name in MARKERS)


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_inputs_outside(
    out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], *, what: str = "--out"
) -> None:
    """Refuse an output directory that is, or holds, one of the run's inputs (symlinks resolved).

    Replacing ``out`` (or deleting it, as a resume directory is deleted at the end) would delete that input.

    Raises:
        ValueError: naming the input and the fix.
    """
    root = _resolved(out)
    for given in inputs:
        if given is None:
            continue
        path = _resolved(given)
        if path == root or root in path.parents:
            where = "is" if path == root else "holds"
            raise ValueError(
                f"{what} {out} {where} the input {given}: writing there would delete it; pick an output "
                "directory outside every input"
            )


def check_output_dir(
    out: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    sources: Iterable[str | os.PathLike] = (),
    overwrite: bool = False,
    what: str = "--out",
) -> Path:
    """Check, before any work, that a run may write (or replace) the directory ``out``.

    Refused: ``out`` is a file; ``out`` is or holds one of ``inputs`` or ``sources`` (:func:`check_inputs_outside`);
    ``out`` lies inside one of ``sources`` (a model folder or bundle the output is a copy of: writing into it would
    change the user's model);
    ``out`` is not empty and ``overwrite`` is False; ``out`` is not empty and not a directory prunekit3d
    wrote (:func:`is_prunekit3d_output`), whatever ``overwrite`` says. Nothing is written.

    Args:
        out: the output directory (may not exist yet).
        inputs: every path the run reads (model, calibration images, labels, data folders); ``None`` skipped.
        sources: the model folders or bundles ``out`` is a compressed copy of (also refused around ``out``).
        overwrite: the user asked to replace an earlier output.
        what: how the user named ``out`` (``"--out"``, ``"path"``), for the messages.

    Returns:
        ``out`` resolved (symlinks followed): where the output will be written.

    Raises:
        FileExistsError: ``out`` is a file, is not empty without ``overwrite``, or is not prunekit3d's.
        ValueError: an input lies inside ``out``.

    Example::

        >>> check_output_dir("runs/small", inputs=["model.pt", "images/"], overwrite=args.overwrite)
    """
    root = _resolved(out)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"{what} {out} is a file; the output is a directory: pick another path")
    sources = list(sources)
    check_inputs_outside(out, [*inputs, *sources], what=what)
    for source in sources:
        if _resolved(source) in root.parents:
            raise ValueError(f"{what} {out} lies inside the source {source}: writing there would change it; "
                             "pick an output directory outside it")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{what} {out} exists and is not empty; pass --overwrite (overwrite=True) to replace it, "
                "or pick another path"
            )
        if not is_prunekit3d_output(root):
            raise FileExistsError(_foreign(out, what))
    return root


def _foreign(out: str | os.PathLike, what: str) -> str:
    return (
        f"{what} {out} is not a directory prunekit3d wrote (no manifest.json of a prunekit3d format), and "
        "overwrite replaces only those: pick another path, or empty it yourself"
    )


def _rewrites_all(tmp: Path, target: Path) -> bool:
    """Every entry of ``target`` has a namesake in ``tmp``: replacing it loses nothing the writer did not write."""
    return all((tmp / entry.name).exists() for entry in target.iterdir())


def _swap_in(tmp: Path, target: Path, overwrite: bool) -> None:
    if not target.exists() or _is_empty_dir(target):
        os.replace(tmp, target)  # onto nothing or an empty directory: one atomic rename
        return
    if not overwrite:  # checked again here: something may have appeared at target meanwhile
        raise FileExistsError(f"{target} exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    if not (is_prunekit3d_output(target) or _rewrites_all(tmp, target)):
        raise FileExistsError(_foreign(target, "the directory"))
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory that takes ``target``'s place only if the ``with`` block succeeds.

    Args:
        target: the directory to create (or replace); a symlink is followed (the link stays).
        overwrite: replace a non-empty ``target`` -- only a prunekit3d output, or a directory whose every
            entry the new one rewrites (see the module docstring); otherwise only a missing or empty one.

    Raises:
        FileExistsError: ``target`` is not empty and may not be replaced; it is left as it was.
    """
    target = _resolved(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        for f in tmp.iterdir():
            fsync(f)
        _swap_in(tmp, target, overwrite)
        fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # still there only if something failed


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces ``path`` only if the ``with`` block succeeds.

    Args:
        path: the file to create or replace.
        suffix: ending of the temporary file's name, for writers that pick the format from it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)  # still there only if something failed


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path``, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
