"""``edgeherd device rotate-credentials`` on a real Mosquitto with the real agent.

Passwords (a broker without TLS, as one the user brings may be): the new password reaches the agent over its own
authenticated session and is stored before the broker changes; then the old password is refused, the agent is
back on the broker with the new one at once (Mosquitto ends the connection made with the old password when it
reloads its password file) while its local API keeps serving, and its connections after a broker restart use
the new password.

Certificates (the managed broker's default): the same promises, the old certificate revoked after the agent
confirms and its connection dropped with the session kept, so every command sent meanwhile is carried out."""

from __future__ import annotations

import json
import shutil
import stat
import threading
import time
import urllib.request
import uuid
from datetime import datetime, timezone

import pytest
from sqlmodel import Session

from agent.config import load_config
from agent.runtime import Agent
from protocol import Command, CommandAck, CommandKind, TopicKind, decode, device_topic, encode
from server import audit
from server.broker import SERVER_USER
from server.registry import Registry, RegistryError
from tests._mosquitto import free_port
from tests.mqtt_helpers import ConnectRefused, TestClient
from tests.server_helpers import server_dir, wait_for

pytestmark = pytest.mark.integration


class _Addr:
    def __init__(self, port: int, server_port: int = 0) -> None:
        self.host, self.port, self.server_port, self.server_user = "127.0.0.1", port, server_port, SERVER_USER


def _plain(data):
    """A data directory whose managed broker serves devices with passwords over plain TCP."""
    (data / "broker").mkdir(mode=0o700)
    (data / "broker" / "listener.json").write_text(json.dumps({"tls": False}))
    return data


@pytest.fixture
def server(tmp_path):
    data, _ = server_dir(tmp_path / "server")
    reg = Registry(_plain(data))
    assert not reg.certificates
    reg.broker.start()
    yield reg
    reg.broker.stop()
    reg.engine.dispose()


@pytest.fixture
def cert_server(tmp_path):
    data, _ = server_dir(tmp_path / "server")
    reg = Registry(data)
    assert reg.certificates
    reg.broker.start()
    yield reg
    reg.broker.stop()
    reg.engine.dispose()


def _cert_agent(reg, tmp_path, device_id="pi-1"):
    """Enrol ``device_id`` and start an agent with a copy of its config, certificate, key and CA (as on a
    device)."""
    enrolled = reg.add_device(device_id, "raspberry-pi-5")
    etc = tmp_path / f"{device_id}-etc"
    etc.mkdir()
    for name in ("agent.toml", "device.pem", "device.key", "ca.pem"):
        shutil.copy(enrolled.agent_config.parent / name, etc / name)
    cfg = load_config(etc / "agent.toml", data_dir=str(tmp_path / f"{device_id}-data"), api_port=free_port())
    agent = Agent(cfg, min_backoff=0.2, max_backoff=1.0).start()
    wait_for(agent.session.connected.is_set, 20, "the agent to connect", poll=0.05)
    return agent, etc


def _agent(reg, tmp_path, device_id="pi-1"):
    """Enrol ``device_id`` and start an agent with a copy of its config and password file (as on a device)."""
    enrolled = reg.add_device(device_id, "raspberry-pi-5")
    etc = tmp_path / f"{device_id}-etc"
    etc.mkdir()
    shutil.copy(enrolled.agent_config, etc / "agent.toml")
    shutil.copy(enrolled.agent_config.parent / "broker-password", etc / "broker-password")
    cfg = load_config(etc / "agent.toml", data_dir=str(tmp_path / f"{device_id}-data"), api_port=free_port())
    agent = Agent(cfg, min_backoff=0.2, max_backoff=1.0).start()
    wait_for(agent.session.connected.is_set, 20, "the agent to connect", poll=0.05)
    return agent, etc / "broker-password"


class _Watch:
    """Polls the agent's local API and its broker connection: how long it was off the broker, and whether the
    API ever failed to answer."""

    def __init__(self, agent):
        self.agent, self.offline_s, self.api_failures, self._stop = agent, 0.0, 0, threading.Event()
        self._url = f"http://127.0.0.1:{agent.cfg.api_port}/v1/health"
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        last = time.monotonic()
        while not self._stop.wait(0.01):
            now = time.monotonic()
            if not self.agent.session.connected.is_set():
                self.offline_s += now - last
            last = now
            try:
                with urllib.request.urlopen(self._url, timeout=2) as resp:
                    json.loads(resp.read())
            except OSError:
                self.api_failures += 1

    def stop(self):
        self._stop.set()
        self._t.join()


class _Commands:
    """Sends ``report_now`` to pi-1 every 20 ms as the server user, and collects the ids acknowledged done (each one
    makes the agent report: a faster stream only builds a backlog a loaded machine takes long to work off)."""

    def __init__(self, reg):
        self.client = TestClient(_Addr(reg.broker.port, reg.broker.server_port), SERVER_USER,  # type: ignore[arg-type]
                                 reg.broker.server_password())
        self.client.client.on_message = self._ack
        self.client.subscribe(device_topic("pi-1", TopicKind.ACK))
        self.sent: list[str] = []
        self.done: set[str] = set()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _ack(self, client, userdata, msg):
        ack = decode(CommandAck, bytes(msg.payload))
        if ack.status == "done":
            self.done.add(ack.command_id)

    def _run(self):
        while not self._stop.wait(0.02):
            cmd = Command(command_id=uuid.uuid4().hex, kind=CommandKind.REPORT_NOW,
                          issued_at=datetime.now(timezone.utc))
            self.client.client.publish(device_topic("pi-1", TopicKind.COMMAND), encode(cmd), qos=1)
            self.sent.append(cmd.command_id)

    def stop(self) -> list[str]:
        self._stop.set()
        self._t.join()
        return self.sent


def test_rotation_delivers_then_swaps_and_the_agent_stays_on_the_broker(server, tmp_path):
    agent, password_file = _agent(server, tmp_path)
    try:
        old = password_file.read_text().strip()
        session = agent.session.session_id
        watch = _Watch(agent)
        commands = _Commands(server)  # commands sent all through the change, some while the agent is off
        rotation = server.rotate_credentials("pi-1", actor="alice", timeout=15)
        wait_for(lambda: agent.session.connected.is_set() and agent.session.session_id != session, 10,
                 "the agent to be back on the broker", poll=0.05)
        time.sleep(0.3)
        watch.stop()
        sent = commands.stop()

        # the MQTT session lived through the change: the broker resumed it on the reconnection, and every
        # command sent meanwhile (those sent while the connection was down were queued in it) was carried out
        assert agent.session.session_present and agent.session.resumed >= 1
        wait_for(lambda: commands.done >= set(sent), 60, "every command to be acknowledged done", poll=0.05)
        print(f"{len(sent)} commands sent during the rotation, all carried out")

        # stored before the broker changed, 0600, the old one kept until the new one was accepted
        new = password_file.read_text().strip()
        assert new != old and len(new) >= 32
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert "used from the next connection" in rotation.message
        assert (server.data / "devices" / "pi-1" / "broker-password").read_text().strip() == new

        # Mosquitto ended the connection made with the old password when it reloaded; the agent came straight
        # back with the new one: one reconnection, never refused, the previous password forgotten, the local
        # API answering throughout
        log = (server.broker.dir / "mosquitto.log").read_text()
        assert log.count("as pi-1 (") == 2 and "not authorised" not in log
        assert not password_file.with_name("broker-password.previous").exists()
        assert watch.offline_s < 1.0, f"off the broker for {watch.offline_s:.2f} s"
        print(f"off the broker for {watch.offline_s * 1000:.0f} ms during the rotation")
        assert watch.api_failures == 0

        # the old password is refused, the new one accepted
        addr = _Addr(server.broker.port)
        with pytest.raises(ConnectRefused):
            TestClient(addr, "pi-1", old)  # type: ignore[arg-type]
        TestClient(addr, "pi-1", new).close()  # type: ignore[arg-type]

        # audited, with the actor, without the secret
        with Session(server.engine) as db:
            entries = audit.entries(db, action="device.rotate_credentials")
        assert len(entries) == 1 and entries[0].actor == "alice" and entries[0].subject == "device:pi-1"
        assert entries[0].detail == {"via": "agent", "command_id": rotation.command_id}

        # later connections (after a broker restart) use the new password
        second = agent.session.session_id
        refusals = (server.broker.dir / "mosquitto.log").read_text().count("not authorised")
        server.broker.stop()
        wait_for(lambda: not agent.session.connected.is_set(), 20, "the agent to see the broker go", poll=0.05)
        server.broker.start()
        wait_for(lambda: agent.session.connected.is_set() and agent.session.session_id != second, 30,
                 "the agent to reconnect", poll=0.05)
        assert (server.broker.dir / "mosquitto.log").read_text().count("not authorised") == refusals
        assert password_file.read_text().strip() == new
    finally:
        agent.stop()


def test_an_offline_device_keeps_its_password(server, tmp_path):
    agent, password_file = _agent(server, tmp_path)
    old = password_file.read_text().strip()
    agent.stop()
    with pytest.raises(RegistryError, match=r"did not confirm its new credentials within 2 s.*credentials still work"):
        server.rotate_credentials("pi-1", timeout=2)
    TestClient(_Addr(server.broker.port), "pi-1", old).close()  # type: ignore[arg-type]
    with Session(server.engine) as db:
        assert audit.entries(db, action="device.rotate_credentials") == []
    with pytest.raises(RegistryError, match="no enrolled device named nope"):
        server.rotate_credentials("nope", timeout=2)


def test_an_agent_with_an_inline_password_refuses_and_nothing_changes(server, tmp_path):
    enrolled = server.add_device("pi-2", "raspberry-pi-5")
    password = (enrolled.agent_config.parent / "broker-password").read_text().strip()
    cfg = load_config(None, device_id="pi-2", broker_url=server.broker_url, password=password,
                      server_key=server.public_key_text(), data_dir=str(tmp_path / "pi-2"), api_port=0)
    agent = Agent(cfg, min_backoff=0.2, max_backoff=1.0, api=False).start()
    try:
        wait_for(agent.session.connected.is_set, 20, "the agent to connect", poll=0.05)
        with pytest.raises(RegistryError, match=r"answered failed: .*password_file.*current credentials still work"):
            server.rotate_credentials("pi-2", timeout=10)
        TestClient(_Addr(server.broker.port), "pi-2", password).close()  # type: ignore[arg-type]
    finally:
        agent.stop()


def test_an_unfinished_rotation_never_locks_the_agent_out(server, tmp_path):
    """The agent stored a new password but the server never swapped it (the acknowledgement was lost): its next
    connection is refused with the new password and made with the previous one."""
    agent, password_file = _agent(server, tmp_path)
    old = password_file.read_text().strip()
    agent.session.credentials.rotate("a-password-the-broker-never-heard-of")
    server.broker.stop()
    wait_for(lambda: not agent.session.connected.is_set(), 20, "the agent to see the broker go", poll=0.05)
    server.broker.start()
    try:
        wait_for(agent.session.connected.is_set, 30, "the agent to reconnect with its previous password", poll=0.05)
        assert password_file.read_text().strip() == "a-password-the-broker-never-heard-of"
        assert password_file.with_name("broker-password.previous").read_text().split() == [old]
    finally:
        agent.stop()


def test_the_command(server, tmp_path):
    from typer.testing import CliRunner

    from server.cli import app

    agent, password_file = _agent(server, tmp_path)
    old = password_file.read_text()
    try:
        args = ["device", "rotate-credentials", "pi-1", "--data-dir", str(server.data), "--timeout", "10"]
        result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "rotated pi-1's broker password" in result.output and "the old one no longer works" in result.output
        assert password_file.read_text() != old
    finally:
        agent.stop()
    result = CliRunner().invoke(app, [*args[:-2], "--timeout", "1"], env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "did not confirm its new credentials within 1 s" in result.output


def test_certificate_rotation_keeps_the_session_and_revokes_the_old_certificate(cert_server, tmp_path):
    from cryptography import x509

    from tests._mosquitto import DeviceTls
    from tests.mqtt_helpers import HandshakeRefused

    reg = cert_server
    agent, etc = _cert_agent(reg, tmp_path)
    try:
        old_serial = x509.load_pem_x509_certificate((etc / "device.pem").read_bytes()).serial_number
        shutil.copy(etc / "device.pem", tmp_path / "old.pem")
        shutil.copy(etc / "device.key", tmp_path / "old.key")
        session = agent.session.session_id
        watch = _Watch(agent)
        commands = _Commands(reg)
        rotation = reg.rotate_credentials("pi-1", actor="alice", timeout=15)
        wait_for(lambda: agent.session.connected.is_set() and agent.session.session_id != session, 10,
                 "the agent to be back on the broker", poll=0.05)
        time.sleep(0.3)
        watch.stop()
        sent = commands.stop()
        # the session lived through the change: every command sent meanwhile was carried out
        assert agent.session.session_present and agent.session.resumed >= 1
        wait_for(lambda: commands.done >= set(sent), 60, "every command to be acknowledged done", poll=0.05)
        assert watch.api_failures == 0 and watch.offline_s < 2.0, watch.offline_s
        print(f"{len(sent)} commands during the rotation, all carried out; off the broker {watch.offline_s:.2f} s")

        new_serial = x509.load_pem_x509_certificate((etc / "device.pem").read_bytes()).serial_number
        assert new_serial != old_serial and stat.S_IMODE((etc / "device.key").stat().st_mode) == 0o600
        assert reg.broker.authority.serials("pi-1") == [new_serial]
        assert reg.broker.authority.serials("pi-1", revoked=True) == [old_serial]
        with Session(reg.engine) as db:
            entries = audit.entries(db, action="device.rotate_credentials")
        assert [e.detail for e in entries] == [{"via": "agent", "command_id": rotation.command_id,
                                                 "serial": f"{new_serial:x}"}]
        # the old certificate no longer gets in; the new one does
        addr = _Addr(reg.broker.port, reg.broker.server_port)
        with pytest.raises((HandshakeRefused, OSError)):
            TestClient(addr, "pi-1", DeviceTls("pi-1", tmp_path / "old.pem", tmp_path / "old.key",  # type: ignore[arg-type]
                                               etc / "ca.pem", old_serial), client_id="x", timeout=5)
        TestClient(addr, "pi-1", DeviceTls("pi-1", etc / "device.pem", etc / "device.key", etc / "ca.pem",  # type: ignore[arg-type]
                                           new_serial), client_id="x").close()
    finally:
        agent.stop()
