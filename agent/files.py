"""Crash-safe file writes: temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hardware.files import atomic_write, fsync_dir, sha256_file

__all__ = ["atomic_copy", "atomic_write", "sha256_file"]  # atomic_write and sha256_file live in hardware.files


def atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    with src.open("rb") as fin, tmp.open("wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
