"""The server's one seam to the MQTT broker: every MQTT session the server holds goes through :class:`Bus`.

A :class:`Bus` wraps one paho client logged in as the server user. It connects
(once and waits, for the CLI and the registry's operations, or for the life of
``server run``, reconnecting by itself), publishes (desired states retained,
receipts, errors, artifact chunks), sends a command and waits for the device's
final acknowledgement, and hands incoming messages to handlers. paho's errors
(not connected, its queue full, a socket that cannot be opened) become
:class:`BusError` here, so the rest of the server never sees paho.

Two exchanges with the managed broker stay in server/broker.py, below MQTT sessions: the readiness probe of a
starting Mosquitto (a TCP connect) and ``take_over`` (one raw MQTT 5 CONNECT under a device's client id, to
disconnect a revoked or rotated session).

:func:`new_client` holds the connection settings of every MQTT client this
package makes (MQTT 5, the login, an optional TLS context): the server's and the
fleet simulator's devices' (server/simulate.py).

Errors::

    ServerError (server/errors.py)
    └── BusError: the broker cannot be reached, did not acknowledge in time, or
        the connection is down
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol import (
    AckStatus,
    Command,
    CommandAck,
    DesiredState,
    InvalidMessage,
    LogBatch,
    TopicKind,
    decode,
    device_topic,
    encode,
)
from server.errors import ServerError

__all__ = ["Bus", "BusError", "Handler", "Publication", "answers", "new_client"]

log = logging.getLogger(__name__)

#: What a publish returns: wait for it with :meth:`Bus.confirm`.
Publication = mqtt.MQTTMessageInfo
#: Called with the topic and the payload of each message a subscription brings.
Handler = Callable[[str, bytes], None]
_A = TypeVar("_A", CommandAck, LogBatch)


def answers(model: type[_A], device_id: str, command_id: str, what: str) -> tuple[queue.Queue[_A], Handler]:
    """A queue and the handler that fills it with ``device_id``'s answers to the command ``command_id`` (an
    acknowledgement, a log batch); anything else is ignored, and what does not decode is logged as a dropped
    ``what``."""
    got: queue.Queue[_A] = queue.Queue()

    def on_answer(topic: str, payload: bytes) -> None:
        try:
            answer = decode(model, payload)
        except InvalidMessage as exc:
            log.warning("dropped %s from %s: %s", what, device_id, exc)
            return
        if answer.command_id == command_id and answer.device_id == device_id:
            got.put(answer)

    return got, on_answer
#: Seconds the broker has to answer a connection, a subscription or a QoS 1 publish.
ANSWER_S = 10.0


class BusError(ServerError):
    """The broker cannot be reached or did not answer; the message says which and what to check."""


def new_client(client_id: str, username: str, password: str | None, *,
               tls: ssl.SSLContext | None = None) -> mqtt.Client:
    """A paho MQTT 5 client with its login (and ``tls``, when given) set, not connected yet."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.username_pw_set(username, password)
    if tls is not None:
        client.tls_set_context(tls)
    return client


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


class Bus:
    """One connection to the broker as the server user: publish, subscribe, and command round-trips."""

    def __init__(self, client: mqtt.Client, url: str, on_message: Handler | None = None) -> None:
        self.url = url
        self._client = client
        self._default = on_message
        #: Handlers by exact topic (command acknowledgements); everything else goes to ``on_message``.
        self._handlers: dict[str, Handler] = {}
        self._subacks: dict[int, bool] = {}  # mid -> whether the SUBACK granted every filter
        self._answered = threading.Condition()
        client.on_message = self._dispatch
        client.on_subscribe = self._subscribed

    @classmethod
    def connect(cls, url: str, username: str, password: str, *, client_id: str | None = None,
                timeout: float = ANSWER_S) -> Bus:
        """Connect and wait for the broker's answer; BusError when it cannot be reached within ``timeout``."""
        client = new_client(client_id or f"edgeherd-cli-{uuid.uuid4().hex[:8]}", username, password)
        connected = threading.Event()
        refused: list[str] = []

        def answered(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            if reason.is_failure:
                refused.append(str(reason))
            connected.set()

        client.on_connect = answered
        unreachable = f"cannot reach the broker at {url}; is `edgeherd server run` running?"
        try:
            client.connect(*_address(url), keepalive=10)
        except OSError:
            raise BusError(unreachable) from None
        client.loop_start()
        if not connected.wait(timeout) or refused:
            client.disconnect()
            client.loop_stop()
            raise BusError(f"the broker at {url} refused {username}: {refused[0]}" if refused else unreachable)
        return cls(client, url)

    @classmethod
    def start(cls, url: str, username: str, password: str, *, client_id: str, on_connect: Callable[[Bus], None],
              on_message: Handler) -> Bus:
        """A connection for the life of the process: it reconnects by itself (1 to 5 s apart) and calls
        ``on_connect`` after every accepted (re)connection, where subscriptions are made again; every message
        goes to ``on_message``. OSError when the first connection cannot be opened."""
        client = new_client(client_id, username, password)
        client.reconnect_delay_set(1, 5)
        bus = cls(client, url, on_message)

        def connected(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            if reason.is_failure:
                log.error("broker refused the server: %s", reason)
                return
            on_connect(bus)

        client.on_connect = connected
        client.connect(*_address(url), keepalive=30)
        client.loop_start()
        return bus

    # -- publishing ------------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> Publication:
        """Queue a message for the broker; :meth:`confirm` waits until it has taken it."""
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def publish_desired(self, desired: DesiredState) -> Publication:
        """Queue ``desired`` on its device's desired topic, retained (QoS 1): what the device finds on connecting."""
        return self.publish(device_topic(desired.device_id, TopicKind.DESIRED), encode(desired), qos=1, retain=True)

    @staticmethod
    def confirm(publication: Publication, timeout: float = ANSWER_S) -> bool:
        """Wait up to ``timeout`` s for the broker to take ``publication``; whether it did. BusError when it
        never can: the client is not connected, or paho's queue is full."""
        try:
            publication.wait_for_publish(timeout)
        except (RuntimeError, ValueError) as exc:
            raise BusError(str(exc)) from None
        return publication.is_published()

    # -- subscribing -------------------------------------------------------------------------------

    def subscribe(self, topic: str | list[tuple[str, int]], qos: int = 1, *, wait: float | None = None) -> bool:
        """Subscribe to ``topic`` (or to several ``(filter, qos)`` pairs); with ``wait``, wait that many seconds
        for the broker to confirm, and say whether it did (without, True once asked)."""
        _, mid = self._client.subscribe(topic, qos) if isinstance(topic, str) else self._client.subscribe(topic)
        if wait is None:
            return True
        if mid is None:  # not sent (not connected)
            return False
        with self._answered:
            answered = self._answered.wait_for(lambda: mid in self._subacks, wait)
            granted = self._subacks.pop(mid, False)
        return answered and granted

    def route(self, topic: str, handler: Handler | None) -> None:
        """Send messages on exactly ``topic`` to ``handler`` instead of ``on_message`` (None: stop); subscribing
        is the caller's (:meth:`subscribe`)."""
        if handler is None:
            self._handlers.pop(topic, None)
        else:
            self._handlers[topic] = handler

    def _subscribed(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        """A SUBACK: granted when no reason code in it is a failure (the broker's ACL may refuse a filter)."""
        with self._answered:
            self._subacks[mid] = not any(getattr(r, "is_failure", False) for r in reasons or [])
            self._answered.notify_all()

    def _dispatch(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        handler = self._handlers.get(msg.topic, self._default)
        if handler is not None:
            handler(msg.topic, bytes(msg.payload))

    def request(self, device_id: str, cmd: Command, timeout: float = 30.0) -> CommandAck | None:
        """Send ``cmd`` to the device and wait for its final acknowledgement (done, failed or rejected); None when
        none comes within ``timeout`` seconds. BusError when the broker does not confirm the subscription to the
        device's acknowledgements or take the command."""
        acks, on_ack = answers(CommandAck, device_id, cmd.command_id, "an acknowledgement")
        ack_topic = device_topic(device_id, TopicKind.ACK)
        self._handlers[ack_topic] = on_ack
        try:
            if not self.subscribe(ack_topic, qos=1, wait=ANSWER_S):
                raise BusError(f"the broker did not grant the subscription to {device_id}'s acknowledgements (not "
                               "connected, or its ACL refused it)")
            if not self.confirm(self.publish(device_topic(device_id, TopicKind.COMMAND), encode(cmd), qos=1)):
                raise BusError(f"the broker did not acknowledge the command to {device_id}")
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                try:
                    ack = acks.get(timeout=left)
                except queue.Empty:
                    break
                if ack.status is not AckStatus.ACCEPTED:
                    return ack
            return None
        finally:
            self._handlers.pop(ack_topic, None)
            self._client.unsubscribe(ack_topic)

    # -- paho's own callbacks, for a caller that reads topics itself ---------------------------------

    @property
    def on_message(self) -> Any:
        """paho's message callback, ``(client, userdata, message)``; setting it bypasses the handlers."""
        return self._client.on_message

    @on_message.setter
    def on_message(self, callback: Any) -> None:
        self._client.on_message = callback

    @property
    def on_subscribe(self) -> Any:
        """paho's subscription callback, ``(client, userdata, mid, reason_codes, properties)``."""
        return self._client.on_subscribe

    @on_subscribe.setter
    def on_subscribe(self, callback: Any) -> None:
        self._client.on_subscribe = callback

    # -- the connection ------------------------------------------------------------------------------

    def is_connected(self) -> bool:
        return self._client.is_connected()

    def disconnect(self) -> None:
        """Say goodbye to the broker (the network loop sends it); :meth:`loop_stop` then ends the loop."""
        self._client.disconnect()

    def loop_stop(self) -> None:
        self._client.loop_stop()

    def close(self) -> None:
        """Disconnect and stop the network loop."""
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
