"""The agent's MQTT 5 session: connect with a last will, resubscribe, reconnect with jittered backoff.

One network thread owns the paho client's loop. Callbacks only hand messages
to the agent's queue, so nothing slow ever runs on the network thread.

The broker keeps the session for :data:`SESSION_EXPIRY_S` after a connection
ends. The first connection of a process starts a clean session; every
reconnection resumes it, so subscriptions and the QoS 1 messages sent to the
device while it was off (a command, say) survive a dropped connection, such
as the one Mosquitto ends when a credential rotation changes the password.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import AgentConfig
from agent.credentials import Credentials
from protocol import TopicKind, device_topic, will_message

__all__ = ["Session"]

log = logging.getLogger(__name__)

SUBSCRIBED_KINDS = (TopicKind.DESIRED, TopicKind.COMMAND, TopicKind.ARTIFACT_CHUNK, TopicKind.ERROR,
                    TopicKind.RECEIPT)
#: How long the broker keeps the session (subscriptions, queued QoS 1 messages) of a dropped connection.
SESSION_EXPIRY_S = 60
#: CONNACK reason codes that mean "wrong user name or password": try the next candidate password at once.
_BAD_CREDENTIALS = (134, 135)


class Session:
    def __init__(
        self,
        cfg: AgentConfig,
        *,
        on_message: Callable[[str, bytes], None],
        on_connected: Callable[[int], None],
        on_disconnected: Callable[[], None],
        on_puback: Callable[[int, bool], None],
        next_session: Callable[[], int],
        min_backoff: float = 1.0,
        max_backoff: float = 60.0,
        credentials: Credentials | None = None,
    ) -> None:
        self.cfg = cfg
        #: The passwords to log in with (the current one first); re-read before every connection.
        self.credentials = credentials or Credentials(cfg)
        cfg.broker_password()  # an unreadable password file stops the agent here, saying which
        self._candidate = 0
        self._candidates: list[str | None] = []
        self._on_message, self._on_connected = on_message, on_connected
        self._on_disconnected, self._on_puback = on_disconnected, on_puback
        self._next_session = next_session
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.device_id, protocol=mqtt.MQTTv5)
        if cfg.tls:
            ctx = ssl.create_default_context(cafile=str(cfg.tls_ca) if cfg.tls_ca else None)
            if cfg.tls_cert and cfg.tls_key:
                ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key))
            self.client.tls_set_context(ctx)
        self.client.on_connect = self._connect_cb
        self.client.on_disconnect = self._disconnect_cb
        self.client.on_message = self._message_cb
        self.client.on_publish = self._publish_cb
        self.client.on_subscribe = self._subscribe_cb
        self.connected = threading.Event()
        self.session_id = 0
        #: Whether the broker resumed the session on the last connection (MQTT 5 "session present").
        self.session_present = False
        #: Connections the broker accepted, and how many of them resumed the session.
        self.connections = self.resumed = 0
        self._clean_start = True
        self.last_refusal: str | None = None
        #: Topics subscribed on top of the device's own (an artifact's broadcast chunks while downloading it),
        #: renewed on every connection; ``granted`` holds those the broker has accepted on this connection,
        #: with the monotonic time it did.
        self._extra: set[str] = set()
        self.granted: dict[str, float] = {}
        self._pending_subs: dict[int, str] = {}
        #: Extra topics subscribed in the broker's session (kept across resumed connections).
        self._in_session: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._quick = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeherd-mqtt", daemon=True)

    # -- paho callbacks (network thread: hand off, never block) ------------------

    def _connect_cb(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    props: Properties | None) -> None:
        if reason.is_failure:
            self.last_refusal = str(reason)
            if reason.value in _BAD_CREDENTIALS and self._candidate + 1 < len(self._candidates):
                log.warning("broker refused the connection: %s; trying the previous password", reason)
                self._candidate += 1
            else:
                log.warning("broker refused the connection: %s", reason)
                self._candidate = 0
            client.disconnect()
            return
        self.last_refusal = None
        self.session_present = bool(getattr(flags, "session_present", False))
        self._clean_start = False  # from now on, reconnections resume this session
        self.connections += 1
        self.resumed += self.session_present
        self.credentials.accepted(self._candidate)
        client.subscribe([(device_topic(self.cfg.device_id, k), 1) for k in SUBSCRIBED_KINDS])
        with self._lock:
            self.granted.clear()
            self._pending_subs.clear()  # SUBACKs of an earlier connection say nothing about this one
            for topic in self._extra:
                self._subscribe_extra(topic)
            # a resumed session still holds every extra topic subscribed in it: drop those no longer wanted
            # (an UNSUBSCRIBE sent on a dying connection may never have arrived)
            stale = self._in_session - self._extra if self.session_present else set()
            if stale:
                client.unsubscribe(sorted(stale))
            self._in_session = set(self._extra)
            self.connected.set()  # under the lock: listen/unlisten see the connection and the session together
        log.info("connected to %s as %s (session %d%s)", self.cfg.broker_url, self.cfg.device_id, self.session_id,
                 ", resumed" if self.session_present else "")
        self._on_connected(self.session_id)

    def _disconnect_cb(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       props: Properties | None) -> None:
        was = self.connected.is_set()
        self.connected.clear()
        if was:
            log.warning("disconnected from the broker: %s", reason)
            self._on_disconnected()

    def _message_cb(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._on_message(msg.topic, bytes(msg.payload))

    def _subscribe_cb(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode],
                      props: Properties | None) -> None:
        with self._lock:
            topic = self._pending_subs.pop(mid, None)
            if topic is not None and topic in self._extra and reasons and not reasons[0].is_failure:
                self.granted[topic] = time.monotonic()
            elif topic is not None:
                log.info("the broker did not grant a subscription to %s: %s", topic, reasons[0] if reasons else "-")

    def _subscribe_extra(self, topic: str) -> None:
        rc, mid = self.client.subscribe(topic, qos=1)
        if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._pending_subs[mid] = topic

    def _publish_cb(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    props: Properties | None) -> None:
        self._on_puback(mid, not reason.is_failure)

    # -- network thread -------------------------------------------------------------

    def _run(self) -> None:
        delay = self.min_backoff
        while not self._stop.is_set():
            self._candidates = self.credentials.candidates()
            if self._candidate >= len(self._candidates):
                self._candidate = 0
            self.client.username_pw_set(self.cfg.username or self.cfg.device_id, self._candidates[self._candidate])
            self.session_id = self._next_session()
            topic, payload = will_message(self.cfg.device_id, self.session_id)
            self.client.will_set(topic, payload, qos=1, retain=True)
            try:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = SESSION_EXPIRY_S
                self.client.connect(self.cfg.broker_host, self.cfg.broker_port, keepalive=self.cfg.keepalive,
                                    clean_start=self._clean_start, properties=props)
            except (OSError, ssl.SSLError) as exc:
                wait = random.uniform(self.min_backoff / 2, delay)  # noqa: S311 - jitter, not crypto
                log.info("cannot reach %s (%s); retrying in %.1f s", self.cfg.broker_url, exc, wait)
                self._stop.wait(wait)
                delay = min(delay * 2, self.max_backoff)
                continue
            while not self._stop.is_set():
                rc = self.client.loop(timeout=0.5)
                if rc != mqtt.MQTT_ERR_SUCCESS:
                    break
            if self.connected.is_set():  # the loop ended without a disconnect callback
                self.connected.clear()
                self._on_disconnected()
            if self._stop.is_set():
                break
            if self.last_refusal is None:
                delay = self.min_backoff
                if self._quick.is_set():
                    self._quick.clear()
                    continue  # expected (credential rotation): reconnect at once
            elif self._candidate > 0:
                continue  # a previous password is next: try it now
            wait = random.uniform(self.min_backoff / 2, delay)  # noqa: S311
            self._stop.wait(wait)
            delay = min(delay * 2, self.max_backoff)

    def start(self) -> None:
        self._thread.start()

    def reconnect_at_once(self) -> None:
        """The next time the connection ends, reconnect without waiting: the broker is expected to end it (it
        re-checks a connection's password when its password file changes, as Mosquitto does)."""
        self._quick.set()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        """Queue a publish; the message id, or None when not connected."""
        if not self.connected.is_set():
            return None
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return None
        return int(info.mid)

    def listen(self, topic: str) -> None:
        """Also subscribe to ``topic``, now and after every reconnect, until :meth:`unlisten`."""
        with self._lock:
            if topic in self._extra:
                return
            self._extra.add(topic)
            if self.connected.is_set():
                self._subscribe_extra(topic)
                self._in_session.add(topic)

    def wait_granted(self, topic: str, timeout: float) -> bool:
        """Wait until the broker has granted the subscription to ``topic`` (False when it has not in time)."""
        deadline = time.monotonic() + timeout
        while topic not in self.granted:
            if time.monotonic() >= deadline or not self.connected.is_set():
                return False
            time.sleep(0.01)
        return True

    def unlisten(self, topic: str) -> None:
        with self._lock:
            if topic not in self._extra:
                return
            self._extra.discard(topic)
            self.granted.pop(topic, None)
            if self.connected.is_set():
                self.client.unsubscribe(topic)  # if it is lost with the connection, the next resume repeats it

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Publish ``final`` (the graceful offline state), disconnect, stop the thread."""
        if final is not None and self.connected.is_set():
            info = self.client.publish(final[0], final[1], qos=1, retain=True)
            deadline = time.monotonic() + timeout
            while not info.is_published() and time.monotonic() < deadline:
                time.sleep(0.02)
        if self.connected.is_set():
            self.client.disconnect()  # the network thread sends it and sees the disconnect
            deadline = time.monotonic() + timeout
            while self.connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.02)
        self._stop.set()
        self._thread.join(timeout)
