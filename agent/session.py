"""The agent's MQTT 5 session: connect with a last will, resubscribe, reconnect with jittered backoff.

One network thread owns the paho client's loop. Callbacks only hand messages
to the agent's queue, so nothing slow ever runs on the network thread.

The broker keeps the session for :data:`SESSION_EXPIRY_S` after a connection
ends. The first connection of a process starts a clean session; every
reconnection resumes it, so subscriptions and the QoS 1 messages sent to the
device while it was off (a command, say) survive a dropped connection, such
as the one Mosquitto ends when a credential rotation changes the password.

Over TLS (``mqtts://``) the context is built from the certificate files
before every connection attempt (:class:`agent.credentials.Certificates`), so
a rotation takes effect on the next connection, and the previous files are
tried when the current ones fail. Why the agent is not on the broker is kept
in :attr:`Session.broker_error` (the local API's ``/v1/health`` shows it) and
logged; a failed TLS handshake is explained (:func:`explain_handshake`,
:func:`explain_refusal`): the broker's certificate is not from the pinned CA,
does not name the host in ``broker_url``, or the broker refused this
device's certificate. With TLS 1.3 a broker that refuses a client
certificate often just closes the connection once the handshake is done,
before answering CONNECT; the agent then asks the broker once more in a TLS
1.2 handshake, where the broker checks the certificate inside the handshake
and names its objection in an alert (revoked, unknown CA, expired).
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
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
from agent.credentials import Certificates, Credentials, TlsFiles
from agent.errors import ConfigError
from protocol import TopicKind, device_topic, will_message

__all__ = ["Session", "ask_broker_why", "explain_handshake", "explain_refusal"]

log = logging.getLogger(__name__)

SUBSCRIBED_KINDS = (TopicKind.DESIRED, TopicKind.COMMAND, TopicKind.ARTIFACT_CHUNK, TopicKind.ERROR,
                    TopicKind.RECEIPT)
#: How long the broker keeps the session (subscriptions, queued QoS 1 messages) of a dropped connection.
SESSION_EXPIRY_S = 60
#: CONNACK reason codes that mean "wrong user name or password": try the next candidate password at once.
_BAD_CREDENTIALS = (134, 135)
#: How long the TLS 1.2 handshake that asks a broker why it refused the certificate may take.
PROBE_TIMEOUT_S = 5.0

#: OpenSSL verify codes (``SSLCertVerificationError.verify_code``) meaning "not signed by a CA we trust".
_UNTRUSTED = {2, 7, 18, 19, 20, 21, 30}
#: ... "the certificate does not name the host we connected to" (a DNS name, an IP address).
_WRONG_HOST = {62, 64}
#: ... "not valid at this time".
_NOT_NOW = {9, 10}
#: TLS alerts with which a broker refuses a client certificate, and what each means for the device.
_REFUSALS = {
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it is revoked (`edgeherd device revoke`, or replaced by a credential "
                                       "rotation): a revoked device must be enrolled again",
    "TLSV1_ALERT_UNKNOWN_CA": "it is not signed by a CA the broker trusts (it comes from another server, or the "
                              "server's CA rotation finished without this device): enrol the device again",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it has expired (or the broker's clock is wrong): enrol the device again",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "",
    "SSLV3_ALERT_BAD_CERTIFICATE": "",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "",
    "TLSV1_ALERT_ACCESS_DENIED": "",
}


def explain_handshake(exc: OSError, cfg: AgentConfig, files: TlsFiles) -> str:
    """Why a TLS handshake with the broker failed, as a person can act on it (``exc`` is what it raised)."""
    where = f"{cfg.broker_host}:{cfg.broker_port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, detail = exc.verify_code, exc.verify_message
        if code in _WRONG_HOST:
            return (f"the broker's certificate does not name {cfg.broker_host}, the host in broker_url ({detail}): "
                    "set broker_url to a name the certificate has, or have the server's certificate name this one "
                    f"(`edgeherd server run --public-host {cfg.broker_host}`)")
        if code in _UNTRUSTED:
            pinned = (f"the CA pinned in tls_ca ({files.ca})" if files.ca is not None
                      else "a CA this system trusts (no tls_ca is set)")
            return (f"the broker's certificate is not signed by {pinned} ({detail}): {where} is not the broker this "
                    "device was enrolled with, or the server's CA changed; the server's pki/ca-bundle.pem is the "
                    "bundle to pin")
        if code in _NOT_NOW:
            return (f"the broker's certificate is not valid at this device's time ({detail}): check the device's "
                    "clock (date -u) and the certificate's dates")
        return f"the broker's certificate was refused: {detail}"
    reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else None
    if reason in _REFUSALS:
        return explain_refusal(reason, files)
    if isinstance(exc, (ssl.SSLEOFError, ConnectionResetError)) or reason == "WRONG_VERSION_NUMBER":
        return (f"{where} ended the TLS handshake without a word ({exc}): is it the broker's TLS listener? A plain "
                "MQTT listener (use mqtt:// for it) does this")
    return f"the TLS handshake with {where} failed: {exc}"


def explain_refusal(reason: str | None, files: TlsFiles) -> str:
    """Why the broker refused this device's TLS client: ``reason`` is its alert (an OpenSSL reason such as
    ``SSLV3_ALERT_CERTIFICATE_REVOKED``), None when it closed the connection without one."""
    if files.cert is None:
        return ("the broker requires a client certificate and this device has none: set tls_cert and tls_key "
                "(its enrolment writes them), or use the broker's password listener")
    which = f"this device's {'previous ' if files.previous else ''}certificate ({files.cert})"
    if reason is None:
        return (f"the broker closed the connection right after the TLS handshake, before answering: it refused "
                f"{which}; it is revoked, expired or not from a CA the broker trusts (the broker's log says which)")
    meaning = _REFUSALS.get(reason) or f"the broker answered {reason.lower().replace('_', ' ')}"
    return f"the broker refused {which}: {meaning}"


def ask_broker_why(ctx: ssl.SSLContext, host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Handshake with the broker in TLS 1.2 (``ctx`` limited to it), where the broker checks the client certificate
    within the handshake and names its objection in an alert: the alert's reason (one of those that refuse a
    certificate); "" when the handshake succeeds (the broker takes the certificate); None when the broker does not
    say (it has no TLS 1.2, or cannot be reached)."""
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=host):
            return ""
    except ssl.SSLError as exc:
        return exc.reason if exc.reason in _REFUSALS else None
    except OSError:
        return None


class _TlsSocket(ssl.SSLSocket):
    """Keeps the error that ended the connection: paho only logs it, and a TLS alert says why the broker
    refused this device."""

    failure: OSError | None = None

    def _keep(self, exc: OSError) -> None:
        if not isinstance(exc, (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError)):
            self.failure = exc

    def recv(self, buflen: int = 1024, flags: int = 0) -> bytes:
        try:
            return super().recv(buflen, flags)
        except OSError as exc:
            self._keep(exc)
            raise

    def send(self, data: Any, flags: int = 0) -> int:
        try:
            return super().send(data, flags)
        except OSError as exc:
            self._keep(exc)
            raise


class _TlsContext(ssl.SSLContext):
    """The context paho holds for the client's life. Each connection's socket comes from :attr:`inner`, the
    context built from the certificate files for that attempt (a rotation changes them), and is kept in
    :attr:`socket`."""

    inner: ssl.SSLContext | None = None
    socket: _TlsSocket | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if self.inner is None:
            raise ssl.SSLError("no TLS context was built for this connection")
        self.inner.sslsocket_class = _TlsSocket
        wrapped = self.inner.wrap_socket(sock, *args, **kwargs)
        self.socket = wrapped if isinstance(wrapped, _TlsSocket) else None
        return wrapped


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
        #: The TLS files to connect with (the current ones first); re-read before every connection.
        self.certificates = Certificates(cfg)
        self._tls_index = 0
        self._tls_candidates: list[TlsFiles] = []
        #: The files of the connection being made (None: plain MQTT).
        self._tls_files: TlsFiles | None = None
        #: Why the agent is not on the broker: the last attempt's failure or what ended the last connection;
        #: None while connected (and before the first attempt).
        self.broker_error: str | None = None
        #: Whether the broker answered CONNECT on the connection being made.
        self._answered = False
        self._on_message, self._on_connected = on_message, on_connected
        self._on_disconnected, self._on_puback = on_disconnected, on_puback
        self._next_session = next_session
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.device_id, protocol=mqtt.MQTTv5)
        self._tls = _TlsContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname: paho leaves the host name check on
        if cfg.tls:
            self._check_tls_files()
            self.client.tls_set_context(self._tls)
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
        #: Notified when ``granted`` gains a topic or the connection ends (wait_granted waits on it).
        self._granted_changed = threading.Condition()
        self._stop = threading.Event()
        self._quick = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgeherd-mqtt", daemon=True)
        # paho writes a publish straight to the socket from the calling thread unless it believes its own network
        # thread runs (loop_start). Ours does, in _run: tell paho so, and every write happens on that thread. Two
        # threads writing one TLS socket (a worker publishing while the network thread handles a disconnect)
        # corrupt OpenSSL's state and abort the process.
        self.client._thread = self._thread

    # -- paho callbacks (network thread: hand off, never block) ------------------

    def _connect_cb(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    props: Properties | None) -> None:
        self._answered = True
        if reason.is_failure:
            self.last_refusal = str(reason)
            self.broker_error = f"the broker refused the connection: {reason}"
            if reason.value in _BAD_CREDENTIALS and self._candidate + 1 < len(self._candidates):
                log.warning("broker refused the connection: %s; trying the previous password", reason)
                self._candidate += 1
            else:
                log.warning("broker refused the connection: %s", reason)
                self._candidate = 0
            client.disconnect()
            return
        self.last_refusal = self.broker_error = None
        self.session_present = bool(getattr(flags, "session_present", False))
        self._clean_start = False  # from now on, reconnections resume this session
        self.connections += 1
        self.resumed += self.session_present
        self.credentials.accepted(self._candidate)
        if self._tls_files is not None:
            self.certificates.accepted(self._tls_files)
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
        with self._granted_changed:
            self._granted_changed.notify_all()
        if was:
            self.broker_error = f"the connection to the broker ended: {reason}"
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
        with self._granted_changed:
            self._granted_changed.notify_all()

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
            if self.cfg.tls and not self._use_tls_files():
                delay = self._pause(delay)  # no files of any candidate can be used: logged, retried later
                continue
            self.session_id = self._next_session()
            topic, payload = will_message(self.cfg.device_id, self.session_id)
            self.client.will_set(topic, payload, qos=1, retain=True)
            self._answered = False
            self._tls.socket = None
            try:
                props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                props.SessionExpiryInterval = SESSION_EXPIRY_S
                self.client.connect(self.cfg.broker_host, self.cfg.broker_port, keepalive=self.cfg.keepalive,
                                    clean_start=self._clean_start, properties=props)
            except OSError as exc:  # ssl.SSLError included
                if self._tls.socket is not None:  # a failed handshake leaves paho without a socket to close
                    self._tls.socket.close()
                files = self._tls_files
                if files is not None and isinstance(exc, (ssl.SSLError, ConnectionResetError)):
                    self._failed(logging.WARNING, explain_handshake(exc, self.cfg, files))
                    if self._next_tls_files():
                        continue  # the previous certificate is next: try it now
                else:
                    self._failed(logging.INFO, f"cannot reach {self.cfg.broker_url} ({exc})")
                delay = self._pause(delay)
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
            if not self._answered:  # the broker ended the connection before answering CONNECT
                problem, refused = self._unanswered()
                self._failed(logging.WARNING, problem)
                if refused and self._next_tls_files():
                    continue
                delay = self._pause(delay)
                continue
            if self.last_refusal is None:
                delay = self.min_backoff
                if self._quick.is_set():
                    self._quick.clear()
                    continue  # expected (credential rotation): reconnect at once
            elif self._candidate > 0:
                continue  # a previous password is next: try it now
            delay = self._pause(delay)

    def _pause(self, delay: float) -> float:
        """Wait a jittered ``delay`` (or until stopped); the next delay."""
        wait = random.uniform(self.min_backoff / 2, delay)  # noqa: S311 - jitter, not crypto
        log.info("retrying in %.1f s", wait)
        self._stop.wait(wait)
        return min(delay * 2, self.max_backoff)

    def _failed(self, level: int, problem: str) -> None:
        self.broker_error = problem
        log.log(level, "not on the broker: %s", problem)

    # -- TLS files ----------------------------------------------------------------------

    def _check_tls_files(self) -> None:
        """At start: ConfigError (naming the file) when no candidate's files can be used."""
        problems = []
        for files in self.certificates.candidates():
            try:
                self.certificates.context(files)
                return
            except ConfigError as exc:
                problems.append(str(exc))
        raise ConfigError("; ".join(problems))

    def _use_tls_files(self) -> bool:
        """Build the context of this attempt from the candidate files (the current ones, or the previous ones after
        the current ones failed); False when none can be used."""
        self._tls_candidates = self.certificates.candidates()
        if self._tls_index >= len(self._tls_candidates):
            self._tls_index = 0
        while True:
            files = self._tls_candidates[self._tls_index]
            try:
                self._tls.inner = self.certificates.context(files)
            except ConfigError as exc:
                self._failed(logging.ERROR, str(exc))
                if self._next_tls_files():
                    continue
                self._tls_files = None
                return False
            self._tls_files = files
            return True

    def _next_tls_files(self) -> bool:
        """After the files of this attempt failed: move on to the next candidate; True when there is one."""
        if self._tls_index + 1 < len(self._tls_candidates):
            self._tls_index += 1
            log.warning("trying the previous certificate (%s) next", self._tls_candidates[self._tls_index].cert)
            return True
        self._tls_index = 0
        return False

    def _unanswered(self) -> tuple[str, bool]:
        """Why the broker ended a connection before answering CONNECT, and whether it refused this device's TLS
        client certificate (so the next candidate's files are worth a try)."""
        files = self._tls_files
        if files is None:
            return "the broker closed the connection before answering CONNECT; its log says why", False
        sock = self._tls.socket
        failure = sock.failure if sock is not None else None
        reason = failure.reason if isinstance(failure, ssl.SSLError) else None
        if reason not in _REFUSALS:
            reason = self._ask_why(files)
            if reason == "":
                return ("the broker closed the connection before answering CONNECT, though it takes this device's "
                        "certificate; its log says why"), False
        return explain_refusal(reason, files), True

    def _ask_why(self, files: TlsFiles) -> str | None:
        try:
            ctx = self.certificates.context(files)
        except ConfigError:
            return None
        return ask_broker_why(ctx, self.cfg.broker_host, self.cfg.broker_port)

    def start(self) -> None:
        self._thread.start()

    def reconnect_at_once(self) -> None:
        """The next time the connection ends, reconnect without waiting, with the current credentials (those a
        rotation has just stored): the broker is expected to end it (it re-checks a connection's password when its
        password file changes, as Mosquitto does; the server ends it after revoking the old certificate)."""
        self._candidate = self._tls_index = 0
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
        with self._granted_changed:  # notified after each SUBACK and when the connection ends
            while topic not in self.granted:
                left = deadline - time.monotonic()
                if left <= 0 or not self.connected.is_set():
                    return False
                self._granted_changed.wait(left)
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
            with contextlib.suppress(RuntimeError, ValueError):  # not queued: nothing to wait for
                info.wait_for_publish(timeout)
        if self.connected.is_set():
            self.client.disconnect()  # the network thread sends it and sees the disconnect
            deadline = time.monotonic() + timeout
            while self.connected.is_set() and time.monotonic() < deadline:
                time.sleep(0.02)
        self._stop.set()
        self._thread.join(timeout)
