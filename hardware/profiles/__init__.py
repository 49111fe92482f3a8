"""Hardware profiles: one TOML file per supported kind of device, loaded and validated here.

Each ``<name>.toml`` in this directory describes one board (or class of
machine): its architecture, OS and Python, memory and cores, accelerator,
the inference runtimes the agent uses there, the artifacts it prefers in
order, the latency budget rollout gates hold it to, how the agent is
installed and run, and how :func:`hardware.detect` recognises it.
``docs/hardware.md`` documents every key.

The schema forbids unknown keys; a malformed file raises
:class:`ProfileError` naming the file and the key::

    ProfileError
    └── UnknownProfile     no profile of that name

A device is enrolled with one of these profiles or, marked *custom*, with a
name that is none of theirs (hardware without a profile, a simulator):
:func:`check_device_profile` decides which names enrolment accepts, and
:func:`label` shows a custom one as such. A custom profile has no latency
budget and its devices get the general artifact order.

Loading needs only the standard library, pydantic and :mod:`protocol`, so
the agent can read profiles on the device.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hardware.errors import HardwareError
from protocol.manifest import ArtifactEntry, Precision, Target
from protocol.tomlfile import read_toml

__all__ = [
    "PROFILE_DIR",
    "ArtifactChoice",
    "Profile",
    "ProfileError",
    "UnknownProfile",
    "check_device_profile",
    "first_in_order",
    "is_known",
    "label",
    "load",
    "load_all",
    "load_file",
    "names",
]

PROFILE_DIR = Path(__file__).resolve().parent
_NAME = r"^[a-z0-9][a-z0-9-]{0,63}$"
_VERSION = r"^[0-9]+\.[0-9]+$"
_CLAUSE = r"[<>=!~]=?[0-9][0-9A-Za-z.*+-]*"
#: ``10.3`` or pip specifiers such as ``>=10.0,<11``.
_SPEC = rf"^(?:[<>=!~]=?)?[0-9][0-9A-Za-z.*+-]*(?:,\s*{_CLAUSE})*$"
#: A pip requirement without markers: ``name[extra]>=1,<2``.
_REQUIREMENT = rf"^[A-Za-z0-9][A-Za-z0-9._-]*(?:\[[A-Za-z0-9,_-]+\])?(?:{_CLAUSE}(?:,{_CLAUSE})*)?$"
#: Which runtimes can load which compilation target.
TARGET_RUNTIMES: dict[Target, frozenset[str]] = {
    Target.ONNX: frozenset({"onnxruntime"}),
    Target.TFLITE: frozenset({"ai-edge-litert", "tflite-runtime"}),
    Target.TENSORRT: frozenset({"tensorrt"}),
}


class ProfileError(HardwareError):
    """A profile file is missing, unreadable or malformed; the message names the file and the key."""


class UnknownProfile(ProfileError):
    """No profile has that name; the message lists those that exist."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class System(_Section):
    #: CPU architecture of the userland, as ``uname -m`` / ``platform.machine()`` say it.
    architecture: Literal["aarch64", "x86_64"]
    #: Human-readable operating system the profile is for.
    os: Annotated[str, Field(min_length=1, max_length=120)]
    #: ``ID`` in ``/etc/os-release`` (``debian``, ``ubuntu``); omitted: any.
    os_id: Annotated[str, Field(pattern=r"^[a-z0-9._-]{1,32}$")] | None = None
    #: ``VERSION_ID`` in ``/etc/os-release``; omitted: any version.
    os_version: Annotated[str, Field(pattern=r"^[0-9.]{1,16}$")] | None = None
    #: The C library's version; the wheelhouse takes only wheels built for it or older (manylinux tags).
    glibc: Annotated[str, Field(pattern=_VERSION)]
    #: The Python version the agent runs on, and the one the wheelhouse is built for.
    python: Annotated[str, Field(pattern=_VERSION)]
    #: The interpreter on the device that creates the agent's virtual environment.
    python_command: Annotated[str, Field(pattern=r"^[A-Za-z0-9._/-]{1,128}$")] = "python3"
    #: The OS's own ``python3`` when it is not ``python`` (the agent then needs ``python_command`` alongside).
    system_python: Annotated[str, Field(pattern=_VERSION)] | None = None
    #: Jetson Linux (L4T) release line the profile is for, e.g. ``R36`` (JetPack 6).
    l4t: Annotated[str, Field(pattern=r"^R[0-9]{2}$")] | None = None
    #: What starts the agent and restarts it on failure.
    service_manager: Literal["systemd"] = "systemd"
    #: OS packages the installer needs that the bundle cannot carry (checked, not installed, by install.sh).
    packages: tuple[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.+-]{0,63}$")], ...] = ()

    @field_validator("python")
    @classmethod
    def _agent_python(cls, v: str) -> str:
        if tuple(int(p) for p in v.split(".")) < (3, 10):
            raise ValueError(f"the agent needs Python 3.10 or newer, not {v}; give the older one as system_python "
                             "and the newer one the agent runs on as python")
        return v


class Hardware(_Section):
    #: Smallest and largest memory of the board's variants, in MiB (nominal, e.g. 8192 for an 8 GB board).
    memory_mib: tuple[Annotated[int, Field(ge=128)], Annotated[int, Field(ge=128)]] | None = None
    #: The CPU core counts the board's variants have; omitted: any.
    cores: tuple[Annotated[int, Field(ge=1, le=1024)], ...] = ()
    #: What runs inference besides the CPU.
    accelerator: Literal["none", "nvidia-tegra", "nvidia-gpu"] = "none"
    #: The accelerator, in words.
    accelerator_name: Annotated[str, Field(max_length=120)] | None = None
    #: CUDA compute capability of the GPU, when every board of the profile has the same one.
    compute_capability: Annotated[str, Field(pattern=r"^[0-9]{1,2}\.[0-9]$")] | None = None

    @field_validator("memory_mib")
    @classmethod
    def _range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and v[0] > v[1]:
            raise ValueError(f"give [smallest, largest]; {v[0]} is more than {v[1]}")
        return v


class RuntimeSpec(_Section):
    #: Runtime name as manifests name it.
    name: Literal["onnxruntime", "ai-edge-litert", "tflite-runtime", "tensorrt"]
    #: The version on this platform: an exact one (``10.3``) or a pip specifier (``>=1.18``).
    version: Annotated[str, Field(pattern=_SPEC)]
    #: ``wheelhouse``: installed from the bundle's wheels; ``system``: comes with the OS image (JetPack),
    #: seen through the virtual environment's system site-packages.
    source: Literal["wheelhouse", "system"] = "wheelhouse"


class Install(_Section):
    #: The ``edgeherd`` extra that brings the profile's runtime (``onnx``, ``tflite``); empty: none.
    extra: Literal["", "onnx", "tflite"] = ""
    #: Further pip requirements the agent needs on this board (e.g. ``cuda-python>=12.2,<13``).
    packages: tuple[Annotated[str, Field(pattern=_REQUIREMENT)], ...] = ()
    #: Let the agent's virtual environment see the OS's Python packages (TensorRT on JetPack).
    system_site_packages: bool = False
    #: Groups the service runs with, for device nodes (``video`` for the Jetson GPU).
    supplementary_groups: tuple[Annotated[str, Field(pattern=r"^[a-z_][a-z0-9_-]{0,31}$")], ...] = ()
    #: Whether the service may see the device's hardware nodes (/dev); off unless the accelerator needs them.
    device_access: bool = False


class Rollout(_Section):
    #: p95 inference latency in milliseconds a rollout wave must stay within, unless the rollout sets its own.
    latency_budget_ms: Annotated[float, Field(gt=0, le=600_000)]
    #: Artifacts this device prefers, best first, as ``<target>-<precision>`` (``tensorrt-fp16``).
    artifacts: tuple[str, ...] = Field(min_length=1, max_length=12)

    @field_validator("artifacts")
    @classmethod
    def _artifacts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        targets, precisions = [t.value for t in Target], [p.value for p in Precision]
        for item in v:
            target, _, precision = item.partition("-")
            if target not in targets or precision not in precisions:
                raise ValueError(f"{item!r} is not <target>-<precision> with target one of {', '.join(targets)} "
                                 f"and precision one of {', '.join(precisions)}")
        if len(set(v)) != len(v):
            raise ValueError("each artifact kind may be listed once")
        return v


class Detect(_Section):
    #: Substrings of ``/proc/device-tree/model`` that identify the board (any one is enough).
    board: tuple[Annotated[str, Field(min_length=3, max_length=80)], ...] = ()
    #: For profiles without ``board``: whether an NVIDIA GPU must be present (true) or absent (false).
    nvidia_gpu: bool | None = None


class ArtifactChoice(BaseModel):
    """One entry of a profile's artifact preference."""

    model_config = ConfigDict(frozen=True)

    target: Target
    precision: Precision

    def __str__(self) -> str:
        return f"{self.target.value}-{self.precision.value}"


class Profile(_Section):
    """One hardware profile (see ``docs/hardware.md`` for every key)."""

    #: The profile's name: its file name without ``.toml``.
    name: Annotated[str, Field(pattern=_NAME)]
    #: The board, in words.
    title: Annotated[str, Field(min_length=1, max_length=120)]
    #: ``unsupported`` profiles are recognised by detection, but ``flash`` refuses them, saying ``notes``.
    support: Literal["supported", "unsupported"] = "supported"
    #: What an operator should know: caveats, what the profile does about them.
    notes: Annotated[str, Field(max_length=2000)] = ""
    system: System
    hardware: Hardware
    runtimes: tuple[RuntimeSpec, ...] = Field(min_length=1, max_length=8)
    install: Install = Install()
    rollout: Rollout
    detect: Detect = Detect()

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        have = {r.name for r in self.runtimes}
        if len(have) != len(self.runtimes):
            raise ValueError("runtimes: each runtime may be listed once")
        for choice in self.artifact_order:
            if not have & TARGET_RUNTIMES[choice.target]:
                raise ValueError(f"rollout.artifacts: {choice} needs one of "
                                 f"{', '.join(sorted(TARGET_RUNTIMES[choice.target]))} in runtimes")
        wheel_runtimes = {r.name for r in self.runtimes if r.source == "wheelhouse"}
        extra_runtime = {"onnx": "onnxruntime", "tflite": "ai-edge-litert", "": None}[self.install.extra]
        if extra_runtime is not None and extra_runtime not in wheel_runtimes:
            raise ValueError(f"install.extra: {self.install.extra!r} installs {extra_runtime}, which runtimes does "
                             "not list with source = \"wheelhouse\"")
        if any(r.source == "system" for r in self.runtimes) and not self.install.system_site_packages:
            raise ValueError("install.system_site_packages: a runtime with source = \"system\" is only visible to "
                             "the agent with system_site_packages = true")
        if bool(self.detect.board) == (self.detect.nvidia_gpu is not None):
            raise ValueError("detect: give board (for a board) or nvidia_gpu (for a generic machine), one of them")
        if self.support == "unsupported" and not self.notes.strip():
            raise ValueError("notes: an unsupported profile must say why, and what to do instead")
        return self

    @property
    def supported(self) -> bool:
        return self.support == "supported"

    @property
    def latency_budget_ms(self) -> float:
        """The p95 latency budget (ms) rollout gates hold this device to by default."""
        return self.rollout.latency_budget_ms

    @property
    def artifact_order(self) -> tuple[ArtifactChoice, ...]:
        """Artifact kinds this device prefers, best first."""
        out = []
        for item in self.rollout.artifacts:
            target, _, precision = item.partition("-")
            out.append(ArtifactChoice(target=Target(target), precision=Precision(precision)))
        return tuple(out)

    def choose_artifact(self, artifacts: Iterable[ArtifactEntry],
                        runtimes: Mapping[str, str] | None = None) -> ArtifactEntry | None:
        """The first of ``artifacts`` (a manifest's) in this profile's order that the device can load, or None.

        ``runtimes``: what the device reported having (``{name: version}``, from its hello), each artifact's
        runtime requirement checked against it; None: any runtime this profile lists, versions unchecked.
        """
        if runtimes is None:
            listed = {r.name for r in self.runtimes}
            return first_in_order(self.artifact_order, artifacts, lambda art: art.runtime.name in listed)
        return first_in_order(self.artifact_order, artifacts, lambda art: art.runtime.unmet(runtimes) is None)


def first_in_order(order: Iterable[ArtifactChoice], artifacts: Iterable[ArtifactEntry],
                   loadable: Callable[[ArtifactEntry], bool]) -> ArtifactEntry | None:
    """The first of ``artifacts`` by (target, precision) in ``order`` for which ``loadable`` holds, or None."""
    arts = list(artifacts)
    for choice in order:
        for art in arts:
            if (art.target, art.precision) == (choice.target, choice.precision) and loadable(art):
                return art
    return None


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part + 1}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(file)"


def load_file(path: Path) -> Profile:
    """Load and validate one profile file; ProfileError names the file and the key at fault."""
    raw = read_toml(path, "", ProfileError)
    try:
        profile = Profile.model_validate(raw)
    except ValidationError as exc:
        problems = [f"{_where(tuple(e['loc']))}: {e['msg']}" for e in exc.errors()[:5]]
        raise ProfileError(f"{path}: " + "; ".join(problems)) from None
    if profile.name != path.stem:
        raise ProfileError(f"{path}: name: {profile.name!r} must match the file name ({path.stem!r})")
    return profile


def names(directory: Path = PROFILE_DIR) -> list[str]:
    """Names of the profiles in ``directory``, sorted."""
    return sorted(p.stem for p in directory.glob("*.toml"))


@cache
def _load_cached(path: Path, mtime_ns: int) -> Profile:
    return load_file(path)


def load(name: str, directory: Path = PROFILE_DIR) -> Profile:
    """The profile called ``name``; UnknownProfile lists the ones there are."""
    if not re.match(_NAME, name):
        raise UnknownProfile(f"{name!r} is not a profile name (a-z, 0-9 and '-'); "
                             f"profiles: {', '.join(names(directory))}")
    path = directory / f"{name}.toml"
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        raise UnknownProfile(f"no hardware profile {name!r}; profiles: {', '.join(names(directory))}") from None
    return _load_cached(path, mtime)


def load_all(directory: Path = PROFILE_DIR) -> dict[str, Profile]:
    """Every profile in ``directory`` by name; the first malformed one raises ProfileError."""
    return {n: load(n, directory) for n in names(directory)}


def is_known(name: str, directory: Path = PROFILE_DIR) -> bool:
    """Whether ``name`` is a profile's (a device enrolled with any other name has a custom profile)."""
    return bool(re.fullmatch(_NAME, name)) and (directory / f"{name}.toml").is_file()


def label(name: str, directory: Path = PROFILE_DIR) -> str:
    """A device's profile as it is shown: the name, followed by ``(custom)`` when it is no profile's."""
    return name if is_known(name, directory) else f"{name} (custom)"


def check_device_profile(name: str, *, custom: bool = False, directory: Path = PROFILE_DIR) -> None:
    """Accept ``name`` as a device's profile: a profile that loads or, with ``custom``, a well-formed name that
    is no profile's. UnknownProfile lists the profiles and says how to mark a name custom; ProfileError names
    a profile file that does not load, or a profile's name marked custom."""
    if not custom:
        try:
            load(name, directory)
        except UnknownProfile as exc:
            raise UnknownProfile(f"{exc}; for hardware without a profile, mark the name as a custom profile "
                                 "(no latency budget, the general artifact order)") from None
        return
    if not re.fullmatch(_NAME, name):
        raise UnknownProfile(f"{name!r} is not a profile name: a-z, 0-9 and '-', at most 64 characters, starting "
                             "with a letter or a digit")
    if is_known(name, directory):
        raise ProfileError(f"{name} is a hardware profile, not a custom one: enrol the device with it without "
                           "marking it custom")
