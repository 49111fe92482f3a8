"""The edgeherd/v1 MQTT topic tree.

Every topic of a device lives under ``edgeherd/v1/devices/{device_id}/``, so
one broker ACL line (``pattern readwrite edgeherd/v1/devices/%u/#``) confines
a device, logged in with its id as user name, to its own topics.

:data:`TOPICS` is the single table of topic kinds, direction, QoS and retain
flag; ``docs/protocol.md`` mirrors it and a test keeps the two in step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from protocol.errors import TopicError
from protocol.ids import is_device_id

__all__ = [
    "ARTIFACTS",
    "DEVICES",
    "PREFIX",
    "SHARE_GROUP",
    "TOPICS",
    "Direction",
    "TopicKind",
    "TopicSpec",
    "artifact_topic",
    "device_topic",
    "parse_artifact_topic",
    "parse_device_topic",
    "server_subscriptions",
]

PREFIX = "edgeherd/v1"
DEVICES = f"{PREFIX}/devices"
#: Broadcast chunks of one artifact, for every device downloading it at the same time.
ARTIFACTS = f"{PREFIX}/artifacts"
#: MQTT 5 shared-subscription group that server replicas join.
SHARE_GROUP = "edgeherd"


class Direction(str, Enum):
    DEVICE_TO_SERVER = "device→server"
    SERVER_TO_DEVICE = "server→device"


class TopicKind(str, Enum):
    """Last level of a device topic."""

    STATE = "state"
    HELLO = "hello"
    DESIRED = "desired"
    ARTIFACT_REQUEST = "artifact/req"
    ARTIFACT_CHUNK = "artifact/chunk"
    TELEMETRY = "telemetry"
    STATS = "stats"
    COMMAND = "cmd"
    ACK = "ack"
    ERROR = "error"
    RECEIPT = "receipt"
    LOGS = "logs"


@dataclass(frozen=True)
class TopicSpec:
    kind: TopicKind
    direction: Direction
    qos: int
    retain: bool
    payload: str
    summary: str


TOPICS: dict[TopicKind, TopicSpec] = {
    spec.kind: spec
    for spec in (
        TopicSpec(TopicKind.STATE, Direction.DEVICE_TO_SERVER, 1, True, "DeviceState",
                  "online/offline and what the device runs; also the last will"),
        TopicSpec(TopicKind.HELLO, Direction.DEVICE_TO_SERVER, 1, False, "Hello",
                  "hardware fingerprint and supported protocol versions, once per connection"),
        TopicSpec(TopicKind.DESIRED, Direction.SERVER_TO_DEVICE, 1, True, "DesiredState",
                  "the signed bundle the device should run"),
        TopicSpec(TopicKind.ARTIFACT_REQUEST, Direction.DEVICE_TO_SERVER, 1, False, "ChunkRequest",
                  "ask for a byte range of an artifact"),
        TopicSpec(TopicKind.ARTIFACT_CHUNK, Direction.SERVER_TO_DEVICE, 1, False, "binary chunk frame",
                  "one chunk of an artifact: fixed header + raw bytes"),
        TopicSpec(TopicKind.TELEMETRY, Direction.DEVICE_TO_SERVER, 1, False, "TelemetryWindow",
                  "health of one reporting window: requests, errors, latency, resources"),
        TopicSpec(TopicKind.STATS, Direction.DEVICE_TO_SERVER, 1, False, "FeatureStats",
                  "per-feature bin counts for one window, for drift detection"),
        TopicSpec(TopicKind.COMMAND, Direction.SERVER_TO_DEVICE, 1, False, "Command",
                  "an operator command"),
        TopicSpec(TopicKind.ACK, Direction.DEVICE_TO_SERVER, 1, False, "CommandAck",
                  "the device's answer to a command"),
        TopicSpec(TopicKind.ERROR, Direction.SERVER_TO_DEVICE, 1, False, "ErrorReply",
                  "the server's answer to a request it could not serve"),
        TopicSpec(TopicKind.RECEIPT, Direction.SERVER_TO_DEVICE, 1, False, "Receipt",
                  "telemetry and statistics windows the server has stored"),
        TopicSpec(TopicKind.LOGS, Direction.DEVICE_TO_SERVER, 1, False, "LogBatch",
                  "the agent's recent log lines, answering a send_logs command"),
    )
}


def device_topic(device_id: str, kind: TopicKind) -> str:
    """Topic of ``kind`` for ``device_id``; raises :class:`TopicError` for a bad id."""
    if not is_device_id(device_id):
        raise TopicError(f"{device_id!r} is not a valid device id (a-z, 0-9 and '-', at most 63)")
    return f"{DEVICES}/{device_id}/{kind.value}"


_BY_SUFFIX = {kind.value: kind for kind in TopicKind}


def parse_device_topic(topic: str) -> tuple[str, TopicKind]:
    """Split a device topic into ``(device_id, kind)``.

    Raises :class:`TopicError` for anything outside the v1 device tree.
    """
    head = f"{DEVICES}/"
    if not topic.startswith(head):
        raise TopicError(f"topic {topic!r} is not under {head}")
    device_id, sep, suffix = topic[len(head):].partition("/")
    if not sep or not is_device_id(device_id):
        raise TopicError(f"topic {topic!r} does not name a valid device id")
    kind = _BY_SUFFIX.get(suffix)
    if kind is None:
        raise TopicError(f"topic {topic!r}: unknown kind {suffix!r}")
    return device_id, kind


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def artifact_topic(sha256: str) -> str:
    """The broadcast topic of one artifact's chunks: ``edgeherd/v1/artifacts/{sha256}/chunk``."""
    if not _SHA256_RE.match(sha256):
        raise TopicError(f"{sha256!r} is not a sha256 (64 lowercase hex characters)")
    return f"{ARTIFACTS}/{sha256}/chunk"


def parse_artifact_topic(topic: str) -> str | None:
    """The sha256 named by a broadcast chunk topic, or None for any other topic."""
    head, tail = f"{ARTIFACTS}/", "/chunk"
    if not (topic.startswith(head) and topic.endswith(tail)):
        return None
    sha = topic[len(head):-len(tail)]
    return sha if _SHA256_RE.match(sha) else None


def server_subscriptions(*, shared: bool = True) -> list[tuple[str, int]]:
    """Topic filters (with QoS) the server subscribes to.

    With ``shared`` the filters are MQTT 5 shared subscriptions in group
    :data:`SHARE_GROUP`, so replicas split the device traffic between them.
    """
    out = []
    for spec in TOPICS.values():
        if spec.direction is Direction.DEVICE_TO_SERVER:
            flt = f"{DEVICES}/+/{spec.kind.value}"
            out.append((f"$share/{SHARE_GROUP}/{flt}" if shared else flt, spec.qos))
    return out
