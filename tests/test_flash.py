"""``edgeherd flash`` end to end: real wheelhouses made with pip's platform options, an x86-64 bundle installed
offline and run the way its unit says until it serves a model from a real server over TLS with its own
certificate (and re-flashed: its old certificate revoked), a Raspberry Pi 5 bundle that holds only aarch64 and
pure wheels for Python 3.11 and a certificate for the server's public host name, the same bundle written into a
Raspberry Pi OS root filesystem, the ssh commands, and the password bundle of a broker the user brings."""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from packaging.utils import parse_wheel_filename
from sqlmodel import Session
from typer.testing import CliRunner

from hardware.provision import FIRSTBOOT_DIR
from server.broker import MosquittoBroker
from server.cli import app
from server.db.models import Device
from tests._mosquitto import free_port
from tests.provision_helpers import (
    device_python,
    install_layout,
    offline_env,
    profile_wheelhouse,
    raspberry_pi_os,
    start_installed_agent,
)
from tests.server_helpers import server_dir, wait_for

pytestmark = pytest.mark.integration

ME = pwd.getpwuid(os.getuid()).pw_name
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def run(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def _serial(pem: bytes) -> int:
    return x509.load_pem_x509_certificate(pem).serial_number


def _common_name(pem: bytes) -> str:
    return str(x509.load_pem_x509_certificate(pem).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@pytest.fixture(scope="session")
def x86_download(tmp_path_factory) -> tuple[Path, list[str]]:
    """The x86-64 agent wheelhouse, downloaded once per session (and pip's lines as they came)."""
    return profile_wheelhouse(tmp_path_factory, "x86-64-cpu")


@pytest.fixture(scope="session")
def x86_wheels(x86_download) -> Path:
    """The tests flash from the session's wheelhouse with --no-index."""
    return x86_download[0]


def test_the_download_shows_its_progress(x86_download):
    """pip's lines reach the caller as they come (the CLI shows them under a spinner): one per wheel at least."""
    wheels, lines = x86_download
    text = "\n".join(lines).lower().replace("-", "_")
    for w in wheels.glob("*.whl"):
        name = w.name.split("-")[0].lower()
        assert name == "edgeherd" or name in text, name
    assert any(line.startswith("Collecting ") for line in lines)


@pytest.fixture(scope="session")
def pi5_flash(tmp_path_factory):
    """A Raspberry Pi 5 bundle made by the command itself, downloading from the package index, for a server
    whose managed broker devices reach as broker.lan (`server run --public-host broker.lan`)."""
    root = tmp_path_factory.mktemp("pi5")
    data, _ = server_dir(root / "server")
    MosquittoBroker(data, public_hosts=["broker.lan"])  # what `server run --public-host broker.lan` keeps
    out = root / "pi-5.tar.gz"
    t0 = time.monotonic()
    result = run("flash", "pi-5", "--profile", "raspberry-pi-5", "--out", str(out), "--data-dir", str(data))
    assert result.exit_code == 0, result.output
    print(f"flash --profile raspberry-pi-5 with a download: {time.monotonic() - t0:.1f} s")
    unpacked = root / "unpacked"
    unpacked.mkdir()
    with tarfile.open(out) as tar:
        tar.extractall(unpacked, filter="data")
    return data, out, unpacked / "edgeherd-pi-5", result.output


def test_pi5_bundle_holds_only_aarch64_and_pure_wheels_for_python_3_11(pi5_flash):
    data, out, bundle, output = pi5_flash
    assert stat.S_IMODE(out.stat().st_mode) == 0o600 and "mode 0600" in " ".join(output.split())
    info = json.loads((bundle / "bundle.json").read_text())
    assert info["python"] == "3.11" and info["architecture"] == "aarch64" and info["profile"] == "raspberry-pi-5"
    assert info["platforms"][0] == "manylinux_2_36_aarch64"
    wheels = sorted(p.name for p in (bundle / "wheelhouse").glob("*.whl"))
    assert wheels == sorted(info["wheels"])
    names = set()
    for w in wheels:
        name, _, _, tags = parse_wheel_filename(w)
        names.add(str(name))
        assert all(t.platform == "any" or t.platform.endswith("_aarch64") for t in tags), w
        # CPython 3.11 takes it: built for cp311, or for the stable ABI of an older CPython, or pure Python 3
        assert any((t.interpreter, t.abi) == ("cp311", "cp311")
                   or (t.abi == "abi3" and t.interpreter.startswith("cp3") and int(t.interpreter[3:]) <= 11)
                   or (t.interpreter == "py3" and t.abi == "none" and t.platform == "any") for t in tags), w
    assert {"edgeherd", "ai-edge-litert", "numpy", "paho-mqtt", "pydantic", "pydantic-core", "cryptography",
            "typer"} <= names
    assert not names & {"torch", "onnxruntime", "sqlmodel", "textual", "tomli"}  # agent extras only; no 3.10 backport
    requirements = (bundle / "requirements.txt").read_text()
    assert requirements.count("--hash=sha256:") == len(wheels) and "edgeherd[tflite]==" in requirements
    # the device is enrolled with the profile
    listed = run("device", "list", "--data-dir", str(data))
    assert "pi-5" in listed.output and "raspberry-pi-5" in listed.output


def test_pi5_bundle_logs_in_with_its_own_certificate_for_the_public_host(pi5_flash):
    """The certificate the registry issued (the enrolment copy in devices/pi-5/), its CN the device id, signed by
    the data directory's CA, which the bundle pins; the broker URL is the public host, which the broker's
    certificate names; no password anywhere."""
    data, _, bundle, output = pi5_flash
    cred = bundle / "config/credentials"
    assert sorted(p.name for p in cred.iterdir()) == ["ca.pem", "device.key", "device.pem"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in cred.iterdir()} == {0o600}
    enrolled = data / "devices" / "pi-5"
    for name in ("device.pem", "device.key", "ca.pem"):
        assert (cred / name).read_bytes() == (enrolled / name).read_bytes(), name
    cert = (cred / "device.pem").read_bytes()
    assert _common_name(cert) == "pi-5"
    ca = x509.load_pem_x509_certificate((cred / "ca.pem").read_bytes())
    x509.load_pem_x509_certificate(cert).verify_directly_issued_by(ca)
    assert (cred / "ca.pem").read_bytes() == (data / "pki" / "ca-bundle.pem").read_bytes()
    broker = MosquittoBroker(data)
    assert broker.authority is not None and broker.authority.serials("pi-5") == [_serial(cert)]
    toml = (bundle / "config/agent.toml").read_text()
    assert 'broker_url = "mqtts://broker.lan:8883"' in toml and "broker.lan" in broker.certificate_names
    assert 'tls_cert = "@CONFIG_DIR@/credentials/device.pem"' in toml and "password" not in toml
    assert not list(bundle.rglob("*password*"))
    assert json.loads((bundle / "bundle.json").read_text())["credentials"] == "certificate"
    assert "private key" in " ".join(output.split()) and "loopback" not in output


def test_flash_for_a_broker_the_user_brings_gives_a_password(pi5_flash, tmp_path):
    """`--broker` (a broker the user brings): a password, and the broker's CA from --ca-cert pinned."""
    data, _, bundle, _ = pi5_flash
    ca = tmp_path / "broker-ca.crt"
    ca.write_bytes((bundle / "config/credentials/ca.pem").read_bytes())  # a CA certificate; whose does not matter
    out = tmp_path / "pi-9.tar.gz"
    result = run("flash", "pi-9", "--profile", "raspberry-pi-5", "--out", str(out), "--data-dir", str(data),
                 "--broker", "mqtts://emqx.lan:8883", "--ca-cert", str(ca), "--find-links",
                 str(bundle / "wheelhouse"), "--no-index")
    assert result.exit_code == 0, result.output
    assert "broker password" in " ".join(result.output.split())
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        toml = tar.extractfile("edgeherd-pi-9/config/agent.toml").read().decode()  # type: ignore[union-attr]
        password = tar.extractfile(  # type: ignore[union-attr]
            "edgeherd-pi-9/config/credentials/broker-password").read().decode().strip()
        pinned = tar.extractfile("edgeherd-pi-9/config/ca.crt").read()  # type: ignore[union-attr]
    assert password == (data / "devices" / "pi-9" / "broker-password").read_text().strip() and len(password) >= 20
    assert pinned == ca.read_bytes() and not any(n.endswith(("device.pem", "device.key")) for n in names)
    assert 'broker_url = "mqtts://emqx.lan:8883"' in toml and "password_file" in toml and "tls_cert" not in toml
    assert MosquittoBroker(data).authority.serials("pi-9") == []  # type: ignore[union-attr]


def test_flash_into_a_raspberry_pi_os_root_filesystem(pi5_flash, tmp_path):
    data, _, bundle, _ = pi5_flash
    rootfs = raspberry_pi_os(tmp_path / "rootfs")
    result = run("flash", "pi-6", "--profile", "raspberry-pi-5", "--rootfs", str(rootfs), "--data-dir", str(data),
                 "--find-links", str(bundle / "wheelhouse"), "--no-index")
    assert result.exit_code == 0, result.output
    assert "enabled edgeherd-firstboot.service" in " ".join(result.output.split())
    dest = rootfs / FIRSTBOOT_DIR.lstrip("/") / "edgeherd-pi-6"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    assert stat.S_IMODE((dest / "config/credentials/device.key").stat().st_mode) == 0o600
    assert _common_name((dest / "config/credentials/device.pem").read_bytes()) == "pi-6"
    assert stat.S_IMODE((dest / "install.sh").stat().st_mode) == 0o700
    unit = (rootfs / "etc/systemd/system/edgeherd-firstboot.service").read_text()
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert (rootfs / shlex.split(exec_start[len("ExecStart="):])[0].lstrip("/")).samefile(dest / "install.sh")
    assert os.path.islink(rootfs / "etc/systemd/system/multi-user.target.wants/edgeherd-firstboot.service")
    assert any(p.name.startswith("ai_edge_litert-") for p in (dest / "wheelhouse").iterdir())
    if SYSTEMD_ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd): the unit was not verified")
    out = subprocess.run([SYSTEMD_ANALYZE, "verify", f"--root={rootfs}",
                          "/etc/systemd/system/edgeherd-firstboot.service"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    # a 32-bit image is refused before anything changes
    armhf = raspberry_pi_os(tmp_path / "armhf", arch="armv7l")
    refused = run("flash", "pi-7", "--profile", "raspberry-pi-5", "--rootfs", str(armhf), "--data-dir", str(data),
                  "--find-links", str(bundle / "wheelhouse"), "--no-index")
    assert refused.exit_code == 1 and "the userland is armv7l" in " ".join(refused.output.split())
    assert "pi-7" not in run("device", "list", "--data-dir", str(data)).output


def test_flash_over_ssh(pi5_flash, tmp_path, monkeypatch):
    data, _, bundle, _ = pi5_flash
    import server.cli.flash as flash_cli

    calls: list[list[str]] = []
    copied = tmp_path / "copied.tar.gz"

    def remote(argv: list[str]) -> str:
        calls.append(argv)
        if argv[0] == "scp":
            shutil.copy(argv[-2], copied)
            assert stat.S_IMODE(Path(argv[-2]).stat().st_mode) == 0o600
        return "/tmp/edgeherd-flash.Zx81Qw07\n" if "mktemp" in argv[-1] else ""

    monkeypatch.setattr(flash_cli, "RUNNER", remote)
    result = run("flash", "pi-8", "--profile", "raspberry-pi-5", "--ssh", "pi@pi-8.lan", "--data-dir", str(data),
                 "--find-links", str(bundle / "wheelhouse"), "--no-index")
    assert result.exit_code == 0, result.output
    assert [c[0] for c in calls] == ["ssh", "scp", "ssh"]
    assert calls[1][-1] == "pi@pi-8.lan:/tmp/edgeherd-flash.Zx81Qw07/bundle.tar.gz"
    assert "sudo ./edgeherd-pi-8/install.sh" in calls[2][-1]
    with tarfile.open(copied) as tar:
        assert {"edgeherd-pi-8/config/credentials/device.pem", "edgeherd-pi-8/config/credentials/device.key",
                "edgeherd-pi-8/config/credentials/ca.pem"} <= set(tar.getnames())


def test_x86_bundle_installs_offline_enrols_serves_and_upgrades_in_place(digits_bundle, x86_wheels, tmp_path):
    from server import audit
    from server.app import ServerApp
    from toolchain.data import load_digits

    os.chmod(tmp_path, 0o711)  # noqa: S103 - the broker runs as its own user and must reach the data directory
    data, _ = server_dir(tmp_path / "server", digits_bundle.key)
    server = ServerApp(data, metrics_port=0, drift_interval=3600).start()
    assert server.registry.certificates and server.registry.broker_url.startswith("mqtts://127.0.0.1:")
    root = tmp_path / "device"
    layout = [*install_layout(root), "--user", ME, "--python", device_python()]
    agent: subprocess.Popen[bytes] | None = None
    api_port = free_port()
    cred = root / "etc/edgeherd/credentials"

    def flash_and_unpack(name: str) -> Path:
        out = tmp_path / f"{name}.tar.gz"
        t0 = time.monotonic()
        result = run("flash", "x86-1", "--profile", "x86-64-cpu", "--out", str(out), "--data-dir", str(data),
                     "--find-links", str(x86_wheels), "--no-index")
        assert result.exit_code == 0, result.output
        print(f"flash {name}: {time.monotonic() - t0:.1f} s")
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        (tmp_path / name).mkdir()
        subprocess.run(["tar", "-xzf", str(out), "-C", str(tmp_path / name)], check=True)
        return tmp_path / name / "edgeherd-x86-1"

    def install(bundle: Path) -> str:
        t0 = time.monotonic()
        # pip on the "device" can reach nothing: no index, and a proxy that refuses
        out = subprocess.run([str(bundle / "install.sh"), *layout], capture_output=True, text=True,
                             env=offline_env(), timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        print(f"install.sh: {time.monotonic() - t0:.1f} s")
        return out.stdout

    def stop_agent(proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)

    def device() -> Device | None:
        with Session(server.registry.engine) as db:
            return db.get(Device, "x86-1")

    def predict() -> dict:
        x = load_digits().x[:8]
        req = urllib.request.Request(f"http://127.0.0.1:{api_port}/v1/predict",
                                     data=json.dumps({"inputs": x.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    try:
        first = flash_and_unpack("first")
        assert "no network" in install(first)
        if SYSTEMD_ANALYZE:
            unit = root / "etc/systemd/system/edgeherd-agent.service"
            verify = subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True)
            assert verify.returncode == 0, verify.stdout + verify.stderr
        first_serial = _serial((cred / "device.pem").read_bytes())

        agent = start_installed_agent(root, api_port, tmp_path / "agent.log")
        d = wait_for(lambda: (x := device()) is not None and x.status == "online" and x.fingerprint and x, 60,
                     "the installed agent to enrol")
        assert d.fingerprint["cpu_count"] >= 1 and d.profile == "x86-64-cpu"

        server.registry.push_model(digits_bundle.dir)
        server.registry.deploy("digits", "1.0.0", "x86-1")
        wait_for(lambda: (x := device()) and x.running_artifact == "digits-onnx-int8" and x.install_step == "done", 90,
                 "the agent to install the bundle")
        assert len(predict()["classes"]) == 8

        # the same installer again: nothing reinstalled, the agent's data and credentials kept
        stop_agent(agent)
        agent = None
        kept = {p.name: p.read_bytes() for p in cred.iterdir()}
        slots = sorted(p.name for p in (root / "var/lib/edgeherd").iterdir())
        again = install(first)
        assert "is installed already" in again and "kept the certificate, key and pinned CA" in again
        assert {p.name: p.read_bytes() for p in cred.iterdir()} == kept
        assert sorted(p.name for p in (root / "var/lib/edgeherd").iterdir()) == slots

        # a new bundle (re-flashed: a fresh certificate, the old one revoked) upgrades in place and keeps the data:
        # the agent comes back with the new certificate and serves the model it had, without another deploy
        second = flash_and_unpack("second")
        with Session(server.registry.engine) as db:
            reissued = audit.entries(db, action="device.rotate_credentials", subject="device:x86-1")
        second_serial = _serial((second / "config/credentials/device.pem").read_bytes())
        assert len(reissued) == 1 and reissued[0].detail == {"via": "flash", "output": "out",
                                                             "serial": f"{second_serial:x}"}
        auth = server.registry.broker.authority
        assert auth.is_revoked(first_serial) and auth.serials("x86-1") == [second_serial]
        out = install(second)
        assert "installed the certificate, key and pinned CA of x86-1" in out
        assert _serial((cred / "device.pem").read_bytes()) == second_serial
        venvs = sorted(p.name for p in (root / "opt/edgeherd/venvs").iterdir())
        assert len(venvs) == 2 and os.readlink(root / "opt/edgeherd/venv").endswith(
            json.loads((second / "bundle.json").read_text())["bundle_id"])
        generation = device().desired_generation  # type: ignore[union-attr]
        agent = start_installed_agent(root, api_port, tmp_path / "agent.log")
        wait_for(lambda: (x := device()) and x.status == "online" and x.state_session > d.state_session, 60,
                 "the upgraded agent to come back")
        assert predict()["model"] == "digits"
        assert device().desired_generation == generation  # type: ignore[union-attr]
    finally:
        if agent is not None and agent.poll() is None:
            stop_agent(agent)
        server.stop()


def _real_python(version: str) -> str | None:
    from tests.test_agent_pythons import _python

    return _python(version)


@pytest.mark.slow
def test_a_bundle_for_python_3_10_installs_and_runs_the_agent_there(tmp_path):
    """``--python 3.10`` (a JetPack 6 Python on an x86-64 machine): the device's markers decide the wheelhouse
    (tomli is needed below 3.11), and the agent runs on 3.10. Slow: it downloads a cp310 wheelhouse."""
    python = _real_python("3.10")
    if python is None:
        pytest.skip("no Python 3.10 interpreter on this machine")
    data, _ = server_dir(tmp_path / "server")
    out = tmp_path / "py310.tar.gz"
    result = run("flash", "py310", "--profile", "x86-64-cpu", "--python", "3.10", "--out", str(out),
                 "--data-dir", str(data))
    assert result.exit_code == 0, result.output
    subprocess.run(["tar", "-xzf", str(out), "-C", str(tmp_path)], check=True)
    bundle = tmp_path / "edgeherd-py310"
    wheels = [p.name for p in (bundle / "wheelhouse").iterdir()]
    assert any(w.startswith("tomli-") for w in wheels) and any("-cp310-" in w for w in wheels)
    root = tmp_path / "device"
    layout = ["--prefix", str(root / "opt"), "--config-dir", str(root / "etc"), "--data-dir", str(root / "data"),
              "--unit-dir", str(root / "units"), "--user", ME, "--systemd", "no"]
    wrong = subprocess.run([str(bundle / "install.sh"), *layout, "--python", sys.executable], capture_output=True,
                           text=True)
    assert wrong.returncode != 0 and "is Python 3.11; this bundle's wheels are for Python 3.10" in wrong.stderr
    done = subprocess.run([str(bundle / "install.sh"), *layout, "--python", python], capture_output=True, text=True,
                          env={**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"},
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    check = subprocess.run([str(root / "opt/venv/bin/python"), "-c",
                            "import sys, agent.runtime, agent.credentials, hardware; "
                            "print(sys.version_info[:2], hardware.detect().profile)"],
                           capture_output=True, text=True, cwd="/")
    assert check.returncode == 0 and check.stdout.startswith("(3, 10)"), check.stdout + check.stderr


SSHD = shutil.which("sshd", path=f"/usr/sbin:/usr/local/sbin:{os.environ.get('PATH', '')}")


@pytest.fixture
def sshd(tmp_path):
    """A real OpenSSH server on a free loopback port, taking one key for this user; (port, client key)."""
    if SSHD is None:
        pytest.skip("sshd is not installed (make test installs openssh-server)")
    if os.geteuid() != 0:
        pytest.skip("the installer runs as root over ssh here; as another user it would need sudo's password")
    d = tmp_path / "sshd"
    d.mkdir()
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    shutil.copy(d / "client.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host'}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password", "UsePAM no", "StrictModes no", "Subsystem sftp internal-sftp", ""]))
    Path("/run/sshd").mkdir(exist_ok=True)  # its privilege-separation directory
    with (d / "sshd.log").open("ab") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log)
    import socket

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(lambda: listening() or proc.poll() is not None, 20, "sshd to listen")
    assert proc.poll() is None, (d / "sshd.log").read_text()
    yield port, d / "client"
    proc.terminate()
    proc.wait(10)


def test_flash_over_a_real_ssh_connection_installs_the_agent(sshd, x86_wheels, tmp_path):
    """scp and ssh for real (OpenSSH on loopback): the bundle lands in a fresh 0700 directory, install.sh runs
    there and installs the agent offline, and the directory is gone afterwards."""
    from hardware.provision import SshTarget, install_over_ssh
    from server.cli.flash import run_command

    port, key = sshd
    data, _ = server_dir(tmp_path / "server")
    out = tmp_path / "x86-2.tar.gz"
    result = run("flash", "x86-2", "--profile", "x86-64-cpu", "--out", str(out), "--data-dir", str(data),
                 "--find-links", str(x86_wheels), "--no-index")
    assert result.exit_code == 0, result.output
    root = tmp_path / "device"
    layout = ["--prefix", str(root / "opt/edgeherd"), "--config-dir", str(root / "etc/edgeherd"),
              "--data-dir", str(root / "var/lib/edgeherd"), "--unit-dir", str(root / "etc/systemd/system"),
              "--user", ME, "--python", device_python(), "--systemd", "no"]
    options = ("-o", f"Port={port}", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o",
               "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR")
    before = set(Path("/tmp").glob("edgeherd-flash.*"))
    commands = install_over_ssh(out, "edgeherd-x86-2", SshTarget(f"{ME}@127.0.0.1", options), run_command,
                                install_args=layout)
    assert [c[0] for c in commands] == ["ssh", "scp", "ssh"]
    # installed: the venv's agent runs, the config with the device's secret is 0600
    agent = root / "opt/edgeherd/venv/bin/edgeherd-agent"
    assert subprocess.run([str(agent), "--version"], capture_output=True, text=True, check=True).stdout.strip()
    key = root / "etc/edgeherd/credentials/device.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes() == (data / "devices" / "x86-2" / "device.key").read_bytes()
    assert set(Path("/tmp").glob("edgeherd-flash.*")) == before  # the remote temporary directory is removed
