"""Desired states survive the broker: the managed Mosquitto keeps retained messages across a restart, and the
server republishes every device's recorded desired state, with its recorded generation, whenever it
(re)connects. Client ids on the managed broker: the devices' listener binds them to user names, the server's
own listener lets the server take a revoked device's session over."""

from __future__ import annotations

import json
import signal

import pytest
from sqlmodel import Session

from protocol import DesiredState, SignedManifest, TopicKind, decode, decode_model, device_topic
from server.app import ServerApp
from server.broker import MosquittoBroker
from server.db.models import Device
from server.registry import Registry
from tests._mosquitto import DeviceTls
from tests.mqtt_helpers import HandshakeRefused, TestClient
from tests.server_helpers import blob_bundle, server_dir, wait_for
from tests.tls_device_helpers import listeners, reachable

pytestmark = pytest.mark.integration

PROFILE = "x86-64-cpu"


def _enrol(reg: Registry, device_id: str) -> DeviceTls:
    """Enrol ``device_id``; the certificate it logs in with (the files enrolment wrote beside its agent.toml)."""
    files = reg.add_device(device_id, PROFILE).agent_config.parent
    return DeviceTls(device_id, files / "device.pem", files / "device.key", files / "ca.pem", 0)


def _set_desired(reg: Registry, device_id: str, signed: SignedManifest) -> int:
    """Record and publish ``device_id``'s desired state (the bundle's one artifact) as deploys and rollouts do;
    its generation."""
    client = reg.client()
    try:
        with Session(reg.engine) as db:
            device = db.get(Device, device_id)
            assert device is not None
            desired = reg.set_desired(db, client, device, signed, "blob")
            db.commit()
    finally:
        client.disconnect()
        client.loop_stop()
    return desired.generation


def _signed(reg: Registry, bundle) -> SignedManifest:
    return decode_model(SignedManifest, reg.push_model(bundle).signed_manifest)


def _retained_desired(reg: Registry, device_id: str, creds: DeviceTls) -> DesiredState | None:
    """What ``device_id``, connecting now, finds retained on its desired topic (None: nothing)."""
    device = TestClient(listeners(reg.broker), device_id, creds)  # type: ignore[arg-type]
    try:
        device.subscribe(device_topic(device_id, TopicKind.DESIRED))
        got = device.drain(wait=1.0)
    finally:
        device.close()
    assert len(got) <= 1 and all(m.retain for m in got)
    return decode(DesiredState, got[0].payload) if got else None


def test_the_managed_broker_keeps_desired_states_across_a_restart(tmp_path):
    data, key = server_dir(reachable(tmp_path) / "server")
    reg = Registry(data)
    reg.broker.start()
    try:
        creds = _enrol(reg, "pi-1")
        signed = _signed(reg, blob_bundle(tmp_path / "bundle", key)[0])
        generation = _set_desired(reg, "pi-1", signed)
        reg.broker.stop()  # SIGTERM: Mosquitto saves its store
        reg.broker.start()
        # nobody has published anything since the restart: this is what the broker kept
        desired = _retained_desired(reg, "pi-1", creds)
        assert desired is not None, "the restarted broker lost the retained desired state"
        assert (desired.generation, desired.artifact, desired.bundle) == (generation, "blob", signed)
    finally:
        reg.broker.stop()


def test_a_server_reconnecting_republishes_every_recorded_desired_state_with_its_generation(tmp_path):
    """The broker is killed (no chance to save its store) and restarted by the server's supervisor; the server
    reconnects and publishes the desired states again from the registry, one device per batch, with the
    generations recorded; nothing for a device that never had one, nothing for a revoked one."""
    data, key = server_dir(reachable(tmp_path) / "server")
    app = ServerApp(data, metrics_port=0, drift_interval=0, rollout_interval=0)
    app.republish_batch = 1
    app.start()
    reg = app.registry
    try:
        creds = {d: _enrol(reg, d) for d in ("pi-1", "pi-2", "pi-3", "pi-4")}
        signed = _signed(reg, blob_bundle(tmp_path / "bundle", key)[0])
        generations = {d: _set_desired(reg, d, signed) for d in ("pi-1", "pi-3", "pi-4")}  # pi-2: never
        reg.revoke_device("pi-3")
        wait_for(lambda: app.republish_passes >= 1, 30, "the first republishing pass")
        passes = app.republish_passes

        reg.broker.proc.send_signal(signal.SIGKILL)  # its retained messages were never saved: all lost
        reg.broker.proc.wait(10)
        wait_for(lambda: app.republish_passes > passes, 60, "the server to reconnect and republish")

        for device_id in ("pi-1", "pi-4"):
            desired = _retained_desired(reg, device_id, creds[device_id])
            assert desired is not None, f"{device_id}'s desired state was not republished"
            assert (desired.generation, desired.artifact, desired.bundle) == (generations[device_id], "blob", signed)
        assert _retained_desired(reg, "pi-2", creds["pi-2"]) is None
        with Session(reg.engine) as db:  # the registry still records the generations it published
            assert {d: db.get(Device, d).desired_generation for d in generations} == generations
        watcher = reg.client()  # the server user sees every device's topics: what is retained, all of it
        seen: list[str] = []
        watcher.on_message = lambda c, u, m: seen.append(m.topic)
        watcher.subscribe("edgeherd/v1/devices/+/desired", qos=1)
        marker = device_topic("zz-marker", TopicKind.DESIRED)  # not retained: it comes after every retained one
        watcher.publish(marker, b"", qos=1).wait_for_publish(10)
        wait_for(lambda: marker in seen, 10, "the retained desired states")
        watcher.disconnect()
        watcher.loop_stop()
        assert seen[-1] == marker
        assert sorted(seen[:-1]) == [device_topic(d, TopicKind.DESIRED) for d in ("pi-1", "pi-4")]  # not pi-3's
    finally:
        app.stop()


def test_republishing_leaves_retained_what_was_set_while_it_ran(tmp_path, monkeypatch):
    """A deploy that publishes a newer desired state between the republisher reading a device and publishing
    it: the republisher's older one would be what stays retained; it publishes the device again as it is now."""
    data, key = server_dir(reachable(tmp_path) / "server")
    reg = Registry(data)
    reg.broker.start()
    try:
        creds = _enrol(reg, "pi-1")
        v1 = _signed(reg, blob_bundle(tmp_path / "v1", key)[0])
        v2 = _signed(reg, blob_bundle(tmp_path / "v2", key, version="2.0.0")[0])
        _set_desired(reg, "pi-1", v1)
        real = reg._publish_recorded
        newer: list[int] = []

        def deploy_meanwhile(db, client, devices, manifests):
            if not newer:  # the rows are read (v1); another party sets v2 and publishes it before we publish v1
                newer.append(_set_desired(reg, "pi-1", v2))
            return real(db, client, devices, manifests)

        monkeypatch.setattr(reg, "_publish_recorded", deploy_meanwhile)
        client = reg.client()
        try:
            assert reg.republish_desired(client) == 1
        finally:
            client.disconnect()
            client.loop_stop()
        desired = _retained_desired(reg, "pi-1", creds)
        assert desired is not None and (desired.generation, desired.bundle) == (newer[0], v2)
    finally:
        reg.broker.stop()


def test_the_server_takes_a_devices_session_over_on_its_own_listener(tmp_path):
    """Revocation drops a device's live connection by taking its session over (``Registry._kick``): that works
    on the server's listener, which keeps the client id asked for. The devices' listener takes certificates
    only: the server user's password does not get it a session there at all."""
    data, _ = server_dir(reachable(tmp_path) / "server")
    reg = Registry(data)
    reg.broker.start()
    try:
        creds = _enrol(reg, "pi-1")
        broker = listeners(reg.broker)
        device = TestClient(broker, "pi-1", creds, client_id="pi-1")  # type: ignore[arg-type]
        try:
            with pytest.raises((HandshakeRefused, TimeoutError, ConnectionError)):
                TestClient(broker, "edgeherd-server", reg.broker.server_password(),  # type: ignore[arg-type]
                           client_id="pi-1", port=broker.port, timeout=3)
            assert device.dropped == 0
            reg._kick("pi-1")
            wait_for(lambda: device.dropped >= 1, 10, "the device's connection to be taken over")
        finally:
            device.close()
    finally:
        reg.broker.stop()


def test_a_data_directory_from_before_the_servers_listener_keeps_its_devices_port(tmp_path):
    """One from before the server's own listener and TLS, with devices enrolled (password users): it keeps the
    devices' port and stays plain, so their agent configs still work; it gains the server's listener."""
    broker_dir = tmp_path / "data" / "broker"
    broker_dir.mkdir(parents=True)
    (broker_dir / "listener.json").write_text(json.dumps({"host": "127.0.0.1", "port": 18830}))
    (broker_dir / "users.json").write_text(json.dumps({"pi-1": "$7$old-hash"}))
    broker = MosquittoBroker(tmp_path / "data")
    assert broker.port == 18830 and broker.url == "mqtt://127.0.0.1:18830"  # what agent configs name
    assert not broker.tls and broker.authority is None
    assert broker.server_port not in (0, 18830)
    saved = json.loads((broker_dir / "listener.json").read_text())
    assert saved == {"host": "127.0.0.1", "port": 18830, "server_port": broker.server_port, "tls": False,
                     "public_hosts": []}
    assert MosquittoBroker(tmp_path / "data").server_port == broker.server_port  # chosen once
    (broker_dir / "listener.json").write_text("{not json")
    with pytest.raises(Exception, match=r"listener\.json is not valid"):
        MosquittoBroker(tmp_path / "data")


def test_a_data_directory_from_before_tls_without_devices_gets_tls(tmp_path):
    """Nobody to strand: an old directory with no device enrolled turns TLS on like a new one."""
    broker_dir = tmp_path / "data" / "broker"
    broker_dir.mkdir(parents=True)
    (broker_dir / "listener.json").write_text(json.dumps({"host": "127.0.0.1", "port": 18830}))
    broker = MosquittoBroker(tmp_path / "data")
    assert broker.tls and broker.url == "mqtts://127.0.0.1:18830" and broker.authority is not None
    assert json.loads((broker_dir / "listener.json").read_text())["tls"] is True
