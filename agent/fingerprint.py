"""What this device is: the hardware fingerprint and profile sent in ``hello``."""

from __future__ import annotations

import logging
import os
import platform
import shutil
from pathlib import Path

from agent.backends import installed_runtimes
from protocol import Fingerprint, GpuInfo

__all__ = ["fingerprint", "hardware_profile", "memory_available"]

log = logging.getLogger(__name__)


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return None


def _meminfo(key: str) -> int | None:
    text = _read("/proc/meminfo") or ""
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def memory_available() -> int | None:
    return _meminfo("MemAvailable")


def _os_name() -> str:
    for line in (_read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')[:256]
    return f"{platform.system()} {platform.release()}"[:256]


def _cpu_model() -> str | None:
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.lower().startswith(("model name", "hardware", "cpu model")):
            return line.split(":", 1)[1].strip()[:256]
    return None


def _gpu() -> GpuInfo | None:
    tegra = _read("/etc/nv_tegra_release")
    if tegra is None:
        return None
    runtimes = installed_runtimes()
    return GpuInfo(name="NVIDIA Tegra", tensorrt=runtimes.get("tensorrt"))


def fingerprint(data_dir: Path) -> Fingerprint:
    board = _read("/proc/device-tree/model")
    return Fingerprint(
        arch=platform.machine() or "unknown",
        os=_os_name(),
        python=platform.python_version(),
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count() or 1,
        memory_bytes=_meminfo("MemTotal") or 0,
        disk_free_bytes=shutil.disk_usage(data_dir).free,
        board=board[:256] if board else None,
        runtimes=installed_runtimes(),
        gpu=_gpu(),
    )


def hardware_profile(configured: str) -> str | None:
    """The configured hardware profile, or (``auto``) the one :func:`hardware.detect` finds."""
    if configured != "auto":
        return configured
    from hardware.detection import detect

    try:
        found = detect()
    except Exception:  # detection only informs; it must never keep the agent from starting
        log.exception("hardware detection failed; sending no profile")
        return None
    if found.profile is None:
        log.warning("no hardware profile fits this device (%s); sending none", found.why)
    for problem in found.problems:
        log.warning("this device differs from the %s profile: %s", found.profile, problem)
    return found.profile
