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
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

import typer

from server.cli._common import Broker, DataDir, console, err, fail, open_registry, require_actor
from server.net import is_loopback

if TYPE_CHECKING:
    from hardware.provision import DeviceSecrets
    from server.broker import DeviceCredentials

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
    def __init__(self, device_id: str, enrolled: bool, wheels: list[str], where: str, bundle_name: str,
                 certificate: bool = False) -> None:
        self.device_id, self.enrolled, self.wheels, self.where, self.bundle_name = (
            device_id, enrolled, wheels, where, bundle_name)
        #: Whether the device logs in with a certificate (the managed broker) rather than a password.
        self.certificate = certificate


def _loopback(url: str) -> bool:
    return is_loopback(urlsplit(url).hostname or "")


def _same_host(a: str, b: str) -> bool:
    """Host names compare without case; IP addresses as addresses (``::1`` is ``0:0::1``)."""
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a.rstrip(".").lower() == b.rstrip(".").lower()


def check_certificate_name(url: str, names: list[str]) -> None:
    """ValueError unless the host of ``url`` is one of ``names`` (the broker certificate's): an agent checks that
    the broker's certificate names the host it connects to, and would never connect."""
    host = urlsplit(url).hostname or ""
    if any(_same_host(host, n) for n in names):
        return
    raise ValueError(f"the broker URL {url} names {host}, which is not in the managed broker's TLS certificate "
                     f"({', '.join(names)}): the device would refuse the broker. Restart the server with "
                     f"`edgeherd server run --public-host {host}` (the name the device reaches it at), or give "
                     "--broker-url with one of those names")


def _enrolment_copy(where: Path, certificates: bool) -> DeviceCredentials:
    """What ``Registry.add_device`` left in ``devices/<id>/`` for the device to log in with."""
    from server.broker import DeviceCredentials

    if certificates:
        return DeviceCredentials(certificate=(where / "device.pem").read_bytes(),
                                 key=(where / "device.key").read_bytes(), ca_bundle=(where / "ca.pem").read_bytes())
    return DeviceCredentials(password=(where / "broker-password").read_text().strip())


def _secrets(device_id: str, url: str, server_key: str, creds: DeviceCredentials,
             ca: bytes | None) -> DeviceSecrets:
    """The bundle's secrets from what the registry issued; ``ca``: the CA certificate given for a broker the user
    brings (the managed CA comes with a certificate)."""
    from hardware.provision import DeviceSecrets

    if creds.certificate is not None:
        return DeviceSecrets(device_id=device_id, broker_url=url, server_key=server_key,
                             certificate=creds.certificate, key=creds.key, ca_cert=creds.ca_bundle)
    return DeviceSecrets(device_id=device_id, broker_url=url, server_key=server_key, password=creds.password,
                         ca_cert=ca)


def flash(registry: Any, device_id: str, profile_name: str, *, out: Path | None = None, rootfs: Path | None = None,
          ssh: str | None = None, broker_url: str | None = None, ca_cert: Path | None = None,
          groups: list[str] | None = None, python: str | None = None, wheel: Path | None = None,
          find_links: list[Path] | None = None, no_index: bool = False, constraints: Path | None = None,
          ssh_options: list[str] | None = None, force: bool = False, actor: str = "system",
          on_pip_line: Callable[[str], None] | None = None, runner: Runner | None = None,
          say: Callable[[str], None] = lambda _: None,
          progress: AbstractContextManager[Any] | None = None) -> FlashResult:
    """Make the device's provisioning bundle and deliver it to exactly one of ``out``, ``rootfs`` or ``ssh``.

    The device logs in with what the registry issues: on the managed broker (TLS), a certificate and key with the
    CA bundle to pin, and then the broker URL's host must be one the broker's certificate names; on a broker the
    user brings, a password (with ``ca_cert`` pinned for an mqtts:// one). Everything that can be checked is,
    before anything changes. The wheelhouse is made first (the slow step, and the one that may fail; inside
    ``progress``), and only then is the device enrolled (with fresh credentials) or, if it exists, given fresh
    credentials, which cut off its current agent (its old certificates revoked, or its old password replaced).
    """
    from hardware.profiles import ProfileError, load
    from hardware.provision import (
        BundleSpec,
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
    from server.broker import BrokerError
    from server.pki import PkiError
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
    certificates = registry.certificates
    if certificates:
        # the managed broker: devices log in with certificates from the data directory's CA, which they pin
        if ca_cert is not None:
            raise ValueError("--ca-cert is for a broker you bring (--broker): the managed broker's CA comes from the "
                             "data directory, and the device pins it")
        if scheme != "mqtts":
            raise ValueError(f"--broker-url {url}: the managed broker's devices' listener takes TLS only: give "
                             "mqtts://host:port")
        check_certificate_name(url, registry.broker.certificate_names)
    elif ca_cert is not None and scheme != "mqtts":
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
            creds = _enrolment_copy(registry.data / "devices" / device_id, certificates)
        else:
            creds = registry.reissue_credentials(device_id, actor=actor, detail={
                "via": "flash", "output": "out" if out else "rootfs" if rootfs else "ssh"})
        spec = BundleSpec(_secrets(device_id, url, server_key, creds, ca), profile, py,
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
        return FlashResult(device_id, enrolled, names, where, spec.name, spec.secrets.uses_certificate)
    except (WheelhouseError, ProvisionError, RegistryError, BrokerError, PkiError, OSError,
            RuntimeError) as exc:
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
    ca_cert: Annotated[Path | None, typer.Option("--ca-cert", help="CA certificate of an mqtts:// broker you "
                                                 "bring (--broker), pinned on the device. The managed broker's CA "
                                                 "is pinned without it.")] = None,
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
    """Provision a device: an offline installer of the agent with the device's own credentials (a certificate
    and key on the managed broker, a password on one you bring) and the pinned server key and CA, as a file, in
    a root filesystem, or installed over ssh."""
    actor = require_actor(ctx, data_dir, "ENROLL_DEVICE")
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
        reg = open_registry(data_dir, broker)
        result = flash(reg, device, profile, out=out, rootfs=rootfs, ssh=ssh, broker_url=broker_url,
                       ca_cert=ca_cert, groups=group, python=python, wheel=wheel, find_links=find_links,
                       no_index=no_index, constraints=constraints, ssh_options=ssh_option, force=force,
                       actor=actor, on_pip_line=on_line, say=lambda m: err.print(m), progress=status)
    except ValueError as exc:
        fail(exc)
    secret = "private key" if result.certificate else "broker password"
    old = "its old certificates are revoked" if result.certificate else "its old password no longer works"
    verb = "enrolled" if result.enrolled else f"issued fresh credentials to ({old})"
    console.print(f"{verb} {device}; bundle of {len(result.wheels)} wheels")
    if out is not None:
        console.print(f"wrote {out} (mode 0600: it holds {device}'s {secret}; delete it once installed). "
                      f"On the device: tar -xzf {out.name} && sudo ./{result.bundle_name}/install.sh")
    elif rootfs is not None:
        console.print(f"wrote the bundle to {result.where} (mode 0700: it holds {device}'s {secret}) and "
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
    """Give a connected device new credentials over its own session (a certificate from the current CA, or a
    broker password); the old ones stop working once the agent has stored the new ones."""
    from server.cli.remote import call, remote
    from server.registry import RegistryError

    client = remote(ctx)
    if client is not None:
        client.timeout = max(client.timeout, timeout + 30)  # the server waits up to --timeout for the agent
        with err.status(f"waiting for {name} to store its new credentials …"):
            done = call(client, "POST", f"/devices/{name}/rotate-credentials", {"timeout": timeout})
        kind = done.get("credential", "credentials")
        console.print(f"rotated {name}'s broker {kind}: the agent stored the new one and uses it from its next "
                      "connection; the old one no longer works")
        return
    actor = require_actor(ctx, data_dir, "ENROLL_DEVICE")
    try:
        reg = open_registry(data_dir, broker)
        what = "certificate" if reg.certificates else "password"
        with err.status(f"waiting for {name} to store its new {what} …"):
            reg.rotate_credentials(name, actor=actor, timeout=timeout)
    except RegistryError as exc:
        fail(exc)
    old = "its old certificates are revoked" if what == "certificate" else "the old one no longer works"
    console.print(f"rotated {name}'s broker {what}: the agent stored the new one and uses it from its next "
                  f"connection; {old}")
