"""Outputs that a killed process never leaves half-written (docs/design.md §10): each file or
directory is made under a temporary name, flushed to disk, renamed into place in one step, and
the rename itself flushed. A reader sees the old output or the whole new one, never a part."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

# What a temporary file is called beside its target: ``name + TMP_SUFFIX``.
TMP_SUFFIX = ".tmp"


def fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, write: Callable[[Path], object]) -> None:
    """Make ``path`` by ``write(tmp)`` into a temporary file beside it, then flush it and rename
    it over ``path``. If ``write`` raises, the temporary file is removed and ``path`` is left
    as it was."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        write(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync(path.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """``path`` holding ``data``, whole or not at all."""
    replace_file(path, lambda tmp: tmp.write_bytes(data))


def publish(src: Path, dst: Path) -> None:
    """Make the complete directory ``src`` appear as ``dst`` in one rename, after its files
    and then the rename itself are on disk. An existing ``dst`` is replaced."""
    for path in sorted(src.rglob("*"), reverse=True):  # files before their directories
        fsync(path)
    fsync(src)
    if dst.exists():  # rename() needs an empty directory in the way: move the old one aside
        old = src.parent / f"{dst.name}.old"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)
    fsync(dst.parent)
