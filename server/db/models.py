"""The registry schema (SQLModel). Changes go through Alembic migrations in ``server/db/migrations``.

Tables: devices, model versions and their artifacts, telemetry windows, feature
statistics windows, drift reports, alerts (with the hysteresis state of each condition and the webhook
deliveries); rollouts, their devices and gate
evaluations; approvals, the hash-chained audit log and leases. Report rows are keyed by
``(device_id, session, window_seq)``, so a replayed or duplicated window is
stored once.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Column, DateTime, Index, LargeBinary, Text, UniqueConstraint, false
from sqlmodel import Field, SQLModel

__all__ = ["AgentReleaseRow", "AgentRollout", "AgentRolloutDevice",
           "Alert", "AlertCondition", "AlertDelivery", "Approval", "ArtifactRow", "AuditEntry", "Device",
           "DriftPending", "DriftReportRow", "GateEvaluation", "GroupRelease",
           "KeyStatement", "Lease", "ModelVersion", "OperatorKey", "OperatorToken",
           "Rollout", "RolloutDevice", "StatsWindow", "TelemetryRow", "VersionArtifact"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _ts(**kw: Any) -> Any:
    return Field(default_factory=_now, sa_column=Column(DateTime(timezone=True), **kw))


class Device(SQLModel, table=True):
    __tablename__ = "devices"

    id: str = Field(primary_key=True, max_length=63)
    profile: str = Field(max_length=64)
    groups: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    #: Where the device's broker credentials live (e.g. "mosquitto:passwd"); never the secret itself.
    credentials_ref: str = Field(default="", max_length=256)
    revoked: bool = False
    status: str = Field(default="unknown", max_length=16)
    state_session: int = Field(default=-1, sa_type=BigInteger)
    state_seq: int = Field(default=-1, sa_type=BigInteger)
    last_seen: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    agent_version: str | None = Field(default=None, max_length=32)
    fingerprint: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))
    running_manifest: str | None = Field(default=None, max_length=64)
    running_artifact: str | None = Field(default=None, max_length=64)
    install_step: str | None = Field(default=None, max_length=16)
    install_error: str | None = Field(default=None, max_length=1000)
    desired_generation: int = Field(default=0, sa_type=BigInteger)
    desired_manifest: str | None = Field(default=None, max_length=64)
    desired_artifact: str | None = Field(default=None, max_length=64)
    created_at: datetime = _ts(nullable=False)
    #: Serial of the newest key-set statement the device reported holding (server/signing_keys.py).
    keyset_serial: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    #: Digest of the agent release the device is meant to run (server/agent_releases.py); None: its own.
    desired_agent: str | None = Field(default=None, max_length=64)
    #: The device's last word on an agent update: {"version", "step", "error"} (protocol.AgentUpdate).
    agent_update: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON))


class ModelVersion(SQLModel, table=True):
    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, index=True)
    version: str = Field(max_length=32)
    manifest_sha256: str = Field(max_length=64, unique=True)
    #: The signed manifest exactly as pushed (canonical JSON).
    signed_manifest: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    #: Lifecycle: draft → candidate → approved → deployed → retired (server/governance.py).
    stage: str = Field(default="draft", max_length=16)
    author: str | None = Field(default=None, max_length=256)
    #: The operator who pushed it; four-eyes keeps both author and pusher from approving it.
    pushed_by: str | None = Field(default=None, max_length=64)
    lineage: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    #: The bundle's MODEL_CARD.md as pushed (Markdown), if it had one.
    card: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    created_at: datetime = _ts(nullable=False)


class ArtifactRow(SQLModel, table=True):
    """A file in the content-addressed store."""

    __tablename__ = "artifacts"

    sha256: str = Field(primary_key=True, max_length=64)
    size: int = Field(sa_type=BigInteger)
    location: str = Field(max_length=512)


class VersionArtifact(SQLModel, table=True):
    """An artifact of a model version (several may share one file)."""

    __tablename__ = "version_artifacts"

    version_id: int = Field(foreign_key="model_versions.id", primary_key=True)
    name: str = Field(primary_key=True, max_length=64)
    sha256: str = Field(foreign_key="artifacts.sha256", max_length=64)
    target: str = Field(max_length=16)
    precision: str = Field(max_length=8)
    runtime: str = Field(max_length=32)
    metrics: dict[str, float] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class TelemetryRow(SQLModel, table=True):
    __tablename__ = "telemetry"
    __table_args__ = (Index("ix_telemetry_device_end", "device_id", "end"),)

    device_id: str = Field(primary_key=True, max_length=63)
    session: int = Field(primary_key=True, sa_type=BigInteger)
    window_seq: int = Field(primary_key=True, sa_type=BigInteger)
    start: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    end: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    manifest_sha256: str | None = Field(default=None, max_length=64)
    requests: int = Field(sa_type=BigInteger)
    errors: int = Field(sa_type=BigInteger)
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    dropped_windows: int = 0
    received_at: datetime = _ts(nullable=False)


class StatsWindow(SQLModel, table=True):
    __tablename__ = "feature_stats"
    __table_args__ = (Index("ix_stats_manifest_end", "manifest_sha256", "end"),)

    device_id: str = Field(primary_key=True, max_length=63)
    session: int = Field(primary_key=True, sa_type=BigInteger)
    window_seq: int = Field(primary_key=True, sa_type=BigInteger)
    manifest_sha256: str = Field(max_length=64)
    end: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    n: int = Field(sa_type=BigInteger)
    #: The FeatureStats message as received (canonical JSON).
    payload: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    received_at: datetime = _ts(nullable=False)
    #: Drift evaluation has taken this window (scored it, or added it to its device's undecided windows). A flag,
    #: not a time watermark: a window whose batch commits late, with an older ``received_at``, is still scored.
    scored: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, default=False,
                                                         server_default=false(), index=True))


class DriftReportRow(SQLModel, table=True):
    __tablename__ = "drift_reports"

    id: int | None = Field(default=None, primary_key=True)
    scope: str = Field(max_length=16)  # "device" or "fleet"
    device_id: str | None = Field(default=None, max_length=63, index=True)
    manifest_sha256: str = Field(max_length=64, index=True)
    n: int = Field(sa_type=BigInteger)
    drifted: bool
    worst: str | None = Field(default=None, max_length=64)
    #: The largest PSI / threshold over the features (≥ 1: beyond it), for sorting and display.
    score: float | None = None
    #: For a device report: when the statistics window it scored was received.
    window_received_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    #: For a device report: the statistics window that completed it (with the undecided ones before it, if any).
    session: int | None = Field(default=None, sa_type=BigInteger)
    window_seq: int | None = Field(default=None, sa_type=BigInteger)
    #: Too few rows to decide (``drifted`` is False then): the device's next windows are added to these counts.
    insufficient: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, default=False,
                                                               server_default=false()))
    report: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    computed_at: datetime = _ts(nullable=False)


class Alert(SQLModel, table=True):
    """An alert: raised → acknowledged → cleared (server/alerts.py). ``active`` until cleared; acknowledged once
    ``acknowledged_at`` is set."""

    __tablename__ = "alerts"

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=32)
    device_id: str | None = Field(default=None, max_length=63, index=True)
    manifest_sha256: str | None = Field(default=None, max_length=64)
    active: bool = True
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    raised_at: datetime = _ts(nullable=False)
    cleared_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    severity: str = Field(default="warning", max_length=16)
    acknowledged_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    acknowledged_by: str | None = Field(default=None, max_length=64)
    ack_note: str | None = Field(default=None, max_length=1000)
    #: Who cleared it: ``hysteresis`` (clean evaluations in a row) or the operator who resolved it.
    cleared_by: str | None = Field(default=None, max_length=64)


class AlertCondition(SQLModel, table=True):
    """The hysteresis of one condition (a device, a manifest, an alert kind): kept in the database so that a
    restarted server or another replica carries on exactly where the last evaluation stopped."""

    __tablename__ = "alert_conditions"

    device_id: str = Field(primary_key=True, max_length=63)
    manifest_sha256: str = Field(primary_key=True, max_length=64)
    kind: str = Field(primary_key=True, max_length=32)
    #: The condition holds (an alert is open for it, or was resolved by hand while it still held).
    active: bool = False
    #: Evaluations in a row that disagree with ``active``.
    streak: int = 0
    #: The open alert of this condition, if any.
    alert_id: int | None = Field(default=None, sa_type=BigInteger)
    updated_at: datetime = _ts(nullable=False)


class DriftPending(SQLModel, table=True):
    """A device's statistics windows too small to decide on alone, waiting for the next ones to be added."""

    __tablename__ = "drift_pending"

    device_id: str = Field(primary_key=True, max_length=63)
    manifest_sha256: str = Field(primary_key=True, max_length=64)
    #: ``[[session, window_seq], ...]``, oldest first.
    windows: list[list[int]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    n: int = Field(default=0, sa_type=BigInteger)
    updated_at: datetime = _ts(nullable=False)


class AlertDelivery(SQLModel, table=True):
    """One attempt to tell the alert webhook that an alert fired or resolved; a failed attempt names when the next
    one is due (its own row)."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (Index("ix_alert_deliveries_status_due", "status", "due_at"),)

    id: int | None = Field(default=None, primary_key=True)
    alert_id: int = Field(foreign_key="alerts.id", index=True)
    #: ``firing`` or ``resolved`` (the Alertmanager status sent).
    event: str = Field(max_length=16)
    attempt: int = 1
    #: pending, sending, delivered, failed (another attempt follows at ``next_try_at``) or abandoned (the last).
    status: str = Field(default="pending", max_length=16)
    due_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    attempted_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    http_status: int | None = None
    error: str | None = Field(default=None, max_length=1000)
    next_try_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    created_at: datetime = _ts(nullable=False)


class Rollout(SQLModel, table=True):
    """A version rolled out to a target in waves (server/rollouts.py plans it, server/orchestrator.py runs it)."""

    __tablename__ = "rollouts"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    version_id: int = Field(foreign_key="model_versions.id", index=True)
    artifact: str | None = Field(default=None, max_length=64)
    #: {"groups": [...], "tags": [...], "devices": [...]}, resolved again on every step.
    target: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    production: bool = False
    #: The RolloutSpec: strategy, waves, soak, timeouts, failure threshold, gates, failure policy.
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    state: str = Field(default="pending", max_length=16, index=True)
    wave: int = 0
    #: Epoch seconds the current wave started (its devices were assigned).
    wave_started_at: float | None = None
    reason: str | None = Field(default=None, max_length=1000)
    created_by: str = Field(max_length=64)
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)


class RolloutDevice(SQLModel, table=True):
    """A device of a rollout: its wave, its progress, and what it ran before (for a rollback)."""

    __tablename__ = "rollout_devices"

    rollout_id: int = Field(foreign_key="rollouts.id", primary_key=True)
    device_id: str = Field(primary_key=True, max_length=63)
    wave: int
    state: str = Field(max_length=16)
    previous_manifest: str | None = Field(default=None, max_length=64)
    previous_artifact: str | None = Field(default=None, max_length=64)
    assigned_at: float
    finished_at: float | None = None
    error: str | None = Field(default=None, max_length=1000)


class GateEvaluation(SQLModel, table=True):
    """One gate's verdict on one wave, with the numbers it was decided on."""

    __tablename__ = "gate_evaluations"

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: int = Field(foreign_key="rollouts.id", index=True)
    wave: int
    gate: str = Field(max_length=32)
    verdict: str = Field(max_length=16)  # pass, fail, insufficient
    numbers: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    at: datetime = _ts(nullable=False)


class Approval(SQLModel, table=True):
    __tablename__ = "approvals"

    id: int | None = Field(default=None, primary_key=True)
    version_id: int = Field(foreign_key="model_versions.id", index=True)
    actor: str = Field(max_length=64)
    decision: str = Field(max_length=16)  # approve, reject
    reason: str = Field(max_length=1000)
    at: datetime = _ts(nullable=False)
    #: The approver's Ed25519 signature over :func:`server.signatures.decision_payload` (base64), and the public
    #: key it verifies with (base64, raw 32 bytes); None for a decision taken on the server host without a key.
    signature: str | None = Field(default=None, max_length=128)
    public_key: str | None = Field(default=None, max_length=64)
    #: The audit entry that recorded this decision; ``audit verify`` checks the row against it.
    audit_seq: int | None = Field(default=None, sa_type=BigInteger)


class OperatorToken(SQLModel, table=True):
    """An operator's API token. Only its SHA-256 is kept: the token itself is shown once, when issued."""

    __tablename__ = "operator_tokens"

    #: A short public id ("tok_…"), for listing and revoking; not a secret.
    id: str = Field(primary_key=True, max_length=32)
    operator: str = Field(max_length=64, index=True)
    token_sha256: str = Field(max_length=64, unique=True)
    #: "full" (everything the operator's role allows) or "push" (read, push models and features: CI pipelines).
    scope: str = Field(default="full", max_length=16)
    label: str = Field(default="", max_length=128)
    created_by: str = Field(max_length=64)
    created_at: datetime = _ts(nullable=False)
    expires_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))
    last_used_at: datetime | None = Field(default=None, sa_column=Column(DateTime(timezone=True)))


class OperatorKey(SQLModel, table=True):
    """An operator's Ed25519 public key, which their approvals must verify with."""

    __tablename__ = "operator_keys"

    operator: str = Field(primary_key=True, max_length=64)
    #: Raw 32-byte public key, base64.
    public_key: str = Field(max_length=64)
    created_at: datetime = _ts(nullable=False)


class AuditEntry(SQLModel, table=True):
    """One entry of the append-only audit log; ``hash`` chains it to the one before (server/audit.py)."""

    __tablename__ = "audit_log"

    seq: int = Field(primary_key=True, sa_type=BigInteger)
    at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    actor: str = Field(max_length=64)
    action: str = Field(max_length=64, index=True)
    subject: str = Field(max_length=256)
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64, unique=True)


class Lease(SQLModel, table=True):
    """A named lease: which replica acts (a rollout, the drift evaluation) until when (server/leases.py)."""

    __tablename__ = "leases"

    name: str = Field(primary_key=True, max_length=128)
    holder: str = Field(max_length=128)
    #: Epoch seconds, by the database's clock.
    expires_at: float


class FeatureDefinitionRow(SQLModel, table=True):
    """A registered feature definition (protocol/features.py). A version is never edited: a changed
    definition is registered as a new version."""

    __tablename__ = "feature_definitions"

    name: str = Field(primary_key=True, max_length=64)
    version: int = Field(primary_key=True)
    #: sha256 of the definition's canonical JSON.
    sha256: str = Field(max_length=64)
    #: The definition as canonical JSON.
    definition: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    owner: str = Field(default="", max_length=256)
    pushed_by: str | None = Field(default=None, max_length=64)
    created_at: datetime = _ts(nullable=False)


class KeyStatement(SQLModel, table=True):
    """A key-set statement the server issued (protocol/keyset.py): the bundle-signing keys and their states.
    The newest goes out in every desired state (server/signing_keys.py)."""

    __tablename__ = "keyset_statements"

    serial: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    #: The signed statement as canonical JSON, exactly as published.
    statement: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    #: "rotating": a next key waits for every device's confirmation; "done": no rotation under way.
    phase: str = Field(max_length=16)
    actor: str = Field(max_length=64)
    created_at: datetime = _ts(nullable=False)


class GroupRelease(SQLModel, table=True):
    """The model version a device group tracks (server/groups.py): set by a completed rollout that targeted the
    group or by hand; members that join later, or run something else, converge to it."""

    __tablename__ = "device_groups"

    name: str = Field(primary_key=True, max_length=64)
    version_id: int = Field(foreign_key="model_versions.id", index=True)
    set_by: str = Field(max_length=64)
    #: How it was set: "hand", or "rollout:<name>".
    via: str = Field(max_length=80)
    set_at: datetime = _ts(nullable=False)


class AgentReleaseRow(SQLModel, table=True):
    """An agent release pushed to the server (protocol/agent_release.py); its tar is in the content store."""

    __tablename__ = "agent_releases"

    id: int | None = Field(default=None, primary_key=True)
    version: str = Field(max_length=32, unique=True)
    python: str = Field(max_length=8)
    sha256: str = Field(max_length=64)
    size: int = Field(sa_type=BigInteger)
    #: sha256 of the release's canonical JSON (protocol.release_digest).
    digest: str = Field(max_length=64, unique=True)
    #: The signed release exactly as published (canonical JSON).
    signed: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_by: str = Field(max_length=64)
    created_at: datetime = _ts(nullable=False)


class AgentRollout(SQLModel, table=True):
    """An agent release rolled out to a target in waves (server/agent_releases.py)."""

    __tablename__ = "agent_rollouts"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True)
    release_id: int = Field(foreign_key="agent_releases.id", index=True)
    #: {"groups": [...], "tags": [...], "devices": [...]}.
    target: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    #: Wave sizes as given: "1", "50%", "100%".
    waves: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    #: Seconds a device of a wave has to report the new version before the rollout fails.
    deadline_s: float = 600.0
    #: running, done or failed.
    state: str = Field(default="running", max_length=16, index=True)
    wave: int = 0
    wave_started_at: float | None = None
    reason: str | None = Field(default=None, max_length=1000)
    created_by: str = Field(max_length=64)
    created_at: datetime = _ts(nullable=False)
    updated_at: datetime = _ts(nullable=False)


class AgentRolloutDevice(SQLModel, table=True):
    """A device of an agent rollout: its wave and how its update went (pending, assigned, done, failed)."""

    __tablename__ = "agent_rollout_devices"

    rollout_id: int = Field(foreign_key="agent_rollouts.id", primary_key=True)
    device_id: str = Field(primary_key=True, max_length=63)
    wave: int = 0
    state: str = Field(default="pending", max_length=16)
    reason: str | None = Field(default=None, max_length=1000)
