"""Alerts: rows with a state machine, driven from the database, that reach someone.

The life of an alert (:data:`TRANSITIONS`)::

                 ack (an operator)
      raised ───────────────────────► acknowledged
         │                                 │
         │ clear (hysteresis)              │ clear (hysteresis)
         │ resolve (an operator)           │ resolve (an operator)
         ▼                                 ▼
      cleared ◄────────────────────────────┘

The state is read from the row (:func:`state_of`): ``active`` until cleared, acknowledged once
``acknowledged_at`` is set. A *condition* is (device, manifest, kind), the kinds being input drift and output
drift. Every decided drift evaluation of a device feeds its conditions' :class:`server.drift.Hysteresis`, whose
state (active, streak) lives in ``alert_conditions`` next to the id of the open alert (:func:`observe`): a
restarted server, or the replica that takes the "drift" lease over, carries on exactly where the last
evaluation stopped, so a condition that already has an alert never raises a second one, and clean evaluations
clear it whoever makes them.

Delivery: raising and clearing an alert queue a webhook delivery in the same transaction (when
``EDGEHERD_ALERT_WEBHOOK`` is set, server/settings.py). :class:`Notifier` POSTs them off the scoring path as
Prometheus Alertmanager's webhook JSON (:func:`alertmanager_payload`), retrying with exponential back-off; every
attempt is an ``alert_deliveries`` row with its status, error and when the next try is due.

Errors::

    Exception
     └── AlertError           the alert's state does not allow the action; the message says why
          └── AlertNotFound   no alert with that id
"""

from __future__ import annotations

import hashlib
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, or_, select

from server import audit
from server.db.models import Alert, AlertCondition, AlertDelivery, AuditEntry, ModelVersion
from server.drift import DriftReport, FeatureDrift, Hysteresis
from server.errors import ServerError
from server.settings import ALERT_WEBHOOK

__all__ = [
    "MAX_NOTE",
    "TRANSITIONS",
    "AlertAction",
    "AlertError",
    "AlertKind",
    "AlertNotFound",
    "AlertState",
    "Notifier",
    "Observation",
    "acknowledge",
    "alert_json",
    "alertmanager_payload",
    "deliveries",
    "delivery_json",
    "list_alerts",
    "next_state",
    "observations",
    "observe",
    "queue_delivery",
    "resolve",
    "state_of",
]

log = logging.getLogger(__name__)

#: Longest acknowledgement or resolution note.
MAX_NOTE = 1000
#: Who clears an alert when clean evaluations in a row do.
HYSTERESIS = "hysteresis"
#: Alertmanager's "no end time" (an alert still firing).
ZERO_TIME = "0001-01-01T00:00:00Z"


class AlertError(ServerError):
    """The alert's state does not allow the action; the message says why and what to do."""


class AlertNotFound(AlertError):
    """No alert with that id."""


class AlertKind(str, Enum):
    """What an alert is about. Input drift keeps the name alerts had before output drift raised any."""

    DRIFT = "drift"
    OUTPUT_DRIFT = "output_drift"

    @property
    def alertname(self) -> str:
        return {AlertKind.DRIFT: "EdgeherdInputDrift", AlertKind.OUTPUT_DRIFT: "EdgeherdOutputDrift"}[self]

    @property
    def label(self) -> str:
        return {AlertKind.DRIFT: "input drift", AlertKind.OUTPUT_DRIFT: "output drift"}[self]


class AlertState(str, Enum):
    RAISED = "raised"
    ACKNOWLEDGED = "acknowledged"
    CLEARED = "cleared"


class AlertAction(str, Enum):
    ACK = "ack"
    CLEAR = "clear"  # by hysteresis: clean evaluations in a row
    RESOLVE = "resolve"  # by an operator


#: (state, action) → the state it leads to; anything else is refused.
TRANSITIONS: dict[tuple[AlertState, AlertAction], AlertState] = {
    (AlertState.RAISED, AlertAction.ACK): AlertState.ACKNOWLEDGED,
    (AlertState.RAISED, AlertAction.CLEAR): AlertState.CLEARED,
    (AlertState.RAISED, AlertAction.RESOLVE): AlertState.CLEARED,
    (AlertState.ACKNOWLEDGED, AlertAction.CLEAR): AlertState.CLEARED,
    (AlertState.ACKNOWLEDGED, AlertAction.RESOLVE): AlertState.CLEARED,
}


def state_of(alert: Alert) -> AlertState:
    if not alert.active:
        return AlertState.CLEARED
    return AlertState.ACKNOWLEDGED if alert.acknowledged_at is not None else AlertState.RAISED


def next_state(alert_id: int | None, state: AlertState, action: AlertAction) -> AlertState:
    """The state ``action`` leads to, or AlertError saying why it cannot be taken."""
    found = TRANSITIONS.get((state, action))
    if found is None:
        verb = {AlertAction.ACK: "acknowledged", AlertAction.CLEAR: "cleared", AlertAction.RESOLVE: "resolved"}
        raise AlertError(f"alert {alert_id} is {state.value}; it cannot be {verb[action]} "
                         f"(`edgeherd alerts show {alert_id}` says by whom and when)")
    return found


def _utc(at: datetime) -> datetime:
    """SQLite gives naive datetimes back (stored as UTC)."""
    return at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _apply(alert: Alert, action: AlertAction, actor: str, note: str | None, now: datetime) -> AlertState:
    """Move ``alert`` by ``action`` (refused when its state does not allow it); the new state."""
    new = next_state(alert.id, state_of(alert), action)
    if action is AlertAction.ACK:
        alert.acknowledged_at, alert.acknowledged_by, alert.ack_note = now, actor, note
    else:
        alert.active, alert.cleared_at, alert.cleared_by = False, now, actor
        if note:
            alert.detail = {**alert.detail, "resolution": note}
    return new


# -- what a drift evaluation observes (pure) -----------------------------------------------------------


@dataclass(frozen=True)
class Observation:
    """One decided evaluation of one condition: did it drift, and why (the alert's detail if it raises one)."""

    kind: AlertKind
    drifted: bool
    detail: dict[str, Any]


def _reason(f: FeatureDrift) -> str:
    said = getattr(f, "reason", None)
    if said:
        return str(said) if str(said).startswith(f.name) else f"{f.name}: {said}"
    ratio = f.psi / f.psi_threshold if f.psi_threshold else 0.0
    return f"{f.name}: p = {f.p_value:.2g} (chi-square, {f.df} df), PSI {ratio:.2f}× its threshold"


def observations(report: DriftReport) -> list[Observation]:
    """What a decided report says about each condition: input drift always, output drift when it has classes."""
    worst = next((f for f in report.features if f.name == report.worst), None)
    drifting = sorted((f for f in report.features if f.drifted), key=lambda f: f.p_value)
    explained = drifting[0] if drifting else worst
    detail: dict[str, Any] = {"worst": report.worst, "n": report.n, "score": report.score,
                              "reason": _reason(explained) if explained is not None else None,
                              "features": [f.name for f in drifting[:10]]}
    out = [Observation(AlertKind.DRIFT, bool(report.drifted), detail)]
    if report.output is not None:
        o = report.output
        out.append(Observation(AlertKind.OUTPUT_DRIFT, bool(o.drifted),
                               {"worst": o.name, "n": o.n, "p_value": o.p_value,
                                "reason": _reason(o).replace("output.class:", "predicted classes:", 1)
                                .replace("output.value:", "predicted values:", 1)}))
    return out


# -- the database side of an evaluation -----------------------------------------------------------------


def queue_delivery(db: Session, alert: Alert, event: str, now: datetime) -> None:
    """Queue a webhook delivery of ``alert`` (``firing`` or ``resolved``) in the caller's transaction."""
    assert alert.id is not None  # noqa: S101 - flushed by the caller
    db.add(AlertDelivery(alert_id=alert.id, event=event, attempt=1, status="pending", due_at=now, created_at=now))


def observe(db: Session, device_id: str, manifest_sha256: str, obs: Observation, *, notify: bool,
            now: datetime | None = None, raise_after: int = 2, clear_after: int = 3) -> str | None:
    """Feed one decided evaluation to the condition's hysteresis, in the caller's transaction: raise an alert
    ("raised"), clear the open one ("cleared"), or neither (None). The condition row is locked (PostgreSQL) so
    two writers cannot both raise."""
    now = now or _now()
    cond = db.exec(select(AlertCondition).where(
        AlertCondition.device_id == device_id, AlertCondition.manifest_sha256 == manifest_sha256,
        AlertCondition.kind == obs.kind.value).with_for_update()).first()
    if cond is None:
        cond = AlertCondition(device_id=device_id, manifest_sha256=manifest_sha256, kind=obs.kind.value, updated_at=now)
        # an alert raised before conditions were kept in the database is adopted, not raised a second time
        legacy = db.exec(select(Alert).where(Alert.device_id == device_id, Alert.manifest_sha256 == manifest_sha256,
                                             Alert.kind == obs.kind.value, col(Alert.active))
                         .order_by(col(Alert.id).desc())).first()
        if legacy is not None:
            cond.active, cond.alert_id = True, legacy.id
    h = Hysteresis(raise_after=raise_after, clear_after=clear_after, active=cond.active, _streak=cond.streak)
    event = h.update(obs.drifted)
    cond.active, cond.streak, cond.updated_at = h.active, h._streak, now
    if event == "raised":
        alert = Alert(kind=obs.kind.value, device_id=device_id, manifest_sha256=manifest_sha256, detail=obs.detail,
                      raised_at=now)
        db.add(alert)
        db.flush()
        cond.alert_id = alert.id
        log.info("alert %s raised: %s on %s: %s", alert.id, obs.kind.label, device_id, obs.detail.get("reason"))
        if notify:
            queue_delivery(db, alert, "firing", now)
    elif event == "cleared":
        alert_row = db.get(Alert, cond.alert_id) if cond.alert_id is not None else None
        if alert_row is not None and alert_row.active:
            _apply(alert_row, AlertAction.CLEAR, HYSTERESIS, None, now)
            db.add(alert_row)
            log.info("alert %s cleared: %s on %s", alert_row.id, obs.kind.label, device_id)
            if notify:
                queue_delivery(db, alert_row, "resolved", now)
        cond.alert_id = None
    db.add(cond)
    return event


# -- operators' actions ------------------------------------------------------------------------------------


def _act(engine: Engine, alert_id: int, action: AlertAction, actor: str, note: str | None,
         notify: bool | None) -> tuple[Alert, AuditEntry]:
    if note is not None and len(note) > MAX_NOTE:
        raise AlertError(f"the note is {len(note)} characters; at most {MAX_NOTE}")
    note = note.strip() if note else None
    with Session(engine) as db:
        found = db.get(Alert, alert_id)
        if found is None:
            raise AlertNotFound(f"no alert {alert_id}; `edgeherd alerts list --all` lists them")
        subject_detail = {"kind": found.kind, "device": found.device_id, "note": note}
    send = ALERT_WEBHOOK.read() is not None if notify is None else notify
    done: list[Alert] = []

    def work(db: Session) -> None:
        done.clear()
        alert = db.exec(select(Alert).where(Alert.id == alert_id).with_for_update()).one()
        now = _now()
        _apply(alert, action, actor, note, now)
        db.add(alert)
        if action is AlertAction.RESOLVE:  # the condition starts again: a lasting shift raises a new alert
            for cond in db.exec(select(AlertCondition).where(AlertCondition.alert_id == alert_id)):
                cond.active, cond.streak, cond.alert_id, cond.updated_at = False, 0, None, now
                db.add(cond)
            fired = db.exec(select(AlertDelivery.id).where(AlertDelivery.alert_id == alert_id).limit(1)).first()
            if send or fired is not None:  # whoever was told it fired hears it resolved, whatever this shell says
                queue_delivery(db, alert, "resolved", now)
        done.append(alert)

    entry = audit.append_with_retry(engine, actor, f"alert.{action.value}", f"alert:{alert_id}", subject_detail,
                                    work=work)
    return done[0], entry


def acknowledge(engine: Engine, alert_id: int, actor: str, note: str | None = None) -> tuple[Alert, AuditEntry]:
    """``actor`` acknowledges the alert (raised → acknowledged), audited; AlertError when it is not raised."""
    return _act(engine, alert_id, AlertAction.ACK, actor, note, None)


def resolve(engine: Engine, alert_id: int, actor: str, note: str | None = None, *, notify: bool | None = None
            ) -> tuple[Alert, AuditEntry]:
    """``actor`` clears the alert by hand, audited; the condition's hysteresis starts again."""
    return _act(engine, alert_id, AlertAction.RESOLVE, actor, note, notify)


# -- reading -------------------------------------------------------------------------------------------------


def list_alerts(db: Session, *, include_all: bool = False, active_only: bool = False, hours: float = 24.0,
                limit: int = 500, now: datetime | None = None) -> Sequence[Alert]:
    """Newest first: the active ones and those cleared within ``hours``; every one with ``include_all``."""
    q = select(Alert)
    if active_only:
        q = q.where(col(Alert.active))
    elif not include_all:
        since = (now or _now()) - timedelta(hours=hours)
        q = q.where(or_(col(Alert.active), col(Alert.cleared_at) >= since))
    return db.exec(q.order_by(col(Alert.id).desc()).limit(limit)).all()


def deliveries(db: Session, alert_id: int) -> Sequence[AlertDelivery]:
    return list(db.exec(select(AlertDelivery).where(AlertDelivery.alert_id == alert_id)
                        .order_by(col(AlertDelivery.id))).all())


def _iso(at: datetime | None) -> str | None:
    return _utc(at).isoformat() if at is not None else None


def alert_json(alert: Alert) -> dict[str, Any]:
    """An alert as plain JSON (the API's and the CLI's shape)."""
    return {"id": alert.id, "kind": alert.kind, "state": state_of(alert).value, "device_id": alert.device_id,
            "manifest_sha256": alert.manifest_sha256, "active": alert.active, "severity": alert.severity,
            "reason": alert.detail.get("reason") or alert.detail.get("worst"), "detail": alert.detail,
            "raised_at": _iso(alert.raised_at), "acknowledged_at": _iso(alert.acknowledged_at),
            "acknowledged_by": alert.acknowledged_by, "ack_note": alert.ack_note,
            "cleared_at": _iso(alert.cleared_at), "cleared_by": alert.cleared_by}


def delivery_json(d: AlertDelivery) -> dict[str, Any]:
    return {"id": d.id, "event": d.event, "attempt": d.attempt, "status": d.status, "due_at": _iso(d.due_at),
            "attempted_at": _iso(d.attempted_at), "http_status": d.http_status, "error": d.error,
            "next_try_at": _iso(d.next_try_at)}


# -- the webhook ------------------------------------------------------------------------------------------------


def _rfc3339(at: datetime) -> str:
    return _utc(at).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alertmanager_payload(alert: Alert, status: str, *, model: str | None, external_url: str = "") -> dict[str, Any]:
    """Prometheus Alertmanager's webhook JSON (version 4) for one alert, ``firing`` or ``resolved``."""
    try:
        kind = AlertKind(alert.kind)
        name, title = kind.alertname, kind.label
    except ValueError:
        name, title = f"Edgeherd_{alert.kind}", alert.kind
    labels = {"alertname": name, "device": alert.device_id or "", "model": model or (alert.manifest_sha256 or "")[:12],
              "severity": alert.severity}
    reason = str(alert.detail.get("reason") or alert.detail.get("worst") or "")
    annotations = {"summary": f"{title} on {labels['device']} ({labels['model']})",
                   "description": reason + (f" (alert {alert.id}, n = {alert.detail['n']})" if "n" in alert.detail
                                            else f" (alert {alert.id})")}
    ends = _rfc3339(alert.cleared_at) if status == "resolved" and alert.cleared_at is not None else ZERO_TIME
    fingerprint = hashlib.sha256(json.dumps([alert.id, labels], sort_keys=True).encode()).hexdigest()[:16]
    group = {"alertname": name, "device": labels["device"]}
    return {
        "version": "4", "groupKey": "{}:{" + ", ".join(f'{k}="{v}"' for k, v in group.items()) + "}",
        "truncatedAlerts": 0, "status": status, "receiver": "edgeherd", "groupLabels": group,
        "commonLabels": labels, "commonAnnotations": annotations, "externalURL": external_url,
        "alerts": [{"status": status, "labels": labels, "annotations": annotations,
                    "startsAt": _rfc3339(alert.raised_at), "endsAt": ends, "generatorURL": external_url,
                    "fingerprint": fingerprint}],
    }


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer to record, not one to follow with the payload."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        return None


@dataclass
class Notifier:
    """POSTs due webhook deliveries and records each attempt; call :meth:`deliver_due` from one thread."""

    engine: Engine
    url: str
    #: Seconds one POST may take.
    timeout: float = 10.0
    #: Attempts per delivery before it is abandoned.
    max_attempts: int = 8
    #: Seconds before the second attempt; doubled for each one after, up to ``max_backoff``.
    backoff: float = 5.0
    max_backoff: float = 3600.0
    #: Bytes of the receiver's answer read, at most.
    max_response: int = 64 * 1024
    #: Where the payload's externalURL / generatorURL point (e.g. the TUI served on the web); empty: nowhere.
    external_url: str = ""

    def backoff_after(self, attempt: int) -> timedelta:
        return timedelta(seconds=min(self.backoff * 2 ** max(attempt - 1, 0), self.max_backoff))

    def deliver_due(self, now: datetime | None = None, limit: int = 50) -> int:
        """Send up to ``limit`` deliveries due by ``now``; how many were attempted."""
        now = _utc(now) if now is not None else _now()
        work: list[tuple[int, bytes]] = []
        with Session(self.engine) as db:
            # a delivery left "sending" by a server that stopped mid-way counts as a failed attempt
            # (after longer than a whole batch of POSTs can take, so another replica's batch in flight is left be)
            stale = now - timedelta(seconds=max(limit * self.timeout, 60.0) + 60.0)
            for d in db.exec(select(AlertDelivery).where(AlertDelivery.status == "sending",
                                                         col(AlertDelivery.attempted_at) < stale)).all():
                self._outcome(db, d, None, "no answer recorded: the server stopped while sending", now)
            rows = db.exec(select(AlertDelivery).where(AlertDelivery.status == "pending",
                                                       col(AlertDelivery.due_at) <= now)
                           .order_by(col(AlertDelivery.id)).limit(limit)).all()
            names: dict[str | None, str | None] = {}
            for d in rows:
                claimed = db.connection().execute(
                    update(AlertDelivery).where(col(AlertDelivery.id) == d.id, col(AlertDelivery.status) == "pending")
                    .values(status="sending", attempted_at=now)).rowcount
                alert = db.get(Alert, d.alert_id)
                if not claimed or alert is None or d.id is None:
                    continue
                if alert.manifest_sha256 not in names:
                    v = db.exec(select(ModelVersion).where(
                        ModelVersion.manifest_sha256 == alert.manifest_sha256)).first()
                    names[alert.manifest_sha256] = f"{v.name}:{v.version}" if v else None
                payload = alertmanager_payload(alert, d.event, model=names[alert.manifest_sha256],
                                               external_url=self.external_url)
                work.append((d.id, json.dumps(payload, separators=(",", ":")).encode()))
            db.commit()
        for delivery_id, body in work:
            with Session(self.engine) as db:
                row = db.get(AlertDelivery, delivery_id)
                if row is None or row.status != "sending":  # taken as abandoned meanwhile: not sent twice from here
                    continue
            status, error = self._post(body)
            with Session(self.engine) as db:
                row = db.get(AlertDelivery, delivery_id)
                if row is not None and row.status == "sending":  # only the attempt still in flight is settled
                    self._outcome(db, row, status, error, now)
                db.commit()
        return len(work)

    def _outcome(self, db: Session, d: AlertDelivery, status: int | None, error: str | None, now: datetime) -> None:
        d.http_status, d.error = status, error[:1000] if error else None
        if error is None:
            d.status = "delivered"
            log.info("alert %s (%s) delivered to the webhook, attempt %d", d.alert_id, d.event, d.attempt)
        elif d.attempt >= self.max_attempts:
            d.status = "abandoned"
            log.warning("alert %s (%s): webhook attempt %d failed (%s); giving up", d.alert_id, d.event, d.attempt,
                        error)
        else:
            d.status = "failed"
            d.next_try_at = now + self.backoff_after(d.attempt)
            log.warning("alert %s (%s): webhook attempt %d failed (%s); trying again at %s", d.alert_id, d.event,
                        d.attempt, error, d.next_try_at.isoformat(timespec="seconds"))
            db.add(AlertDelivery(alert_id=d.alert_id, event=d.event, attempt=d.attempt + 1, status="pending",
                                 due_at=d.next_try_at, created_at=now))
        db.add(d)

    def _post(self, body: bytes) -> tuple[int | None, str | None]:
        """POST ``body``; (HTTP status or None, None when delivered else what went wrong)."""
        request = urllib.request.Request(self.url, data=body, method="POST",  # noqa: S310 - http(s) only (settings)
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "edgeherd-alerts"})
        opener = urllib.request.build_opener(_NoRedirects)
        try:
            with opener.open(request, timeout=self.timeout) as answer:
                answer.read(self.max_response)
                code = int(answer.status)
        except urllib.error.HTTPError as exc:
            text = exc.read(200).decode("utf-8", "replace") if exc.fp is not None else ""
            return exc.code, f"HTTP {exc.code} {exc.reason}" + (f": {text.strip()}" if text.strip() else "")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return None, f"{type(exc).__name__}: {reason}"
        if not 200 <= code < 300:
            return code, f"HTTP {code}"
        return code, None
