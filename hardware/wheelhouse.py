"""The wheelhouse of a provisioning bundle: every wheel the agent needs on the device, for its platform and Python.

This runs on the operator's machine (``edgeherd flash``), never on a device:
it needs pip and ``packaging`` (both come with ``edgeherd[server]``).

1. The edgeherd wheel: the one given, or this installation's packages and
   metadata packed into a ``py3-none-any`` wheel (:func:`agent_wheel`), so a
   flash works from an installed edgeherd as from a source checkout, offline.
2. The agent's requirements: edgeherd's core dependencies plus the profile's
   runtime extra and packages, their markers evaluated for the *device*
   (its Python and architecture), not for this machine.
3. ``pip download --only-binary=:all: --platform … --python-version …
   --implementation cp``: the manylinux tags the profile's glibc accepts.
   pip evaluates the markers of dependencies for the machine it runs on, so
   the result is then closed over for the device (:func:`close`): each wheel's
   own requirements are evaluated for the device, missing ones downloaded in a
   further round, and wheels the device does not need dropped.
4. Every wheel must be installable on the device (its tags), and each is
   pinned with its sha256 in ``requirements.txt``, which install.sh installs
   with ``--no-index --require-hashes --no-deps``.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from hardware.errors import HardwareError
from hardware.files import sha256_file

__all__ = [
    "PACKAGES",
    "DeviceTarget",
    "Wheel",
    "Wheelhouse",
    "WheelhouseError",
    "agent_requirements",
    "agent_wheel",
    "build",
    "close",
]

log = logging.getLogger(__name__)
#: The packages of the edgeherd distribution (pyproject.toml, [tool.hatch.build.targets.wheel]).
PACKAGES = ("protocol", "agent", "toolchain", "server", "hardware")
#: Rounds of ``pip download`` to close the wheelhouse over the device's markers.
_ROUNDS = 4
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


class WheelhouseError(HardwareError):
    """The wheelhouse cannot be made; the message says what is missing and what pip said."""


@dataclass(frozen=True)
class DeviceTarget:
    """The device's Python and platform, as wheels and markers see them."""

    python: str
    arch: str
    glibc: str

    @property
    def python_tuple(self) -> tuple[int, int]:
        major, minor = self.python.split(".")
        return int(major), int(minor)

    @property
    def platforms(self) -> list[str]:
        """manylinux platform tags the device accepts, newest first (pip does not infer the older ones)."""
        major, minor = (int(p) for p in self.glibc.split("."))
        tags = [f"manylinux_{major}_{m}_{self.arch}" for m in range(minor, 16, -1)]
        tags.append(f"manylinux2014_{self.arch}")
        if self.arch == "x86_64":
            tags += [f"manylinux_2_{m}_{self.arch}" for m in (12, 5)] + [f"manylinux2010_{self.arch}",
                                                                          f"manylinux1_{self.arch}"]
        return tags

    def tags(self) -> set[Tag]:
        """Every wheel tag the device's CPython accepts (what pip on the device would)."""
        v = self.python_tuple
        return set(cpython_tags(v, platforms=self.platforms)) | set(
            compatible_tags(v, interpreter=f"cp{v[0]}{v[1]}", platforms=self.platforms))

    def environment(self, extra: str = "") -> dict[str, str]:
        """PEP 508 marker environment of the device."""
        return {
            "python_version": self.python, "python_full_version": f"{self.python}.0",
            "implementation_name": "cpython", "implementation_version": f"{self.python}.0",
            "platform_python_implementation": "CPython", "platform_machine": self.arch, "platform_system": "Linux",
            "sys_platform": "linux", "os_name": "posix", "platform_release": "", "platform_version": "",
            "extra": extra,
        }

    def wants(self, req: Requirement, extras: Iterable[str] = ()) -> bool:
        """Whether ``req`` applies on the device, for a distribution installed with ``extras``."""
        if req.marker is None:
            return True
        return any(req.marker.evaluate(self.environment(e)) for e in ("", *extras))


@dataclass(frozen=True)
class Wheel:
    path: Path
    name: str
    version: Version
    sha256: str

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


@dataclass
class Wheelhouse:
    dir: Path
    #: The edgeherd wheel (in ``dir``).
    edgeherd: Wheel
    #: Every wheel the agent installs, edgeherd's first.
    wheels: list[Wheel]
    target: DeviceTarget
    extra: str
    pip_log: list[str] = field(default_factory=list)

    def requirements_txt(self) -> str:
        """Pinned, hashed requirements for ``pip install --no-index --require-hashes --no-deps``."""
        lines = ["# every wheel of ./wheelhouse, pinned with its sha256 (written by edgeherd flash)"]
        extra = f"[{self.extra}]" if self.extra else ""
        for w in self.wheels:
            name = f"{w.name}{extra}" if w is self.edgeherd else w.name
            lines.append(f"{name}=={w.version} --hash=sha256:{w.sha256}")
        return "\n".join(lines) + "\n"


# -- the edgeherd wheel ----------------------------------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _package_files(name: str) -> list[tuple[str, Path]]:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise WheelhouseError(f"the {name} package of edgeherd is not importable here; give --wheel")
    root = Path(next(iter(spec.submodule_search_locations)))
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for f in sorted(filenames):
            if f.endswith((".pyc", ".pyo")) or f.startswith("."):
                continue
            p = Path(dirpath) / f
            out.append((f"{name}/{p.relative_to(root).as_posix()}", p))
    return out


def agent_wheel(dest: Path, source: Path | None = None) -> Path:
    """Put the edgeherd wheel into ``dest``: a copy of ``source``, or this installation packed as a wheel."""
    dest.mkdir(parents=True, exist_ok=True)
    if source is not None:
        try:
            name, _, _, _ = parse_wheel_filename(source.name)
        except InvalidWheelFilename as exc:
            raise WheelhouseError(f"{source}: {exc}") from None
        if name != "edgeherd":
            raise WheelhouseError(f"{source} is a wheel of {name}, not of edgeherd")
        out = dest / source.name
        shutil.copyfile(source, out)
        return out
    try:
        dist = importlib.metadata.distribution("edgeherd")
    except importlib.metadata.PackageNotFoundError:
        raise WheelhouseError("edgeherd is not installed here (pip install -e .), so its wheel cannot be packed; "
                              "give --wheel") from None
    metadata, entry_points = dist.read_text("METADATA"), dist.read_text("entry_points.txt")
    if not metadata:
        raise WheelhouseError("the installed edgeherd has no METADATA; reinstall it or give --wheel")
    version = dist.version
    info = f"edgeherd-{version}.dist-info"
    out = dest / f"edgeherd-{version}-py3-none-any.whl"
    record: list[str] = []
    tmp = out.with_name(out.name + ".part")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:

        def add(arcname: str, data: bytes, mode: int = 0o644) -> None:
            zi = zipfile.ZipInfo(arcname, date_time=_FIXED_TIME)
            zi.external_attr = (0o100000 | mode) << 16
            zi.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(zi, data)
            record.append(f"{arcname},{_record_hash(data)},{len(data)}")

        for package in PACKAGES:
            for arcname, path in _package_files(package):
                add(arcname, path.read_bytes())
        add(f"{info}/METADATA", metadata.encode())
        add(f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: edgeherd flash\nRoot-Is-Purelib: true\n"
                             b"Tag: py3-none-any\n")
        if entry_points:
            add(f"{info}/entry_points.txt", entry_points.encode())
        record.append(f"{info}/RECORD,,")
        zi = zipfile.ZipInfo(f"{info}/RECORD", date_time=_FIXED_TIME)
        zi.external_attr = 0o100644 << 16
        zf.writestr(zi, "\n".join(record) + "\n")
    os.replace(tmp, out)
    return out


def _wheel_metadata(path: Path) -> tuple[str, Version, list[Requirement]]:
    """Name, version and Requires-Dist of a wheel file."""
    try:
        name, version, _, _ = parse_wheel_filename(path.name)
    except InvalidWheelFilename as exc:
        raise WheelhouseError(f"{path.name}: {exc}") from None
    with zipfile.ZipFile(path) as zf:
        meta = next((n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            raise WheelhouseError(f"{path.name} has no METADATA")
        msg = Parser().parsestr(zf.read(meta).decode("utf-8", "replace"))
    reqs = []
    for line in msg.get_all("Requires-Dist") or []:
        try:
            reqs.append(Requirement(line))
        except InvalidRequirement as exc:
            raise WheelhouseError(f"{path.name}: Requires-Dist {line!r}: {exc}") from None
    return str(name), version, reqs


def agent_requirements(edgeherd_wheel: Path, extra: str, packages: Sequence[str],
                       target: DeviceTarget) -> list[Requirement]:
    """What the agent needs on the device: edgeherd's core requirements and those of ``extra``, plus ``packages``."""
    _, _, reqs = _wheel_metadata(edgeherd_wheel)
    out = [r for r in reqs if target.wants(r, [extra] if extra else [])]
    for marker_free in out:
        marker_free.marker = None
    try:
        out += [Requirement(p) for p in packages]
    except InvalidRequirement as exc:
        raise WheelhouseError(f"install.packages: {exc}") from None
    return out


# -- downloading and closing over the device's markers -----------------------------------------------------------


def _index(directory: Path, target: DeviceTarget) -> tuple[dict[str, list[Wheel]], list[str]]:
    """Wheels in ``directory`` by canonical name, and the files the device cannot install."""
    ok = target.tags()
    found: dict[str, list[Wheel]] = {}
    foreign = []
    for path in sorted(directory.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(path.name)
        if not tags & ok:
            foreign.append(path.name)
            continue
        found.setdefault(str(name), []).append(Wheel(path, str(name), version, sha256_file(path)))
    return found, foreign


def close(roots: Sequence[Requirement], directory: Path,
          target: DeviceTarget) -> tuple[dict[str, Wheel], list[Requirement]]:
    """The wheels of ``directory`` that satisfy ``roots`` and, recursively, their requirements as they apply on the
    device; and the requirements no wheel there satisfies."""
    available, _ = _index(directory, target)
    chosen: dict[str, Wheel] = {}
    extras_of: dict[str, set[str]] = {}
    missing: list[Requirement] = []
    queue: list[tuple[Requirement, frozenset[str]]] = [(r, frozenset()) for r in roots]
    while queue:
        req, parent_extras = queue.pop(0)
        if not target.wants(req, parent_extras):
            continue
        name = str(canonicalize_name(req.name))
        candidates = sorted((w for w in available.get(name, []) if req.specifier.contains(w.version, prereleases=True)),
                            key=lambda w: w.version, reverse=True)
        have = chosen.get(name)
        if have is not None:
            if not req.specifier.contains(have.version, prereleases=True):
                missing.append(req)
                continue
            new_extras = set(req.extras) - extras_of[name]
            if not new_extras:
                continue
        elif not candidates:
            missing.append(req)
            continue
        else:
            have = chosen[name] = candidates[0]
            extras_of[name] = set()
            new_extras = set(req.extras)
        extras_of[name] |= new_extras
        _, _, deps = _wheel_metadata(have.path)
        queue += [(d, frozenset(extras_of[name])) for d in deps]
    return chosen, missing


def _pip(args: list[str], on_line: Callable[[str], None] | None, pip: Sequence[str]) -> list[str]:
    cmd = [*pip, *args]
    log.info("running %s", " ".join(cmd))
    lines: list[str] = []
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PIP_PROGRESS_BAR": "off"}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:  # noqa: S603
        assert proc.stdout is not None  # noqa: S101 - PIPE above
        for line in proc.stdout:
            lines.append(line.rstrip())
            if on_line is not None:
                on_line(line.rstrip())
        rc = proc.wait()
    if rc != 0:
        tail = "\n".join(lines[-15:])
        raise WheelhouseError(f"pip download failed (exit {rc}):\n{tail}")
    return lines


def build(dest: Path, *, target: DeviceTarget, extra: str, packages: Sequence[str] = (),
          edgeherd_wheel: Path | None = None, find_links: Sequence[Path] = (), no_index: bool = False,
          constraints: Path | None = None, on_line: Callable[[str], None] | None = None,
          pip: Sequence[str] = (sys.executable, "-m", "pip")) -> Wheelhouse:
    """Make the wheelhouse for ``target`` in ``dest`` (created, must be empty or absent)."""
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise WheelhouseError(f"{dest} is not empty")
    own = agent_wheel(dest, edgeherd_wheel)
    roots = agent_requirements(own, extra, packages, target)
    common = ["download", "--only-binary=:all:", "--dest", str(dest), "--python-version", target.python,
              "--implementation", "cp", "--abi", f"cp{target.python_tuple[0]}{target.python_tuple[1]}",
              "--abi", "abi3", "--abi", "none", "--progress-bar", "off"]
    for platform in target.platforms:
        common += ["--platform", platform]
    for d in find_links:
        common += ["--find-links", str(d)]
    if no_index:
        common.append("--no-index")
    if constraints is not None:
        common += ["-c", str(constraints)]
    todo = list(roots)
    lines: list[str] = []
    missing: list[Requirement] = []
    for _ in range(_ROUNDS):
        lines += _pip([*common, *(_plain(r) for r in todo)], on_line, pip)
        chosen, missing = close(roots, dest, target)
        if not missing:
            break
        todo = missing
    else:
        raise WheelhouseError("no wheel for the device satisfies " + ", ".join(sorted({str(m) for m in missing}))
                              + f" (Python {target.python}, {target.platforms[0]} or older)")
    _, foreign = _index(dest, target)
    if foreign:
        raise WheelhouseError(f"pip fetched wheels the device cannot install: {', '.join(foreign)}")
    keep = {w.path.name for w in chosen.values()} | {own.name}
    for path in dest.glob("*.whl"):
        if path.name not in keep:
            path.unlink()  # needed only under this machine's markers
    ours = Wheel(own, "edgeherd", parse_wheel_filename(own.name)[1], sha256_file(own))
    wheels = [ours, *sorted((w for n, w in chosen.items() if n != "edgeherd"), key=lambda w: w.name)]
    return Wheelhouse(dest, ours, wheels, target, extra, lines)


def _plain(req: Requirement) -> str:
    """``req`` for pip's command line, without a marker (already evaluated for the device)."""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{req.name}{extras}{req.specifier}"

