"""Playing the server for agent tests: desired state, chunk answers (with faults), and a record of reports."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import AgentConfig
from protocol import (
    ChunkRequest,
    DesiredState,
    DeviceState,
    ErrorReply,
    FeatureStats,
    InvalidMessage,
    Receipt,
    SignedManifest,
    TelemetryWindow,
    TopicKind,
    decode,
    device_topic,
    encode,
    parse_device_topic,
    public_key_to_text,
)
from server.distribution import DirectoryStore, answer
from tests._mosquitto import Broker, DeviceTls
from tests._mosquitto import free_port as _free_port

ROOT = Path(__file__).resolve().parents[1]
#: frame index (per request) and frame bytes -> bytes to send, or None to drop it
Mangle = Callable[[int, bytes], bytes | None]


@dataclass
class Seen:
    states: list[DeviceState] = field(default_factory=list)
    telemetry: list[TelemetryWindow] = field(default_factory=list)
    stats: list[FeatureStats] = field(default_factory=list)
    requests: list[ChunkRequest] = field(default_factory=list)
    hellos: int = 0
    acks: list[Any] = field(default_factory=list)


class FakeServer:
    """Connects as the server user; answers chunk requests from a bundle's artifacts directory."""

    def __init__(self, broker: Broker, artifacts: Path, *, persistent: bool = False) -> None:
        self.broker = broker
        self.store = DirectoryStore(artifacts)
        self.seen = Seen()
        self.mangle: Mangle | None = None
        #: Answer telemetry and statistics with receipts, as the server does.
        self.confirming = True
        self.serving = threading.Event()
        self.serving.set()
        self._cv = threading.Condition()
        self._work: queue.Queue[tuple[str, ChunkRequest] | None] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"fake-server-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(broker.server_user, broker.server_password)
        self.client.reconnect_delay_set(0.1, 1.0)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._connected = threading.Event()
        props = None
        if persistent:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.client.connect(broker.host, broker.server_port, keepalive=10, clean_start=not persistent, properties=props)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("fake server could not connect")
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe([("edgeherd/v1/devices/+/" + k.value, 1) for k in (
            TopicKind.STATE, TopicKind.HELLO, TopicKind.ARTIFACT_REQUEST, TopicKind.TELEMETRY, TopicKind.STATS,
            TopicKind.ACK)])
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            device, kind = parse_device_topic(msg.topic)
            payload = bytes(msg.payload)
            with self._cv:
                if kind is TopicKind.STATE:
                    self.seen.states.append(decode(DeviceState, payload))
                elif kind is TopicKind.TELEMETRY:
                    window = decode(TelemetryWindow, payload)
                    self.seen.telemetry.append(window)
                    self._confirm(device, telemetry=[(window.session, window.window_seq)])
                elif kind is TopicKind.STATS:
                    stats = decode(FeatureStats, payload)
                    self.seen.stats.append(stats)
                    self._confirm(device, stats=[(stats.session, stats.window_seq)])
                elif kind is TopicKind.HELLO:
                    self.seen.hellos += 1
                elif kind is TopicKind.ACK:
                    self.seen.acks.append(payload)
                elif kind is TopicKind.ARTIFACT_REQUEST:
                    req = decode(ChunkRequest, payload)
                    self.seen.requests.append(req)
                    self._work.put((device, req))
                self._cv.notify_all()
        except InvalidMessage as exc:  # the test fails on what it waits for; keep a trace
            print(f"fake server: invalid message on {msg.topic}: {exc}", file=sys.stderr)

    def _confirm(self, device: str, **windows: list[tuple[int, int]]) -> None:
        """Send the receipt the real server sends once a window is stored (unless ``confirming`` is off)."""
        if self.confirming:
            self.client.publish(device_topic(device, TopicKind.RECEIPT),
                                encode(Receipt(device_id=device, **windows)), qos=1)

    def _serve(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            device, req = item
            if not self.serving.is_set():
                continue
            for i, frame in enumerate(answer(req, self.store)):
                if isinstance(frame, ErrorReply):
                    self.client.publish(device_topic(device, TopicKind.ERROR), encode(frame), qos=1)
                    break
                out = self.mangle(i, frame) if self.mangle else frame
                if out is not None:
                    self.client.publish(device_topic(device, TopicKind.ARTIFACT_CHUNK), out, qos=1)

    def desire(self, device_id: str, generation: int, signed: SignedManifest | None, artifact: str | None) -> None:
        msg = DesiredState(device_id=device_id, generation=generation, issued_at=datetime.now(timezone.utc),
                           bundle=signed, artifact=artifact)
        self.client.publish(device_topic(device_id, TopicKind.DESIRED), encode(msg), qos=1, retain=True
                            ).wait_for_publish(5)

    def wait(self, predicate: Callable[[Seen], Any], timeout: float = 60.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                result = predicate(self.seen)
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    last = self.seen.states[-1] if self.seen.states else None
                    raise TimeoutError(f"timed out waiting for {what}; last state: {last}")
                self._cv.wait(min(left, 0.5))

    def wait_running(self, artifact: str, timeout: float = 60.0) -> DeviceState:
        return self.wait(lambda s: next((st for st in reversed(s.states) if st.running is not None
                                         and st.running.artifact == artifact and st.install is not None
                                         and st.install.step.value == "done"), None), timeout,
                         f"running {artifact}")

    def wait_install(self, step: str, timeout: float = 60.0) -> DeviceState:
        return self.wait(lambda s: next((st for st in reversed(s.states) if st.install is not None
                                         and st.install.step.value == step), None), timeout, f"install {step}")

    def close(self) -> None:
        self._work.put(None)
        self.client.loop_stop()
        self.client.disconnect()


def agent_config(broker: Broker, data_dir: Path, device_id: str, password: str | DeviceTls, server_pub: Any,
                 **extra: Any) -> AgentConfig:
    """``password``: the device's certificate (``broker.add_device``) or, on a plain broker, its password."""
    login: dict[str, Any] = ({"tls_cert": password.cert, "tls_key": password.key, "tls_ca": password.ca}
                             if isinstance(password, DeviceTls) else {"password": password})
    # small chunks, so the test artifacts (a few hundred KiB) take many frames and resumes mean something
    return AgentConfig(device_id=device_id, broker_url=broker.url, **login,
                       server_key=public_key_to_text(server_pub), data_dir=data_dir,
                       api_port=extra.pop("api_port", _free_port()), chunk_kib=extra.pop("chunk_kib", 16), **extra)


def write_agent_toml(path: Path, cfg: AgentConfig) -> Path:
    lines = []
    for key, value in cfg.model_dump(exclude_none=True).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f'{key} = "{value}"')
    path.write_text("\n".join(lines) + "\n")
    return path


class AgentProcess:
    """``edgeherd-agent run`` as a real process; with ``kill_at`` ("STEP" or "STEP@ARTIFACT"), run as
    tests/agent_launcher.py does, which SIGKILLs it on entry to that install step."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None, kill_at: str | None = None
                 ) -> None:
        self.log = log
        if kill_at is None:
            argv = [str(Path(sys.executable).parent / "edgeherd-agent"), "run", "--config", str(config)]
        else:
            argv = [sys.executable, "-m", "tests.agent_launcher", "--kill-at", kill_at, "--config", str(config)]
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=fh, stderr=fh, env={**os.environ, **(env or {})})

    def wait_killed(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
