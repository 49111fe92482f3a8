"""Alerts (server/alerts.py): list them, show one with its webhook deliveries, acknowledge or resolve one.

Acknowledging and resolving need :attr:`~server.governance.Permission.ACK_ALERT` (the operator role) and land in the
audit log with the note.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query
from pydantic import Field
from sqlmodel import Session

from server import alerts as core
from server.api.auth import Operator, permit
from server.api.routes_base import Body, as_object, plain, refused
from server.db.models import Alert
from server.governance import Permission

__all__ = ["alerts"]

alerts = APIRouter(prefix="/alerts", tags=["drift and audit"])

AlertId = Annotated[int, Path(ge=1, le=2**62, description="The alert's id (`GET /alerts`)")]


class Note(Body):
    note: Annotated[str | None, Field(max_length=core.MAX_NOTE,
                                      description="Why, or what is being done (recorded, and in the audit log)")] = None


@alerts.get("", summary="Active alerts, and those cleared within the last hours; newest first")
def list_alerts(op: Annotated[Operator, Depends(permit(Permission.READ))],
                hours: Annotated[float, Query(ge=0, le=24 * 366, description="How far back cleared ones go")] = 24.0,
                active: Annotated[bool, Query(description="Only the active ones")] = False,
                all: Annotated[bool, Query(description="Every alert, cleared ones of any age too")] = False,
                limit: Annotated[int, Query(ge=1, le=5000)] = 500) -> list[dict[str, Any]]:
    with Session(op.registry.engine) as db:
        rows = core.list_alerts(db, include_all=all, active_only=active, hours=hours, limit=limit,
                                now=datetime.now(timezone.utc))
        return [plain(core.alert_json(a)) for a in rows]


@alerts.get("/{alert_id}", summary="One alert: its state, reason, who acknowledged it, its webhook deliveries")
def show_alert(op: Annotated[Operator, Depends(permit(Permission.READ))], alert_id: AlertId) -> dict[str, Any]:
    with Session(op.registry.engine) as db:
        alert = db.get(Alert, alert_id)
        if alert is None:
            raise HTTPException(404, f"no alert {alert_id}")
        return as_object(core.alert_json(alert) | {
            "deliveries": [core.delivery_json(d) for d in core.deliveries(db, alert_id)]})


def _act(op: Operator, alert_id: int, action: str, note: str | None) -> dict[str, Any]:
    try:
        if action == "ack":
            alert, entry = core.acknowledge(op.registry.engine, alert_id, op.name, note)
        else:
            alert, entry = core.resolve(op.registry.engine, alert_id, op.name, note)
    except core.AlertNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    except core.AlertError as exc:
        raise refused(exc) from None
    op.registry.anchor_audit(entry)
    return as_object(core.alert_json(alert))


@alerts.post("/{alert_id}/ack", summary="Acknowledge a raised alert: someone is on it")
def ack_alert(op: Annotated[Operator, Depends(permit(Permission.ACK_ALERT))], alert_id: AlertId,
              body: Note | None = None) -> dict[str, Any]:
    return _act(op, alert_id, "ack", body.note if body is not None else None)


@alerts.post("/{alert_id}/resolve", summary="Clear an alert by hand; a lasting shift raises a new one")
def resolve_alert(op: Annotated[Operator, Depends(permit(Permission.ACK_ALERT))], alert_id: AlertId,
                  body: Note | None = None) -> dict[str, Any]:
    return _act(op, alert_id, "resolve", body.note if body is not None else None)
