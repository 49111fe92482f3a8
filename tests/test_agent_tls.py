"""The agent over TLS on a real Mosquitto (the managed broker, its own CA): it connects with its certificate, refuses a
broker certificate from another CA or for another host name and says why in its log and ``/v1/health``, explains a
refusal of its own certificate, and moves to a new certificate when the server rotates it, falling back to the
previous one when the broker refuses the new one. Also the configuration rules, the pinned trust store, the checks a
new certificate must pass and the explanations, without a broker."""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import socket
import ssl
import stat
import tempfile
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig, load_config
from agent.credentials import Certificates, TlsFiles, check_certificate
from agent.errors import ConfigError
from agent.runtime import Agent
from agent.session import Session, ask_broker_why, explain_handshake, explain_refusal
from hardware.files import atomic_write
from protocol import Command, CommandAck, CommandKind, TopicKind, decode, device_topic, encode
from server.broker import MosquittoBroker, free_port
from server.pki import Authority
from server.registry import Registry
from tests.server_helpers import server_dir, wait_for

KEY = "ed25519:Jpn69PZ51Vluwz2vQYcuWf+9zuqAACue9tnTfwOnUkk="


@pytest.fixture
def root() -> Iterator[Path]:
    """A directory the broker reaches after dropping root to the 'mosquitto' user (0711: no listing)."""
    path = Path(tempfile.mkdtemp(prefix="edgeherd-tls-"))
    os.chmod(path, 0o711)  # noqa: S103 - search only, for the broker's user
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _write_device(where: Path, issued: Any, ca: bytes | None = None) -> dict[str, Path]:
    """The device's certificate, key and pinned CA bundle (``ca``, else the one issued with it), 0600, as
    enrolment leaves them."""
    where.mkdir(parents=True, exist_ok=True)
    files = {"tls_cert": where / "device.pem", "tls_key": where / "device.key", "tls_ca": where / "ca.pem"}
    atomic_write(files["tls_cert"], issued.certificate, 0o600)
    atomic_write(files["tls_key"], issued.key, 0o600)
    atomic_write(files["tls_ca"], ca if ca is not None else issued.ca_bundle, 0o600)
    return files


def _config(tmp: Path, device_id: str, url: str, files: dict[str, Path]) -> AgentConfig:
    return AgentConfig(device_id=device_id, broker_url=url, server_key=KEY, data_dir=tmp / f"{device_id}-data",
                       api_port=free_port(), profile="x86-64-cpu", **files)


def _health(agent: Agent) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.cfg.api_port}/v1/health", timeout=5) as resp:
        return dict(json.loads(resp.read()))


def _handshake(port: int, files: dict[str, Path], *, check_hostname: bool = True) -> str:
    """A TLS 1.2 handshake with the devices' listener, where the broker checks the client certificate within the
    handshake: "" when it takes the certificate, else the reason of its alert."""
    ctx = ssl.create_default_context(cafile=str(files["tls_ca"]))
    ctx.check_hostname = check_hostname
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(files["tls_cert"]), str(files["tls_key"]))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1"):
            return ""
    except ssl.SSLError as exc:
        return str(exc.reason)


def _mqtt_connack(port: int, device_id: str, files: dict[str, Path]) -> str | None:
    """Connect over TLS (1.3 where both sides have it) with ``files``: the CONNACK's reason, None when the broker
    ended the connection without one."""
    ctx = ssl.create_default_context(cafile=str(files["tls_ca"]))
    ctx.load_cert_chain(str(files["tls_cert"]), str(files["tls_key"]))
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=mqtt.MQTTv5)
    client.tls_set_context(ctx)
    answers: list[str] = []
    client.on_connect = lambda c, u, f, reason, p: answers.append(str(reason))
    try:
        client.connect("127.0.0.1", port)
    except OSError:
        return None
    for _ in range(40):
        if answers or client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
            break
    client.disconnect()
    return answers[0] if answers else None


# -- configuration, trust store, checks and explanations (no broker) ------------------------------------------------


@pytest.mark.parametrize(("fields", "error"), [
    ({"broker_url": "mqtt://b:1883", "tls_ca": "ca.pem"}, "tls_ca need a TLS broker_url (mqtts://"),
    ({"broker_url": "mqtt://b:1883", "tls_ca": "ca.pem", "tls_cert": "d.pem", "tls_key": "d.key"},
     "tls_ca, tls_cert, tls_key need a TLS broker_url"),
    ({"broker_url": "mqtts://b:8883", "tls_cert": "d.pem", "tls_key": "d.key"}, "tls_ca is required with tls_cert"),
    ({"broker_url": "mqtts://b:8883", "tls_ca": "ca.pem", "tls_cert": "d.pem"}, "tls_cert and tls_key go together"),
])
def test_config_refuses_tls_keys_that_do_not_fit(tmp_path, fields, error):
    toml = tmp_path / "agent.toml"
    toml.write_text("".join(f'{k} = "{v}"\n' for k, v in {
        "device_id": "pi-1", "server_key": KEY, "data_dir": "data", **fields}.items()))
    with pytest.raises(ConfigError, match=error.replace("(", r"\(")):
        load_config(toml)


def test_config_takes_a_pinned_ca_alone_and_the_full_set(tmp_path):
    alone = load_config(None, device_id="pi-1", broker_url="mqtts://b:8883", server_key=KEY, data_dir="d",
                        tls_ca="ca.pem", password="p" * 20)
    assert alone.tls and alone.tls_cert is None
    full = load_config(None, device_id="pi-1", broker_url="mqtts://b", server_key=KEY, data_dir="d",
                       tls_ca="ca.pem", tls_cert="d.pem", tls_key="d.key")
    assert full.broker_port == 8883 and Certificates(full).rotatable


def test_the_context_trusts_only_the_pinned_ca_and_checks_the_host_name(tmp_path):
    auth = Authority.open(tmp_path / "server")
    issued = auth.issue_device("pi-1")
    files = _write_device(tmp_path / "etc", issued)
    ctx = Certificates(_config(tmp_path, "pi-1", "mqtts://b:8883", files)).context(
        TlsFiles(files["tls_ca"], files["tls_cert"], files["tls_key"]))
    pinned = x509.load_pem_x509_certificates(issued.ca_bundle)
    assert ctx.cert_store_stats()["x509_ca"] == len(pinned) == 1  # no system CA in the store
    got = ctx.get_ca_certs(binary_form=True)
    assert [x509.load_der_x509_certificate(der) for der in got] == pinned
    assert ctx.check_hostname and ctx.verify_mode is ssl.CERT_REQUIRED
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    # a broker certificate from a public CA would verify against the system store, which is not there
    assert ctx.cert_store_stats()["x509"] == 1


def test_files_that_cannot_be_used_stop_the_agent_naming_the_file(tmp_path):
    auth = Authority.open(tmp_path / "server")
    files = _write_device(tmp_path / "etc", auth.issue_device("pi-1"))
    other = auth.issue_device("pi-1")
    cfg = _config(tmp_path, "pi-1", "mqtts://127.0.0.1:1", files)
    current = TlsFiles(files["tls_ca"], files["tls_cert"], files["tls_key"])
    certs = Certificates(cfg)

    def broken(path: Path, data: bytes | None) -> str:
        saved = path.read_bytes()
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
        try:
            with pytest.raises(ConfigError) as got:
                certs.context(current)
            with pytest.raises(ConfigError):  # the agent does not start
                Session(cfg, on_message=lambda t, p: None, on_connected=lambda s: None,
                        on_disconnected=lambda: None, on_puback=lambda m, ok: None, next_session=lambda: 1)
            return str(got.value)
        finally:
            path.write_bytes(saved)

    assert f"tls_cert {files['tls_cert']} cannot be read" in broken(files["tls_cert"], None)
    assert f"tls_cert {files['tls_cert']} holds no PEM certificate" in broken(files["tls_cert"], b"nonsense")
    assert f"tls_key {files['tls_key']} is not an unencrypted PEM private key" in broken(files["tls_key"], b"x")
    assert f"tls_key {files['tls_key']} is not the key of tls_cert" in broken(files["tls_key"], other.key)
    assert f"tls_ca {files['tls_ca']} cannot be used as the pinned CA bundle" in broken(files["tls_ca"], None)
    assert f"tls_ca {files['tls_ca']}" in broken(files["tls_ca"], b"no certificates here")
    certs.context(current)  # restored: usable again


def test_a_new_certificate_must_fit_this_device_and_the_ca_sent_with_it(tmp_path):
    auth = Authority.open(tmp_path / "a")
    other = Authority.open(tmp_path / "b")
    good = auth.issue_device("pi-1")
    assert check_certificate(good.certificate, good.key, good.ca_bundle, "pi-1") is None
    # a bundle of both CAs (a CA rotation under way) is fine
    both = other.trusted_pem() + good.ca_bundle
    assert check_certificate(good.certificate, good.key, both, "pi-1") is None
    cases = [
        ((good.certificate, good.key, good.ca_bundle, "pi-2"), "is for pi-1, not for pi-2"),
        ((good.certificate, auth.issue_device("pi-1").key, good.ca_bundle, "pi-1"), "not the certificate's key"),
        ((good.certificate, good.key, other.trusted_pem(), "pi-1"), "not signed by any CA in the CA bundle"),
        ((good.certificate, good.key, good.certificate, "pi-1"), "not signed by any CA"),  # a leaf is no CA
        ((b"junk", good.key, good.ca_bundle, "pi-1"), "not a PEM certificate"),
        ((good.certificate, b"junk", good.ca_bundle, "pi-1"), "not an unencrypted PEM private key"),
        ((good.certificate, good.key, b"junk", "pi-1"), "holds no PEM certificate"),
    ]
    for args, why in cases:
        assert why in (check_certificate(*args) or ""), (why, check_certificate(*args))
    later = datetime.now(timezone.utc) + timedelta(days=3000)
    assert "expired" in (check_certificate(good.certificate, good.key, good.ca_bundle, "pi-1", later) or "")


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}")
    exc.verify_code, exc.verify_message, exc.reason = code, message, "CERTIFICATE_VERIFY_FAILED"
    return exc


def _alert(reason: str) -> ssl.SSLError:
    exc = ssl.SSLError(1, f"[SSL: {reason}] {reason.lower()}")
    exc.reason = reason
    return exc


FILES = TlsFiles(Path("/etc/edgeherd/ca.pem"), Path("/etc/edgeherd/device.pem"), Path("/etc/edgeherd/device.key"))


@pytest.mark.parametrize(("exc", "says"), [
    (_verify_error(20, "unable to get local issuer certificate"),
     "the broker's certificate is not signed by the CA pinned in tls_ca (/etc/edgeherd/ca.pem)"),
    (_verify_error(19, "self-signed certificate in certificate chain"), "not signed by the CA pinned in tls_ca"),
    (_verify_error(62, "Hostname mismatch, certificate is not valid for 'gw.lan'."),
     "does not name gw.lan, the host in broker_url"),
    (_verify_error(64, "IP address mismatch"), "--public-host gw.lan"),
    (_verify_error(10, "certificate has expired"), "check the device's clock"),
    (_verify_error(26, "unsupported certificate purpose"), "was refused: unsupported certificate purpose"),
    (_alert("SSLV3_ALERT_CERTIFICATE_REVOKED"), "the broker refused this device's certificate "
                                                "(/etc/edgeherd/device.pem): it is revoked"),
    (_alert("TLSV1_ALERT_UNKNOWN_CA"), "not signed by a CA the broker trusts"),
    (_alert("SSLV3_ALERT_CERTIFICATE_EXPIRED"), "it has expired"),
    (_alert("SSLV3_ALERT_BAD_CERTIFICATE"), "the broker answered sslv3 alert bad certificate"),
    (_alert("WRONG_VERSION_NUMBER"), "is it the broker's TLS listener?"),
    (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "ended the TLS handshake without a word"),
    (ConnectionResetError(104, "Connection reset by peer"), "is it the broker's TLS listener?"),
    (_alert("NO_SHARED_CIPHER"), "the TLS handshake with gw.lan:8883 failed"),
])
def test_handshake_failures_are_explained(tmp_path, exc, says):
    cfg = _config(tmp_path, "pi-1", "mqtts://gw.lan:8883", {})
    assert says in explain_handshake(exc, cfg, FILES)


def test_refusals_without_an_alert_or_a_certificate_are_explained():
    assert "closed the connection right after the TLS handshake" in explain_refusal(None, FILES)
    previous = TlsFiles(FILES.ca, Path("/etc/edgeherd/device.pem.previous"), FILES.key, previous=True)
    assert "previous certificate (/etc/edgeherd/device.pem.previous): it is revoked" in explain_refusal(
        "SSLV3_ALERT_CERTIFICATE_REVOKED", previous)
    assert "requires a client certificate and this device has none" in explain_refusal(
        "TLSV13_ALERT_CERTIFICATE_REQUIRED", TlsFiles(FILES.ca, None, None))


# -- on the managed broker ------------------------------------------------------------------------------------------


@pytest.fixture
def broker(root) -> Iterator[MosquittoBroker]:
    b = MosquittoBroker(root / "server", listen=("127.0.0.1", 0))
    b.start()
    yield b
    b.stop()


def _run(cfg: AgentConfig) -> Agent:
    return Agent(cfg, min_backoff=0.2, max_backoff=1.0).start()


@pytest.mark.integration
def test_the_agent_connects_with_its_certificate(broker, root):
    assert broker.url.startswith("mqtts://127.0.0.1:")
    files = _write_device(root / "etc", broker.issue_certificates(["pi-1"])["pi-1"])
    agent = _run(_config(root, "pi-1", broker.url, files))
    try:
        wait_for(agent.session.connected.is_set, 20, "the agent to connect over TLS", poll=0.05)
        health = _health(agent)
        assert health["connected"] is True and health["broker_error"] is None
        assert agent.session.certificates.in_use == TlsFiles(files["tls_ca"], files["tls_cert"], files["tls_key"])
        # the broker took the certificate's common name as the user name (the ACL confines it to its own topics)
        log = (broker.dir / "mosquitto.log").read_text()
        assert "as pi-1 (" in log and "u'pi-1'" in log
    finally:
        agent.stop()


def _refused(agent: Agent, says: str, caplog: pytest.LogCaptureFixture) -> str:
    """Wait until the agent says ``says`` in /v1/health; check it is logged at WARNING and never connected."""
    wait_for(lambda: says in (agent.session.broker_error or ""), 20, f"the agent to say {says!r}", poll=0.05)
    health = _health(agent)
    assert health["connected"] is False and says in health["broker_error"]
    assert any(r.levelno == logging.WARNING and says in r.getMessage() for r in caplog.records
               if r.name == "agent.session")
    assert agent.session.connections == 0
    return str(health["broker_error"])


@pytest.mark.integration
def test_a_broker_certificate_from_another_ca_is_refused_and_explained(broker, root, caplog):
    caplog.set_level(logging.INFO, logger="agent")
    impostor_ca = Authority.open(root / "elsewhere").trusted_pem()  # the CA the device pins is not the broker's
    files = _write_device(root / "etc", broker.issue_certificates(["pi-1"])["pi-1"], ca=impostor_ca)
    agent = _run(_config(root, "pi-1", broker.url, files))
    try:
        error = _refused(agent, f"the broker's certificate is not signed by the CA pinned in tls_ca "
                                f"({files['tls_ca']})", caplog)
        assert f"127.0.0.1:{broker.port} is not the broker this device was enrolled with" in error
    finally:
        agent.stop()
    assert "as pi-1 (" not in (broker.dir / "mosquitto.log").read_text()


class _NamedBroker(MosquittoBroker):
    """A managed broker whose certificate names broker.example only (not the loopback address it listens on)."""

    @property
    def certificate_names(self) -> list[str]:
        return ["broker.example"]


@pytest.mark.integration
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_broker_certificate_for_another_host_is_refused_and_explained(root, caplog, host):
    caplog.set_level(logging.INFO, logger="agent")
    b = _NamedBroker(root / "server", listen=("127.0.0.1", 0))
    b.start()
    try:
        cert = x509.load_pem_x509_certificate((b.tls_dir / "broker.pem").read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(n.value) for n in sans] == ["broker.example"]
        files = _write_device(root / "etc", b.issue_certificates(["pi-1"])["pi-1"])
        agent = _run(_config(root, "pi-1", f"mqtts://{host}:{b.port}", files))
        try:
            error = _refused(agent, f"the broker's certificate does not name {host}, the host in broker_url", caplog)
            assert f"--public-host {host}" in error
        finally:
            agent.stop()
        # only the name is wrong: the certificate is from the pinned CA, and takes the device's
        assert _handshake(b.port, files) == "CERTIFICATE_VERIFY_FAILED"
        assert _handshake(b.port, files, check_hostname=False) == ""
    finally:
        b.stop()


@pytest.mark.integration
@pytest.mark.parametrize("case", ["revoked", "another CA"])
def test_a_refused_device_certificate_is_explained(broker, root, caplog, case):
    caplog.set_level(logging.INFO, logger="agent")
    issued = broker.issue_certificates(["pi-1"])["pi-1"]
    if case == "revoked":
        broker.revoke_certificates([issued.serial])
        files, says = _write_device(root / "etc", issued), "it is revoked"
        wait_for(lambda: _handshake(broker.port, files) == "SSLV3_ALERT_CERTIFICATE_REVOKED", 10,
                 "the broker to re-read its CRL", poll=0.05)
    else:  # signed by a CA the broker does not trust; the device pins the broker's CA all the same
        stranger = Authority.open(root / "elsewhere").issue_device("pi-1")
        files = _write_device(root / "etc", stranger, ca=issued.ca_bundle)
        says = "it is not signed by a CA the broker trusts"
    agent = _run(_config(root, "pi-1", broker.url, files))
    try:
        error = _refused(agent, f"the broker refused this device's certificate ({files['tls_cert']}): {says}",
                         caplog)
        print(f"{case}: /v1/health broker_error: {error}")
    finally:
        agent.stop()


@pytest.mark.integration
def test_a_broker_that_closes_without_a_reason_is_asked_why_in_tls_1_2(broker, root):
    """Over TLS 1.3 a broker may end the connection after the handshake with no alert (the read sees only EOF):
    the agent asks again in a TLS 1.2 handshake, where the certificate is checked within it and an alert names why."""
    issued = broker.issue_certificates(["pi-1"])["pi-1"]
    files = _write_device(root / "etc", issued)
    stranger = _write_device(root / "stranger", Authority.open(root / "elsewhere").issue_device("pi-1"),
                             ca=issued.ca_bundle)
    cfg = _config(root, "pi-1", broker.url, files)
    certs = Certificates(cfg)
    current = certs.candidates()[0]
    assert ask_broker_why(certs.context(current), "127.0.0.1", broker.port) == ""  # taken
    assert ask_broker_why(Certificates(_config(root, "pi-1", broker.url, stranger)).context(
        TlsFiles(stranger["tls_ca"], stranger["tls_cert"], stranger["tls_key"])), "127.0.0.1",
        broker.port) == "TLSV1_ALERT_UNKNOWN_CA"
    assert ask_broker_why(certs.context(current), "127.0.0.1", broker.server_port) is None  # not TLS: no verdict
    assert ask_broker_why(certs.context(current), "127.0.0.1", free_port()) is None  # nobody there

    broker.revoke_certificates([issued.serial])
    wait_for(lambda: _handshake(broker.port, files) == "SSLV3_ALERT_CERTIFICATE_REVOKED", 10,
             "the broker to re-read its CRL", poll=0.05)
    session = Session(cfg, on_message=lambda t, p: None, on_connected=lambda s: None, on_disconnected=lambda: None,
                      on_puback=lambda m, ok: None, next_session=lambda: 1)
    assert session._use_tls_files()
    session._tls.socket = None  # the connection ended with no error to read
    problem, refused = session._unanswered()
    assert refused and problem == explain_refusal("SSLV3_ALERT_CERTIFICATE_REVOKED", current)


# -- rotation, with the server's registry ----------------------------------------------------------------------------


@pytest.fixture
def registry(root) -> Iterator[Registry]:
    data, _ = server_dir(root / "server")
    reg = Registry(data, listen=("127.0.0.1", 0))
    reg.broker.start()
    yield reg
    reg.broker.stop()
    reg.engine.dispose()


def _enrolled_agent(reg: Registry, root: Path, device_id: str = "pi-1") -> tuple[Agent, dict[str, Path]]:
    """Enrol ``device_id`` and run an agent on a copy of its files, as on the device."""
    enrolled = reg.add_device(device_id, "raspberry-pi-5")
    etc = root / f"{device_id}-etc"
    shutil.copytree(enrolled.agent_config.parent, etc)
    cfg = load_config(etc / "agent.toml", data_dir=str(root / f"{device_id}-data"), api_port=free_port())
    assert cfg.tls and cfg.tls_cert == etc / "device.pem"
    files = {"tls_cert": etc / "device.pem", "tls_key": etc / "device.key", "tls_ca": etc / "ca.pem"}
    agent = _run(cfg)
    wait_for(agent.session.connected.is_set, 20, "the agent to connect", poll=0.05)
    return agent, files


def _serial(path: Path) -> int:
    return int(x509.load_pem_x509_certificate(path.read_bytes()).serial_number)


def _previous(files: dict[str, Path]) -> list[Path]:
    return [p.with_name(p.name + ".previous") for p in files.values()]


def _command(reg: Registry, device_id: str, args: dict[str, Any]) -> CommandAck:
    """Send ``rotate_credentials`` with ``args`` as the server user; the agent's final answer."""
    acks: queue.Queue[CommandAck] = queue.Queue()
    subscribed = threading.Event()
    cmd = Command(command_id=uuid.uuid4().hex, kind=CommandKind.ROTATE_CREDENTIALS, args=args,
                  issued_at=datetime.now(timezone.utc))
    client = reg.client()
    try:
        client.on_message = lambda c, u, msg: acks.put(decode(CommandAck, bytes(msg.payload)))
        client.on_subscribe = lambda c, u, mid, reasons, props: subscribed.set()
        client.subscribe(device_topic(device_id, TopicKind.ACK), qos=1)
        assert subscribed.wait(10)
        client.publish(device_topic(device_id, TopicKind.COMMAND), encode(cmd), qos=1).wait_for_publish(10)
        while True:
            ack = acks.get(timeout=20)
            if ack.command_id == cmd.command_id and ack.status != "accepted":
                return ack
    finally:
        client.disconnect()
        client.loop_stop()


def _kick(reg: Registry, device_id: str) -> None:
    """End the device's connection (a session takeover on the server's listener), as the registry does."""
    client = reg.client(client_id=device_id)
    client.disconnect()
    client.loop_stop()


@pytest.mark.integration
def test_rotation_moves_the_agent_to_a_new_certificate_and_the_old_one_is_refused(registry, root):
    agent, files = _enrolled_agent(registry, root)
    try:
        old = {k: p.read_bytes() for k, p in files.items()}
        old_files = {k: root / "old" / p.name for k, p in files.items()}
        (root / "old").mkdir()
        for k, p in old_files.items():
            p.write_bytes(old[k])
        old_serial = _serial(files["tls_cert"])
        assert _handshake(registry.broker.port, old_files) == ""
        connections = agent.session.connections

        rotation = registry.rotate_credentials("pi-1", actor="alice", timeout=15)
        assert "new certificate stored in" in rotation.message
        wait_for(lambda: agent.session.connected.is_set() and agent.session.connections > connections, 15,
                 "the agent to be back on the broker", poll=0.05)

        # new files, 0600, a certificate the server issued for pi-1; the old serial is on the CRL
        new_serial = _serial(files["tls_cert"])
        assert new_serial != old_serial and registry.broker.authority is not None
        assert registry.broker.authority.is_revoked(old_serial)
        assert registry.broker.authority.serials("pi-1") == [new_serial]
        for p in files.values():
            assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert files["tls_key"].read_bytes() != old["tls_key"]
        # the agent is on the broker with the new files, and has forgotten the previous ones
        assert agent.session.certificates.in_use is not None and not agent.session.certificates.in_use.previous
        wait_for(lambda: not any(p.exists() for p in _previous(files)), 5, "the previous files to go", poll=0.05)
        health = _health(agent)
        assert health["connected"] is True and health["broker_error"] is None
        # the enrolment copy is current too
        assert (registry.data / "devices" / "pi-1" / "device.pem").read_bytes() == files["tls_cert"].read_bytes()

        # the old certificate is refused at the handshake (TLS 1.2 names it revoked; over TLS 1.3 the broker ends
        # the connection without a CONNACK); the new one is taken
        wait_for(lambda: _handshake(registry.broker.port, old_files) == "SSLV3_ALERT_CERTIFICATE_REVOKED", 10,
                 "the broker to refuse the old certificate", poll=0.05)
        assert _mqtt_connack(registry.broker.port, "pi-1", old_files) is None
        assert _handshake(registry.broker.port, files) == ""
    finally:
        agent.stop()


@pytest.mark.integration
def test_a_bad_certificate_is_rejected_and_nothing_changes(registry, root):
    agent, files = _enrolled_agent(registry, root)
    try:
        before = {k: p.read_bytes() for k, p in files.items()}
        assert registry.broker.authority is not None
        other = registry.broker.issue_certificates(["pi-9"])["pi-9"]
        ack = _command(registry, "pi-1", {"certificate": other.certificate.decode(), "key": other.key.decode(),
                                          "ca": other.ca_bundle.decode()})
        assert ack.status == "rejected" and ack.message == "the certificate is for pi-9, not for pi-1"
        assert {k: p.read_bytes() for k, p in files.items()} == before
        assert not any(p.exists() for p in _previous(files))
        assert agent.session.connected.is_set()
        # a password for an agent that logs in with a certificate: it has no password file to store it in
        ack = _command(registry, "pi-1", {"password": "a-new-password-0123456789"})
        assert ack.status == "failed" and "password_file" in ack.message
    finally:
        agent.stop()


@pytest.mark.integration
@pytest.mark.parametrize("case", ["new certificate revoked", "new CA does not verify the broker"])
def test_the_agent_falls_back_to_the_previous_certificate_when_the_new_one_fails(registry, root, caplog, case):
    caplog.set_level(logging.INFO, logger="agent")
    agent, files = _enrolled_agent(registry, root)
    try:
        old_cert = files["tls_cert"].read_bytes()
        assert registry.broker.authority is not None
        if case == "new certificate revoked":  # the broker refuses the new certificate
            new = registry.broker.issue_certificates(["pi-1"])["pi-1"]
            says = f"the broker refused this device's certificate ({files['tls_cert']}): it is revoked"
        else:  # a certificate from another CA, with that CA's bundle: the broker's certificate does not verify
            new = Authority.open(root / "elsewhere").issue_device("pi-1")
            says = f"the broker's certificate is not signed by the CA pinned in tls_ca ({files['tls_ca']})"
        ack = _command(registry, "pi-1", {"certificate": new.certificate.decode(), "key": new.key.decode(),
                                          "ca": new.ca_bundle.decode()})
        assert ack.status == "done", ack.message
        assert files["tls_cert"].read_bytes() == new.certificate
        assert files["tls_cert"].with_name("device.pem.previous").read_bytes() == old_cert
        if case == "new certificate revoked":
            registry.broker.revoke_certificates([new.serial])
            wait_for(lambda: _handshake(registry.broker.port, files) == "SSLV3_ALERT_CERTIFICATE_REVOKED", 10,
                     "the broker to re-read its CRL", poll=0.05)
        connections = agent.session.connections
        _kick(registry, "pi-1")
        wait_for(lambda: agent.session.connected.is_set() and agent.session.connections > connections, 15,
                 "the agent to be back on the broker", poll=0.05)

        # the new files failed (said why), the previous ones were tried at once and taken, and are kept
        messages = [r.getMessage() for r in caplog.records if r.name.startswith("agent.")]
        assert any(says in m for m in messages), messages
        assert any("trying the previous certificate" in m for m in messages)
        in_use = agent.session.certificates.in_use
        assert in_use is not None and in_use.previous and in_use.cert is not None
        assert in_use.cert.read_bytes() == old_cert
        assert all(p.exists() for p in _previous(files))
        assert any("took the previous one" in m for m in messages)
        assert _health(agent)["broker_error"] is None

        # the next rotation (the server's own) keeps the previous files that work and replaces the current ones;
        # once the broker takes them, the previous ones are forgotten
        connections = agent.session.connections
        registry.rotate_credentials("pi-1", timeout=15)
        wait_for(lambda: agent.session.connected.is_set() and agent.session.connections > connections, 15,
                 "the agent to be back on the broker", poll=0.05)
        wait_for(lambda: not any(p.exists() for p in _previous(files)), 5, "the previous files to go", poll=0.05)
        assert _serial(files["tls_cert"]) == registry.broker.authority.serials("pi-1")[0]
        assert _serial(files["tls_cert"]) not in (_serial_of(old_cert), new.serial)
        in_use = agent.session.certificates.in_use
        assert in_use is not None and not in_use.previous
    finally:
        agent.stop()


def _serial_of(pem: bytes) -> int:
    return int(x509.load_pem_x509_certificate(pem).serial_number)
