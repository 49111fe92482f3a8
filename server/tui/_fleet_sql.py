"""The Fleet table as SQL: every device's row as the TUI shows it (server/tui/data.py ``DeviceRow``), computed in
the database, so that a page of it is filtered, sorted, counted and cut there and only the page crosses into
Python.

The columns of the fleet expression (:func:`fleet_rows`) are the row's fields: the shown status comes from
server/presence.py :func:`~server.presence.online_clause` (the rule the CLI and /metrics use); health is
``DeviceRow.health`` written as a CASE, the one rule that has to exist twice (tests/test_tui_fleet_page.py holds
the two to the same answers); groups and tags as comma-joined text are the JSON lists with their punctuation
taken out (a group or tag name has none: server/groups.py ``GROUP_PATTERN``).

The filter (:func:`matches`) is server/tui/render.py :func:`~server.tui.render.fleet_matches`: a plain word is a
substring of the row's words, ``group:G`` and ``tag:T`` one of its groups or tags, ``status:``, ``profile:``,
``health:`` and ``version:`` (the running one) equal to the field, all without case. Lower-casing in SQLite is
ASCII-only; ids, groups, tags and versions are ASCII by their patterns, a custom profile name may not be.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Float, String, and_, case, cast, false, func, literal, or_, true
from sqlalchemy import select as sa_select
from sqlalchemy.orm import aliased
from sqlalchemy.sql.expression import ColumnElement
from sqlalchemy.sql.selectable import CTE
from sqlmodel import col

from server.db.models import Device, DriftReportRow, ModelVersion, TelemetryRow
from server.presence import online_clause

__all__ = ["fleet_rows", "matches", "order", "page"]

DASH = "—"
_LIST_FIELDS = {"group": "groups_text", "tag": "tags_text"}
_EQUAL_FIELDS = {"status": "status", "profile": "profile", "health": "health", "version": "running"}
_SORTS = {"id": "id", "profile": "profile", "groups": "groups_text", "status": "status", "running": "running",
          "desired": "desired", "install": "install", "last_seen": "last_seen", "p95": "p95_ms",
          "errors": "error_rate", "drift": "drift"}
_TEXT_SORTS = {"id", "profile", "groups", "status", "running", "desired", "install"}


def _csv(json_list: Any) -> ColumnElement[str]:
    """A JSON list of names as ``a,b`` (what ``",".join(names)`` gives)."""
    text: ColumnElement[str] = cast(json_list, String)
    for mark in ('"', "[", "]", " "):
        text = func.replace(text, mark, "")
    return text


def _version_name(digest: Any) -> tuple[Any, ColumnElement[str]]:
    """A join target for the model version with manifest ``digest``, and its ``name:version`` (or —)."""
    v = aliased(ModelVersion)
    name = case((col(v.id).is_(None), literal(DASH)), else_=col(v.name).concat(":").concat(col(v.version)))
    return (v, col(v.manifest_sha256) == digest), name


def fleet_rows(now: datetime, stale_after: timedelta, recent: timedelta) -> CTE:
    """Every device's row at ``now``: telemetry newer than ``now - recent`` aggregated, the latest drift score."""
    tele = (sa_select(col(TelemetryRow.device_id).label("device_id"),
                      func.sum(TelemetryRow.requests).label("req"), func.sum(TelemetryRow.errors).label("err"),
                      func.sum(col(TelemetryRow.p95_ms) * col(TelemetryRow.requests)).label("p95w"),
                      func.sum(TelemetryRow.requests).filter(col(TelemetryRow.p95_ms).is_not(None)).label("p95n"))
            .where(col(TelemetryRow.received_at) >= now - recent)
            .group_by(col(TelemetryRow.device_id)).subquery("tele"))
    # the latest device report's id per device, joined (an ``id IN (…)`` here is re-read per device by SQLite)
    latest = (sa_select(col(DriftReportRow.device_id).label("device_id"), func.max(DriftReportRow.id).label("id"))
              .where(col(DriftReportRow.scope) == "device").group_by(col(DriftReportRow.device_id)).subquery("latest"))
    drift = aliased(DriftReportRow, name="drift")
    running_join, running = _version_name(col(Device.running_manifest))
    desired_join, desired = _version_name(col(Device.desired_manifest))
    status = case((col(Device.revoked) == true(), literal("revoked")),
                  (online_clause(now, stale_after), literal("online")),
                  (col(Device.status) == "online", literal("offline")), else_=col(Device.status))
    install = func.coalesce(func.nullif(col(Device.install_step), ""), DASH)
    p95 = case((tele.c.p95n > 0, cast(tele.c.p95w, Float) / cast(tele.c.p95n, Float)), else_=None)
    error_rate = case((tele.c.req > 0, cast(tele.c.err, Float) / cast(tele.c.req, Float)), else_=None)
    errors, score = func.coalesce(error_rate, 0.0), func.coalesce(col(drift.score), 0.0)
    health = case((status != "online", literal("off")),
                  (or_(install == "failed", errors > 0.05, score >= 1), literal("bad")),
                  (or_(install.not_in(("done", DASH)), errors > 0.01, score >= 0.5), literal("warn")),
                  else_=literal("ok"))
    q = (sa_select(col(Device.id).label("id"), col(Device.profile).label("profile"),
                   col(Device.groups).label("groups"), col(Device.tags).label("tags"),
                   _csv(col(Device.groups)).label("groups_text"), _csv(col(Device.tags)).label("tags_text"),
                   status.label("status"), running.label("running"), desired.label("desired"),
                   install.label("install"), col(Device.last_seen).label("last_seen"),
                   tele.c.req, tele.c.err, tele.c.p95w, tele.c.p95n, p95.label("p95_ms"),
                   error_rate.label("error_rate"), col(drift.score).label("drift"), health.label("health"))
         .select_from(Device)
         .outerjoin(tele, tele.c.device_id == col(Device.id))
         .outerjoin(latest, latest.c.device_id == col(Device.id))
         .outerjoin(drift, col(drift.id) == latest.c.id)
         .outerjoin(*running_join).outerjoin(*desired_join))
    return q.cte("fleet")


def matches(fleet: CTE, text: str) -> ColumnElement[bool]:
    """server/tui/render.py :func:`fleet_matches` over the fleet expression."""
    c = fleet.c
    hay: ColumnElement[str] = func.lower(c.id)
    for part in (c.profile, c.groups_text, c.tags_text, c.status, c.running, c.desired, c.install, c.health):
        hay = hay.concat(" ").concat(func.lower(part))
    conditions: list[ColumnElement[bool]] = []
    for word in text.lower().split():
        key, sep, value = word.partition(":")
        if sep and key in _LIST_FIELDS:
            listed = literal(",").concat(func.lower(c[_LIST_FIELDS[key]])).concat(",")
            conditions.append(false() if "," in value else listed.contains(f",{value},", autoescape=True))
        elif sep and key in _EQUAL_FIELDS:
            conditions.append(func.lower(c[_EQUAL_FIELDS[key]]) == value)
        else:
            conditions.append(hay.contains(word, autoescape=True))
    return and_(true(), *conditions)


def order(columns: Any, sort: str, reverse: bool, dialect: str) -> list[Any]:
    """ORDER BY for column ``sort`` of ``columns`` (the fleet's, or a page's): missing values last (first,
    reversed), text without case, ties by id."""
    value: Any = columns[_SORTS[sort]]
    if sort in _TEXT_SORTS:
        value = func.lower(value)
        if dialect == "postgresql":  # code-point order, as Python compares strings (SQLite's BINARY does)
            value = value.collate("C")
    missing = value.is_(None)
    return [missing.desc() if reverse else missing, value.desc() if reverse else value, columns.id]


def page(fleet: CTE, text: str, sort: str, reverse: bool, offset: int, limit: int | None, focus: str | None,
         dialect: str) -> Any:
    """One statement for a page and the counts; the fleet expression is worked out once (a CTE read more than
    once is materialised by SQLite and PostgreSQL). Every row it returns carries the fleet's counts
    (``n_total``, ``n_online``, ``n_bad``, ``n_matched``) and the 0-based position of ``focus`` among the matched
    devices (``focus_at``, null when not asked or not matched), then the page's row; a page with no row is one
    row of counts and nulls."""
    match = matches(fleet, text)

    def number(condition: ColumnElement[bool]) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    focus_at: Any = literal(None)
    if focus is not None:
        ranked = (sa_select(fleet.c.id, func.row_number().over(order_by=order(fleet.c, sort, reverse, dialect))
                            .label("rn")).where(match).subquery("ranked"))
        focus_at = sa_select(ranked.c.rn - 1).where(ranked.c.id == focus).scalar_subquery()
    counts = sa_select(func.count().label("n_total"), number(fleet.c.status == "online").label("n_online"),
                       number(fleet.c.health == "bad").label("n_bad"), number(match).label("n_matched"),
                       focus_at.label("focus_at")).subquery("counts")
    rows = sa_select(fleet).where(match).order_by(*order(fleet.c, sort, reverse, dialect)).offset(offset)
    if limit is not None:
        rows = rows.limit(limit)
    held = rows.subquery("page")
    return (sa_select(counts, held).select_from(counts.outerjoin(held, true()))
            .order_by(*order(held.c, sort, reverse, dialect)))
