"""The TUI driven with key presses against a real database filled by the fleet simulator (a real Mosquitto,
the server ingesting): filtering, sorting, drill-down, a rollout started through the form, paused and rolled
back with the typed confirmation, a version approved by an approver and refused to its author. After each
action the database shows its effect and the audit log records it."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlmodel import Session, col, select
from textual.widgets import DataTable, Label, Select, Sparkline, Static

from server import audit
from server.app import ServerApp
from server.db.models import AuditEntry, DriftReportRow, ModelVersion, Rollout
from server.governance import Governance, find_version, promote
from server.orchestrator import Orchestrator
from server.registry import Registry
from server.simulate import SimConfig, simulate
from server.tui.app import EdgeherdApp, make_app
from server.tui.data import FleetData
from server.tui.modals import ConfirmModal, ReasonModal, TypedConfirmModal
from server.tui.screens import DeviceScreen, FleetScreen, HelpScreen, ModelsScreen, RolloutsScreen
from server.tui.screens.fleet import FleetTable
from tests.server_helpers import blob_bundle, server_dir
from tests.tui_state import OPERATORS, settle

pytestmark = pytest.mark.integration
SIZE = (160, 48)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, digits_bundle):
    from protocol import manifest_digest
    from tests.tls_device_helpers import reachable

    root = reachable(tmp_path_factory.mktemp("tui-fleet"))  # the broker's user reads its TLS files under it
    data, _ = server_dir(root / "data", digits_bundle.key)
    (data / "operators.toml").write_text(OPERATORS)
    app = ServerApp(data, metrics_port=0, drift_interval=0, rollout_interval=0).start()
    reg = app.registry
    reg.push_model(digits_bundle.dir, actor="alice")
    reg.push_model(blob_bundle(root / "b", digits_bundle.key, model="digits", version="1.1.0")[0], actor="alice")
    with Session(reg.engine) as db:
        promote(db, find_version(db, "digits:1.0.0"), "alice")
    lab = reg.add_devices_bulk([f"lab-{i:02d}" for i in range(20)], "x86-64-cpu", ["lab"])  # takes onnx-fp32
    prod = reg.add_devices_bulk([f"prod-{i:02d}" for i in range(10)], "x86-64", ["prod"], custom_profile=True)
    manifest = digits_bundle.signed.manifest
    digest = manifest_digest(manifest)
    result = simulate(SimConfig(reg.broker_url, {**lab, **prod}, seconds=3, interval=0.25, processes=2,
                                reference=manifest.reference, manifest_sha256=digest,
                                running=(digest, "digits-onnx-int8"), drifting=frozenset({"lab-03"}), drift=3.0,
                                follow_desired=True))
    assert result.failed_connects == 0
    deadline = time.monotonic() + 30
    while app.queued() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    assert app.evaluate_drift() > 0
    yield app, data
    app.stop()


def _keys(table: DataTable) -> list[str]:
    return [str(table.coordinate_to_cell_key((i, 0)).row_key.value) for i in range(table.row_count)]


def _audit(data_app, action: str) -> list[AuditEntry]:
    with Session(data_app.registry.engine) as db:
        return list(db.exec(select(AuditEntry).where(AuditEntry.action == action).order_by(col(AuditEntry.seq))))


def test_fleet_filters_sorts_and_drills_down(fleet):
    asyncio.run(_test_fleet_filters_sorts_and_drills_down(fleet))


async def _test_fleet_filters_sorts_and_drills_down(fleet):
    _, data = fleet
    app = make_app(data, "dave", refresh_s=0)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, FleetScreen)
        table = screen.query_one("#fleet", FleetTable)
        assert table.row_count == 30
        await pilot.press("slash", *"group:prod", "enter")
        await settle(pilot)
        assert sorted(table.row_keys()) == [f"prod-{i:02d}" for i in range(10)]
        await pilot.press("slash", *["backspace"] * 10, "enter")
        await settle(pilot)
        assert table.row_count == 30
        for _ in range(10):  # to the drift column, then highest first
            await pilot.press("s")
        await pilot.press("S")
        await settle(pilot)
        assert table.row_keys()[0] == "lab-03"  # the device whose inputs drift
        drifts = [screen.rows[k].drift for k in table.row_keys()]
        assert drifts == sorted(drifts, key=lambda v: -(v or 0))
        table.move_cursor(row=0)
        await pilot.press("enter")
        await settle(pilot)
        device = app.screen
        assert isinstance(device, DeviceScreen) and device.device_id == "lab-03"
        assert "c0_mean" in str(device.query_one("#features", Static).render())  # its image summaries
        await pilot.press("x")  # a viewer may not revoke: greyed out, nothing opens
        await settle(pilot)
        assert app.screen is device and device.check_action("revoke", ()) is None
        await pilot.press("escape")
        await settle(pilot)
        assert app.screen is screen


def test_a_rollout_started_through_the_form_paused_and_rolled_back(fleet):
    asyncio.run(_test_a_rollout_started_through_the_form_paused_and_rolled_back(fleet))


async def _test_a_rollout_started_through_the_form_paused_and_rolled_back(fleet):
    server, data = fleet
    app = make_app(data, "alice", refresh_s=0)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        assert isinstance(app.screen, RolloutsScreen)
        await pilot.press("n")
        await settle(pilot)
        await pilot.press(*"tui-lab")
        app.screen.query_one("#model", Select).value = "digits:1.1.0"
        await pilot.click("#groups")
        await pilot.press(*"lab")
        await pilot.click("#confirm")
        await settle(pilot)
        with Session(server.registry.engine) as db:
            row = db.exec(select(Rollout).where(Rollout.name == "tui-lab")).one()
            assert row.state == "pending" and row.created_by == "alice" and row.target == {"groups": ["lab"]}
        assert [e.actor for e in _audit(server, "rollout.create") if e.subject == "rollout:tui-lab"] == ["alice"]

        Orchestrator(server.registry).step()  # the server's next step: the canary gets the version
        await pilot.press("p")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmModal) and "groups=lab" in app.screen.question
        await pilot.press("enter")  # focus starts on Cancel
        await settle(pilot)
        with Session(server.registry.engine) as db:
            assert db.exec(select(Rollout).where(Rollout.name == "tui-lab")).one().state == "running"
        await pilot.press("p")
        await settle(pilot)
        await pilot.click("#confirm")
        await settle(pilot)
        with Session(server.registry.engine) as db:
            assert db.exec(select(Rollout).where(Rollout.name == "tui-lab")).one().state == "paused"
        assert [e.actor for e in _audit(server, "rollout.paused")] == ["alice"]

        await pilot.press("b")
        await settle(pilot)
        modal = app.screen
        assert isinstance(modal, TypedConfirmModal)
        await pilot.press(*"tui-la", "enter")  # not the name: nothing happens
        await settle(pilot)
        assert app.screen is modal
        await pilot.press("b", "enter")
        await settle(pilot)
        with Session(server.registry.engine) as db:
            assert db.exec(select(Rollout).where(Rollout.name == "tui-lab")).one().state == "rolling_back"
        started = _audit(server, "rollout.rollback_started")
        assert [e.actor for e in started] == ["alice"] and started[0].detail["devices"] == 1
        with Session(server.registry.engine) as db:
            assert audit.verify(db).ok


def test_an_author_cannot_approve_and_an_approver_can(fleet):
    asyncio.run(_test_an_author_cannot_approve_and_an_approver_can(fleet))


async def _test_an_author_cannot_approve_and_an_approver_can(fleet):
    server, data = fleet
    app = make_app(data, "alice", refresh_s=0)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("m")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, ModelsScreen)
        table = screen.query_one("#models", DataTable)
        table.move_cursor(row=_keys(table).index("digits:1.0.0"))
        await settle(pilot)
        assert screen.selected == "digits:1.0.0" and screen.check_action("approve", ()) is None  # greyed: author
        await pilot.press("a")
        await settle(pilot)
        assert app.screen is screen
    with Session(server.registry.engine) as db:
        assert db.exec(select(ModelVersion).where(ModelVersion.version == "1.0.0")).one().stage == "candidate"

    app = make_app(data, "bob", refresh_s=0)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("m")
        await settle(pilot)
        screen = app.screen
        table = screen.query_one("#models", DataTable)
        table.move_cursor(row=_keys(table).index("digits:1.0.0"))
        await settle(pilot)
        assert screen.check_action("approve", ()) is True
        await pilot.press("a")
        await settle(pilot)
        assert isinstance(app.screen, ReasonModal)
        await pilot.press(*"held-out accuracy fine", "enter")
        await settle(pilot)
    with Session(server.registry.engine) as db:
        assert db.exec(select(ModelVersion).where(ModelVersion.version == "1.0.0")).one().stage == "approved"
    approvals = _audit(server, "model.approve")
    assert [(e.actor, e.detail.get("reason")) for e in approvals] == [("bob", "held-out accuracy fine")]


def test_drift_audit_and_help_screens(fleet):
    asyncio.run(_test_drift_audit_and_help_screens(fleet))


async def _test_drift_audit_and_help_screens(fleet):
    _, data = fleet
    app = make_app(data, "dave", refresh_s=0)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("d")
        await settle(pilot)
        drift = app.screen.query_one("#drift", DataTable)
        assert drift.row_count > 0 and _keys(drift)[0].startswith("digits:1.0.0|")
        await pilot.press("l")
        await settle(pilot)
        assert "verified" in str(app.screen.query_one("#chain", Static).render())
        table = app.screen.query_one("#audit", DataTable)
        everything = table.row_count
        await pilot.press("slash", *"device.add")
        await settle(pilot)
        assert 0 < table.row_count < everything
        await pilot.press("escape", "question_mark")
        await settle(pilot)
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await settle(pilot)
        assert not isinstance(app.screen, HelpScreen)


def _drawn(spark: Sparkline) -> str:
    return "".join(spark.render_line(y).text for y in range(spark.size.height))


def test_drift_and_device_screens_draw_no_bar_without_data(tmp_path):
    asyncio.run(_test_drift_and_device_screens_draw_no_bar_without_data(tmp_path))


async def _test_drift_and_device_screens_draw_no_bar_without_data(tmp_path):
    data, _ = server_dir(tmp_path / "data")
    (data / "operators.toml").write_text(OPERATORS)
    reg = Registry(data)
    reg.add_device("pi-1", "raspberry-pi-5")
    app = EdgeherdApp(FleetData(reg, Governance.load(data), "dave"), refresh_s=0)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("enter")  # the device screen of a device that never sent telemetry
        await settle(pilot)
        assert isinstance(app.screen, DeviceScreen)
        for name, label in (("latency", "p95 latency (ms): no telemetry yet"),
                            ("errors", "error rate: no telemetry yet")):
            assert not app.screen.query_one(f"#{name}", Sparkline).display
            assert str(app.screen.query_one(f"#{name}-label", Label).render()) == label
        await pilot.press("d")  # no drift evaluated anywhere
        await settle(pilot)
        series = app.screen.query_one("#series", Sparkline)
        assert not series.display and app.screen.query_one("#drift", DataTable).row_count == 0
        assert str(app.screen.query_one("#series-label", Label).render()) == "no drift evaluated yet"

        with Session(reg.engine) as db:  # one fleet-wide evaluation: a flat line, not a full bar
            db.add(ModelVersion(name="digits", version="1.0.0", manifest_sha256="1" * 64, signed_manifest=b"{}"))
            db.add(DriftReportRow(scope="fleet", manifest_sha256="1" * 64, n=500, drifted=False, worst="pixel_13",
                                  score=0.3, report={"features": [{"name": "pixel_13", "psi": 0.03,
                                                                   "psi_threshold": 0.1}]}))
            db.commit()
        await pilot.press("l", "d")
        await settle(pilot)
        series = app.screen.query_one("#series", Sparkline)
        assert series.display and list(series.data or []) == [pytest.approx(0.3)] * 2
        drawn = _drawn(series)
        assert "█" not in drawn and "▁" in drawn, drawn
        assert "over the last 1 evaluations" in str(app.screen.query_one("#series-label", Label).render())
    reg.engine.dispose()
