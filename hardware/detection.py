"""What device is this? Read the files that say so and map them to a hardware profile.

:func:`detect` reads, under ``root`` (``/`` on the device; a mounted image or
a recorded sample tree elsewhere):

- ``/proc/device-tree/model``: the board, on ARM boards;
- ``/etc/nv_tegra_release``: the Jetson Linux (L4T) release, i.e. the JetPack;
- ``/etc/os-release``: the operating system;
- the dynamic loader (``ld-linux-aarch64.so.1``, ``ld-linux-x86-64.so.2``,
  ``ld-linux-armhf.so.3``): the userland's architecture, which on a Raspberry
  Pi with a 32-bit image differs from the kernel's (``/proc/sys/kernel/arch``);
- ``/proc/cpuinfo`` and ``/sys/devices/system/cpu/online``: CPU and cores;
  ``/proc/meminfo``: memory;
- ``/usr/bin/python3.N``: the Pythons the OS has;
- package metadata (``*.dist-info``) in the system's site directories and, on
  the live system, the running interpreter's path: runtime versions, without
  importing any runtime;
- ``/proc/driver/nvidia`` and ``/sys/bus/pci/devices``: an NVIDIA GPU.

Under a root other than ``/``, symbolic links are resolved inside the root,
as a chroot would, so an image's absolute links never reach the host.

Standard library and :mod:`hardware.profiles` only: this runs on the device.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import distributions
from pathlib import Path, PurePosixPath

from hardware.profiles import Profile, load_all

__all__ = ["Detection", "Facts", "GpuFacts", "detect", "match", "problems", "read_facts", "satisfies"]

#: Distributions that provide each runtime, as manifests name runtimes.
RUNTIME_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "ai-edge-litert": ("ai-edge-litert",),
    "tflite-runtime": ("tflite-runtime",),
    "tensorrt": ("tensorrt",),
}
#: The dynamic loader each userland architecture has, and where it may be.
_LOADERS = (
    ("aarch64", "ld-linux-aarch64.so.1", ("lib", "usr/lib", "lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu")),
    ("x86_64", "ld-linux-x86-64.so.2", ("lib64", "usr/lib64", "lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")),
    ("armv7l", "ld-linux-armhf.so.3", ("lib", "usr/lib", "lib/arm-linux-gnueabihf", "usr/lib/arm-linux-gnueabihf")),
)
_JETPACK = {"R32": "JetPack 4", "R35": "JetPack 5", "R36": "JetPack 6"}
#: A board with less memory than this share of its profile's smallest variant is not that board.
_MEMORY_SLACK = 0.75


@dataclass(frozen=True)
class GpuFacts:
    vendor: str
    #: ``tegra``: the Jetson's integrated GPU; ``discrete``: a PCI card.
    kind: str
    name: str | None = None
    #: Kernel driver version (discrete) or L4T release (Tegra); None when the driver is not loaded.
    driver: str | None = None


@dataclass(frozen=True)
class Facts:
    """What the files say; None where a file is absent (an image has no /proc)."""

    root: str
    arch: str | None
    kernel_arch: str | None
    board: str | None
    l4t: str | None
    os_id: str | None
    os_version: str | None
    os_name: str | None
    #: The system's ``python3`` (the target of /usr/bin/python3), and every python3.N in /usr/bin.
    python: str | None
    pythons: tuple[str, ...]
    cpu_model: str | None
    cores: int | None
    memory_bytes: int | None
    runtimes: dict[str, str] = field(default_factory=dict)
    gpu: GpuFacts | None = None


@dataclass(frozen=True)
class Detection:
    """The facts, the profile they map to (None: no profile fits), why, and how the device differs from it."""

    facts: Facts
    profile: str | None
    why: str
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """A profile fits and the device is what that profile expects."""
        return self.profile is not None and not self.problems


# -- reading files under a root ----------------------------------------------------------------


class _Root:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.live = root.resolve() == Path("/")

    def path(self, rel: str) -> Path | None:
        """``rel`` (absolute inside the root) with symbolic links resolved inside the root; None if absent."""
        if self.live:
            p = Path("/" + rel.lstrip("/"))
            return p if os.path.lexists(p) else None
        parts = list(PurePosixPath(rel.lstrip("/")).parts)
        current: list[str] = []
        hops = 0
        while parts:
            part = parts.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if current:
                    current.pop()
                continue
            candidate = self.root.joinpath(*current, part)
            if candidate.is_symlink():
                hops += 1
                if hops > 40:
                    return None
                target = PurePosixPath(os.readlink(candidate))
                if target.is_absolute():
                    current = []
                parts = list(target.parts if not target.is_absolute() else target.parts[1:]) + parts
                continue
            if not candidate.exists():
                return None
            current.append(part)
        return self.root.joinpath(*current)

    def read(self, rel: str) -> str | None:
        p = self.path(rel)
        if p is None:
            return None
        try:
            return p.read_bytes().decode("utf-8", "replace").strip("\x00\n ")
        except OSError:
            return None

    def listdir(self, rel: str) -> list[str]:
        p = self.path(rel)
        try:
            return sorted(os.listdir(p)) if p is not None else []
        except OSError:
            return []


def _os_release(r: _Root) -> dict[str, str]:
    text = r.read("etc/os-release") or r.read("usr/lib/os-release") or ""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip():
            out[key.strip()] = value.strip().strip('"').strip("'")
    return out


def _l4t(r: _Root) -> str | None:
    text = r.read("etc/nv_tegra_release")
    if text is None:
        return None
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)", text)
    return f"R{m.group(1)}.{m.group(2)}" if m else "unknown"


def _arch(r: _Root) -> str | None:
    for arch, loader, dirs in _LOADERS:
        if any(r.path(f"{d}/{loader}") is not None for d in dirs):
            return arch
    return platform.machine() or None if r.live else None


def _cores(r: _Root, cpuinfo: str) -> int | None:
    online = r.read("sys/devices/system/cpu/online")
    if online:
        count = 0
        try:
            for part in online.split(","):
                lo, _, hi = part.partition("-")
                count += int(hi or lo) - int(lo) + 1
            return count
        except ValueError:
            pass
    processors = sum(1 for line in cpuinfo.splitlines() if re.match(r"processor\s*:", line))
    if processors:
        return processors
    return os.cpu_count() if r.live else None


def _cpu_model(cpuinfo: str) -> str | None:
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "cpu model", "hardware"):
        if fields.get(key):
            return fields[key][:256]
    return None


def _memory(r: _Root) -> int | None:
    for line in (r.read("proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            try:
                return int(line.split()[1]) * 1024
            except (IndexError, ValueError):
                return None
    return None


def _pythons(r: _Root) -> tuple[str | None, tuple[str, ...]]:
    found = set()
    for d in ("usr/bin", "usr/local/bin"):
        for name in r.listdir(d):
            m = re.fullmatch(r"python(3\.\d+)", name)
            if m:
                found.add(m.group(1))
    system = None
    link = r.root / "usr/bin/python3" if not r.live else Path("/usr/bin/python3")
    if link.is_symlink():
        m = re.search(r"python(3\.\d+)$", os.readlink(link))
        system = m.group(1) if m else None
    elif r.live and not found:
        system = f"{sys.version_info[0]}.{sys.version_info[1]}"
    if system is None and len(found) == 1:
        system = next(iter(found))
    ordered = tuple(sorted(found, key=lambda v: tuple(int(p) for p in v.split("."))))
    return system, ordered


def _site_dirs(r: _Root) -> list[str]:
    dirs: list[str] = []
    for base in ("usr/lib", "usr/local/lib"):
        for name in r.listdir(base):
            if re.fullmatch(r"python3(\.\d+)?", name):
                for sub in ("dist-packages", "site-packages"):
                    p = r.path(f"{base}/{name}/{sub}")
                    if p is not None:
                        dirs.append(str(p))
    if r.live:
        dirs = [p for p in sys.path if p] + dirs
    return dirs


def _runtimes(r: _Root) -> dict[str, str]:
    path = _site_dirs(r)
    out: dict[str, str] = {}
    for runtime, dists in RUNTIME_DISTRIBUTIONS.items():
        for dist_name in dists:
            dist = next(iter(distributions(name=dist_name, path=path)), None)
            if dist is not None and dist.version:
                out[runtime] = dist.version
                break
    return out


def _gpu(r: _Root, board: str | None, l4t: str | None) -> GpuFacts | None:
    if l4t is not None or (board is not None and "Jetson" in board):
        return GpuFacts("nvidia", "tegra", driver=l4t)
    driver = None
    version = r.read("proc/driver/nvidia/version")
    if version is not None:
        m = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]*)", version)
        driver = m.group(1) if m else "unknown"
    for bus in r.listdir("proc/driver/nvidia/gpus"):
        info = r.read(f"proc/driver/nvidia/gpus/{bus}/information") or ""
        m = re.search(r"^Model:\s*(.+)$", info, re.M)
        if m:
            return GpuFacts("nvidia", "discrete", name=m.group(1).strip()[:120], driver=driver)
    for dev in r.listdir("sys/bus/pci/devices"):
        vendor = (r.read(f"sys/bus/pci/devices/{dev}/vendor") or "").lower()
        cls = (r.read(f"sys/bus/pci/devices/{dev}/class") or "").lower()
        if vendor == "0x10de" and cls.startswith(("0x0300", "0x0302")):
            return GpuFacts("nvidia", "discrete", driver=driver)
    if driver is not None:
        return GpuFacts("nvidia", "discrete", driver=driver)
    return None


def read_facts(root: Path | str = "/") -> Facts:
    """Read what the files under ``root`` say about the device."""
    r = _Root(Path(root))
    osr = _os_release(r)
    board = r.read("proc/device-tree/model")
    l4t = _l4t(r)
    cpuinfo = r.read("proc/cpuinfo") or ""
    kernel_arch = r.read("proc/sys/kernel/arch") or (os.uname().machine if r.live else None)
    python, pythons = _pythons(r)
    return Facts(
        root=str(root), arch=_arch(r), kernel_arch=kernel_arch, board=board[:256] if board else None, l4t=l4t,
        os_id=osr.get("ID"), os_version=osr.get("VERSION_ID"), os_name=osr.get("PRETTY_NAME"),
        python=python, pythons=pythons, cpu_model=_cpu_model(cpuinfo), cores=_cores(r, cpuinfo),
        memory_bytes=_memory(r), runtimes=_runtimes(r), gpu=_gpu(r, board, l4t),
    )


# -- mapping facts to a profile (pure) ---------------------------------------------------------------


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(m) for m in re.findall(r"\d+", v.split("+")[0])[:4])


def satisfies(version: str, spec: str) -> bool:
    """Whether ``version`` meets ``spec``: ``>=10.0,<11`` style clauses, or a bare ``10.3`` (meaning 10.3.*)."""
    have = _vtuple(version)
    for clause in (c.strip() for c in spec.split(",") if c.strip()):
        m = re.fullmatch(r"(>=|<=|==|!=|~=|>|<)?\s*([0-9][0-9A-Za-z.+-]*?)(\.\*)?", clause)
        if m is None:
            return False
        op, want, wildcard = m.group(1) or "", _vtuple(m.group(2)), bool(m.group(3))
        width = max(len(have), len(want))
        h, w = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        if not op or (op == "==" and wildcard):
            ok = have[: len(want)] == want
        elif op == "~=":
            ok = h >= w and have[: max(len(want) - 1, 1)] == want[: max(len(want) - 1, 1)]
        else:
            ok = {"==": h == w, "!=": h != w, ">=": h >= w, "<=": h <= w, ">": h > w, "<": h < w}[op]
        if not ok:
            return False
    return True


def problems(facts: Facts, profile: Profile) -> tuple[str, ...]:
    """How the device (or image) differs from what ``profile`` expects; facts that are unknown are not judged."""
    out = []
    s, hw = profile.system, profile.hardware
    if facts.arch is not None and facts.arch != s.architecture:
        out.append(f"the userland is {facts.arch}; {profile.name} needs a {s.architecture} "
                   f"{'(64-bit) ' if s.architecture == 'aarch64' else ''}operating system ({s.os})")
    if (s.os_id is not None and facts.os_id is not None and facts.os_id != s.os_id) or \
            (s.os_version is not None and facts.os_version is not None and facts.os_version != s.os_version):
        out.append(f"the OS is {facts.os_name or facts.os_id} {facts.os_version or ''}".rstrip()
                   + f"; {profile.name} is for {s.os}")
    if s.l4t is not None:
        if facts.l4t is None:
            if facts.board is not None or facts.os_id is not None:
                out.append(f"/etc/nv_tegra_release is missing; {profile.name} is for Jetson Linux {s.l4t} "
                           f"({_JETPACK.get(s.l4t, s.l4t)})")
        elif not facts.l4t.startswith(s.l4t + "."):
            line = facts.l4t.split(".")[0]
            out.append(f"Jetson Linux is {facts.l4t} ({_JETPACK.get(line, 'unknown JetPack')}); {profile.name} is for "
                       f"{s.l4t} ({_JETPACK.get(s.l4t, s.l4t)})")
    if facts.pythons and s.python not in facts.pythons:
        alongside = f" installed alongside the system's {s.system_python}" if s.system_python else ""
        out.append(f"Python {s.python} ({s.python_command}) is not installed (found {', '.join(facts.pythons)}); "
                   f"the agent needs it{alongside}")
    if hw.memory_mib is not None and facts.memory_bytes is not None:
        mib = facts.memory_bytes / 2**20
        lo, hi = hw.memory_mib
        if mib < lo * _MEMORY_SLACK or mib > hi * 1.05:
            out.append(f"{mib:.0f} MiB of memory; {profile.name} boards have {lo}–{hi} MiB")
    if hw.cores and facts.cores is not None and facts.cores not in hw.cores:
        out.append(f"{facts.cores} CPU cores; {profile.name} boards have {' or '.join(map(str, hw.cores))}")
    for rt in profile.runtimes:
        if rt.source != "system" or facts.os_id is None:
            continue
        have = facts.runtimes.get(rt.name)
        if have is None:
            out.append(f"{rt.name} {rt.version} is not installed; on {profile.name} it comes with the OS ({s.os})")
        elif not satisfies(have, rt.version):
            out.append(f"{rt.name} is {have}; {profile.name} needs {rt.version}")
    if hw.accelerator == "nvidia-gpu" and facts.gpu is not None and facts.gpu.driver is None:
        out.append("an NVIDIA GPU is present but its driver is not loaded (no /proc/driver/nvidia)")
    return tuple(out)


def match(facts: Facts, profiles: Mapping[str, Profile]) -> Detection:
    """The profile ``facts`` map to: by board where there is one, else by architecture and GPU."""
    board = facts.board or ""
    hits = []
    for p in profiles.values():
        matched = [s for s in p.detect.board if s in board]
        if matched:
            hits.append((max(len(s) for s in matched), p.name, p))
    if hits:
        _, _, best = max(hits, key=lambda h: (h[0], h[1]))
        return Detection(facts, best.name, f"board {board!r}", problems(facts, best))
    if facts.board is not None and facts.arch != "x86_64":
        return Detection(facts, None, f"board {board!r} is not one of the profiles' boards")
    has_gpu = facts.gpu is not None and facts.gpu.kind == "discrete"
    generic = sorted((p for p in profiles.values() if p.detect.nvidia_gpu is not None
                      and p.system.architecture == facts.arch and p.detect.nvidia_gpu == has_gpu),
                     key=lambda p: p.name)
    if not generic:
        return Detection(facts, None, f"no profile for a {facts.arch or 'machine of unknown architecture'}"
                                      f"{' with board ' + repr(board) if board else ' without a board model'}")
    gpu = f"an NVIDIA GPU ({facts.gpu.name or 'unnamed'})" if has_gpu and facts.gpu else "no NVIDIA GPU"
    return Detection(facts, generic[0].name, f"{facts.arch}, {gpu}", problems(facts, generic[0]))


def detect(root: Path | str = "/", profiles: Mapping[str, Profile] | None = None) -> Detection:
    """Read the device's files under ``root`` and map them to a profile (of ``profiles``, default: all)."""
    return match(read_facts(root), load_all() if profiles is None else profiles)
