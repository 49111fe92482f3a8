"""Provisioning bundles without the network: layout and modes (a device certificate, or a password for a broker
the user brings), install.sh (offline, idempotent, upgrading in place, keeping data and rotated credentials), a
Raspberry Pi OS root filesystem with the first-boot unit, the ssh commands, and the wheelhouse's closure over the
device's markers."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from hardware.profiles import load
from hardware.provision import (
    FIRSTBOOT_DIR,
    DeviceSecrets,
    ProvisionError,
    SshTarget,
    check_rootfs,
    install_over_ssh,
    install_rootfs,
    write_tarball,
)
from hardware.wheelhouse import DeviceTarget, agent_wheel, close
from tests.provision_helpers import (
    SERVER_KEY,
    device_certificate,
    fast_bundle,
    install_layout,
    raspberry_pi_os,
    spec,
)

ME = pwd.getpwuid(os.getuid()).pw_name
MY_GROUP = grp.getgrgid(os.getgid()).gr_name
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
NO_SYSTEMD_ANALYZE = "systemd-analyze is not installed (Debian package systemd; `make system-deps` installs it)"


def mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


@pytest.fixture(scope="session")
def wheel_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("edgeherd-wheel")
    agent_wheel(d)
    return d


# -- the bundle ---------------------------------------------------------------------------------------------------


def _regular(tar: tarfile.TarFile) -> dict[str, int]:
    return {m.name: stat.S_IMODE(m.mode) for m in tar.getmembers() if not m.isdir() and "wheelhouse/" not in m.name}


def test_bundle_layout_modes_and_contents(tmp_path, wheel_dir):
    """The managed broker's device: its certificate, key and pinned CA bundle, 0600 under config/credentials/,
    named by agent.toml with an mqtts:// broker; nothing secret in bundle.json or a repr."""
    s = spec("pi-1", "x86-64-cpu", broker_url="mqtts://broker.example:8883")
    cert, key, ca = device_certificate("pi-1")
    bundle = fast_bundle(tmp_path, s, wheel_dir)
    out = tmp_path / "pi-1.tar.gz"
    write_tarball(bundle, out, s.created_at)
    assert mode(out) == 0o600
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
        files = _regular(tar)
        agent_toml = tar.extractfile("edgeherd-pi-1/config/agent.toml").read().decode()  # type: ignore[union-attr]
        info = json.loads(tar.extractfile("edgeherd-pi-1/bundle.json").read())  # type: ignore[union-attr]
        stored = {n: tar.extractfile(f"edgeherd-pi-1/config/credentials/{n}").read()  # type: ignore[union-attr]
                  for n in ("device.pem", "device.key", "ca.pem")}
    assert files == {
        "edgeherd-pi-1/install.sh": 0o700, "edgeherd-pi-1/bundle.json": 0o600,
        "edgeherd-pi-1/requirements.txt": 0o600, "edgeherd-pi-1/config/agent.toml": 0o600,
        "edgeherd-pi-1/config/credentials/device.pem": 0o600, "edgeherd-pi-1/config/credentials/device.key": 0o600,
        "edgeherd-pi-1/config/credentials/ca.pem": 0o600,
        "edgeherd-pi-1/systemd/edgeherd-agent.service": 0o644, "edgeherd-pi-1/bin/edgeherd-launch": 0o755,
        "edgeherd-pi-1/systemd/edgeherd-firstboot.service": 0o644}
    assert stat.S_IMODE(members["edgeherd-pi-1"].mode) == 0o700
    assert stat.S_IMODE(members["edgeherd-pi-1/config/credentials"].mode) == 0o700
    assert all(m.uid == 0 and m.uname == "root" for m in members.values())
    assert stored == {"device.pem": cert, "device.key": key, "ca.pem": ca}
    assert agent_toml.splitlines()[1:] == [
        'device_id = "pi-1"', 'broker_url = "mqtts://broker.example:8883"',
        'tls_ca = "@CONFIG_DIR@/credentials/ca.pem"', 'tls_cert = "@CONFIG_DIR@/credentials/device.pem"',
        'tls_key = "@CONFIG_DIR@/credentials/device.key"', f'server_key = "{SERVER_KEY}"',
        'data_dir = "@DATA_DIR@"', 'profile = "x86-64-cpu"']
    assert info["device_id"] == "pi-1" and info["profile"] == "x86-64-cpu" and info["python"] == "3.11"
    assert info["tls"] and info["ca_cert"] and info["credentials"] == "certificate"
    assert info["platforms"][0] == "manylinux_2_35_x86_64"
    body = key.split(b"\n")[1].decode()  # a line of the key itself
    assert body not in json.dumps(info) and body not in repr(s.secrets) and "certificate=***" in repr(s.secrets)
    with pytest.raises(ProvisionError, match="exists; it holds another device's credentials"):
        write_tarball(bundle, out)


def test_password_bundle_for_a_broker_the_user_brings(tmp_path, wheel_dir):
    """A broker the user brings: the password, 0600 under config/credentials/, and the broker's CA pinned."""
    s = spec("pi-1", password="correct-horse-battery-staple-1",  # noqa: S106 - a test bundle's password
             ca=b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
             broker_url="mqtts://broker.example:8883")
    bundle = fast_bundle(tmp_path, s, wheel_dir)
    out = tmp_path / "pi-1.tar.gz"
    write_tarball(bundle, out, s.created_at)
    with tarfile.open(out) as tar:
        files = _regular(tar)
        agent_toml = tar.extractfile("edgeherd-pi-1/config/agent.toml").read().decode()  # type: ignore[union-attr]
        password = tar.extractfile(  # type: ignore[union-attr]
            "edgeherd-pi-1/config/credentials/broker-password").read()
    assert {n: m for n, m in files.items() if "/config/" in n} == {
        "edgeherd-pi-1/config/agent.toml": 0o600, "edgeherd-pi-1/config/credentials/broker-password": 0o600,
        "edgeherd-pi-1/config/ca.crt": 0o644}
    assert password == b"correct-horse-battery-staple-1\n"
    assert agent_toml.splitlines()[3:5] == ['password_file = "@CONFIG_DIR@/credentials/broker-password"',
                                            'tls_ca = "@CONFIG_DIR@/ca.crt"']
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["credentials"] == "password" and info["ca_cert"] and "correct-horse" not in json.dumps(info)
    assert "correct-horse" not in repr(s.secrets) and "password=***" in repr(s.secrets)


def test_device_secrets_take_one_kind_of_credentials_complete():
    cert, key, ca = device_certificate("pi-1")
    ok = {"device_id": "pi-1", "broker_url": "mqtts://b:8883", "server_key": SERVER_KEY}
    cases = [
        ({}, "give exactly one"),
        ({"password": "p" * 24, "certificate": cert, "key": key, "ca_cert": ca}, "give exactly one"),
        ({"password": "p" * 24, "key": key}, "a private key goes with a certificate"),
        ({"certificate": cert, "ca_cert": ca}, "goes with its private key and the CA bundle"),
        ({"certificate": cert, "key": key}, "goes with its private key and the CA bundle"),
        ({"certificate": cert, "key": key, "ca_cert": ca, "broker_url": "mqtt://b:1883"},
         "is for an mqtts:// broker, not mqtt://b:1883"),
        ({"certificate": b"not a certificate", "key": key, "ca_cert": ca}, "certificate is not PEM"),
        ({"certificate": cert, "key": cert, "ca_cert": ca}, "private key is not PEM"),
        ({"certificate": cert, "key": key, "ca_cert": key}, "CA bundle is not PEM"),
    ]
    for given, message in cases:
        with pytest.raises(ProvisionError, match=message):
            DeviceSecrets(**(ok | given))
    assert DeviceSecrets(**ok, certificate=cert, key=key, ca_cert=ca).uses_certificate
    assert not DeviceSecrets(**ok, password="p" * 24).uses_certificate


def test_the_unit_is_hardened_and_the_jetson_one_sees_the_gpu(tmp_path, wheel_dir):
    pi = fast_bundle(tmp_path / "a", spec("pi-1", "raspberry-pi-5"), wheel_dir)
    unit = (pi / "systemd/edgeherd-agent.service").read_text()
    for line in ("Restart=always", "User=@USER@", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes", "PrivateDevices=yes", "CapabilityBoundingSet=",
                 "ReadWritePaths=@DATA_DIR@ @CONFIG_DIR@/credentials",
                 "ExecStart=@PREFIX@/bin/edgeherd-launch @DATA_DIR@/agent @PREFIX@/venv run --config "
                 "@CONFIG_DIR@/agent.toml"):
        assert line in unit.splitlines(), line
    orin = fast_bundle(tmp_path / "b", spec("orin-1", "jetson-orin-nano"), wheel_dir)
    assert "PrivateDevices=no" in (orin / "systemd/edgeherd-agent.service").read_text()
    script = (orin / "install.sh").read_text()
    assert "SYSTEM_SITE=yes" in script and "GROUPS_WANTED='video render'" in script and "PY_VERSION=3.10" in script


# -- install.sh ---------------------------------------------------------------------------------------------------


def _layout(root: Path) -> list[str]:
    return install_layout(root)


def _install(bundle: Path, root: Path, *extra: str, env: dict[str, str] | None = None,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    # no network: a proxy that refuses, and pip told not to use an index in any case
    base = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
            "EDGEHERD_PYTHON": sys.executable}
    out = subprocess.run([str(bundle / "install.sh"), *_layout(root), "--user", ME, *extra], capture_output=True,
                         text=True, env={**base, **(env or {})}, timeout=300)
    if check:
        assert out.returncode == 0, out.stdout + out.stderr
    return out


def _fake_systemctl(tmp_path: Path) -> tuple[dict[str, str], Path]:
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    calls = tmp_path / "systemctl.calls"
    (bindir / "systemctl").write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    os.chmod(bindir / "systemctl", 0o755)  # noqa: S103 - an executable stand-in
    return {"PATH": f"{bindir}:{os.environ['PATH']}"}, calls


def _creds(cred: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(cred.iterdir()) if p.name != "bundle-id"}


def test_install_sh_installs_offline_is_idempotent_and_upgrades_in_place(tmp_path, wheel_dir):
    from agent.config import load_config

    root = tmp_path / "root"
    first = fast_bundle(tmp_path / "b1", spec("pi-1"), wheel_dir)
    out = _install(first, root, "--systemd", "no")
    assert "no network" in out.stdout and "systemd does not manage services here" in out.stdout
    assert "installed the certificate, key and pinned CA of pi-1" in out.stdout
    prefix, etc, data = root / "opt/edgeherd", root / "etc/edgeherd", root / "var/lib/edgeherd"
    first_env = f"venvs/0.1.0-{json.loads((first / 'bundle.json').read_text())['bundle_id']}"
    assert os.readlink(prefix / "venv") == first_env
    # (this bundle's wheelhouse is edgeherd alone: the full one is installed and run in tests/test_flash.py)
    version = subprocess.run([str(prefix / "venv/bin/python"), "-c", "import importlib.metadata as m, hardware; "
                              "print(m.version('edgeherd'), hardware.__file__)"], capture_output=True, text=True,
                             cwd="/")
    assert version.returncode == 0 and version.stdout.startswith(f"0.1.0 {prefix}/venv/lib/"), version
    assert (prefix / "venv/bin/edgeherd-agent").exists()
    cred = etc / "credentials"
    cert, key, ca = device_certificate("pi-1")
    assert _creds(cred) == {"ca.pem": ca, "device.key": key, "device.pem": cert}
    assert {p.name: mode(p) for p in cred.iterdir()} == {
        "ca.pem": 0o600, "device.key": 0o600, "device.pem": 0o600, "bundle-id": 0o644}
    assert (mode(cred), mode(data)) == (0o700, 0o750)
    assert {p.stat().st_uid for p in [cred, *cred.iterdir()]} == {os.getuid()}
    # the agent's own configuration loader finds the files installed where agent.toml says
    cfg = load_config(etc / "agent.toml")
    assert (cfg.tls_cert, cfg.tls_key, cfg.tls_ca) == (cred / "device.pem", cred / "device.key", cred / "ca.pem")
    assert cfg.tls and cfg.broker_url == "mqtts://broker.example:8883" and cfg.password_file is None
    assert cfg.data_dir == data and cfg.device_id == "pi-1"
    assert mode(etc / "agent.toml") == (0o640 if os.getuid() == 0 else 0o600)
    unit = (root / "etc/systemd/system/edgeherd-agent.service").read_text()
    assert f"ExecStart={prefix}/bin/edgeherd-launch {data}/agent {prefix}/venv run --config {etc}/agent.toml" in unit
    assert os.access(prefix / "bin/edgeherd-launch", os.X_OK)
    assert f"User={ME}" in unit and f"Group={MY_GROUP}" in unit and f"ReadWritePaths={data} {cred}" in unit
    if SYSTEMD_ANALYZE:
        verify = subprocess.run([SYSTEMD_ANALYZE, "verify", str(root / "etc/systemd/system/edgeherd-agent.service")],
                                capture_output=True, text=True)
        assert verify.returncode == 0, verify.stdout + verify.stderr

    # the agent ran: its data, and rotated credentials (a new certificate and key, stored where agent.toml says)
    (data / "install.json").write_text("{}")
    (cred / "device.pem").write_bytes(b"rotated certificate\n")
    (cred / "device.key").write_bytes(b"rotated key\n")
    rotated = _creds(cred)

    # the same bundle again, with systemd: nothing reinstalled, data and the rotated credentials kept, restarted
    env, calls = _fake_systemctl(tmp_path)
    out = _install(first, root, "--systemd", "yes", env=env)
    assert "is installed already" in out.stdout and "kept the certificate, key and pinned CA" in out.stdout
    assert calls.read_text().splitlines() == ["daemon-reload", "enable edgeherd-agent.service",
                                              "restart edgeherd-agent.service"]
    assert _creds(cred) == rotated
    assert (data / "install.json").read_text() == "{}"

    # a newer bundle (a re-flash: fresh credentials) upgrades in place; an old third environment is removed
    (prefix / "venvs/0.0.9-0000000000000000").mkdir()
    device_certificate.cache_clear()  # a new certificate, as a re-flash issues
    second = fast_bundle(tmp_path / "b2", spec("pi-1"), wheel_dir)
    assert device_certificate("pi-1")[0] != cert
    _install(second, root, "--systemd", "no")
    second_env = f"venvs/0.1.0-{json.loads((second / 'bundle.json').read_text())['bundle_id']}"
    assert os.readlink(prefix / "venv") == second_env
    assert (prefix / "previous").read_text().strip() == first_env
    assert sorted(p.name for p in (prefix / "venvs").iterdir()) == sorted([first_env[6:], second_env[6:]])
    new_cert, new_key, new_ca = device_certificate("pi-1")
    assert _creds(cred) == {"ca.pem": new_ca, "device.key": new_key, "device.pem": new_cert}
    assert (data / "install.json").read_text() == "{}"


def test_install_sh_password_path_and_moving_a_device_to_certificates(tmp_path, wheel_dir):
    """A broker the user brings: the password installed 0600 and the broker's CA pinned, a rotated password kept
    on a re-install; then the device flashed for the managed broker: its certificate installed and the password
    files (and the other broker's CA) gone."""
    from agent.config import load_config

    root = tmp_path / "root"
    etc = root / "etc/edgeherd"
    cred = etc / "credentials"
    ca = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    first = fast_bundle(tmp_path / "b1", spec(password="first-password-0123456789",  # noqa: S106
                                              broker_url="mqtts://broker.lan:8883", ca=ca), wheel_dir)
    out = _install(first, root, "--systemd", "no")
    assert "installed the broker password of pi-1" in out.stdout
    assert (cred / "broker-password").read_text() == "first-password-0123456789\n"
    assert (mode(cred / "broker-password"), (etc / "ca.crt").read_bytes(), mode(etc / "ca.crt")) == (0o600, ca, 0o644)
    cfg = load_config(etc / "agent.toml")
    assert (cfg.password_file, cfg.tls_ca, cfg.tls_cert) == (cred / "broker-password", etc / "ca.crt", None)
    assert cfg.broker_password() == "first-password-0123456789"

    # the agent rotated its password: a re-install of the same bundle keeps it
    (cred / "broker-password").write_text("rotated-password-0123456789\n")
    (cred / "broker-password.previous").write_text("first-password-0123456789\n")
    out = _install(first, root, "--systemd", "no")
    assert "kept the broker password" in out.stdout
    assert (cred / "broker-password").read_text() == "rotated-password-0123456789\n"

    # flashed again for the managed broker (certificates)
    second = fast_bundle(tmp_path / "b2", spec("pi-1"), wheel_dir)
    out = _install(second, root, "--systemd", "no")
    assert "installed the certificate, key and pinned CA of pi-1" in out.stdout
    assert sorted(p.name for p in cred.iterdir()) == ["bundle-id", "ca.pem", "device.key", "device.pem"]
    assert not (etc / "ca.crt").exists()
    cfg = load_config(etc / "agent.toml")
    assert cfg.password_file is None and cfg.tls_cert == cred / "device.pem"

    # and back to a password (a broker the user brings, without a CA of its own): the certificate files go
    third = fast_bundle(tmp_path / "b3", spec(password="third-password-0123456789"), wheel_dir)  # noqa: S106
    _install(third, root, "--systemd", "no")
    assert sorted(p.name for p in cred.iterdir()) == ["broker-password", "bundle-id"]
    assert load_config(etc / "agent.toml").tls_ca is None


def test_install_sh_first_boot_removes_the_bundle_and_itself(tmp_path, wheel_dir):
    root = tmp_path / "root"
    bundle = fast_bundle(tmp_path / "b", spec(), wheel_dir)
    env, calls = _fake_systemctl(tmp_path)
    out = _install(bundle, root, "--systemd", "yes", "--firstboot", env=env)
    assert calls.read_text().splitlines() == ["daemon-reload", "enable edgeherd-agent.service",
                                              "start --no-block edgeherd-agent.service",
                                              "disable edgeherd-firstboot.service"]
    assert not bundle.exists() and "removed the bundle" in out.stdout
    cred = root / "etc/edgeherd/credentials"
    assert all(mode(cred / n) == 0o600 for n in ("device.pem", "device.key", "ca.pem"))


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--prefix", "opt/edgeherd"], {}, "--prefix must be an absolute path, not 'opt/edgeherd'"),
    (["--data-dir", "/var/lib/edge herd"], {}, "--data-dir may hold only letters, digits"),
    (["--user", "Root;rm"], {}, "--user takes a user name"),
    (["--systemd", "maybe"], {}, "--systemd takes auto, yes or no"),
    (["--bogus"], {}, "unknown option --bogus"),
    ([], {"EDGEHERD_PYTHON": "python3.99"}, "python3.99 is not installed: this bundle needs Python 3.11 (OS packages: "
                                            "python3-venv), or pass --python PATH"),
    ([], {"EDGEHERD_PYTHON": "FAKEPY"}, "is Python 3.9; this bundle's wheels are for Python 3.11"),
])
def test_install_sh_refuses_bad_input_before_changing_anything(tmp_path, wheel_dir, args, env, message):
    bundle = fast_bundle(tmp_path / "b", spec(), wheel_dir)
    if env.get("EDGEHERD_PYTHON") == "FAKEPY":
        fake = tmp_path / "python3.9"
        fake.write_text('#!/bin/sh\necho 3.9\n')
        os.chmod(fake, 0o755)  # noqa: S103 - an executable stand-in
        env = {"EDGEHERD_PYTHON": str(fake)}
    root = tmp_path / "root"
    out = subprocess.run([str(bundle / "install.sh"), *_layout(root), "--user", ME, *args], capture_output=True,
                         text=True, env={**os.environ, "EDGEHERD_PYTHON": sys.executable, **env}, timeout=60)
    assert out.returncode != 0 and message in out.stderr, out.stderr
    assert not root.exists()


# -- a Raspberry Pi OS root filesystem --------------------------------------------------------------------------


def test_rootfs_gets_the_bundle_and_an_enabled_first_boot_unit(tmp_path, wheel_dir):
    rootfs = raspberry_pi_os(tmp_path / "rootfs")
    bundle = fast_bundle(tmp_path / "b", spec("pi-1", "raspberry-pi-5"), wheel_dir)
    result = install_rootfs(bundle, rootfs, load("raspberry-pi-5"))
    home = rootfs / FIRSTBOOT_DIR.lstrip("/")
    dest = home / "edgeherd-pi-1"
    assert result.bundle_dir == dest and not result.replaced and result.problems == ()
    assert (mode(home), mode(dest), mode(dest / "install.sh"), mode(dest / "config/credentials/device.key")) == (
        0o700, 0o700, 0o700, 0o600)
    unit = rootfs / "etc/systemd/system/edgeherd-firstboot.service"
    assert mode(unit) == 0o644
    text = unit.read_text()
    assert f"ConditionPathExists={FIRSTBOOT_DIR}/edgeherd-pi-1/install.sh" in text
    assert f"ExecStart={FIRSTBOOT_DIR}/edgeherd-pi-1/install.sh --firstboot" in text
    link = rootfs / "etc/systemd/system/multi-user.target.wants/edgeherd-firstboot.service"
    assert os.readlink(link) == "/etc/systemd/system/edgeherd-firstboot.service"
    if os.getuid() == 0:
        assert {p.stat().st_uid for p in dest.rglob("*")} == {0}
    # flashing the same card again replaces the first bundle (its credentials are no longer valid)
    again = install_rootfs(fast_bundle(tmp_path / "c", spec("pi-1", "raspberry-pi-5"), wheel_dir), rootfs,
                           load("raspberry-pi-5"))
    assert again.replaced and len(list(home.iterdir())) == 1


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason=NO_SYSTEMD_ANALYZE)
def test_systemd_analyze_accepts_the_first_boot_unit(tmp_path, wheel_dir):
    rootfs = raspberry_pi_os(tmp_path / "rootfs")
    install_rootfs(fast_bundle(tmp_path / "b", spec("pi-1", "raspberry-pi-5"), wheel_dir), rootfs,
                   load("raspberry-pi-5"))
    out = subprocess.run([str(SYSTEMD_ANALYZE), "verify", f"--root={rootfs}",
                          "/etc/systemd/system/edgeherd-firstboot.service"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_rootfs_that_is_not_what_the_profile_expects_is_refused(tmp_path):
    pi = load("raspberry-pi-5")
    with pytest.raises(ProvisionError, match="does not look like a root filesystem"):
        check_rootfs(tmp_path, pi)
    armhf = raspberry_pi_os(tmp_path / "armhf", arch="armv7l")
    with pytest.raises(ProvisionError, match=r"the userland is armv7l; raspberry-pi-5 needs a aarch64 \(64-bit\)"):
        check_rootfs(armhf, pi)
    assert check_rootfs(armhf, pi, force=True)
    old = raspberry_pi_os(tmp_path / "bullseye", python="3.9")
    with pytest.raises(ProvisionError, match=r"Python 3.11 \(python3\) is not installed \(found 3.9\)"):
        check_rootfs(old, pi)


# -- over ssh ---------------------------------------------------------------------------------------------------------


class FakeRemote:
    def __init__(self, mktemp_answer: str = "/tmp/edgeherd-flash.Ab12Cd34\n") -> None:
        self.calls: list[list[str]] = []
        self.answer = mktemp_answer

    def __call__(self, argv: list[str]) -> str:
        self.calls.append(argv)
        return self.answer if "mktemp" in argv[-1] else ""


def test_ssh_copies_with_scp_and_runs_the_installer(tmp_path):
    tarball = tmp_path / "b.tar.gz"
    remote = FakeRemote()
    cmds = install_over_ssh(tarball, "edgeherd-pi-1", SshTarget("pi@pi-1.lan", ("-oPort=2222",)), remote)
    d = "/tmp/edgeherd-flash.Ab12Cd34"
    assert cmds == remote.calls == [
        ["ssh", "-oPort=2222", "--", "pi@pi-1.lan", "umask 077 && mktemp -d /tmp/edgeherd-flash.XXXXXXXX"],
        ["scp", "-q", "-oPort=2222", "--", str(tarball), f"pi@pi-1.lan:{d}/bundle.tar.gz"],
        ["ssh", "-t", "-oPort=2222", "--", "pi@pi-1.lan",
         f"cd {d} && tar -xzf bundle.tar.gz && rm -f bundle.tar.gz && sudo ./edgeherd-pi-1/install.sh; rc=$?; "
         f"rm -rf {d}; exit $rc"]]
    as_root = install_over_ssh(tarball, "edgeherd-pi-1", SshTarget("root@10.0.0.7"), FakeRemote())
    assert " && ./edgeherd-pi-1/install.sh;" in as_root[-1][-1]


def test_ssh_distrusts_what_the_device_answers(tmp_path):
    with pytest.raises(ProvisionError, match="answered"):
        install_over_ssh(tmp_path / "b.tar.gz", "edgeherd-pi-1", SshTarget("pi@pi-1"),
                         FakeRemote("/tmp/x; rm -rf /\n"))
    for bad in ("pi@host; reboot", "-oProxyCommand=sh", "pi@"):
        with pytest.raises(ProvisionError, match="is not USER@HOST or HOST"):
            SshTarget(bad)


# -- the wheelhouse ---------------------------------------------------------------------------------------------------


def test_device_targets():
    pi = DeviceTarget("3.11", "aarch64", "2.36")
    assert pi.platforms[0] == "manylinux_2_36_aarch64" and pi.platforms[-2:] == [
        "manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert "manylinux1_x86_64" in DeviceTarget("3.11", "x86_64", "2.35").platforms
    jetson = DeviceTarget("3.10", "aarch64", "2.35")
    tomli = Requirement("tomli>=2.0; python_version < '3.11'")
    assert jetson.wants(tomli) and not pi.wants(tomli)
    assert not pi.wants(Requirement("onnxruntime>=1.18; extra == 'onnx'"))
    assert pi.wants(Requirement("onnxruntime>=1.18; extra == 'onnx'"), ["onnx"])
    assert not pi.wants(Requirement("pywin32; sys_platform == 'win32'"))
    assert jetson.wants(Requirement("x; platform_machine == 'aarch64'"))


def _fake_wheel(d: Path, name: str, version: str, tag: str, requires: list[str]) -> None:
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(d / f"{name.replace('-', '_')}-{version}-{tag}.whl", "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)


def test_close_follows_the_devices_markers_not_this_machines(tmp_path):
    _fake_wheel(tmp_path, "app", "1.0", "py3-none-any", [
        "core>=1", "old-backport; python_version < '3.11'", "winonly; sys_platform == 'win32'",
        "fast[speed]>=2; platform_machine == 'aarch64'"])
    _fake_wheel(tmp_path, "core", "1.5", "cp310-cp310-manylinux_2_17_aarch64", [])
    _fake_wheel(tmp_path, "core", "1.4", "cp311-cp311-manylinux_2_17_x86_64", [])
    _fake_wheel(tmp_path, "old-backport", "3.0", "py3-none-any", [])
    _fake_wheel(tmp_path, "fast", "2.1", "py3-none-any", ["speedup; extra == 'speed'"])
    jetson = DeviceTarget("3.10", "aarch64", "2.35")
    chosen, missing = close([Requirement("app")], tmp_path, jetson)
    assert {n: str(w.version) for n, w in chosen.items()} == {"app": "1.0", "core": "1.5", "old-backport": "3.0",
                                                              "fast": "2.1"}
    assert [str(m) for m in missing] == ['speedup; extra == "speed"']  # fast[speed] needs it on the device
    pi = DeviceTarget("3.11", "aarch64", "2.36")
    chosen, missing = close([Requirement("app")], tmp_path, pi)
    assert "old-backport" not in chosen and "core" not in chosen  # the only aarch64 core is for cp310
    assert sorted(m.name for m in missing) == ["core", "speedup"]


def test_the_packed_edgeherd_wheel_is_complete(wheel_dir):
    wheel = next(wheel_dir.glob("edgeherd-*-py3-none-any.whl"))
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        record = zf.read(next(n for n in names if n.endswith("dist-info/RECORD"))).decode()
        entry_points = zf.read(next(n for n in names if n.endswith("dist-info/entry_points.txt"))).decode()
    for expected in ("agent/runtime.py", "protocol/messages.py", "hardware/profiles/raspberry-pi-5.toml",
                     "hardware/templates/install.sh", "hardware/detection.py", "server/registry.py"):
        assert expected in names, expected
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert "edgeherd-agent = agent.cli:main" in entry_points
    assert len(record.splitlines()) == len(names)


# -- edgeherd flash: refusals before anything is made or changed -------------------------------------------------


def test_flash_refuses_bad_requests_before_changing_anything(tmp_path):
    from typer.testing import CliRunner

    from server.broker import MosquittoBroker
    from server.cli import app
    from server.registry import Registry
    from tests.server_helpers import server_dir

    data, _ = server_dir(tmp_path / "server")
    MosquittoBroker(data, public_hosts=["gateway.lan", "10.0.0.2"])  # as `server run --public-host` leaves it
    Registry(data).add_device("pi-2", "x86-64-cpu")
    serials = Registry(data).broker.authority.serials("pi-2")  # type: ignore[union-attr]
    taken = tmp_path / "taken.tar.gz"
    taken.write_text("another device's bundle")
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    out = str(tmp_path / "new.tar.gz")
    base = ["flash", "pi-1", "--profile", "raspberry-pi-5", "--data-dir", str(data)]
    bring = ["--broker", "mqtt://b.lan:1883"]  # a broker the user brings: passwords
    cases = [
        (base, "give exactly one of --out FILE, --rootfs DIR or --ssh USER@HOST"),
        ([*base, "--out", out, "--rootfs", str(tmp_path)], "give exactly one of"),
        (["flash", "pi-1", "--profile", "raspberry-pi-9", "--out", out, "--data-dir", str(data)],
         "no hardware profile 'raspberry-pi-9'"),
        ([*base, "--out", out, "--python", "3.8"], "--python 3.8: the agent needs Python 3.10 or newer"),
        ([*base, "--out", out, "--broker-url", "http://b.lan"], "give mqtt://host:1883 or mqtts://host:8883"),
        # the managed broker: its own CA, TLS only, and a host name its certificate names
        ([*base, "--out", out, "--ca-cert", str(ca)], "--ca-cert is for a broker you bring (--broker)"),
        ([*base, "--out", out, "--broker-url", "mqtt://gateway.lan:1883"],
         "the managed broker's devices' listener takes TLS only"),
        ([*base, "--out", out, "--broker-url", "mqtts://b.lan:8883"],
         "names b.lan, which is not in the managed broker's TLS certificate (gateway.lan, 10.0.0.2, localhost, "
         "127.0.0.1): the device would refuse the broker. Restart the server with `edgeherd server run "
         "--public-host b.lan`"),
        ([*base, "--out", out, "--broker-url", "mqtts://10.0.0.3:8883"], "--public-host 10.0.0.3"),
        # a broker the user brings
        ([*base, *bring, "--out", out, "--ca-cert", str(ca), "--broker-url", "mqtt://b.lan:1883"],
         "--ca-cert is for an mqtts:// broker URL"),
        ([*base, "--out", str(taken)], "exists; it may hold another device's credentials"),
        ([*base, "--ssh", "pi@host;reboot"], "is not USER@HOST or HOST"),
        ([*base, "--rootfs", str(tmp_path)], "does not look like a root filesystem"),
        (["flash", "pi-2", "--profile", "raspberry-pi-5", "--out", out, "--data-dir", str(data)],
         "pi-2 is enrolled with profile x86-64-cpu, not raspberry-pi-5"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
        assert result.exit_code != 0 and message in " ".join(result.output.split()), (args, result.output)
    listed = CliRunner().invoke(app, ["device", "list", "--data-dir", str(data)], env={"COLUMNS": "300"}).output
    assert "pi-1" not in listed and "pi-2" in listed
    assert not (tmp_path / "new.tar.gz").exists() and taken.read_text() == "another device's bundle"
    auth = Registry(data).broker.authority
    assert auth is not None and auth.serials("pi-1") == [] and auth.serials("pi-2") == serials
    assert not auth.serials("pi-2", revoked=True)


@pytest.mark.skipif(os.getuid() != 0, reason="creating the agent's user is root's job; this test runs as root only")
def test_install_sh_creates_the_agents_system_user(tmp_path, wheel_dir):
    """With ``useradd`` and ``id`` stood in for (so that this machine gets no new user): the user is created as a
    locked system user whose home is the data directory, and owns its certificate, key and data."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    made = tmp_path / "useradd.args"
    (bindir / "useradd").write_text(f'#!/bin/sh\necho "$*" > {made}\n')
    real_id = shutil.which("id")
    (bindir / "id").write_text(f"""#!/bin/sh
if [ "$2" = edgeherd-test ]; then
  [ -f {made} ] || exit 1
  case $1 in -u) echo 4242 ;; -g) echo 4343 ;; -gn) echo edgeherd-test ;; esac
  exit 0
fi
exec {real_id} "$@"
""")
    for f in ("useradd", "id"):
        os.chmod(bindir / f, 0o755)  # noqa: S103 - executable stand-ins
    root = tmp_path / "root"
    bundle = fast_bundle(tmp_path / "b", spec(), wheel_dir)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "EDGEHERD_PYTHON": sys.executable}
    out = subprocess.run([str(bundle / "install.sh"), *_layout(root), "--user", "edgeherd-test", "--systemd", "no"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "created the system user edgeherd-test" in out.stdout
    assert made.read_text().split() == ["--system", "--user-group", "--home-dir", str(root / "var/lib/edgeherd"),
                                        "--no-create-home", "--shell", "/usr/sbin/nologin", "edgeherd-test"]
    cred = root / "etc/edgeherd/credentials"
    for path in (cred, cred / "device.pem", cred / "device.key", cred / "ca.pem", root / "var/lib/edgeherd"):
        assert (path.stat().st_uid, path.stat().st_gid) == (4242, 4343), path
    toml = root / "etc/edgeherd/agent.toml"
    assert (toml.stat().st_uid, toml.stat().st_gid, mode(toml)) == (0, 4343, 0o640)
    unit = (root / "etc/systemd/system/edgeherd-agent.service").read_text()
    assert "User=edgeherd-test" in unit and "Group=edgeherd-test" in unit
