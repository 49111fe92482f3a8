"""On a real Mosquitto with the generated config, ACL and TLS files: devices
(each with its own certificate) are confined to their own topics, cannot take
another device's session over, and a killed device is marked offline by its
retained last will. On a plain listener with passwords (a broker the user
brings may be one), bad passwords are refused."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import DeviceState, TopicKind, decode, device_topic, encode
from tests._mosquitto import running_broker
from tests.mqtt_helpers import ConnectRefused, TestClient
from tests.samples import all_messages

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 135
BAD_CREDENTIALS = {134, 135}  # MQTT 5: bad user name or password / not authorized
ROOT = Path(__file__).resolve().parents[1]


def test_device_cannot_publish_into_another_devices_topics(mosquitto):
    pw_a, pw_b = mosquitto.add_device("dev-a"), mosquitto.add_device("dev-b")
    a = TestClient(mosquitto, "dev-a", pw_a)
    b = TestClient(mosquitto, "dev-b", pw_b)
    server = TestClient(mosquitto, mosquitto.server_user, mosquitto.server_password)
    try:
        b.subscribe("edgeherd/v1/devices/dev-b/#")
        payload = encode(next(m for m in all_messages() if isinstance(m, DeviceState)))
        for kind in (TopicKind.STATE, TopicKind.DESIRED, TopicKind.COMMAND, TopicKind.ARTIFACT_CHUNK):
            reason = a.publish(device_topic("dev-b", kind), payload)
            assert reason.value == NOT_AUTHORIZED, f"{kind.value}: {reason}"
        # the same client may publish on its own topics
        assert not a.publish(device_topic("dev-a", TopicKind.TELEMETRY), payload).is_failure
        # B's subscription is live: a message from the server arrives, A's never do
        assert server.publish(device_topic("dev-b", TopicKind.COMMAND), b"marker").is_failure is False
        got = b.drain(wait=1.0)
        assert [(m.topic, m.payload) for m in got] == [("edgeherd/v1/devices/dev-b/cmd", b"marker")]
    finally:
        for c in (a, b, server):
            c.close()


def test_device_cannot_subscribe_to_another_devices_topics(mosquitto):
    pw_a = mosquitto.add_device("dev-a")
    a = TestClient(mosquitto, "dev-a", pw_a)
    server = TestClient(mosquitto, mosquitto.server_user, mosquitto.server_password)
    try:
        a.subscribe("edgeherd/v1/devices/dev-b/#")
        a.subscribe("edgeherd/v1/#")
        assert server.publish(device_topic("dev-b", TopicKind.DESIRED), b"secret", retain=True).is_failure is False
        assert server.publish(device_topic("dev-a", TopicKind.DESIRED), b"mine").is_failure is False
        assert [(m.topic, m.payload) for m in a.drain(wait=1.0)] == [("edgeherd/v1/devices/dev-a/desired", b"mine")]
    finally:
        a.close()
        server.close()


def test_a_device_cannot_take_over_another_devices_session(mosquitto):
    """Logged in as dev-a with dev-b's client id: the broker gives dev-a its own id, and dev-b keeps its
    connection, its session and its subscription."""
    pw_a, pw_b = mosquitto.add_device("dev-a"), mosquitto.add_device("dev-b")
    b = TestClient(mosquitto, "dev-b", pw_b, client_id="dev-b")
    server = TestClient(mosquitto, mosquitto.server_user, mosquitto.server_password)
    try:
        b.subscribe("edgeherd/v1/devices/dev-b/#")
        a = TestClient(mosquitto, "dev-a", pw_a, client_id="dev-b")
        try:  # connected, as itself: its own topics are still its only ones
            assert not a.publish(device_topic("dev-a", TopicKind.TELEMETRY), b"{}").is_failure
            assert a.publish(device_topic("dev-b", TopicKind.TELEMETRY), b"{}").value == NOT_AUTHORIZED
        finally:
            a.close()
        assert server.publish(device_topic("dev-b", TopicKind.COMMAND), b"marker").is_failure is False
        got = b.drain(wait=1.0)
        assert [(m.topic, m.payload) for m in got] == [("edgeherd/v1/devices/dev-b/cmd", b"marker")]
        assert b.dropped == 0 and b.client.is_connected()
        assert "Client dev-b already connected" not in mosquitto.log()
    finally:
        b.close()
        server.close()


@pytest.fixture
def plain_mosquitto():
    with running_broker(tls=False) as broker:
        yield broker


def test_wrong_password_and_unknown_user_are_refused(plain_mosquitto):
    mosquitto = plain_mosquitto
    mosquitto.add_user("dev-a")
    with pytest.raises(ConnectRefused) as err:
        TestClient(mosquitto, "dev-a", "not-the-password")
    assert err.value.reason.value in BAD_CREDENTIALS
    with pytest.raises(ConnectRefused) as err:
        TestClient(mosquitto, "dev-nobody", "whatever")
    assert err.value.reason.value in BAD_CREDENTIALS


def test_removed_user_cannot_log_in_after_reload(plain_mosquitto):
    mosquitto = plain_mosquitto
    pw = mosquitto.add_user("dev-a")
    TestClient(mosquitto, "dev-a", pw).close()
    mosquitto.remove_user("dev-a")
    with pytest.raises(ConnectRefused):
        TestClient(mosquitto, "dev-a", pw)


def test_last_will_marks_a_killed_device_offline(mosquitto):
    creds = mosquitto.add_device("dev-a")
    pw = f"tls:{creds.cert},{creds.key},{creds.ca}"
    server = TestClient(mosquitto, mosquitto.server_user, mosquitto.server_password)
    server.subscribe(device_topic("dev-a", TopicKind.STATE))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests._device_process", mosquitto.host, str(mosquitto.port), "dev-a", pw, "41"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "READY", proc.stderr.read() if proc.stderr else line
        online = decode(DeviceState, server.get(timeout=5).payload)
        assert (online.status, online.session) == ("online", 41)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=5)
        msg = server.get(timeout=10)
        offline = decode(DeviceState, msg.payload)
        assert (offline.device_id, offline.status, offline.reason, offline.session) == ("dev-a", "offline", "lost", 41)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
        server.close()
    # retained: a client that connects later still learns the device is offline
    late = TestClient(mosquitto, mosquitto.server_user, mosquitto.server_password)
    try:
        late.subscribe(device_topic("dev-a", TopicKind.STATE))
        msg = late.get(timeout=5)
        assert msg.retain
        assert decode(DeviceState, msg.payload).status == "offline"
    finally:
        late.close()
