"""Crash-safe file writes: temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from hardware.files import atomic_write, fsync_dir

__all__ = ["atomic_copy", "atomic_write", "sha256_file"]  # atomic_write lives in hardware.files


def sha256_file(path: Path) -> str:
    """sha256 of a file's contents, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    with src.open("rb") as fin, tmp.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
