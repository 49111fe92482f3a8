"""Provisioning bundles: everything a device needs to run the agent, installed offline by one script.

A bundle is a directory ``edgeherd-<device>/``, shipped as a ``.tar.gz``
(written mode 0600: it holds the device's private key or broker password)::

    install.sh                          the installer (docs/hardware.md); 0700
    bundle.json                         what the bundle is: device, profile, Python, platform, wheels
    requirements.txt                    every wheel pinned with its sha256
    wheelhouse/*.whl                    edgeherd and its dependencies for the device's platform and Python
    config/agent.toml                   the agent's configuration (paths filled in by install.sh)
    config/credentials/device.pem       the device's certificate (its common name: the device id); 0600
    config/credentials/device.key       its private key; 0600
    config/credentials/ca.pem           the CA bundle the agent pins (the server's own CA); 0600
    config/credentials/broker-password  instead of the three above, for a broker the user brings; 0600
    config/ca.crt                       with a password: the broker's CA certificate, when one was given
    bin/edgeherd-launch                 starts the agent environment the device should run; switches back from
                                        an agent update that does not come up (docs/agent.md)
    systemd/edgeherd-agent.service      the agent's unit (paths filled in by install.sh)
    systemd/edgeherd-firstboot.service  the unit that runs install.sh on the first boot of a flashed image

A device of the managed broker logs in with a certificate of its own over mutual TLS (``mqtts://``, the
server's CA pinned); a password is for a broker the user brings, the weaker option (docs/server.md). install.sh
installs whichever the bundle holds into ``<config>/credentials/``, 0600 and owned by the agent's user, which
rotates them there (``device rotate-credentials``).

It gets onto a device three ways (``edgeherd flash``): as the file itself
(:func:`write_tarball`), written into a mounted root filesystem with the
first-boot unit enabled (:func:`install_rootfs`), or copied with scp and
installed over ssh (:func:`install_over_ssh`, commands run by an injectable
runner). Standard library and :mod:`hardware` only; the wheelhouse itself is
made by :mod:`hardware.wheelhouse`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from hardware.detection import problems, read_facts
from hardware.errors import HardwareError
from hardware.files import atomic_write, fsync_dir
from hardware.profiles import Profile

__all__ = [
    "AGENT_UNIT",
    "BUNDLE_FORMAT",
    "FIRSTBOOT_DIR",
    "FIRSTBOOT_UNIT",
    "BundleSpec",
    "DeviceSecrets",
    "ProvisionError",
    "RootfsResult",
    "SshTarget",
    "check_rootfs",
    "install_over_ssh",
    "install_rootfs",
    "stage",
    "write_tarball",
]

BUNDLE_FORMAT = "edgeherd.provision/1"
AGENT_UNIT = "edgeherd-agent.service"
#: The launcher the unit starts (hardware/templates/edgeherd-launch.sh), installed into PREFIX/bin.
LAUNCHER = "edgeherd-launch"
FIRSTBOOT_UNIT = "edgeherd-firstboot.service"
#: Where a flashed root filesystem keeps the bundle until the first boot has installed it.
FIRSTBOOT_DIR = "/var/lib/edgeherd-firstboot"
#: The device's credentials in the bundle's ``config/credentials/`` and, installed, ``<config>/credentials/``.
CERT_FILE, KEY_FILE, CA_FILE, PASSWORD_FILE = "device.pem", "device.key", "ca.pem", "broker-password"
_TEMPLATES = Path(__file__).resolve().parent / "templates"
#: What ``ssh`` and ``scp`` are given as the device: ``user@host``, an ssh_config alias, ``host``.
_SSH_TARGET = re.compile(r"^(?:[a-z_][a-z0-9_.-]{0,31}@)?[A-Za-z0-9][A-Za-z0-9.:-]{0,252}$")
_REMOTE_DIR = re.compile(r"^/tmp/edgeherd-flash\.[A-Za-z0-9]{6,32}$")


class ProvisionError(HardwareError):
    """A bundle cannot be written or installed; the message says why and what to do."""


@dataclass(frozen=True, kw_only=True)
class DeviceSecrets:
    """What the server gives the device: who it is, where the broker is, what it logs in with (a certificate and
    key, or a password) and the keys it must trust."""

    device_id: str
    broker_url: str
    #: The pinned bundle-signing key, ``ed25519:<base64>``.
    server_key: str
    #: The broker password: for a broker the user brings (the managed one takes certificates).
    password: str | None = None
    #: The device's certificate and private key (PEM), for mutual TLS with the managed broker.
    certificate: bytes | None = None
    key: bytes | None = None
    #: The CA bundle (PEM) the agent pins for mqtts://: the server's CA with a certificate; with a password, the
    #: broker's CA certificate where one was given (None: the device's system CAs, or plain mqtt://).
    ca_cert: bytes | None = None

    def __post_init__(self) -> None:
        if (self.password is None) == (self.certificate is None):
            raise ProvisionError("a device logs in with a password or with a certificate: give exactly one")
        if self.certificate is None:
            if self.key is not None:
                raise ProvisionError("a private key goes with a certificate, not with a password")
            return
        if self.key is None or self.ca_cert is None:
            raise ProvisionError("a device certificate goes with its private key and the CA bundle to pin")
        if not self.broker_url.startswith("mqtts://"):
            raise ProvisionError(f"a device certificate is for an mqtts:// broker, not {self.broker_url}")
        for what, pem, marker in (("certificate", self.certificate, b"-----BEGIN CERTIFICATE-----"),
                                  ("private key", self.key, b"PRIVATE KEY-----"),
                                  ("CA bundle", self.ca_cert, b"-----BEGIN CERTIFICATE-----")):
            if marker not in pem:
                raise ProvisionError(f"the device's {what} is not PEM")

    @property
    def uses_certificate(self) -> bool:
        return self.certificate is not None

    def __repr__(self) -> str:  # never print the password or the key
        kind = "certificate" if self.uses_certificate else "password"
        return f"DeviceSecrets(device_id={self.device_id!r}, broker_url={self.broker_url!r}, {kind}=***)"


@dataclass(frozen=True)
class BundleSpec:
    """Everything a bundle is made of but the wheels."""

    secrets: DeviceSecrets
    profile: Profile
    #: The Python the wheelhouse is for (the profile's unless flash was told otherwise).
    python: str
    bundle_id: str
    edgeherd_version: str
    created_at: datetime

    @property
    def name(self) -> str:
        return f"edgeherd-{self.secrets.device_id}"


# -- rendering ---------------------------------------------------------------------------------------------------


def _fill(template: str, values: dict[str, str]) -> str:
    out = (_TEMPLATES / template).read_text(encoding="utf-8")
    for key, value in values.items():
        out = out.replace(f"@@{key}@@", value)
    leftover = re.findall(r"@@[A-Z_]+@@", out)
    if leftover:
        raise AssertionError(f"{template}: unfilled {leftover}")
    return out


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def agent_toml(spec: BundleSpec) -> str:
    """The agent's configuration; ``@CONFIG_DIR@`` and ``@DATA_DIR@`` are filled in by install.sh."""
    s = spec.secrets
    if s.uses_certificate:
        login = [f'tls_ca = "@CONFIG_DIR@/credentials/{CA_FILE}"',
                 f'tls_cert = "@CONFIG_DIR@/credentials/{CERT_FILE}"',
                 f'tls_key = "@CONFIG_DIR@/credentials/{KEY_FILE}"']
    else:
        login = [f'password_file = "@CONFIG_DIR@/credentials/{PASSWORD_FILE}"']
        if s.ca_cert is not None:
            login.append('tls_ca = "@CONFIG_DIR@/ca.crt"')
    lines = [
        f"# edgeherd agent configuration for {s.device_id} (docs/agent.md), written by `edgeherd flash`",
        f"device_id = {_toml_string(s.device_id)}",
        f"broker_url = {_toml_string(s.broker_url)}",
        *login,
        f"server_key = {_toml_string(s.server_key)}",
        'data_dir = "@DATA_DIR@"',
        f"profile = {_toml_string(spec.profile.name)}",
    ]
    return "\n".join(lines) + "\n"


def agent_unit(spec: BundleSpec) -> str:
    """The agent's systemd unit; user, group and paths are filled in by install.sh."""
    return _fill(AGENT_UNIT, {"DEVICE": spec.secrets.device_id, "PROFILE": spec.profile.name,
                              "PRIVATE_DEVICES": "no" if spec.profile.install.device_access else "yes"})


def firstboot_unit(spec: BundleSpec) -> str:
    return _fill(FIRSTBOOT_UNIT, {"DEVICE": spec.secrets.device_id, "BUNDLE_DIR": f"{FIRSTBOOT_DIR}/{spec.name}"})


def install_script(spec: BundleSpec) -> str:
    p = spec.profile
    q = shlex.quote
    return _fill("install.sh", {
        "DEVICE": q(spec.secrets.device_id), "PROFILE": q(p.name), "BUNDLE_ID": q(spec.bundle_id),
        "VERSION": q(spec.edgeherd_version), "PYTHON": q(spec.python),
        "PYTHON_COMMAND": q(p.system.python_command if spec.python == p.system.python else f"python{spec.python}"),
        "SYSTEM_SITE": "yes" if p.install.system_site_packages else "no",
        "GROUPS": q(" ".join(p.install.supplementary_groups)),
        "OS_PACKAGES": q(", ".join(p.system.packages) or "none"),
    })


# -- the bundle directory ----------------------------------------------------------------------------------------


def _write(path: Path, data: bytes | str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, data, mode)


def stage(parent: Path, spec: BundleSpec, wheelhouse: Path, requirements: str, wheels: Sequence[str],
          platforms: Sequence[str]) -> Path:
    """Write the bundle directory ``<parent>/edgeherd-<device>/``; ``wheelhouse`` (its wheels are moved in)
    and ``requirements`` come from :mod:`hardware.wheelhouse`."""
    root = parent / spec.name
    if root.exists():
        raise ProvisionError(f"{root} exists already")
    root.mkdir(mode=0o700, parents=True)
    os.chmod(root, 0o700)
    wh = root / "wheelhouse"
    wh.mkdir(mode=0o755)
    for name in wheels:
        shutil.move(str(wheelhouse / name), wh / name)
        os.chmod(wh / name, 0o644)
    s, p = spec.secrets, spec.profile
    _write(root / "install.sh", install_script(spec), 0o700)
    _write(root / "requirements.txt", requirements, 0o600)
    _write(root / "config" / "agent.toml", agent_toml(spec), 0o600)
    creds = root / "config" / "credentials"
    if s.uses_certificate:
        assert s.certificate is not None and s.key is not None and s.ca_cert is not None  # noqa: S101 - checked
        _write(creds / CERT_FILE, s.certificate, 0o600)
        _write(creds / KEY_FILE, s.key, 0o600)
        _write(creds / CA_FILE, s.ca_cert, 0o600)
    else:
        _write(creds / PASSWORD_FILE, f"{s.password}\n", 0o600)
        if s.ca_cert is not None:
            _write(root / "config" / "ca.crt", s.ca_cert, 0o644)
    _write(root / "bin" / LAUNCHER, (_TEMPLATES / "edgeherd-launch.sh").read_text(), 0o755)
    _write(root / "systemd" / AGENT_UNIT, agent_unit(spec), 0o644)
    _write(root / "systemd" / FIRSTBOOT_UNIT, firstboot_unit(spec), 0o644)
    info = {
        "format": BUNDLE_FORMAT, "bundle_id": spec.bundle_id, "device_id": s.device_id, "profile": p.name,
        "created_at": spec.created_at.isoformat(), "edgeherd_version": spec.edgeherd_version,
        "python": spec.python, "architecture": p.system.architecture, "platforms": list(platforms),
        "extra": p.install.extra, "wheels": list(wheels), "broker_url": s.broker_url,
        "tls": s.broker_url.startswith("mqtts://"), "ca_cert": s.ca_cert is not None,
        "credentials": "certificate" if s.uses_certificate else "password",
    }
    _write(root / "bundle.json", json.dumps(info, indent=2) + "\n", 0o600)
    return root


def _tar_filter(mtime: float) -> Callable[[tarfile.TarInfo], tarfile.TarInfo]:
    def f(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mtime = int(mtime)
        return ti

    return f


def write_tarball(bundle: Path, out: Path, created_at: datetime | None = None) -> None:
    """Pack ``bundle`` into ``out`` (.tar.gz), mode 0600, written atomically; an existing ``out`` is an error."""
    if out.exists():
        raise ProvisionError(f"{out} exists; it holds another device's credentials: remove it or choose another name")
    stamp = (created_at or datetime.now(timezone.utc)).timestamp()
    tmp = out.with_name(f".{out.name}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w:gz") as tar:
            tar.add(bundle, arcname=bundle.name, filter=_tar_filter(stamp))
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)


# -- a mounted root filesystem ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RootfsResult:
    bundle_dir: Path
    unit: Path
    wants_link: Path
    replaced: bool
    #: How the image differs from the profile (written anyway only with force).
    problems: tuple[str, ...]


def check_rootfs(rootfs: Path, profile: Profile, *, force: bool = False) -> tuple[str, ...]:
    """Whether ``rootfs`` is a systemd root filesystem of the kind ``profile`` describes (architecture, OS, Python;
    :func:`hardware.detection.problems`): ProvisionError if not, unless ``force``; returns the differences."""
    if not (rootfs / "etc" / "os-release").exists() and not (rootfs / "usr" / "lib" / "os-release").exists():
        raise ProvisionError(f"{rootfs} does not look like a root filesystem (no etc/os-release); mount the image's "
                             "root partition and give its mount point")
    if not (rootfs / "etc" / "systemd").is_dir():
        raise ProvisionError(f"{rootfs} has no etc/systemd: the first-boot installer needs systemd")
    found = problems(read_facts(rootfs), profile)
    if found and not force:
        raise ProvisionError(f"{rootfs} is not what profile {profile.name} expects: " + "; ".join(found)
                             + " (--force writes it anyway)")
    return found


def install_rootfs(bundle: Path, rootfs: Path, profile: Profile, *, force: bool = False) -> RootfsResult:
    """Copy ``bundle`` into the root filesystem mounted at ``rootfs`` and enable the first-boot unit there
    (after :func:`check_rootfs`)."""
    found = check_rootfs(rootfs, profile, force=force)
    home = rootfs / FIRSTBOOT_DIR.lstrip("/")
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    dest = home / bundle.name
    replaced = dest.exists()
    if replaced:
        shutil.rmtree(dest)
    shutil.copytree(bundle, dest, symlinks=False)
    os.chmod(dest, 0o700)
    units = rootfs / "etc" / "systemd" / "system"
    units.mkdir(parents=True, exist_ok=True)
    unit = units / FIRSTBOOT_UNIT
    atomic_write(unit, (bundle / "systemd" / FIRSTBOOT_UNIT).read_bytes(), 0o644)
    wants = units / "multi-user.target.wants"
    wants.mkdir(exist_ok=True)
    link = wants / FIRSTBOOT_UNIT
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(f"/etc/systemd/system/{FIRSTBOOT_UNIT}", link)  # what `systemctl enable` makes
    if os.geteuid() == 0:
        for dirpath, dirnames, filenames in os.walk(dest):
            for name in [*dirnames, *filenames]:
                os.lchown(os.path.join(dirpath, name), 0, 0)
        os.lchown(dest, 0, 0)
    fsync_dir(dest)
    fsync_dir(units)
    return RootfsResult(dest, unit, link, replaced, found)


# -- over ssh --------------------------------------------------------------------------------------------------------


#: Runs a command (argv) and returns its standard output; raises on a non-zero exit.
Runner = Callable[[list[str]], str]


@dataclass(frozen=True)
class SshTarget:
    target: str
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _SSH_TARGET.match(self.target):
            raise ProvisionError(f"{self.target!r} is not USER@HOST or HOST")

    @property
    def user(self) -> str | None:
        return self.target.split("@", 1)[0] if "@" in self.target else None


def install_over_ssh(tarball: Path, bundle_name: str, dest: SshTarget, run: Runner,
                     install_args: Sequence[str] = ()) -> list[list[str]]:
    """Copy ``tarball`` to the device with scp and run its install.sh there over ssh; returns the commands run.

    The tarball goes into a fresh 0700 directory made by ``mktemp -d``, which is removed afterwards whatever
    the installer's outcome. Not root on the device: install.sh runs under sudo (ssh -t, so sudo may ask).
    """
    opts = list(dest.options)
    commands: list[list[str]] = []

    def call(argv: list[str]) -> str:
        commands.append(argv)
        return run(argv)

    remote = call(["ssh", *opts, "--", dest.target, "umask 077 && mktemp -d /tmp/edgeherd-flash.XXXXXXXX"]).strip()
    if not _REMOTE_DIR.match(remote):
        raise ProvisionError(f"the device answered {remote[:80]!r} when asked for a temporary directory")
    call(["scp", "-q", *opts, "--", str(tarball), f"{dest.target}:{remote}/bundle.tar.gz"])
    sudo = "" if dest.user == "root" else "sudo "
    args = " ".join(shlex.quote(a) for a in install_args)
    script = (f"cd {remote} && tar -xzf bundle.tar.gz && rm -f bundle.tar.gz && "
              f"{sudo}./{bundle_name}/install.sh{' ' + args if args else ''}; rc=$?; rm -rf {remote}; exit $rc")
    call(["ssh", "-t", *opts, "--", dest.target, script])
    return commands

