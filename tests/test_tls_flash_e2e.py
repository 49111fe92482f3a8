"""Issue 16's "done when", as an operator does it: a fresh ``edgeherd server run --public-host localhost``,
``edgeherd flash DEV --profile PROFILE --out DEV.tar.gz``, the bundle's installer run into a temporary root, and
the installed agent, started the way its unit says, connects over TLS with its own certificate, installs a model
and serves it on its local API.

The profile is this machine's kind, raspberry-pi-5 on a 64-bit Arm machine and x86-64-cpu on an x86-64 one: a
bundle holds wheels for its device's architecture only, so it installs and runs on that architecture alone. What
the Raspberry Pi 5 bundle holds (aarch64 wheels for Python 3.11, the device's certificate for the public host) is
checked on any machine in tests/test_flash.py.
"""

from __future__ import annotations

import json
import os
import platform
import pwd
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from sqlmodel import Session
from typer.testing import CliRunner

from server.broker import free_port
from server.cli import app
from server.db.models import Device
from server.registry import Registry
from tests.api_helpers import stop_server
from tests.conftest import BuiltBundle
from tests.provision_helpers import (
    device_python,
    install_layout,
    offline_env,
    profile_wheelhouse,
    start_installed_agent,
)
from tests.server_helpers import server_dir, wait_for

pytestmark = pytest.mark.integration

#: The profile of this machine's kind, whose bundle can run here.
PROFILE = {"aarch64": "raspberry-pi-5", "x86_64": "x86-64-cpu"}.get(platform.machine())
DEVICE = "tls-dev"
ME = pwd.getpwuid(os.getuid()).pw_name
ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, (args, result.output)
    return " ".join(result.output.split())


def _server_run(data: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``edgeherd server run`` for devices that reach it as localhost, its devices' listener on ``port``."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "server.cli", "server", "run", "--data-dir", str(data),
                                 "--public-host", "localhost", "--listen", f"127.0.0.1:{port}", "--metrics-port",
                                 "0", "--drift-interval", "0", "--rollout-interval", "0.3"],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.skipif(PROFILE is None, reason=f"no hardware profile runs on a {platform.machine()} machine")
def test_server_run_flash_install_connect_over_tls_install_a_model_and_serve(
        digits_bundle: BuiltBundle, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    from toolchain.data import load_digits

    assert PROFILE is not None
    wheels, _ = profile_wheelhouse(tmp_path_factory, PROFILE)  # downloaded once per test session
    t0 = time.monotonic()
    os.chmod(tmp_path, 0o711)  # noqa: S103 - the broker runs as its own user and must reach the data directory
    data, _ = server_dir(tmp_path / "server", digits_bundle.key)
    port = free_port()
    server_log, agent_log = tmp_path / "server.log", tmp_path / "agent.log"
    server = _server_run(data, port, server_log)
    agent: subprocess.Popen[bytes] | None = None
    try:
        url = f"mqtts://localhost:{port}"
        wait_for(lambda: f"server running; broker {url} (devices)" in server_log.read_text() or server.poll(), 60,
                 "the server to start")
        assert server.poll() is None, server_log.read_text()

        # flash: the device is enrolled with a certificate of its own for the public host
        out = tmp_path / f"{DEVICE}.tar.gz"
        said = cli("flash", DEVICE, "--profile", PROFILE, "--out", str(out), "--data-dir", str(data),
                   "--find-links", str(wheels), "--no-index")
        assert f"enrolled {DEVICE}" in said and f"it holds {DEVICE}'s private key" in said
        with tarfile.open(out) as tar:
            tar.extractall(tmp_path / "unpacked", filter="data")
        bundle = tmp_path / "unpacked" / f"edgeherd-{DEVICE}"

        # the installer, offline, into a temporary root
        root = tmp_path / "device"
        installed = subprocess.run([str(bundle / "install.sh"), *install_layout(root), "--user", ME, "--python",
                                    device_python()], capture_output=True, text=True, env=offline_env(),
                                   timeout=600)
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert f"installed the certificate, key and pinned CA of {DEVICE}" in installed.stdout
        etc = root / "etc/edgeherd"
        cred = etc / "credentials"
        toml = (etc / "agent.toml").read_text()
        assert f'broker_url = "{url}"' in toml and f'tls_cert = "{cred}/device.pem"' in toml
        assert "password" not in toml and not list(root.rglob("*password*"))
        pem = (cred / "device.pem").read_bytes()
        cert = x509.load_pem_x509_certificate(pem)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == DEVICE
        assert (cred / "ca.pem").read_bytes() == (data / "pki" / "ca-bundle.pem").read_bytes()
        registry = Registry(data)
        assert registry.broker.authority is not None
        assert registry.broker.authority.serials(DEVICE) == [cert.serial_number]  # its one valid certificate

        # the installed agent connects over TLS with that certificate
        api_port = free_port()
        agent = start_installed_agent(root, api_port, agent_log)

        def device() -> Device | None:
            with Session(registry.engine) as db:
                return db.get(Device, DEVICE)

        wait_for(lambda: (d := device()) is not None and d.status == "online" and d.fingerprint, 60,
                 "the installed agent to connect")
        # the devices' listener requires a client certificate from the CA and takes its common name as the user
        conf = (data / "broker" / "mosquitto.conf").read_text()
        assert f"listener {port} 127.0.0.1" in conf and "require_certificate true" in conf
        assert "use_identity_as_username true" in conf
        assert f"as {DEVICE} (" in (data / "broker" / "mosquitto.log").read_text()
        assert f"u'{DEVICE}'" in (data / "broker" / "mosquitto.log").read_text()

        # a model, deployed: the agent installs it and serves predictions on its local API
        cli("model", "push", str(digits_bundle.dir), "--data-dir", str(data))
        cli("deploy", "digits:1.0.0", "--device", DEVICE, "--data-dir", str(data))
        done = wait_for(lambda: (d := device()) and d.install_step == "done" and d.running_artifact and d, 120,
                        "the agent to install the model")
        assert done.running_artifact.startswith("digits-")
        x = load_digits().x[:8]
        req = urllib.request.Request(f"http://127.0.0.1:{api_port}/v1/predict",
                                     data=json.dumps({"inputs": x.tolist()}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = json.loads(resp.read())
        assert answer["model"] == "digits" and len(answer["classes"]) == 8
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/v1/health", timeout=10) as resp:
            health = json.loads(resp.read())
        assert health["status"] == "ok" and health["connected"] is True and health["broker_error"] is None
        print(f"server run, flash {PROFILE}, install, connect over TLS, install a model, serve: "
              f"{time.monotonic() - t0:.1f} s (the wheelhouse's download not counted)")
    finally:
        if agent is not None:
            stop_server(agent)
        stop_server(server)
