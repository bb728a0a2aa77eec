"""Atomic file and directory writes, and file checksums.

``atomic_file(path)`` yields a temporary path beside ``path`` that replaces it (one rename) only when
the block succeeds; ``write_json(path, data)`` writes through it.

``atomic_directory(target)`` yields an empty temporary directory beside ``target``; only when the
block succeeds does it take ``target``'s place::

    .<name>.tmp-XXXX/  --write files, fsync-->  rename onto <name>      (target missing or empty)
    <name>/ --rename--> .<name>.old-XXXX/, then .<name>.tmp-XXXX/ --rename--> <name>, then delete the old one

On failure the temporary directory is deleted and ``target`` is left as it was (an old directory
moved aside is moved back), so no reader ever sees a half-written directory under ``target``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_directory", "atomic_file", "fsync", "sha256", "write_json"]


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


def _swap_in(tmp: Path, target: Path, overwrite: bool) -> None:
    if not target.exists() or _is_empty_dir(target):
        os.replace(tmp, target)  # onto nothing or an empty directory: one atomic rename
        return
    if not overwrite:  # checked again here: something may have appeared at target meanwhile
        raise FileExistsError(f"{target} exists and is not empty; pass overwrite=True to replace it")
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory that takes ``target``'s place only if the ``with`` block succeeds.

    Args:
        target: the directory to create (or replace).
        overwrite: replace a non-empty ``target``; otherwise only a missing or empty one.
    """
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
