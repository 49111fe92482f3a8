"""``edgeherd flash`` end to end: real wheelhouses made with pip's platform options, an x86-64 bundle installed
offline and run the way its unit says until it serves a model from a real server, a Raspberry Pi 5 bundle that
holds only aarch64 and pure wheels for Python 3.11, the same bundle written into a Raspberry Pi OS root filesystem,
and the ssh commands."""

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
from packaging.utils import parse_wheel_filename
from sqlmodel import Session
from typer.testing import CliRunner

from hardware.provision import FIRSTBOOT_DIR
from hardware.wheelhouse import DeviceTarget, build
from server.cli import app
from server.db.models import Device
from tests._mosquitto import free_port
from tests.provision_helpers import raspberry_pi_os
from tests.server_helpers import server_dir, wait_for

pytestmark = pytest.mark.integration

ME = pwd.getpwuid(os.getuid()).pw_name
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def run(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def _device_python() -> str:
    """The OS's own Python 3.11 when it can make virtual environments (as on a device), else this one."""
    system = Path("/usr/bin/python3.11")
    if system.exists() and subprocess.run([str(system), "-c", "import ensurepip, venv"]).returncode == 0:
        return str(system)
    return sys.executable


@pytest.fixture(scope="session")
def x86_download(tmp_path_factory) -> tuple[Path, list[str]]:
    """The x86-64 agent wheelhouse, downloaded once per session (and pip's lines as they came)."""
    d = tmp_path_factory.mktemp("x86-wheels")
    lines: list[str] = []
    build(d / "w", target=DeviceTarget("3.11", "x86_64", "2.35"), extra="onnx", on_line=lines.append)
    return d / "w", lines


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
    """A Raspberry Pi 5 bundle made by the command itself, downloading from the package index."""
    root = tmp_path_factory.mktemp("pi5")
    data, _ = server_dir(root / "server")
    out = root / "pi-5.tar.gz"
    t0 = time.monotonic()
    result = run("flash", "pi-5", "--profile", "raspberry-pi-5", "--out", str(out), "--data-dir", str(data),
                 "--broker-url", "mqtt://broker.lan:1883")
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


def test_flash_into_a_raspberry_pi_os_root_filesystem(pi5_flash, tmp_path):
    data, _, bundle, _ = pi5_flash
    rootfs = raspberry_pi_os(tmp_path / "rootfs")
    result = run("flash", "pi-6", "--profile", "raspberry-pi-5", "--rootfs", str(rootfs), "--data-dir", str(data),
                 "--find-links", str(bundle / "wheelhouse"), "--no-index", "--broker-url", "mqtt://broker.lan:1883")
    assert result.exit_code == 0, result.output
    assert "enabled edgeherd-firstboot.service" in " ".join(result.output.split())
    dest = rootfs / FIRSTBOOT_DIR.lstrip("/") / "edgeherd-pi-6"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    assert stat.S_IMODE((dest / "config/broker-password").stat().st_mode) == 0o600
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
        assert "edgeherd-pi-8/config/broker-password" in tar.getnames()


def test_x86_bundle_installs_offline_enrols_serves_and_upgrades_in_place(digits_bundle, x86_wheels, tmp_path):
    from server.app import ServerApp
    from toolchain.data import load_digits

    data, _ = server_dir(tmp_path / "server", digits_bundle.key)
    server = ServerApp(data, metrics_port=0, drift_interval=3600).start()
    root = tmp_path / "device"
    layout = ["--prefix", str(root / "opt/edgeherd"), "--config-dir", str(root / "etc/edgeherd"),
              "--data-dir", str(root / "var/lib/edgeherd"), "--unit-dir", str(root / "etc/systemd/system"),
              "--user", ME, "--python", _device_python()]
    # pip on the "device" can reach nothing: no index, and a proxy that refuses
    offline = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "EDGEHERD_INSTALL_NO_SYSTEMD": "1"}
    agent: subprocess.Popen[bytes] | None = None
    api_port = free_port()

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
        out = subprocess.run([str(bundle / "install.sh"), *layout], capture_output=True, text=True, env=offline,
                             timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        print(f"install.sh: {time.monotonic() - t0:.1f} s")
        return out.stdout

    def start_agent() -> subprocess.Popen[bytes]:
        """As systemd would: the unit's ExecStart, from /, with the unit's environment (none)."""
        unit = (root / "etc/systemd/system/edgeherd-agent.service").read_text()
        line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
        env = {"PATH": "/usr/bin:/bin", "EDGEHERD_AGENT_API_PORT": str(api_port)}  # the port: tests run in parallel
        with (tmp_path / "agent.log").open("ab") as log:
            return subprocess.Popen(shlex.split(line[len("ExecStart="):]), cwd="/", env=env, stdout=log, stderr=log)

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

        agent = start_agent()
        d = wait_for(lambda: (x := device()) is not None and x.status == "online" and x.fingerprint and x, 60,
                  "the installed agent to enrol")
        assert d.fingerprint["cpu_count"] >= 1 and d.profile == "x86-64-cpu"

        server.registry.push_model(digits_bundle.dir)
        server.registry.deploy("digits", "1.0.0", "x86-1")
        wait_for(lambda: (x := device()) and x.running_artifact == "digits-onnx-int8" and x.install_step == "done", 90,
              "the agent to install the bundle")
        assert len(predict()["classes"]) == 8

        # the same installer again: nothing reinstalled, the agent's data and password kept
        stop_agent(agent)
        agent = None
        password = (root / "etc/edgeherd/credentials/broker-password").read_text()
        slots = sorted(p.name for p in (root / "var/lib/edgeherd").iterdir())
        again = install(first)
        assert "is installed already" in again and "kept the broker password" in again
        assert (root / "etc/edgeherd/credentials/broker-password").read_text() == password
        assert sorted(p.name for p in (root / "var/lib/edgeherd").iterdir()) == slots

        # a new bundle (re-flashed: fresh credentials) upgrades in place and keeps the data: the agent comes back
        # with the new password and serves the model it had, without another deploy
        second = flash_and_unpack("second")
        from server import audit

        with Session(server.registry.engine) as db:
            reissued = audit.entries(db, action="device.rotate_credentials", subject="device:x86-1")
        assert len(reissued) == 1 and reissued[0].detail == {"via": "flash", "output": "out"}
        out = install(second)
        assert "installed the broker password" in out
        venvs = sorted(p.name for p in (root / "opt/edgeherd/venvs").iterdir())
        assert len(venvs) == 2 and os.readlink(root / "opt/edgeherd/venv").endswith(
            json.loads((second / "bundle.json").read_text())["bundle_id"])
        generation = device().desired_generation  # type: ignore[union-attr]
        agent = start_agent()
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
                 "--data-dir", str(data), "--broker-url", "mqtt://broker.lan:1883")
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
              "--user", ME, "--python", _device_python(), "--systemd", "no"]
    options = ("-o", f"Port={port}", "-i", str(key), "-o", "StrictHostKeyChecking=no", "-o",
               "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR")
    before = set(Path("/tmp").glob("edgeherd-flash.*"))
    commands = install_over_ssh(out, "edgeherd-x86-2", SshTarget(f"{ME}@127.0.0.1", options), run_command,
                                install_args=layout)
    assert [c[0] for c in commands] == ["ssh", "scp", "ssh"]
    # installed: the venv's agent runs, the config with the device's secret is 0600
    agent = root / "opt/edgeherd/venv/bin/edgeherd-agent"
    assert subprocess.run([str(agent), "--version"], capture_output=True, text=True, check=True).stdout.strip()
    password = root / "etc/edgeherd/credentials/broker-password"
    assert stat.S_IMODE(password.stat().st_mode) == 0o600
    assert password.read_text().strip() == (data / "devices" / "x86-2" / "broker-password").read_text().strip()
    assert set(Path("/tmp").glob("edgeherd-flash.*")) == before  # the remote temporary directory is removed
