"""Small blocking wrappers around paho-mqtt 2 (MQTT 5) for tests."""

from __future__ import annotations

import queue
import ssl
import threading
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests._mosquitto import Broker, DeviceTls


class ConnectRefused(Exception):
    def __init__(self, reason: ReasonCode) -> None:
        super().__init__(f"connect refused: {reason} ({reason.value})")
        self.reason = reason


class HandshakeRefused(Exception):
    """The broker ended the connection before answering CONNECT: it refused the TLS client."""


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class _Tracked(ssl.SSLContext):
    """Remembers the sockets it wrapped: paho does not close one whose handshake failed."""

    sockets: list[ssl.SSLSocket]

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:  # type: ignore[override]
        sock = super().wrap_socket(*args, **kwargs)
        self.sockets.append(sock)
        return sock


def device_context(creds: DeviceTls) -> ssl.SSLContext:
    """TLS as an agent makes it: only the pinned CA trusted, the host name checked, the device's certificate."""
    ctx = _Tracked(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sockets = []
    ctx.load_verify_locations(cafile=str(creds.ca))
    ctx.load_cert_chain(str(creds.cert), str(creds.key))
    return ctx


class TestClient:
    """A connected MQTT 5 client that records what it receives and PUBACK reason codes."""

    __test__ = False  # not a pytest test class

    def __init__(self, broker: Broker, user: str, password: str | DeviceTls, *,
                 will: tuple[str, bytes] | None = None, timeout: float = 10.0, client_id: str | None = None,
                 port: int | None = None) -> None:
        """``password``: a password (the server user's goes to the server's own listener), or a device's
        certificate (TLS to the devices' listener)."""
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"{user}-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv5)
        self._tls: _Tracked | None = None
        if isinstance(password, DeviceTls):
            self._tls = device_context(password)  # type: ignore[assignment]
            self.client.tls_set_context(self._tls)
        else:
            self.client.username_pw_set(user, password)
        if port is None:
            port = broker.server_port if user == broker.server_user and broker.server_port else broker.port
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.messages: queue.Queue[Received] = queue.Queue()
        self.pubacks: dict[int, ReasonCode] = {}
        self._puback_cv = threading.Condition()
        self._connected = threading.Event()
        self._suback = threading.Event()
        self.connect_reason: ReasonCode | None = None
        #: Connections the broker (or the network) ended that this client did not close itself.
        self.dropped = 0
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        try:
            self.client.connect(broker.host, port, keepalive=10)
        except OSError:
            for sock in self._tls.sockets if self._tls is not None else []:
                sock.close()
            raise
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.close()
            if self.dropped:
                raise HandshakeRefused(f"the broker closed the connection before any CONNACK ({self.dropped} times)")
            raise TimeoutError("no CONNACK from broker")
        if self.connect_reason is None:
            self.close()
            raise HandshakeRefused(f"the broker closed the connection before any CONNACK ({self.dropped} times)")
        if self.connect_reason.is_failure:
            self.close()
            raise ConnectRefused(self.connect_reason)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    props: Properties | None) -> None:
        self.connect_reason = reason
        if reason.is_failure:
            client.disconnect()  # stop paho from retrying a refused login
        self._connected.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       props: Properties | None) -> None:
        if reason.value != 0:  # 0: our own DISCONNECT
            self.dropped += 1
        if self.connect_reason is None and self.dropped >= 2:
            self._connected.set()  # closed twice before a CONNACK: the broker will not have us

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos))

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    props: Properties | None) -> None:
        with self._puback_cv:
            self.pubacks[mid] = reason
            self._puback_cv.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      props: Properties | None) -> None:
        self._suback.set()

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> None:
        self._suback.clear()
        self.client.subscribe(topic, qos=qos)
        if not self._suback.wait(timeout):
            raise TimeoutError(f"no SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                timeout: float = 5.0) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        with self._puback_cv:
            if not self._puback_cv.wait_for(lambda: info.mid in self.pubacks, timeout):
                raise TimeoutError(f"no PUBACK for {topic}")
            return self.pubacks.pop(info.mid)

    def get(self, timeout: float = 5.0) -> Received:
        return self.messages.get(timeout=timeout)

    def drain(self, wait: float) -> list[Received]:
        out = []
        try:
            while True:
                out.append(self.messages.get(timeout=wait))
        except queue.Empty:
            return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        for sock in self._tls.sockets if self._tls is not None else []:
            sock.close()
