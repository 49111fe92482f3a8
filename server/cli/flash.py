"""``edgeherd flash`` (provision a device with the agent) and ``edgeherd device rotate-credentials``."""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer

from server.cli.fleet import Broker, DataDir, _actor, _fail, _registry, console, err

__all__ = ["FlashResult", "flash", "flash_command", "rotate_credentials_command"]

#: Runs a command and returns its standard output (``--ssh``); replaced in tests.
Runner = Callable[[list[str]], str]


def run_command(argv: list[str]) -> str:
    """Run ``argv``; an interactive one (``ssh -t``: the installer, perhaps sudo asking for a password) talks to
    the terminal, the others' output is returned."""
    interactive = argv[:2] == ["ssh", "-t"]
    try:
        done = subprocess.run(argv, check=True, stdout=None if interactive else subprocess.PIPE,  # noqa: S603
                              text=True)
    except FileNotFoundError:
        raise RuntimeError(f"{argv[0]} is not installed here") from None
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"`{' '.join(argv[:2])} …` failed with exit status {exc.returncode}") from None
    return done.stdout or ""


RUNNER: Runner = run_command


class FlashResult:
    def __init__(self, device_id: str, enrolled: bool, wheels: list[str], where: str, bundle_name: str) -> None:
        self.device_id, self.enrolled, self.wheels, self.where, self.bundle_name = (
            device_id, enrolled, wheels, where, bundle_name)


def _loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def flash(registry: Any, device_id: str, profile_name: str, *, out: Path | None = None, rootfs: Path | None = None,
          ssh: str | None = None, broker_url: str | None = None, ca_cert: Path | None = None,
          groups: list[str] | None = None, python: str | None = None, wheel: Path | None = None,
          find_links: list[Path] | None = None, no_index: bool = False, constraints: Path | None = None,
          ssh_options: list[str] | None = None, force: bool = False, actor: str = "system",
          on_pip_line: Callable[[str], None] | None = None, runner: Runner | None = None,
          say: Callable[[str], None] = lambda _: None,
          progress: AbstractContextManager[Any] | None = None) -> FlashResult:
    """Make the device's provisioning bundle and deliver it to exactly one of ``out``, ``rootfs`` or ``ssh``.

    The wheelhouse is made first (the slow step, and the one that may fail; inside ``progress``), and only then
    is the device enrolled (with fresh credentials) or, if it exists, given fresh credentials, which cut off its
    current agent.
    """
    from hardware.profiles import ProfileError, load
    from hardware.provision import (
        BundleSpec,
        DeviceSecrets,
        ProvisionError,
        SshTarget,
        check_rootfs,
        install_over_ssh,
        install_rootfs,
        stage,
        write_tarball,
    )
    from hardware.wheelhouse import DeviceTarget, WheelhouseError, build
    from protocol.version import __version__
    from server.registry import RegistryError

    if sum(x is not None for x in (out, rootfs, ssh)) != 1:
        raise ValueError("give exactly one of --out FILE, --rootfs DIR or --ssh USER@HOST")
    try:
        profile = load(profile_name)
    except ProfileError as exc:
        raise ValueError(str(exc)) from None
    if not profile.supported:
        raise ValueError(f"profile {profile.name} is marked unsupported: {profile.notes}")
    py = python or profile.system.python
    if not re.fullmatch(r"3\.(1[0-9]|[2-9][0-9])", py):
        raise ValueError(f"--python {py}: the agent needs Python 3.10 or newer, given as X.Y")
    url = broker_url or registry.broker_url
    scheme = urlsplit(url).scheme
    if scheme not in ("mqtt", "mqtts"):
        raise ValueError(f"--broker-url {url}: give mqtt://host:1883 or mqtts://host:8883")
    if ca_cert is not None and scheme != "mqtts":
        raise ValueError("--ca-cert is for an mqtts:// broker URL")
    if _loopback(url):
        say(f"note: the broker URL {url} is a loopback address: the device will look for the broker on itself "
            "(give --broker-url with an address the device can reach)")
    try:  # what can be checked before anything is made or changed
        ssh_target = SshTarget(ssh, tuple(ssh_options or ())) if ssh is not None else None
        if out is not None and out.exists():
            raise ProvisionError(f"{out} exists; it may hold another device's credentials: remove it or choose "
                                 "another name")
        if rootfs is not None:
            check_rootfs(rootfs, profile, force=force)
    except ProvisionError as exc:
        raise ValueError(str(exc)) from None
    existing = next((d for d in registry.devices() if d.id == device_id), None)
    if existing is not None and not existing.revoked and existing.profile != profile.name:
        raise ValueError(f"{device_id} is enrolled with profile {existing.profile}, not {profile.name}; revoke it and "
                         "flash again to change its profile")
    ca = ca_cert.read_bytes() if ca_cert is not None else None
    server_key = registry.public_key_text()  # before anything is made: no key, no flash

    work = Path(tempfile.mkdtemp(prefix="edgeherd-flash-"))
    try:
        target = DeviceTarget(py, profile.system.architecture, profile.system.glibc)
        say(f"making the wheelhouse for {profile.title}: Python {py}, {target.platforms[0]} or older")
        with progress or nullcontext():
            wh = build(work / "wheels", target=target, extra=profile.install.extra,
                       packages=profile.install.packages, edgeherd_wheel=wheel, find_links=find_links or [],
                       no_index=no_index, constraints=constraints, on_line=on_pip_line)
        enrolled = existing is None or existing.revoked
        if enrolled:
            registry.add_device(device_id, profile.name, groups or [], actor=actor)
            password = (registry.data / "devices" / device_id / "broker-password").read_text().strip()
        else:
            password = registry.reissue_credentials(device_id, actor=actor, detail={
                "via": "flash", "output": "out" if out else "rootfs" if rootfs else "ssh"})
        spec = BundleSpec(DeviceSecrets(device_id, url, password, server_key, ca), profile, py,
                          uuid.uuid4().hex[:16], __version__, datetime.now(timezone.utc))
        bundle = stage(work, spec, wh.dir, wh.requirements_txt(), [w.path.name for w in wh.wheels],
                       target.platforms)
        names = [w.path.name for w in wh.wheels]
        if out is not None:
            write_tarball(bundle, out, spec.created_at)
            where = str(out)
        elif rootfs is not None:
            res = install_rootfs(bundle, rootfs, profile, force=force)
            for problem in res.problems:
                say(f"warning: {problem}")
            where = str(res.bundle_dir)
        else:
            assert ssh_target is not None  # noqa: S101 - one of the three, checked above
            tarball = work / f"{spec.name}.tar.gz"
            write_tarball(bundle, tarball, spec.created_at)
            say(f"copying the bundle to {ssh_target.target} and running its installer there")
            install_over_ssh(tarball, spec.name, ssh_target, runner or RUNNER)
            where = ssh_target.target
        return FlashResult(device_id, enrolled, names, where, spec.name)
    except (WheelhouseError, ProvisionError, RegistryError, OSError, RuntimeError) as exc:
        raise ValueError(str(exc)) from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def flash_command(
    ctx: typer.Context,
    device: Annotated[str, typer.Argument(help="Device id: a-z, 0-9 and '-'. Enrolled if new; given fresh "
                                          "credentials if it exists.")],
    profile: Annotated[str, typer.Option("--profile", help="Hardware profile (hardware/profiles, "
                                         "docs/hardware.md), e.g. raspberry-pi-5.")],
    out: Annotated[Path | None, typer.Option("--out", help="Write the offline installer bundle here (.tar.gz).")
                   ] = None,
    rootfs: Annotated[Path | None, typer.Option("--rootfs", help="Write the bundle into this mounted root "
                                                "filesystem, installed by a first-boot unit.")] = None,
    ssh: Annotated[str | None, typer.Option("--ssh", metavar="USER@HOST", help="Copy the bundle with scp and run "
                                            "its installer over ssh.")] = None,
    broker_url: Annotated[str | None, typer.Option("--broker-url", help="The broker as the device reaches it "
                                                   "(default: the server's).")] = None,
    ca_cert: Annotated[Path | None, typer.Option("--ca-cert", help="CA certificate of an mqtts:// broker, "
                                                 "pinned on the device.")] = None,
    group: Annotated[list[str] | None, typer.Option("--group", help="Group(s) of a new device.")] = None,
    python: Annotated[str | None, typer.Option("--python", metavar="X.Y", help="The device's Python, where it "
                                               "is not the profile's.")] = None,
    wheel: Annotated[Path | None, typer.Option("--wheel", help="The edgeherd wheel to install (default: this "
                                               "installation, packed).")] = None,
    find_links: Annotated[list[Path] | None, typer.Option("--find-links", help="A directory of wheels for pip "
                                                          "to use.")] = None,
    no_index: Annotated[bool, typer.Option("--no-index", help="Take wheels only from --find-links "
                                           "(no package index).")] = False,
    constraints: Annotated[Path | None, typer.Option("--constraints", help="pip constraints for the wheelhouse."
                                                     )] = None,
    ssh_option: Annotated[list[str] | None, typer.Option("--ssh-option", help="Passed to ssh and scp, e.g. "
                                                         "-oPort=2222.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Write into a root filesystem that differs from the "
                                        "profile.")] = False,
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
) -> None:
    """Provision a device: an offline installer of the agent with the device's own credentials and the pinned
    server key, as a file, in a root filesystem, or installed over ssh."""
    actor = _actor(ctx, data_dir, "ENROLL_DEVICE")
    from rich.status import Status

    status = Status("making the wheelhouse …", console=err)
    seen = [0]

    def on_line(line: str) -> None:
        m = re.match(r"\s*(Collecting|Downloading|Processing|Saved|File was already downloaded)\s+(\S+)", line)
        if m:
            seen[0] += m.group(1) in ("Saved", "File was already downloaded")
            status.update(f"making the wheelhouse: {seen[0]} wheels; {m.group(1).lower()} "
                          f"{Path(m.group(2)).name[:60]}")

    try:
        reg = _registry(data_dir, broker)
        result = flash(reg, device, profile, out=out, rootfs=rootfs, ssh=ssh, broker_url=broker_url,
                       ca_cert=ca_cert, groups=group, python=python, wheel=wheel, find_links=find_links,
                       no_index=no_index, constraints=constraints, ssh_options=ssh_option, force=force,
                       actor=actor, on_pip_line=on_line, say=lambda m: err.print(m), progress=status)
    except ValueError as exc:
        _fail(exc)
    verb = "enrolled" if result.enrolled else "issued fresh credentials to (its old password no longer works)"
    console.print(f"{verb} {device}; bundle of {len(result.wheels)} wheels")
    if out is not None:
        console.print(f"wrote {out} (mode 0600: it holds {device}'s broker password; delete it once installed). "
                      f"On the device: tar -xzf {out.name} && sudo ./{result.bundle_name}/install.sh")
    elif rootfs is not None:
        console.print(f"wrote the bundle to {result.where} (mode 0700: it holds {device}'s broker password) and "
                      "enabled edgeherd-firstboot.service: the first boot installs the agent and removes the bundle")
    else:
        console.print(f"installed the agent on {result.where} over ssh")


def rotate_credentials_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The device.")],
    timeout: Annotated[float, typer.Option("--timeout", min=1, max=3600, help="Seconds to wait for the agent to "
                                           "confirm.")] = 30.0,
    data_dir: DataDir = Path("data"),
    broker: Broker = None,
) -> None:
    """Give a connected device a new broker password over its own session; the old one stops working once the
    agent has stored the new one."""
    from server.registry import RegistryError

    actor = _actor(ctx, data_dir, "ENROLL_DEVICE")
    try:
        with err.status(f"waiting for {name} to store its new password …"):
            _registry(data_dir, broker).rotate_credentials(name, actor=actor, timeout=timeout)
    except RegistryError as exc:
        _fail(exc)
    console.print(f"rotated {name}'s broker password: the agent stored the new one and uses it from its next "
                  "connection; the old one no longer works")
