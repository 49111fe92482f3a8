"""Pre-flight: can this device run an artifact? Answered before a byte is downloaded."""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.backends import installed_runtimes
from agent.fingerprint import memory_available
from protocol import ArtifactEntry
from protocol.manifest import version_tuple

__all__ = ["check", "version_tuple"]

#: Disk kept free beyond the artifact itself (the download and the slot copy).
DISK_HEADROOM = 16 * 1024 * 1024


def check(art: ArtifactEntry, data_dir: Path, runtimes: dict[str, str] | None = None, *,
          disk_free: int | None = None, memory: int | None = None) -> str | None:
    """Why the device cannot take ``art``, or None when it can (measured values may be passed in)."""
    runtimes = installed_runtimes() if runtimes is None else runtimes
    problem = art.runtime.unmet(runtimes)
    if problem is not None:
        return f"{art.name} {problem}"
    free = shutil.disk_usage(data_dir).free if disk_free is None else disk_free
    if free < 2 * art.size + DISK_HEADROOM:
        return f"not enough disk: {art.size} bytes need {2 * art.size + DISK_HEADROOM} free, {free} are"
    available = memory_available() if memory is None else memory
    if available is not None and available < 3 * art.size:
        return f"not enough memory: {art.size}-byte model, {available} bytes available"
    return None
