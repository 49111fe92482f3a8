"""The Fleet table's page cut in the database (server/tui/_fleet_sql.py, ``FleetData.fleet``) against the same page
cut in Python from every device's row (server/tui/fleet_page.py ``page_of`` over ``FleetData.devices``), on SQLite
and PostgreSQL: every filter word kind, every column sorted both ways, pages, the device kept in view, and a fleet
whose rows cover the cases (revoked, silent, never seen, no telemetry, no drift, unknown versions, names with
LIKE's wildcards in them)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from itertools import product

import pytest
from sqlalchemy import insert
from sqlmodel import Session

from server.db.models import Device, DriftReportRow, ModelVersion, TelemetryRow
from server.governance import Governance
from server.registry import Registry
from server.tui.data import FLEET_SORTS, FleetData, FleetQuery
from server.tui.fleet_page import page_of
from server.tui.render import FLEET_COLUMNS
from tests.tui_state import OPERATORS

NOW = datetime(2026, 11, 2, 9, 30, tzinfo=timezone.utc)
V1, V2, UNKNOWN = "1" * 64, "2" * 64, "9" * 64

TEXTS = ["", "lab", "LAB", "group:lab", "group:", "group:lab,prod", "tag:roof", "tag:", "status:online",
         "status:offline", "status:revoked", "status:unknown", "health:bad", "health:warn", "health:off", "health:ok",
         "profile:my_board", "profile:x86-64", "version:digits:1.1.0", "version:—", "digits:1.1", "_", "%", "1_0",
         "edge.east_1", "prod kitchen", "failed", "—", "downloading lab", "nothing-matches", "dev-0 group:prod",
         "other:word", "ok"]


def _fill(engine) -> None:  # type: ignore[no-untyped-def]
    """40 devices crossing the cases the row's fields can be in."""
    with Session(engine) as db:
        for v, d in (("1.0.0", V1), ("1.1.0", V2)):
            db.add(ModelVersion(name="digits", version=v, manifest_sha256=d, signed_manifest=b"{}", stage="deployed",
                                created_at=NOW))
        db.commit()
    with engine.begin() as conn:
        devices, telemetry, drift = [], [], []
        for i in range(40):
            did = f"dev-{i:02d}"
            devices.append({
                "id": did, "profile": ("raspberry-pi-5", "x86-64", "My_Board")[i % 3],
                "groups": ([], ["lab"], ["Lab", "prod"], ["edge.east_1"], ["prod"])[i % 5],
                "tags": ([], ["kitchen"], ["garage", "roof"])[i % 3], "credentials_ref": "",
                "revoked": i % 13 == 12, "status": ("online", "online", "offline", "unknown", "online")[i % 5],
                "state_session": 1, "state_seq": 1,
                "last_seen": None if i % 11 == 10 else NOW - timedelta(seconds=(5, 60, 400, 170, 2000)[i % 5] + i),
                "running_manifest": (V1, V2, UNKNOWN, None, "")[i % 5 if i % 7 else (i // 7) % 5],
                "install_step": ("done", "failed", "downloading", None, "", "done", "done")[i % 7],
                "desired_generation": 1, "desired_manifest": (V2, V1, None)[i % 3], "created_at": NOW})
            for w in range(i % 3):  # none, one or two recent windows; one old one that does not count
                telemetry.append({"device_id": did, "session": 1, "window_seq": w, "start": NOW, "end": NOW,
                                  "requests": (100, 0, 40)[(i + w) % 3], "errors": (i * 3 + w) % 9,
                                  "p95_ms": None if i % 4 == 3 else 2.0 + i / 8 + w, "dropped_windows": 0,
                                  "received_at": NOW - timedelta(minutes=1 + w)})
            telemetry.append({"device_id": did, "session": 0, "window_seq": 0, "start": NOW, "end": NOW,
                              "requests": 100, "errors": 90, "p95_ms": 99.0, "dropped_windows": 0,
                              "received_at": NOW - timedelta(minutes=30)})
            for k in range(i % 3):  # the latest report is the one shown
                drift.append({"scope": "device", "device_id": did, "manifest_sha256": V1, "n": 50,
                              "drifted": False, "worst": "x", "score": (i % 9) / 6 + k / 10, "report": {},
                              "computed_at": NOW})
        drift.append({"scope": "fleet", "device_id": None, "manifest_sha256": V1, "n": 500, "drifted": True,
                      "worst": "x", "score": 9.0, "report": {}, "computed_at": NOW})
        conn.execute(insert(Device), devices)
        conn.execute(insert(TelemetryRow), telemetry)
        conn.execute(insert(DriftReportRow), drift)


@pytest.fixture
def fleet(engine, tmp_path):  # type: ignore[no-untyped-def]
    _fill(engine)
    data = tmp_path / "data"
    data.mkdir()
    (data / "operators.toml").write_text(OPERATORS)
    return FleetData(Registry(data, engine=engine), Governance.load(data), "dave", clock=lambda: NOW,
                     stale_after=timedelta(seconds=180))


def test_the_sort_keys_are_the_tables_columns():
    assert tuple(key for key, _, _ in FLEET_COLUMNS) == FLEET_SORTS


def test_the_fixture_covers_every_health_and_status(fleet):
    rows = fleet.devices()
    assert {r.health for r in rows} == {"ok", "warn", "bad", "off"}
    assert {r.status for r in rows} == {"online", "offline", "unknown", "revoked"}
    assert {r.running for r in rows} == {"digits:1.0.0", "digits:1.1.0", "—"}
    assert any(r.p95_ms is None for r in rows) and any(r.error_rate is None for r in rows)
    assert any(r.drift is None for r in rows) and any(r.last_seen is None for r in rows)


def test_every_filter_and_order_gives_the_page_python_gives(fleet):
    every = fleet.devices()
    matched = set()
    asked = [*product(TEXTS, ["id"], (False, True)), *product(["", "lab", "health:warn"], FLEET_SORTS, (False, True))]
    for text, sort, reverse in asked:
        query = FleetQuery(text=text, sort=sort, reverse=reverse)
        got, want = fleet.fleet(query), page_of(every, query)
        assert got == want, query
        matched.add(got.matched)
    assert 0 in matched and 40 in matched and len(matched) > 10  # the words do tell devices apart


@pytest.mark.parametrize(("offset", "limit", "focus"), [
    (0, 5, None), (5, 5, None), (38, 5, None), (60, 5, None), (0, 0, None), (0, 40, None),
    (0, 5, "dev-02"), (0, 5, "dev-31"), (30, 4, "dev-01"), (0, None, "dev-17"), (0, 5, "no-such"),
])
def test_pages_and_the_device_kept_in_view(fleet, offset, limit, focus):
    every = fleet.devices()
    for text, sort, reverse in (("", "drift", True), ("lab", "last_seen", False), ("health:bad", "id", True),
                                ("", "p95", False)):
        query = FleetQuery(text=text, sort=sort, reverse=reverse, offset=offset, limit=limit, focus=focus)
        got = fleet.fleet(query)
        assert got == page_of(every, query), query
        if got.focus is not None and limit:
            assert got.offset <= got.focus < got.offset + limit  # the page holds the device kept in view


def test_a_bad_query_is_refused():
    with pytest.raises(ValueError, match="not a Fleet column"):
        FleetQuery(sort="colour")
    with pytest.raises(ValueError, match="not negative"):
        FleetQuery(offset=-1)
