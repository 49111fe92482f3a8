"""Bundles for the provisioning tests: a fast one (its wheelhouse holds only the edgeherd wheel) and fake root
filesystems laid out like the images the profiles are for."""

from __future__ import annotations

import os
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from hardware.files import sha256_file
from hardware.profiles import load
from hardware.provision import BundleSpec, DeviceSecrets, stage
from hardware.wheelhouse import DeviceTarget, agent_wheel
from protocol.version import __version__

SERVER_KEY = "ed25519:Jpn69PZ51Vluwz2vQYcuWf+9zuqAACue9tnTfwOnUkk="


def spec(device: str = "pi-1", profile: str = "x86-64-cpu",
         password: str = "correct-horse-battery-staple-1",  # noqa: S107 - a test bundle's password
         broker_url: str = "mqtt://broker.example:1883", ca: bytes | None = None,
         bundle_id: str | None = None) -> BundleSpec:
    p = load(profile)
    return BundleSpec(DeviceSecrets(device, broker_url, password, SERVER_KEY, ca), p, p.system.python,
                      bundle_id or uuid.uuid4().hex[:16], __version__, datetime.now(timezone.utc))


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
