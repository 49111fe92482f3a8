"""Every JSON message on the edgeherd/v1 topics.

All messages carry ``"v": 1`` (the payload schema version). Models are
strict: unknown fields, wrong types, strings where numbers belong, lists over
their cap and identifiers outside their pattern are rejected. Decode untrusted
payloads with :func:`decode` (or :func:`decode_for_topic`), which raises only
:class:`~protocol.errors.InvalidMessage`.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, ClassVar, Literal

from pydantic import AwareDatetime, Field, StringConstraints, model_validator

from protocol._model import M, WireModel, decode_model, encode_model
from protocol.agent_release import AgentUpdate, SignedAgentRelease
from protocol.errors import InvalidMessage, PayloadTooLarge, UnsupportedVersion
from protocol.ids import DeviceId, Name, RequestId, Sha256Hex, Version
from protocol.keyset import SignedKeySet
from protocol.manifest import MAX_BINS, MAX_FEATURES
from protocol.signing import SignedManifest
from protocol.topics import TopicKind, device_topic

__all__ = [
    "FINAL_SEQ",
    "MAX_RECEIPT_WINDOWS",
    "MAX_REQUEST_BYTES",
    "PROTOCOL_VERSION",
    "AckStatus",
    "ChunkRequest",
    "Command",
    "CommandAck",
    "CommandKind",
    "DesiredState",
    "DeviceState",
    "ErrorCode",
    "ErrorReply",
    "FeatureStats",
    "FeatureWindow",
    "Fingerprint",
    "GpuInfo",
    "Hello",
    "InstallStatus",
    "InstallStep",
    "LatencySummary",
    "Message",
    "Receipt",
    "RunningBundle",
    "TelemetryWindow",
    "decode",
    "decode_for_topic",
    "encode",
    "error_reply_for",
    "will_message",
]

PROTOCOL_VERSION = 1
#: ``seq`` of a session's last state message (graceful offline or last will).
FINAL_SEQ = 2**31 - 1
#: Largest byte range one :class:`ChunkRequest` may ask for.
MAX_REQUEST_BYTES = 1024 * 1024

Count = Annotated[int, Field(ge=0, le=2**53)]
Seq = Annotated[int, Field(ge=0, le=FINAL_SEQ)]
#: Increases on every connection of the agent (e.g. connect time in ms).
Session = Annotated[int, Field(ge=0, le=2**53)]
ShortText = Annotated[str, StringConstraints(max_length=256)]
Reason = Annotated[str, StringConstraints(max_length=1000)]
Counts = Annotated[list[Count], Field(max_length=MAX_BINS)]


class _Msg(WireModel):
    v: Literal[1] = 1


# --- device state -------------------------------------------------------------


class InstallStep(str, Enum):
    """Steps of the agent's install state machine, in order."""

    PREFLIGHT = "preflight"
    DOWNLOAD = "download"
    VERIFY = "verify"
    INSTALL = "install"
    LOAD = "load"
    SMOKE_TEST = "smoke_test"
    SWITCH = "switch"
    DONE = "done"
    FAILED = "failed"
    REVERTED = "reverted"


class RunningBundle(WireModel):
    model: Name
    version: Version
    manifest_sha256: Sha256Hex
    artifact: Name
    slot: Literal["a", "b"]


class InstallStatus(WireModel):
    model: Name
    version: Version
    manifest_sha256: Sha256Hex
    step: InstallStep
    #: Bytes downloaded so far and in total, while downloading.
    progress: Count | None = None
    total: Count | None = None
    #: Why the install failed or was reverted; names the failed step.
    error: Reason | None = None


class DeviceState(_Msg):
    """Retained on ``…/state``. Ordered per device by ``(session, seq)``."""

    KIND: ClassVar[str] = "device state"

    device_id: DeviceId
    status: Literal["online", "offline"]
    #: Increases on every connection of the agent (e.g. connect time in ms).
    session: Session
    #: Increases with every state message within a session; FINAL_SEQ for the last.
    seq: Seq
    ts: AwareDatetime | None = None
    reason: Literal["connected", "update", "shutdown", "lost"] | None = None
    agent_version: Version | None = None
    running: RunningBundle | None = None
    install: InstallStatus | None = None
    #: Serial of the newest key-set statement the agent holds (0: none, only its provisioned key).
    keyset_serial: Annotated[int, Field(ge=0, le=2**53)] | None = None
    #: The agent release the device was last asked to run and how that went (docs/agent.md).
    agent_update: AgentUpdate | None = None


def will_message(device_id: str, session: int) -> tuple[str, bytes]:
    """Topic and payload of the last will the agent registers at connect."""
    state = DeviceState(device_id=device_id, status="offline", session=session, seq=FINAL_SEQ, reason="lost")
    return device_topic(device_id, TopicKind.STATE), encode(state)


# --- hello --------------------------------------------------------------------


class GpuInfo(WireModel):
    name: ShortText
    compute_capability: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,2}\.[0-9]{1,2}$")] | None = None
    memory_bytes: Count | None = None
    cuda: Version | None = None
    tensorrt: Version | None = None


class Fingerprint(WireModel):
    arch: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_]{1,32}$")]
    os: ShortText
    python: Version
    cpu_model: ShortText | None = None
    cpu_count: Annotated[int, Field(ge=1, le=4096)]
    memory_bytes: Count
    disk_free_bytes: Count
    #: ``/proc/device-tree/model`` where there is one, e.g. "Raspberry Pi 5 Model B Rev 1.0".
    board: ShortText | None = None
    #: Inference runtimes importable on the device and their versions.
    runtimes: dict[Name, Version] = Field(default_factory=dict, max_length=16)
    gpu: GpuInfo | None = None


class Hello(_Msg):
    KIND: ClassVar[str] = "hello"

    device_id: DeviceId
    session: Session
    agent_version: Version
    #: Payload schema versions the agent understands.
    protocols: list[Annotated[int, Field(ge=1, le=1000)]] = Field(min_length=1, max_length=16)
    profile: Name | None = None
    fingerprint: Fingerprint


# --- desired state ------------------------------------------------------------


class DesiredState(_Msg):
    """Retained on ``…/desired``: which artifact of which signed bundle to run."""

    KIND: ClassVar[str] = "desired state"
    MAX_BYTES: ClassVar[int] = SignedManifest.MAX_BYTES + 4096 + SignedKeySet.MAX_BYTES + SignedAgentRelease.MAX_BYTES

    device_id: DeviceId
    #: Increases with every change of the desired state; older ones are ignored.
    generation: Annotated[int, Field(ge=0, le=2**53)]
    issued_at: AwareDatetime
    #: ``null``: nothing new to run; the device keeps what it runs.
    bundle: SignedManifest | None = None
    artifact: Name | None = None
    rollout_id: Name | None = None
    #: The newest key-set statement (bundle-signing key rotation); applied whatever the generation.
    keyset: SignedKeySet | None = None
    #: The agent release the device should run (docs/agent.md, "Updating the agent"); ``null``: keep its agent.
    agent: SignedAgentRelease | None = None

    @model_validator(mode="after")
    def _artifact_in_bundle(self) -> DesiredState:
        if (self.bundle is None) != (self.artifact is None):
            raise ValueError("bundle and artifact must be given together")
        if self.bundle is not None and self.artifact is not None:
            names = [a.name for a in self.bundle.manifest.artifacts]
            if self.artifact not in names:
                raise ValueError(f"artifact {self.artifact!r} is not in the bundle (has {names})")
        return self


# --- artifact transfer --------------------------------------------------------


class ChunkRequest(_Msg):
    """Ask for bytes ``[offset, offset + length)`` of an artifact, in chunks of ``chunk_size``."""

    KIND: ClassVar[str] = "chunk request"
    MAX_BYTES: ClassVar[int] = 1024

    request_id: RequestId
    sha256: Sha256Hex
    offset: Annotated[int, Field(ge=0, le=2**42)]
    length: Annotated[int, Field(ge=1, le=MAX_REQUEST_BYTES)]
    chunk_size: Annotated[int, Field(ge=4 * 1024, le=256 * 1024)] = 64 * 1024
    #: The device listens on the artifact's broadcast topic, so the answer may go there and be shared
    #: with every other device fetching the same bytes (docs/protocol.md §6) ...
    broadcast: bool = False
    #: ... and has done so for this long (since its subscription was granted on this connection).
    listening_ms: Annotated[int, Field(ge=0, le=86_400_000)] = 0


class ErrorCode(str, Enum):
    NOT_FOUND = "not_found"
    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    RATE_LIMITED = "rate_limited"
    INTERNAL = "internal"
    #: A time in the message is too far ahead of or behind the server's clock; for a window, ``request_id``
    #: names it (protocol.windows) and the device gives it up.
    BAD_TIME = "bad_time"


class ErrorReply(_Msg):
    KIND: ClassVar[str] = "error reply"
    MAX_BYTES: ClassVar[int] = 4096

    #: The request this answers, when the request could be parsed that far.
    request_id: RequestId | None = None
    code: ErrorCode
    message: Reason
    #: Seconds to wait before retrying, for ``rate_limited`` and ``internal``.
    retry_after_s: Annotated[float, Field(ge=0, le=86400)] | None = None


def error_reply_for(exc: InvalidMessage) -> ErrorReply:
    """The reply to a request that did not decode: ``unsupported_version``, ``too_large`` or ``bad_request``,
    naming the request when its id could be read."""
    match exc:
        case UnsupportedVersion():
            code = ErrorCode.UNSUPPORTED_VERSION
        case PayloadTooLarge():
            code = ErrorCode.TOO_LARGE
        case _:
            code = ErrorCode.BAD_REQUEST
    return ErrorReply(request_id=exc.request_id, code=code, message=str(exc)[:1000])


# --- telemetry and statistics -------------------------------------------------


class LatencySummary(WireModel):
    p50: Annotated[float, Field(ge=0)]
    p95: Annotated[float, Field(ge=0)]
    p99: Annotated[float, Field(ge=0)]
    max: Annotated[float, Field(ge=0)]
    mean: Annotated[float, Field(ge=0)]


class _Window(_Msg):
    """A reporting window of one device; ``(device_id, session, window_seq)`` is its key."""

    device_id: DeviceId
    session: Session
    window_seq: Annotated[int, Field(ge=0, le=2**53)]
    start: AwareDatetime
    end: AwareDatetime

    @model_validator(mode="after")
    def _ordered(self) -> _Window:
        if self.end < self.start:
            raise ValueError("end is before start")
        return self


class TelemetryWindow(_Window):
    """Health of one reporting window."""

    KIND: ClassVar[str] = "telemetry window"
    MAX_BYTES: ClassVar[int] = 16 * 1024

    manifest_sha256: Sha256Hex | None = None
    requests: Count
    errors: Count
    latency_ms: LatencySummary | None = None
    #: Counts of request latencies on ``latency_edges_ms`` (len(edges) - 1 bins).
    latency_edges_ms: list[Annotated[float, Field(ge=0)]] | None = Field(default=None, max_length=MAX_BINS + 1)
    latency_counts: Counts | None = None
    cpu_percent: Annotated[float, Field(ge=0, le=100_000)] | None = None
    memory_bytes: Count | None = None
    disk_free_bytes: Count | None = None
    temperature_c: Annotated[float, Field(ge=-100, le=200)] | None = None
    #: Windows dropped because the offline buffer was full.
    dropped_windows: Count = 0

    @model_validator(mode="after")
    def _consistent(self) -> TelemetryWindow:
        if self.errors > self.requests:
            raise ValueError("errors cannot exceed requests")
        if (self.latency_edges_ms is None) != (self.latency_counts is None):
            raise ValueError("latency_edges_ms and latency_counts go together")
        if (
            self.latency_edges_ms is not None
            and self.latency_counts is not None
            and len(self.latency_counts) != len(self.latency_edges_ms) - 1
        ):
            raise ValueError("latency_counts needs one count per pair of edges")
        return self


class FeatureWindow(WireModel):
    """One feature's counts on the reference bins of the manifest, for one window."""

    name: Name
    version: Annotated[int, Field(ge=1)] | None = None
    counts: Counts
    below: Count = 0
    above: Count = 0
    nan: Count = 0
    mean: float | None = None
    #: Sum of squared deviations from the mean (Welford's M2) of finite values.
    m2: Annotated[float, Field(ge=0)] | None = None
    min: float | None = None
    max: float | None = None


class FeatureStats(_Window):
    """Feature statistics of one window; counts add across windows and devices."""

    KIND: ClassVar[str] = "feature statistics"
    MAX_BYTES: ClassVar[int] = 512 * 1024

    #: The manifest whose reference profile defines the bins.
    manifest_sha256: Sha256Hex
    n: Count
    features: list[FeatureWindow] = Field(max_length=MAX_FEATURES)
    class_counts: list[Count] | None = Field(default=None, max_length=1000)
    confidence_counts: Counts | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FeatureStats:
        names = [(f.name, f.version) for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("each feature may appear once")
        for f in self.features:
            seen = sum(f.counts) + f.below + f.above + f.nan
            if seen != self.n:
                raise ValueError(f"feature {f.name}: counts + below + above + nan = {seen}, but n = {self.n}")
        return self


# --- commands -----------------------------------------------------------------


class CommandKind(str, Enum):
    REPORT_NOW = "report_now"
    ROLLBACK = "rollback"
    RESTART_AGENT = "restart_agent"
    SET_LOG_LEVEL = "set_log_level"
    #: ``args.password`` (the device's next broker password), or ``args.certificate``, ``args.key`` and
    #: ``args.ca`` (its next client certificate, private key and the CA bundle to pin, PEM). The device stores
    #: them for its next connection and acknowledges ``done``; only then does the server retire the old ones.
    ROTATE_CREDENTIALS = "rotate_credentials"
    #: ``args.lines`` (1 to :data:`MAX_LOG_LINES`: the newest lines to send) and optionally ``args.since`` (only
    #: lines numbered above it). The device answers with a :class:`LogBatch` on its ``logs`` topic, then ``done``.
    SEND_LOGS = "send_logs"


#: Length limits of a broker password carried by ``rotate_credentials``.
MIN_PASSWORD, MAX_PASSWORD = 16, 256
#: Largest PEM text (a certificate, a key, a CA bundle) a ``rotate_credentials`` command may carry.
MAX_PEM = 8 * 1024
#: What each PEM argument of ``rotate_credentials`` must hold.
PEM_ARGS = {"certificate": ("CERTIFICATE",), "key": ("PRIVATE KEY", "EC PRIVATE KEY"), "ca": ("CERTIFICATE",)}
PemText = Annotated[str, StringConstraints(max_length=MAX_PEM)]


def _check_pem(name: str, value: object, labels: tuple[str, ...]) -> None:
    if not isinstance(value, str) or not value.isascii():
        raise ValueError(f"rotate_credentials args.{name} must be PEM text")
    blocks = re.findall(r"-----BEGIN ([A-Z ]+)-----\r?\n[A-Za-z0-9+/=\r\n]+-----END \1-----", value)
    if not blocks or any(b not in labels for b in blocks):
        raise ValueError(f"rotate_credentials args.{name} must hold PEM blocks of {' or '.join(labels)}")
    if name == "key" and len(blocks) != 1:
        raise ValueError("rotate_credentials args.key must hold exactly one private key")


class Command(_Msg):
    KIND: ClassVar[str] = "command"
    MAX_BYTES: ClassVar[int] = 32 * 1024

    command_id: RequestId
    kind: CommandKind
    #: Values longer than 256 characters are PEM texts, which only ``rotate_credentials`` takes.
    args: dict[Name, bool | int | float | PemText] = Field(default_factory=dict, max_length=16)
    issued_at: AwareDatetime
    #: The device ignores (and rejects) a command received after this time.
    expires_at: AwareDatetime | None = None

    @model_validator(mode="after")
    def _args(self) -> Command:
        long = [k for k, v in self.args.items() if isinstance(v, str) and len(v) > 256]
        if self.kind is CommandKind.ROTATE_CREDENTIALS:
            if set(self.args) == set(PEM_ARGS):
                for name, labels in PEM_ARGS.items():
                    _check_pem(name, self.args[name], labels)
                return self
            password = self.args.get("password")
            if not isinstance(password, str) or not MIN_PASSWORD <= len(password) <= MAX_PASSWORD \
                    or not password.isprintable() or password != password.strip():
                raise ValueError(f"rotate_credentials needs args.password: {MIN_PASSWORD}-{MAX_PASSWORD} printable "
                                 "characters without leading or trailing spaces, or args.certificate, args.key and "
                                 "args.ca (PEM)")
            if set(self.args) != {"password"}:
                raise ValueError("rotate_credentials takes args.password, or args.certificate, args.key and args.ca")
        elif long:
            raise ValueError(f"args.{long[0]}: at most 256 characters")
        if self.kind is CommandKind.SEND_LOGS:
            _check_log_args(self.args)
        return self


def _check_log_args(args: dict[str, bool | int | float | str]) -> None:
    lines, since = args.get("lines"), args.get("since", 0)
    if isinstance(lines, bool) or not isinstance(lines, int) or not 1 <= lines <= MAX_LOG_LINES:
        raise ValueError(f"send_logs needs args.lines: a whole number from 1 to {MAX_LOG_LINES}")
    if isinstance(since, bool) or not isinstance(since, int) or not 0 <= since <= 2**53:
        raise ValueError("send_logs args.since must be a whole number >= 0 (a line's seq)")
    if set(args) - {"lines", "since"}:
        raise ValueError("send_logs takes args.lines and args.since only")


class AckStatus(str, Enum):
    """How a device answers a command: ``accepted`` when it starts, then ``done`` or ``failed``; ``rejected``
    when it will not carry it out at all (expired, not supported, refused)."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DONE = "done"
    FAILED = "failed"

    def __str__(self) -> str:  # the wire string in messages and logs, on every Python (3.12 formats the name)
        return self.value


class CommandAck(_Msg):
    KIND: ClassVar[str] = "command ack"
    MAX_BYTES: ClassVar[int] = 4096

    device_id: DeviceId
    command_id: RequestId
    #: Lax only so that Python code may also pass the wire string; JSON still takes nothing but the four.
    status: Annotated[AckStatus, Field(strict=False)]
    message: Reason = ""
    ts: AwareDatetime


#: Most log lines one ``send_logs`` command may ask for (and one :class:`LogBatch` may carry).
MAX_LOG_LINES = 2000
#: Longest text of one log line; the device cuts longer ones.
MAX_LOG_TEXT = 2000


class LogLine(WireModel):
    """One line of the agent's log ring. ``text`` is what the device logged: untrusted, shown only with its
    control characters removed."""

    seq: Count
    ts: AwareDatetime
    level: Annotated[str, StringConstraints(max_length=16)]
    logger: ShortText
    text: Annotated[str, StringConstraints(max_length=MAX_LOG_TEXT)]


class LogBatch(_Msg):
    """The device's answer to ``send_logs``: its newest log lines (oldest first), as many as fit in
    :attr:`MAX_BYTES`. ``truncated`` when lines that were asked for and are still held did not fit;
    ``next_seq`` is the ``since`` that asks for only the lines logged after these."""

    KIND: ClassVar[str] = "log batch"
    MAX_BYTES: ClassVar[int] = 64 * 1024

    device_id: DeviceId
    command_id: RequestId
    lines: list[LogLine] = Field(default_factory=list, max_length=MAX_LOG_LINES)
    truncated: bool = False
    next_seq: Count = 0


#: Windows one receipt may name (of each kind); a server with more to confirm sends several.
MAX_RECEIPT_WINDOWS = 512
WindowKey = tuple[Session, Annotated[int, Field(ge=0, le=2**53)]]


class Receipt(_Msg):
    """The server has stored these windows of the device (or had stored them before: a duplicate is
    confirmed again). The agent keeps a window in its outbox until a receipt names it, so a window the
    broker acknowledged but lost (a broker killed before delivering it) is sent again."""

    KIND: ClassVar[str] = "receipt"
    MAX_BYTES: ClassVar[int] = 64 * 1024

    device_id: DeviceId
    #: ``[session, window_seq]`` of stored telemetry windows.
    telemetry: list[WindowKey] = Field(default_factory=list, max_length=MAX_RECEIPT_WINDOWS)
    #: ``[session, window_seq]`` of stored feature statistics.
    stats: list[WindowKey] = Field(default_factory=list, max_length=MAX_RECEIPT_WINDOWS)


# --- codec --------------------------------------------------------------------

Message = (
    DeviceState | Hello | DesiredState | ChunkRequest | ErrorReply | TelemetryWindow | FeatureStats | Command
    | CommandAck | Receipt | LogBatch
)

MESSAGE_FOR_TOPIC: dict[TopicKind, type[WireModel]] = {
    TopicKind.STATE: DeviceState,
    TopicKind.HELLO: Hello,
    TopicKind.DESIRED: DesiredState,
    TopicKind.ARTIFACT_REQUEST: ChunkRequest,
    TopicKind.TELEMETRY: TelemetryWindow,
    TopicKind.STATS: FeatureStats,
    TopicKind.COMMAND: Command,
    TopicKind.ACK: CommandAck,
    TopicKind.ERROR: ErrorReply,
    TopicKind.RECEIPT: Receipt,
    TopicKind.LOGS: LogBatch,
}


def encode(msg: WireModel) -> bytes:
    """Canonical JSON bytes of a message."""
    return encode_model(msg)


def decode(cls: type[M], payload: bytes) -> M:
    """Decode ``payload`` as ``cls``; raises only :class:`InvalidMessage`."""
    return decode_model(cls, payload)


def decode_for_topic(kind: TopicKind, payload: bytes) -> WireModel:
    """Decode a JSON payload received on a topic of ``kind``.

    Raises :class:`InvalidMessage`; for :attr:`TopicKind.ARTIFACT_CHUNK` use
    :func:`protocol.chunks.decode_chunk` instead.
    """
    cls = MESSAGE_FOR_TOPIC.get(kind)
    if cls is None:
        raise ValueError(f"{kind.value} payloads are not JSON; use protocol.chunks.decode_chunk")
    return decode_model(cls, payload)
