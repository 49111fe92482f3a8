"""Pre-flight: can this device run an artifact? Answered before a byte is downloaded."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from agent.backends import installed_runtimes
from agent.fingerprint import memory_available
from protocol import ArtifactEntry

__all__ = ["check", "version_tuple"]

#: Disk kept free beyond the artifact itself (the download and the slot copy).
DISK_HEADROOM = 16 * 1024 * 1024


def version_tuple(v: str) -> tuple[int, ...]:
    """'1.18.0rc1' -> (1, 18, 0); non-numeric tails are ignored."""
    return tuple(int(m) for m in re.findall(r"\d+", v.split("+")[0].split("rc")[0].split("dev")[0])[:4])


def check(art: ArtifactEntry, data_dir: Path, runtimes: dict[str, str] | None = None, *,
          disk_free: int | None = None, memory: int | None = None) -> str | None:
    """Why the device cannot take ``art``, or None when it can (measured values may be passed in)."""
    runtimes = installed_runtimes() if runtimes is None else runtimes
    need = art.runtime
    have = runtimes.get(need.name)
    if have is None:
        present = ", ".join(f"{k} {v}" for k, v in sorted(runtimes.items())) or "none"
        return f"{art.name} needs {need.name} >= {need.min_version}, which is not installed (installed: {present})"
    if version_tuple(have) < version_tuple(need.min_version):
        return f"{art.name} needs {need.name} >= {need.min_version}; this device has {have}"
    if need.max_version is not None and version_tuple(have) > version_tuple(need.max_version):
        return f"{art.name} needs {need.name} <= {need.max_version}; this device has {have}"
    free = shutil.disk_usage(data_dir).free if disk_free is None else disk_free
    if free < 2 * art.size + DISK_HEADROOM:
        return f"not enough disk: {art.size} bytes need {2 * art.size + DISK_HEADROOM} free, {free} are"
    available = memory_available() if memory is None else memory
    if available is not None and available < 3 * art.size:
        return f"not enough memory: {art.size}-byte model, {available} bytes available"
    return None
