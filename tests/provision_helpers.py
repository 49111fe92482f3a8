"""Bundles for the provisioning tests: a fast one (its wheelhouse holds only the edgeherd wheel), device
certificates from a real CA, the agent's full wheelhouse shared by the test modules, the installed agent started
the way its unit says, and fake root filesystems laid out like the images the profiles are for."""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest

from hardware.files import sha256_file
from hardware.profiles import load
from hardware.provision import BundleSpec, DeviceSecrets, stage
from hardware.wheelhouse import DeviceTarget, agent_wheel, build
from protocol.version import __version__

SERVER_KEY = "ed25519:Jpn69PZ51Vluwz2vQYcuWf+9zuqAACue9tnTfwOnUkk="


@functools.cache
def device_certificate(device: str) -> tuple[bytes, bytes, bytes]:
    """A real certificate for ``device`` from a CA of its own (made with :class:`server.pki.Authority`, then
    thrown away): (certificate, key, CA bundle), PEM."""
    from server.pki import Authority

    with tempfile.TemporaryDirectory() as d:
        issued = Authority.open(Path(d)).issue_device(device)
    return issued.certificate, issued.key, issued.ca_bundle


def spec(device: str = "pi-1", profile: str = "x86-64-cpu", *, password: str | None = None,
         broker_url: str | None = None, ca: bytes | None = None, bundle_id: str | None = None) -> BundleSpec:
    """A bundle's spec: the device logs in with a certificate of its own over mqtts:// (the managed broker), or,
    given a ``password``, with that (a broker the user brings; ``ca`` pinned where given)."""
    p = load(profile)
    if password is None:
        cert, key, bundle = device_certificate(device)
        secrets = DeviceSecrets(device_id=device, broker_url=broker_url or "mqtts://broker.example:8883",
                                server_key=SERVER_KEY, certificate=cert, key=key, ca_cert=bundle)
    else:
        secrets = DeviceSecrets(device_id=device, broker_url=broker_url or "mqtt://broker.example:1883",
                                server_key=SERVER_KEY, password=password, ca_cert=ca)
    return BundleSpec(secrets, p, p.system.python, bundle_id or uuid.uuid4().hex[:16], __version__,
                      datetime.now(timezone.utc))


def fast_bundle(parent: Path, s: BundleSpec, wheel_cache: Path) -> Path:
    """Stage ``s`` with a wheelhouse of the edgeherd wheel alone (installed with --no-deps: seconds, no network).

    ``wheel_cache`` holds the packed edgeherd wheel, made once per test session."""
    work = parent / f"wh-{s.bundle_id}"
    work.mkdir(parents=True)
    wheel = next(wheel_cache.glob("edgeherd-*.whl"))
    shutil.copy(wheel, work / wheel.name)
    req = f"edgeherd=={__version__} --hash=sha256:{sha256_file(wheel)}\n"
    target = DeviceTarget(s.python, s.profile.system.architecture, s.profile.system.glibc)
    return stage(parent, s, work, req, [wheel.name], target.platforms)


def packed_wheel(dest: Path) -> Path:
    return agent_wheel(dest)


def profile_wheelhouse(factory: pytest.TempPathFactory, profile: str) -> tuple[Path, list[str]]:
    """The agent's wheelhouse for ``profile`` (its platform, Python and extra), downloaded from the package index
    once per test session whichever module asks first (and pip's lines as they came)."""
    p = load(profile)
    d = factory.getbasetemp() / f"wheelhouse-{p.name}"
    done = d / "lines.json"
    if not done.exists():
        shutil.rmtree(d, ignore_errors=True)
        lines: list[str] = []
        build(d / "w", target=DeviceTarget(p.system.python, p.system.architecture, p.system.glibc),
              extra=p.install.extra, packages=p.install.packages, on_line=lines.append)
        done.write_text(json.dumps(lines))
    return d / "w", json.loads(done.read_text())


def device_python() -> str:
    """The OS's own Python 3.11 when it can make virtual environments (as on a device), else this one."""
    system = Path("/usr/bin/python3.11")
    if system.exists() and subprocess.run([str(system), "-c", "import ensurepip, venv"]).returncode == 0:
        return str(system)
    return sys.executable


def install_layout(root: Path) -> list[str]:
    """install.sh's options that put everything under ``root`` (a device's /)."""
    return ["--prefix", str(root / "opt/edgeherd"), "--config-dir", str(root / "etc/edgeherd"),
            "--data-dir", str(root / "var/lib/edgeherd"), "--unit-dir", str(root / "etc/systemd/system")]


def offline_env(**extra: str) -> dict[str, str]:
    """The environment of an installer on a device that can reach nothing: a proxy that refuses (pip is told not
    to use an index in any case), and no systemd to start the unit."""
    return {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
            "EDGEHERD_INSTALL_NO_SYSTEMD": "1", **extra}


def start_installed_agent(root: Path, api_port: int, log: Path) -> subprocess.Popen[bytes]:
    """The agent installed under ``root``, started as systemd would: the unit's ExecStart, from /, with the
    unit's environment (none but the API port: tests run in parallel)."""
    unit = (root / "etc/systemd/system/edgeherd-agent.service").read_text()
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    env = {"PATH": "/usr/bin:/bin", "EDGEHERD_AGENT_API_PORT": str(api_port)}
    with log.open("ab") as out:
        return subprocess.Popen(shlex.split(line[len("ExecStart="):]), cwd="/", env=env, stdout=out, stderr=out)


def raspberry_pi_os(root: Path, *, arch: str = "aarch64", python: str = "3.11") -> Path:
    """A directory laid out like a mounted Raspberry Pi OS Bookworm root partition (merged /usr, systemd)."""
    (root / "etc/systemd/system/multi-user.target.wants").mkdir(parents=True)
    (root / "etc/os-release").write_text(
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\n'
        'VERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n')
    (root / "etc/rpi-issue").write_text("Raspberry Pi reference 2024-11-19\n")
    (root / "etc/hostname").write_text("raspberrypi\n")
    for d in ("usr/bin", "usr/sbin", "usr/lib/aarch64-linux-gnu", "usr/lib/arm-linux-gnueabihf", "var/lib", "opt",
              "boot/firmware", "home/pi", "tmp", "run", "proc", "sys", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib")):
        os.symlink(target, root / link)
    loader = {"aarch64": "aarch64-linux-gnu/ld-linux-aarch64.so.1",
              "armv7l": "arm-linux-gnueabihf/ld-linux-armhf.so.3"}[arch]
    (root / "usr/lib" / loader).write_text("")
    os.symlink(loader, root / "usr/lib" / Path(loader).name)
    for exe in (f"usr/bin/python{python}", "usr/bin/dash"):
        (root / exe).write_text("#!/bin/false\n")
        os.chmod(root / exe, 0o755)  # noqa: S103 - executables of the image
    os.symlink(f"python{python}", root / "usr/bin/python3")
    os.symlink("dash", root / "usr/bin/sh")
    (root / "boot/firmware/config.txt").write_text("arm_64bit=1\n")
    (root / "boot/firmware/cmdline.txt").write_text("console=serial0,115200 root=PARTUUID=0-02 rootwait\n")
    system_units = Path("/usr/lib/systemd/system")
    if system_units.is_dir():  # Bookworm's systemd 252 ships the same units as Debian 12's
        shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    return root
