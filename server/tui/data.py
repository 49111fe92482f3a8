"""What the TUI shows and does, as plain values: queries over the registry database, and the same actions
the CLI takes (orchestrator, governance, registry), checked against the operator's role.

Every method here may block on the database or the broker; the app calls them from worker threads only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func
from sqlalchemy import select as sa_select  # more columns than sqlmodel's select types
from sqlmodel import Session, col, select

from server import audit
from server.db.models import (
    Alert,
    Approval,
    AuditEntry,
    Device,
    DriftReportRow,
    GateEvaluation,
    ModelVersion,
    Rollout,
    RolloutDevice,
    TelemetryRow,
    VersionArtifact,
)
from server.features import FeatureDriftRow
from server.features import drift as feature_drift
from server.governance import (
    Governance,
    GovernanceError,
    Permission,
    approve,
    check_deploy,
    find_version,
    four_eyes_refusal,
    promoted_by,
    reject,
)
from server.orchestrator import (
    RolloutError,
    command_governed,
    describe,
    resolve_target,
    rollout_view,
    start_governed,
)
from server.presence import shown_status
from server.registry import Registry, RegistryError
from server.rollouts import RolloutSpec, wave_sizes
from server.settings import STALE_AFTER

__all__ = ["FLEET_SORTS", "ActionError", "AlertRow", "DeviceDetail", "DeviceRow", "DriftRow", "FleetData", "FleetPage",
           "FleetQuery", "ModelRow", "RolloutDetail", "RolloutRow"]

#: Telemetry newer than this feeds the fleet table's latency and error columns.
RECENT = timedelta(minutes=5)


class ActionError(Exception):
    """An action was refused or failed; the message is for the operator."""


@dataclass(frozen=True)
class DeviceRow:
    id: str
    profile: str
    groups: str
    tags: str
    status: str
    running: str
    desired: str
    install: str
    last_seen: datetime | None
    p95_ms: float | None
    error_rate: float | None
    drift: float | None

    @property
    def health(self) -> str:
        """ok, warn, bad or off (offline or revoked): what colour the row gets."""
        if self.status != "online":
            return "off"
        if self.install == "failed" or (self.error_rate or 0) > 0.05 or (self.drift or 0) >= 1:
            return "bad"
        if self.install not in ("done", "—") or (self.error_rate or 0) > 0.01 or (self.drift or 0) >= 0.5:
            return "warn"
        return "ok"

    def matches(self, text: str) -> bool:
        """``text`` words all found in the id, profile, groups, tags, status, versions or health."""
        hay = " ".join([self.id, self.profile, self.groups, self.tags, self.status, self.running, self.desired,
                        self.install, self.health]).lower()
        return all(word in hay for word in text.lower().split())


#: The Fleet table's columns, by key, in order: what :class:`FleetQuery` sorts on (server/tui/render.py
#: ``FLEET_COLUMNS`` gives each its header and the value it sorts on).
FLEET_SORTS = ("id", "profile", "groups", "status", "running", "desired", "install", "last_seen", "p95", "errors",
               "drift")

#: The filter's ``key:value`` words (server/tui/render.py :func:`fleet_matches`).
FLEET_FIELDS = ("group", "tag", "status", "profile", "health", "version")


@dataclass(frozen=True)
class FleetQuery:
    """One page of the Fleet table: the devices matching ``text`` (server/tui/render.py :func:`fleet_matches`),
    sorted on column ``sort`` (one of :data:`FLEET_SORTS`; missing values last, strings without case, ties by id),
    ``limit`` of them from ``offset`` (``None``: all). ``focus``: a device to keep in view; when it matches and
    falls outside that page, the page moves to start ``limit // 2`` rows above it."""

    text: str = ""
    sort: str = "id"
    reverse: bool = False
    offset: int = 0
    limit: int | None = None
    focus: str | None = None

    def __post_init__(self) -> None:
        if self.sort not in FLEET_SORTS:
            raise ValueError(f"sort: {self.sort!r} is not a Fleet column ({', '.join(FLEET_SORTS)})")
        if self.offset < 0 or (self.limit is not None and self.limit < 0):
            raise ValueError("offset and limit are not negative")


@dataclass(frozen=True)
class FleetPage:
    """What :meth:`FleetData.fleet` answers: the page's rows from position ``offset`` among the ``matched``
    devices, and the counts the summary line shows (over the whole fleet, whatever the filter)."""

    rows: list[DeviceRow]
    offset: int
    matched: int
    total: int
    online: int
    unhealthy: int
    #: Position of the query's ``focus`` among the matched devices; None when it was not asked or does not match.
    focus: int | None = None


@dataclass(frozen=True)
class DeviceDetail:
    row: DeviceRow
    fingerprint: dict[str, Any]
    history: list[tuple[datetime, str, str]]  # when, what, who
    latency: list[float]
    errors: list[float]
    features: list[tuple[str, float]]  # feature, PSI / threshold of the latest window
    alerts: list[tuple[datetime, str, bool]]  # raised at, what, active


@dataclass(frozen=True)
class AlertRow:
    """An alert as the alert list shows it (server/alerts.py)."""

    id: int
    state: str  # raised, acknowledged, cleared
    kind: str
    device: str
    reason: str
    raised_at: datetime
    by: str  # who acknowledged or cleared it

    @classmethod
    def of(cls, a: dict[str, Any]) -> AlertRow:
        """From :func:`server.alerts.alert_json` (or the API's answer, its JSON)."""
        by = a.get("cleared_by") if a["state"] == "cleared" else a.get("acknowledged_by")
        return cls(id=int(a["id"]), state=str(a["state"]), kind=str(a["kind"]), device=str(a["device_id"] or "—"),
                   reason=str(a.get("reason") or ""), raised_at=datetime.fromisoformat(str(a["raised_at"])),
                   by=str(by or "—"))


@dataclass(frozen=True)
class RolloutRow:
    name: str
    version: str
    state: str
    wave: str
    done: int
    total: int
    target: str
    production: bool
    reason: str


@dataclass(frozen=True)
class RolloutDetail:
    row: RolloutRow
    waves: list[tuple[int, int, int]]  # wave, installed, size
    gates: list[tuple[int, str, str, dict[str, Any]]]  # wave, gate, verdict, numbers
    created_by: str


@dataclass(frozen=True)
class ModelRow:
    ref: str
    stage: str
    author: str
    artifacts: int
    accuracy: str
    int8_delta: str
    approvals: str
    created: datetime


@dataclass(frozen=True)
class DriftRow:
    version: str
    feature: str
    score: float
    windows: int
    worst_devices: str


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class FleetData:
    registry: Registry
    governance: Governance
    actor: str
    #: "Now", for what counts as recent (injectable, so a fixed database renders the same every time).
    clock: Callable[[], datetime] = _utcnow
    #: A device silent this long counts as offline whatever its last state said (server/presence.py).
    stale_after: timedelta = field(default_factory=STALE_AFTER.read)
    _versions: dict[str, str] = field(default_factory=dict)

    # -- who may do what ------------------------------------------------------------------------

    def may(self, permission: Permission) -> bool:
        return self.governance.allows(self.actor, permission)

    def role(self) -> str:
        try:
            return self.governance.role(self.actor).value
        except GovernanceError:
            return "unknown"

    def _require(self, permission: Permission) -> None:
        try:
            self.governance.require(self.actor, permission)
        except GovernanceError as exc:
            raise ActionError(str(exc)) from None

    # -- reads ----------------------------------------------------------------------------------

    def _names(self, db: Session) -> dict[str, str]:
        """manifest digest → "name:version" (versions are few; cached, refreshed when one is missing)."""
        if not self._versions or len(self._versions) != db.exec(select(func.count()).select_from(ModelVersion)).one():
            self._versions = {v.manifest_sha256: f"{v.name}:{v.version}" for v in db.exec(select(ModelVersion))}
        return self._versions

    def devices(self, only: str | None = None) -> list[DeviceRow]:
        """Every device's row (or only device ``only``'s)."""
        now = self.clock()
        with Session(self.registry.engine) as db:
            names = self._names(db)
            since = now - RECENT
            q = sa_select(col(TelemetryRow.device_id), func.sum(TelemetryRow.requests), func.sum(TelemetryRow.errors),
                          func.sum(col(TelemetryRow.p95_ms) * col(TelemetryRow.requests)),
                          func.sum(TelemetryRow.requests).filter(col(TelemetryRow.p95_ms).is_not(None))).where(
                col(TelemetryRow.received_at) >= since)
            latest = select(func.max(DriftReportRow.id)).where(DriftReportRow.scope == "device")
            devices = select(Device)
            if only is not None:
                q = q.where(col(TelemetryRow.device_id) == only)
                latest = latest.where(DriftReportRow.device_id == only)
                devices = devices.where(Device.id == only)
            health = {r[0]: r[1:] for r in db.connection().execute(q.group_by(col(TelemetryRow.device_id)))}
            drift = {r[0]: r[1] for r in db.exec(select(DriftReportRow.device_id, DriftReportRow.score).where(
                col(DriftReportRow.id).in_(latest.group_by(col(DriftReportRow.device_id)))))}
            out = []
            for d in db.exec(devices):
                req, err, p95w, p95n = health.get(d.id, (0, 0, None, None))
                out.append(DeviceRow(
                    id=d.id, profile=d.profile, groups=",".join(d.groups), tags=",".join(d.tags),
                    status=shown_status(d.status, d.last_seen, revoked=d.revoked, now=now,
                                        stale_after=self.stale_after),
                    running=names.get(d.running_manifest or "", "—") if d.running_manifest else "—",
                    desired=names.get(d.desired_manifest or "", "—") if d.desired_manifest else "—",
                    install=d.install_step or "—", last_seen=d.last_seen,
                    p95_ms=float(p95w) / float(p95n) if p95w is not None and p95n else None,
                    error_rate=float(err) / float(req) if req else None, drift=drift.get(d.id)))
        return out

    def fleet(self, query: FleetQuery) -> FleetPage:
        """One page of the Fleet table, filtered, sorted, counted and cut in the database, one statement that
        works the fleet out once (server/tui/_fleet_sql.py); only the page's rows are read back. When the device to
        keep in view is not on that page, one more ranks it, and one more reads the page moved to it."""
        from server.tui import _fleet_sql as q

        engine = self.registry.engine
        fleet = q.fleet_rows(self.clock(), self.stale_after, RECENT)

        def read(offset: int, focus: str | None) -> list[Any]:
            with engine.connect() as conn:
                return list(conn.execute(q.page(fleet, query.text, query.sort, query.reverse, offset, query.limit,
                                                focus, engine.dialect.name)).all())

        offset = query.offset
        found = read(offset, None)
        focus = None
        if query.focus is not None:
            focus = next((offset + i for i, r in enumerate(found) if r.id == query.focus), None)
        if focus is None and query.focus is not None:
            found = read(offset, query.focus)
            focus = found[0].focus_at
            if focus is not None and query.limit is not None and not offset <= focus < offset + query.limit:
                offset = max(0, focus - query.limit // 2)
                found = read(offset, None)
        first = found[0]
        rows = [DeviceRow(id=r.id, profile=r.profile, groups=",".join(r.groups), tags=",".join(r.tags),
                          status=r.status, running=r.running, desired=r.desired, install=r.install,
                          last_seen=r.last_seen,
                          p95_ms=float(r.p95w) / float(r.p95n) if r.p95w is not None and r.p95n else None,
                          error_rate=float(r.err) / float(r.req) if r.req else None,
                          drift=None if r.drift is None else float(r.drift))
                for r in found if r.id is not None]
        return FleetPage(rows, offset, int(first.n_matched), int(first.n_total), int(first.n_online),
                         int(first.n_bad), None if focus is None else int(focus))

    def device(self, device_id: str) -> DeviceDetail:
        rows = {r.id: r for r in self.devices(only=device_id)}  # the device screen needs one row, not the fleet
        if device_id not in rows:
            raise ActionError(f"no device {device_id}")
        with Session(self.registry.engine) as db:
            d = db.get(Device, device_id)
            assert d is not None  # noqa: S101 - listed just now
            windows = list(db.exec(select(TelemetryRow).where(TelemetryRow.device_id == device_id)
                                   .order_by(col(TelemetryRow.end).desc()).limit(60)))[::-1]
            report = db.exec(select(DriftReportRow).where(DriftReportRow.scope == "device",
                                                          DriftReportRow.device_id == device_id)
                             .order_by(col(DriftReportRow.id).desc())).first()
            features = [(f["name"], f["psi"] / f["psi_threshold"] if f["psi_threshold"] else 0.0)
                        for f in (report.report.get("features", []) if report else [])]
            history = [(e.at, e.action, e.actor) for e in audit.entries(db, subject=f"device:{device_id}", limit=20)]
            names = self._names(db)
            for rd, r in db.exec(select(RolloutDevice, Rollout).where(RolloutDevice.rollout_id == Rollout.id,
                                                                      RolloutDevice.device_id == device_id)):
                when = datetime.fromtimestamp(rd.finished_at or rd.assigned_at, tz=timezone.utc)
                v = db.get(ModelVersion, r.version_id)
                history.append((when, f"rollout {r.name} ({names.get(v.manifest_sha256, '?') if v else '?'}): "
                                      f"{rd.state}" + (f" — {rd.error}" if rd.error else ""), r.created_by))
            alerts = [(a.raised_at, f"{a.kind}: {a.detail.get('worst', '')}", a.active) for a in db.exec(
                select(Alert).where(Alert.device_id == device_id).order_by(col(Alert.id).desc()).limit(10))]
        history.sort(key=lambda h: h[0], reverse=True)
        return DeviceDetail(rows[device_id], d.fingerprint or {}, history[:20],
                            [w.p95_ms or 0.0 for w in windows],
                            [w.errors / w.requests if w.requests else 0.0 for w in windows], features, alerts)

    def alerts(self, include_all: bool = False) -> list[AlertRow]:
        """Active alerts and those cleared in the last 24 hours (every one with ``include_all``), newest first."""
        from server import alerts

        with Session(self.registry.engine) as db:
            return [AlertRow.of(alerts.alert_json(a))
                    for a in alerts.list_alerts(db, include_all=include_all, now=self.clock())]

    def acknowledge(self, alert_id: int, note: str | None = None) -> None:
        from server import alerts

        self._require(Permission.ACK_ALERT)
        try:
            _, entry = alerts.acknowledge(self.registry.engine, alert_id, self.actor, note)
        except alerts.AlertError as exc:
            raise ActionError(str(exc)) from None
        self.registry.anchor_audit(entry)

    def rollouts(self) -> list[RolloutRow]:
        with Session(self.registry.engine) as db:
            names = self._names(db)
            counts: dict[int, dict[str, int]] = {}
            for rid, state, n in db.exec(select(RolloutDevice.rollout_id, RolloutDevice.state, func.count())
                                         .group_by(col(RolloutDevice.rollout_id), col(RolloutDevice.state))):
                counts.setdefault(rid, {})[state] = n
            out = []
            for r in db.exec(select(Rollout).order_by(col(Rollout.id).desc())):
                v = db.get(ModelVersion, r.version_id)
                c = counts.get(r.id or 0, {})
                total = len(resolve_target(db, r.target))
                sizes = wave_sizes(RolloutSpec.model_validate(r.spec).effective_waves(), total)
                out.append(RolloutRow(
                    name=r.name, version=names.get(v.manifest_sha256, "?") if v else "?", state=r.state,
                    wave=f"{min(r.wave + 1, len(sizes))}/{len(sizes)}", done=c.get("installed", 0),
                    total=total, target=" ".join(f"{k}={','.join(x)}" for k, x in sorted(r.target.items()) if x),
                    production=r.production, reason=r.reason or ""))
        return out

    def rollout(self, name: str) -> RolloutDetail:
        rows = {r.name: r for r in self.rollouts()}
        if name not in rows:
            raise ActionError(f"no rollout {name}")
        with Session(self.registry.engine) as db:
            r = db.exec(select(Rollout).where(Rollout.name == name)).one()
            view = rollout_view(db, r)
            summary = describe(view)
            sizes = wave_sizes(view.spec.effective_waves(), rows[name].total)
            waves = []
            for i, cumulative in enumerate(sizes):
                size = cumulative - (sizes[i - 1] if i else 0)
                done = summary["waves"].get(i, {}).get("installed", 0)
                waves.append((i, done, size))
            latest: dict[tuple[int, str], GateEvaluation] = {}
            for g in db.exec(select(GateEvaluation).where(GateEvaluation.rollout_id == r.id)
                             .order_by(col(GateEvaluation.id))):
                latest[(g.wave, g.gate)] = g
            gates = [(w, gate, g.verdict, g.numbers) for (w, gate), g in sorted(latest.items())]
            return RolloutDetail(rows[name], waves, gates, r.created_by)

    def models(self) -> list[ModelRow]:
        with Session(self.registry.engine) as db:
            out = []
            for v in db.exec(select(ModelVersion).order_by(col(ModelVersion.id).desc())):
                arts = list(db.exec(select(VersionArtifact).where(VersionArtifact.version_id == v.id)))
                acc = {a.name: a.metrics.get("accuracy") for a in arts}
                fp32 = next((x for n, x in acc.items() if n.endswith("fp32") and x is not None), None)
                int8 = next((x for n, x in acc.items() if n.endswith("int8") and x is not None), None)
                decisions = [f"{a.actor} {a.decision}" for a in db.exec(
                    select(Approval).where(Approval.version_id == v.id))]
                out.append(ModelRow(
                    ref=f"{v.name}:{v.version}", stage=v.stage, author=v.author or "—", artifacts=len(arts),
                    accuracy=f"{fp32:.4f}" if fp32 is not None else "—",
                    int8_delta=f"{int8 - fp32:+.4f}" if fp32 is not None and int8 is not None else "—",
                    approvals=", ".join(decisions) or "—", created=v.created_at))
        return out

    def card(self, ref: str) -> str:
        """The version's model card (Markdown), with its lifecycle, approvals and where it runs."""
        from server.governance import version_card

        with Session(self.registry.engine) as db:
            try:
                v = find_version(db, ref)
            except GovernanceError as exc:
                raise ActionError(str(exc)) from None
            info = version_card(db, v, history=10)
        lines = [f"# {ref}", "", f"**Stage:** {v.stage} · **author:** {v.author or '—'} · "
                 f"**digest:** `{v.manifest_sha256[:16]}…`", ""]
        if info["approvals"]:
            lines += ["## Approvals", ""] + [f"- {a['at']:%Y-%m-%d %H:%M} **{a['actor']}** {a['decision']}: "
                                             f"{a['reason']}" for a in info["approvals"]] + [""]
        lines += [f"**Running on** {len(info['devices'])} device(s).", ""]
        if v.card:
            lines += ["---", "", v.card]
        else:
            lines += ["## Lineage", "", "```json", json.dumps(v.lineage, indent=2, sort_keys=True), "```"]
        return "\n".join(lines)

    def drift(self, hours: float = 24.0) -> list[DriftRow]:
        """Fleet-wide drift per version and feature over the last ``hours``, worst first."""
        since = self.clock() - timedelta(hours=hours)
        with Session(self.registry.engine) as db:
            names = self._names(db)
            per: dict[tuple[str, str], list[float]] = {}
            worst: dict[tuple[str, str], dict[str, float]] = {}
            for r in db.exec(select(DriftReportRow).where(DriftReportRow.computed_at >= since)
                             .order_by(col(DriftReportRow.id).desc()).limit(20_000)):
                for f in r.report.get("features", []):
                    ratio = f["psi"] / f["psi_threshold"] if f.get("psi_threshold") else 0.0
                    key = (names.get(r.manifest_sha256, r.manifest_sha256[:12]), f["name"])
                    if r.scope == "fleet":
                        per.setdefault(key, []).append(ratio)
                    elif r.device_id is not None:
                        w = worst.setdefault(key, {})
                        w[r.device_id] = max(w.get(r.device_id, 0.0), ratio)
        out = []
        for key, ratios in per.items():
            devs = sorted(worst.get(key, {}).items(), key=lambda kv: -kv[1])[:3]
            out.append(DriftRow(key[0], key[1], max(ratios[:5]), len(ratios),
                                ", ".join(f"{d} {s:.1f}" for d, s in devs)))
        return sorted(out, key=lambda r: -r.score)

    def feature_drift(self, feature: str, hours: float = 24.0) -> list[FeatureDriftRow]:
        """A registry feature's drift per model version consuming it and over all of them (server/features.py);
        empty for a feature that is not a registry feature."""
        with Session(self.registry.engine) as db:
            return feature_drift(db, feature, since=self.clock() - timedelta(hours=hours))

    def drift_series(self, version: str, feature: str, points: int = 60) -> list[float]:
        """The fleet's PSI / threshold of one feature of one version, oldest first; an evaluation without a score
        for the feature (it was not reported, or has no threshold) is no point, not a zero."""
        with Session(self.registry.engine) as db:
            digest = next((d for d, n in self._names(db).items() if n == version), version)
            rows = list(db.exec(select(DriftReportRow).where(DriftReportRow.scope == "fleet",
                                                             DriftReportRow.manifest_sha256 == digest)
                                .order_by(col(DriftReportRow.id).desc()).limit(points)))[::-1]
        out = []
        for r in rows:
            f = next((f for f in r.report.get("features", []) if f["name"] == feature), None)
            if f is not None and f.get("psi_threshold"):
                out.append(f["psi"] / f["psi_threshold"])
        return out

    def audit_log(self, text: str = "", limit: int = 500) -> tuple[list[AuditEntry], audit.AuditReport]:
        with Session(self.registry.engine) as db:
            entries = audit.entries(db, limit=limit)
            report = audit.verify(db, audit.read_anchor(self.registry.data / audit.ANCHOR_FILE))
            for e in entries:
                db.expunge(e)
        words = text.lower().split()
        if words:
            entries = [e for e in entries if all(w in f"{e.actor} {e.action} {e.subject} "
                                                     f"{json.dumps(e.detail)}".lower() for w in words)]
        return entries, report

    # -- actions --------------------------------------------------------------------------------

    def start_rollout(self, *, name: str, model: str, target: dict[str, list[str]], spec: RolloutSpec) -> None:
        try:
            start_governed(self.registry, self.governance, self.actor, name=name, model=model, target=target,
                           spec=spec)
        except (GovernanceError, RolloutError, RegistryError) as exc:
            raise ActionError(str(exc)) from None

    def command(self, name: str, command: str, reason: str | None = None) -> None:
        try:
            command_governed(self.registry, self.governance, self.actor, name, command, reason)
        except (GovernanceError, RolloutError, RegistryError) as exc:
            raise ActionError(str(exc)) from None

    def decide(self, ref: str, decision: str, reason: str) -> None:
        """Approve or reject a candidate version."""
        self._require(Permission.APPROVE if decision == "approve" else Permission.REJECT)
        try:
            with Session(self.registry.engine) as db:
                v = find_version(db, ref)
                (approve if decision == "approve" else reject)(db, v, self.actor, reason)
                last = audit.head(db)
            if last is not None:
                self.registry.anchor_audit(last)
        except GovernanceError as exc:
            raise ActionError(str(exc)) from None

    def can_decide(self, ref: str) -> bool:
        """Whether this operator may approve ``ref`` now: the role allows it, it is a candidate, and four-eyes lets
        them (server/governance.py :func:`four_eyes_refusal`)."""
        if not self.may(Permission.APPROVE):
            return False
        with Session(self.registry.engine) as db:
            try:
                v = find_version(db, ref)
            except GovernanceError:
                return False
            return v.stage == "candidate" and four_eyes_refusal(
                self.actor, ref, author=v.author, pushed_by=v.pushed_by, promoted_by=promoted_by(db, v)) is None

    def deploy(self, device_id: str, ref: str) -> str:
        """Deploy ``ref`` to the device; what happened, in a sentence."""
        self._require(Permission.DEPLOY)
        name, _, version = ref.partition(":")
        try:
            with Session(self.registry.engine) as db:  # production devices take approved versions only
                check_deploy(db, ref, device_id, self.governance.config)
            desired = self.registry.deploy(name, version, device_id, actor=self.actor)
        except (RegistryError, GovernanceError) as exc:
            raise ActionError(str(exc)) from None
        if desired is None:
            return f"{device_id} will run {ref} once it connects and reports its runtimes"
        return f"{device_id} should now run {ref} ({desired.artifact})"

    def revoke(self, device_id: str) -> None:
        self._require(Permission.REVOKE_DEVICE)
        try:
            self.registry.revoke_device(device_id, actor=self.actor)
        except RegistryError as exc:
            raise ActionError(str(exc)) from None

    def set_device(self, device_id: str, groups: list[str], tags: list[str]) -> str:
        """Replace the device's groups and tags (server/groups.py), audited; it converges to its groups' release."""
        self._require(Permission.ENROLL_DEVICE)
        try:
            device = self.registry.set_device(device_id, groups=groups, tags=tags, actor=self.actor)
        except RegistryError as exc:
            raise ActionError(str(exc)) from None
        return f"{device_id}: groups {', '.join(device.groups) or '(none)'}; tags {', '.join(device.tags) or '(none)'}"

    def device_command(self, device_id: str, command: str, level: str | None = None) -> str:
        """Send the device's agent ``command`` (server/diagnostics.py) and wait for its answer; the answer in a
        sentence, control characters escaped. ActionError when it is not done."""
        from server.diagnostics import clean, send_command

        self._require(Permission.COMMAND_DEVICE)
        try:
            ack = send_command(self.registry, device_id, command, level, actor=self.actor)
        except RegistryError as exc:
            raise ActionError(clean(str(exc))) from None
        if str(ack.status) != "done":
            raise ActionError(f"{device_id} answered {ack.status}: {clean(ack.message) or 'no reason given'}")
        return f"{device_id}: {command} done: {clean(ack.message)}"

    def device_logs(self, device_id: str, lines: int = 200) -> list[str]:
        """The agent's newest ``lines`` log lines, formatted and with control characters escaped."""
        from server.diagnostics import fetch_logs, format_line

        self._require(Permission.COMMAND_DEVICE)
        try:
            batch = fetch_logs(self.registry, device_id, lines, actor=self.actor)
        except RegistryError as exc:
            raise ActionError(str(exc)) from None
        return [format_line(line) for line in batch.lines]
