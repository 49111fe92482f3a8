"""Attacks on the managed broker's devices' listener, each against a real server data directory and a real
Mosquitto: what a device without a good certificate can do (nothing), what revocation does to a connected
device (drops it at once, for good), and a device in its own network namespace reaching the server over a
veth pair, as a device on the LAN does.

Confinement to a device's own topics (PUBACK 135) and a certificate used with another client id (the broker
gives it its own) are tested in tests/test_broker_isolation.py; an agent refusing a broker certificate for
another name or from another CA in tests/test_agent_tls.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from protocol import TopicKind, device_topic
from server.pki import Authority
from server.registry import Registry
from tests._mosquitto import DeviceTls, free_port
from tests.mqtt_helpers import HandshakeRefused, TestClient
from tests.server_helpers import server_dir, wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


class _Addr:
    """What TestClient needs to know of the managed broker."""

    def __init__(self, reg: Registry) -> None:
        self.host, self.port = "127.0.0.1", reg.broker.port
        self.server_port, self.server_user = reg.broker.server_port, "edgeherd-server"


@pytest.fixture
def server(tmp_path):
    data, _ = server_dir(tmp_path / "server")
    reg = Registry(data)
    reg.broker.start()
    yield reg
    reg.broker.stop()
    reg.engine.dispose()


def _files(where: Path, device_id: str, cert: bytes, key: bytes, ca: bytes, serial: int = 0) -> DeviceTls:
    where.mkdir(parents=True, exist_ok=True)
    creds = DeviceTls(device_id, where / "device.pem", where / "device.key", where / "ca.pem", serial)
    creds.cert.write_bytes(cert)
    creds.key.write_bytes(key)
    creds.ca.write_bytes(ca)
    return creds


def _watch_everything(reg: Registry) -> TestClient:
    watcher = TestClient(_Addr(reg), "edgeherd-server", reg.broker.server_password())  # type: ignore[arg-type]
    watcher.subscribe("edgeherd/v1/#")
    return watcher


def _mqtt_str(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def _connect_and_publish(device_id: str) -> bytes:
    """CONNECT (MQTT 5, no user name) then a QoS 0 PUBLISH on the device's state topic, as raw packets."""
    connect_body = _mqtt_str(b"MQTT") + bytes([5, 0x02, 0, 10, 0]) + _mqtt_str(device_id.encode())
    topic = device_topic(device_id, TopicKind.STATE).encode()
    publish_body = _mqtt_str(topic) + b"\x00" + b"forged"
    return (b"\x10" + bytes([len(connect_body)]) + connect_body
            + b"\x30" + bytes([len(publish_body)]) + publish_body)


def _raw_tls_attempt(port: int, ca: Path, cert: Path | None, key: Path | None, device_id: str) -> bytes:
    """Handshake (the client side of TLS 1.3 completes before the broker has judged the client's certificate),
    send CONNECT and PUBLISH at once, and return what the broker answers before closing (b"" or an alert)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    got = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(_connect_and_publish(device_id))
            while chunk := tls.recv(64):
                got += chunk
    except (ssl.SSLError, OSError):
        pass  # the broker ended the handshake (TLS 1.2) or the session (TLS 1.3) with an alert
    return got


def test_certificates_the_broker_must_refuse(server, tmp_path):
    """Another CA's certificate, an expired one, a revoked one, and none: refused at the handshake; no CONNACK,
    and nothing the client sent is delivered."""
    reg = server
    ca = tmp_path / "ca.pem"
    ca.write_bytes(reg.broker.authority.trusted_pem())
    other = Authority.open(tmp_path / "other").issue_device("dev-a")
    expired = reg.broker.authority.issue_device("dev-a", days=0)  # valid until now: expired a moment later
    revoked = reg.broker.authority.issue_device("dev-a")
    reg.broker.revoke_certificates([revoked.serial])
    cases = {
        "another CA": _files(tmp_path / "other-ca", "dev-a", other.certificate, other.key, ca.read_bytes()),
        "expired": _files(tmp_path / "expired", "dev-a", expired.certificate, expired.key, ca.read_bytes()),
        "revoked": _files(tmp_path / "revoked", "dev-a", revoked.certificate, revoked.key, ca.read_bytes()),
    }
    good = reg.broker.authority.issue_device("dev-a")
    control = _files(tmp_path / "good", "dev-a", good.certificate, good.key, ca.read_bytes())
    time.sleep(1.1)  # past the expired certificate's end
    watcher = _watch_everything(reg)
    try:
        for what, creds in cases.items():
            with pytest.raises(HandshakeRefused):
                TestClient(_Addr(reg), "dev-a", creds, timeout=5)  # type: ignore[arg-type]
            assert not _raw_tls_attempt(reg.broker.port, ca, creds.cert, creds.key, "dev-a").startswith(b"\x20"), what
        with pytest.raises(HandshakeRefused):  # no certificate at all
            _no_certificate(reg, ca)
        assert not _raw_tls_attempt(reg.broker.port, ca, None, None, "dev-a").startswith(b"\x20")
        assert watcher.drain(wait=1.0) == [], "a refused client's publish was delivered"
        # the control: the same raw attempt with a good certificate gets a CONNACK and its publish delivered
        assert _raw_tls_attempt_until_closed(reg.broker.port, ca, control).startswith(b"\x20")
        assert [m.payload for m in watcher.drain(wait=1.0)] == [b"forged"]
        log = (reg.broker.dir / "mosquitto.log").read_text()
        assert "certificate verify failed" in log and "peer did not return a certificate" in log
    finally:
        watcher.close()


def _no_certificate(reg: Registry, ca: Path) -> None:
    """Connect with TLS but no client certificate (raises HandshakeRefused when refused)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    ctx = ssl.create_default_context(cafile=str(ca))
    paho = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="dev-a", protocol=mqtt.MQTTv5)
    paho.tls_set_context(ctx)
    accepted = []
    paho.on_connect = lambda c, u, f, rc, p: accepted.append(rc)
    try:
        paho.connect("127.0.0.1", reg.broker.port, 10)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not accepted:
            if paho.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
    except (ssl.SSLError, OSError):
        pass
    finally:
        paho.disconnect()
    if not accepted:
        raise HandshakeRefused("no CONNACK without a client certificate")


def _raw_tls_attempt_until_closed(port: int, ca: Path, creds: DeviceTls) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(creds.cert), str(creds.key))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        tls.sendall(_connect_and_publish(creds.device_id))
        return tls.recv(64)


def test_plain_tcp_to_the_devices_listener_is_refused(server):
    reg = server
    watcher = _watch_everything(reg)
    try:
        with socket.create_connection(("127.0.0.1", reg.broker.port), timeout=5) as sock:
            sock.sendall(_connect_and_publish("dev-a"))
            got = b""
            try:
                while chunk := sock.recv(64):
                    got += chunk
            except OSError:
                pass
        assert not got.startswith(b"\x20"), f"a plain CONNECT got a CONNACK: {got!r}"
        assert watcher.drain(wait=1.0) == []
    finally:
        watcher.close()


def test_revoking_a_connected_device_drops_it_at_once_and_for_good(server, tmp_path):
    reg = server
    enrolled = reg.add_device("pi-r", "raspberry-pi-5")
    where = enrolled.agent_config.parent
    creds = DeviceTls("pi-r", where / "device.pem", where / "device.key", where / "ca.pem", 0)
    kept = {n: (where / n).read_bytes() for n in ("device.pem", "device.key", "ca.pem")}  # revoke removes the dir
    device = TestClient(_Addr(reg), "pi-r", creds)  # type: ignore[arg-type]
    try:
        assert device.client.is_connected()
        started = time.monotonic()
        reg.revoke_device("pi-r")
        wait_for(lambda: device.dropped > 0, 1.0, "the revoked device's connection to be dropped", poll=0.01)
        print(f"dropped {1000 * (time.monotonic() - started):.0f} ms after `device revoke` began")
    finally:
        device.close()
    again = _files(tmp_path / "again", "pi-r", kept["device.pem"], kept["device.key"], kept["ca.pem"])
    with pytest.raises(HandshakeRefused):
        TestClient(_Addr(reg), "pi-r", again, timeout=5)  # type: ignore[arg-type]


def _netns_available() -> str | None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 to make a network namespace and a veth pair"
    probe = f"ehprobe{os.getpid() % 10000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"this sandbox does not allow network namespaces: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


@pytest.mark.skipif(_netns_available() is not None, reason=str(_netns_available()))
def test_an_agent_in_its_own_network_namespace_connects_over_a_veth_pair(tmp_path):
    """The agent runs in a namespace of its own and reaches the broker at 10.213.x.1 across a veth pair, with
    its own certificate: nothing on loopback, exactly the path a device on the LAN takes."""
    tag = os.getpid() % 10000
    ns, host_if, dev_if = f"eh{tag}", f"ehh{tag}", f"ehd{tag}"
    subnet = 10 + tag % 200
    host_ip, dev_ip = f"10.213.{subnet}.1", f"10.213.{subnet}.2"

    def ip(*args: str, inside: bool = False) -> None:
        cmd = ["ip", "netns", "exec", ns, "ip", *args] if inside else ["ip", *args]
        subprocess.run(cmd, check=True, capture_output=True)

    ip("netns", "add", ns)
    agent = None
    reg = None
    log = (tmp_path / "agent.log").open("wb")
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", dev_if)
        ip("link", "set", dev_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/24", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("addr", "add", f"{dev_ip}/24", "dev", dev_if, inside=True)
        ip("link", "set", dev_if, "up", inside=True)
        ip("link", "set", "lo", "up", inside=True)
        data, _ = server_dir(tmp_path / "server")
        reg = Registry(data, listen=(host_ip, 0), public_hosts=[host_ip])
        reg.broker.start()
        assert reg.broker_url.startswith(f"mqtts://{host_ip}:")
        enrolled = reg.add_device("pi-lan", "raspberry-pi-5")
        etc = tmp_path / "etc"
        shutil.copytree(enrolled.agent_config.parent, etc)
        watcher = TestClient(_Addr(reg), "edgeherd-server", reg.broker.server_password())  # type: ignore[arg-type]
        watcher.subscribe(device_topic("pi-lan", TopicKind.STATE))
        env = {**os.environ, "EDGEHERD_AGENT_DATA_DIR": str(tmp_path / "agent-data"),
               "EDGEHERD_AGENT_API_PORT": str(free_port())}
        agent = subprocess.Popen(
            ["ip", "netns", "exec", ns, str(ROOT / ".venv" / "bin" / "edgeherd-agent"), "run", "--config",
             str(etc / "agent.toml")], cwd=ROOT, env=env, stdout=log, stderr=log)
        try:
            msg = watcher.get(timeout=30)
            assert b'"status":"online"' in msg.payload.replace(b" ", b""), msg.payload
        finally:
            watcher.close()
        broker_log = (reg.broker.dir / "mosquitto.log").read_text()
        assert f"New connection from {dev_ip}" in broker_log and "u'pi-lan'" in broker_log, broker_log[-1500:]
    finally:
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
        log.close()
        if reg is not None:
            reg.broker.stop()
            reg.engine.dispose()
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
