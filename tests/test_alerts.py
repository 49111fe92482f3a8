"""Alerts as database rows: raised → acknowledged → cleared, across restarts and replicas; windows that arrive
late or too small; acknowledging through the CLI and the API; the Alertmanager webhook, retried."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlmodel import Session, SQLModel, col, select
from typer.testing import CliRunner

from agent.window import WindowStats
from protocol import (
    ArtifactEntry,
    Manifest,
    Precision,
    RuntimeRequirement,
    Target,
    TensorSpec,
    encode,
    encode_model,
    manifest_digest,
)
from protocol.signing import sign_manifest
from server import alerts, leases
from server.alerts import AlertAction, AlertError, AlertState
from server.app import ServerApp
from server.db.models import Alert, AlertCondition, AlertDelivery, AuditEntry, DriftReportRow, ModelVersion, StatsWindow
from server.governance import Role
from tests.server_helpers import server_dir
from toolchain.profile import reference_profile

pytestmark = pytest.mark.integration

T0 = datetime.now(timezone.utc).replace(microsecond=0)
M = 6  # features


# -- the state machine (pure) ------------------------------------------------------------------------------


@pytest.mark.parametrize(("state", "action", "expected"), [
    (AlertState.RAISED, AlertAction.ACK, AlertState.ACKNOWLEDGED),
    (AlertState.RAISED, AlertAction.CLEAR, AlertState.CLEARED),
    (AlertState.RAISED, AlertAction.RESOLVE, AlertState.CLEARED),
    (AlertState.ACKNOWLEDGED, AlertAction.CLEAR, AlertState.CLEARED),
    (AlertState.ACKNOWLEDGED, AlertAction.RESOLVE, AlertState.CLEARED),
    (AlertState.ACKNOWLEDGED, AlertAction.ACK, None),
    (AlertState.CLEARED, AlertAction.ACK, None),
    (AlertState.CLEARED, AlertAction.CLEAR, None),
    (AlertState.CLEARED, AlertAction.RESOLVE, None),
])
def test_transitions(state, action, expected):
    if expected is None:
        with pytest.raises(AlertError, match=f"^alert 7 is {state.value}; it cannot be"):
            alerts.next_state(7, state, action)
    else:
        assert alerts.next_state(7, state, action) is expected


# -- a model version with a reference profile, and windows of statistics ------------------------------------


class Fleet:
    """A data directory on ``db_url`` with one model version; windows of statistics stored as ingest does."""

    def __init__(self, tmp: Path, db_url: str) -> None:
        self.data, key = server_dir(tmp / "data")
        self.url = db_url
        rng = np.random.default_rng(0)
        x = rng.normal(size=(20_000, M)).astype(np.float32)
        y = rng.integers(0, 3, len(x))
        self.ref = reference_profile(x, "raw", [f"f{i}" for i in range(M)], y, 3, np.eye(3)[y])
        artifact = ArtifactEntry(name="blob", target=Target.ONNX, precision=Precision.FP32, sha256="ab" * 32, size=1,
                                 runtime=RuntimeRequirement(name="onnxruntime", min_version="1.17"),
                                 inputs=[TensorSpec(name="x", shape=[-1, M], dtype="float32")],
                                 outputs=[TensorSpec(name="y", shape=[-1, 3], dtype="float32")])
        manifest = Manifest(model="watch", version="1.0.0", created_at=T0, task="classification",
                            artifacts=[artifact], reference=self.ref)
        self.digest = manifest_digest(manifest)
        self.signed = encode_model(sign_manifest(manifest, key))
        self.rng = np.random.default_rng(1)
        self.seq = 0
        self.apps: list[ServerApp] = []

    def app(self) -> ServerApp:
        """A server process's drift evaluation (not started: no broker needed)."""
        app = ServerApp(self.data, metrics_port=0, drift_interval=0, rollout_interval=0)
        self.apps.append(app)
        with Session(app.registry.engine) as db:
            if db.exec(select(ModelVersion).where(ModelVersion.manifest_sha256 == self.digest)).first() is None:
                db.add(ModelVersion(name="watch", version="1.0.0", manifest_sha256=self.digest,
                                    signed_manifest=self.signed))
                db.commit()
        return app

    def window(self, app: ServerApp, device: str, *, shift: float = 0.0, rows: int = 200, classes: str = "random",
               received_at: datetime | None = None) -> tuple[int, int]:
        """Store one window of ``rows`` rows (inputs shifted by ``shift``); its (session, window_seq)."""
        self.seq += 1
        x = (self.rng.normal(size=(rows, M)) + shift).astype(np.float32)
        logits = self.rng.normal(size=(rows, 3)).astype(np.float32)
        if classes == "all-zero":
            logits[:, 0] += 10
        w = WindowStats(self.ref, 3)
        w.add_rows(x, logits)
        _, stats = w.close(device_id=device, session=1, window_seq=self.seq, start=T0, end=T0,
                           manifest_sha256=self.digest)
        assert stats is not None
        with Session(app.registry.engine) as db:
            db.add(StatsWindow(device_id=device, session=1, window_seq=self.seq, manifest_sha256=self.digest, end=T0,
                               n=rows, payload=encode(stats), received_at=received_at or datetime.now(timezone.utc)))
            db.commit()
        return 1, self.seq

    def alerts(self, app: ServerApp, device: str) -> list[Alert]:
        with Session(app.registry.engine) as db:
            return list(db.exec(select(Alert).where(Alert.device_id == device).order_by(col(Alert.id))))

    def close(self) -> None:
        for app in self.apps:
            app.registry.engine.dispose()


@pytest.fixture
def fleet(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    monkeypatch.setenv("EDGEHERD_DATABASE_URL", db_url)
    monkeypatch.delenv("EDGEHERD_ALERT_WEBHOOK", raising=False)
    f = Fleet(tmp_path, db_url)
    yield f
    f.close()
    if db_url.startswith("postgresql"):  # the session's database is shared: leave it empty
        from server.db import make_engine

        engine = make_engine(db_url)
        SQLModel.metadata.drop_all(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        engine.dispose()


# -- the lifecycle, driven from the database -----------------------------------------------------------------


def test_an_alert_survives_a_restart_once_and_clears_after_it(fleet):
    first = fleet.app()
    fleet.window(first, "dev-a", shift=2.0)
    assert first.evaluate_drift() == 1 and fleet.alerts(first, "dev-a") == []  # one drifting window: not yet
    fleet.window(first, "dev-a", shift=2.0)
    assert first.evaluate_drift() == 1
    [raised] = fleet.alerts(first, "dev-a")
    assert raised.active and raised.kind == "drift" and alerts.state_of(raised) is AlertState.RAISED
    assert raised.detail["reason"].startswith(raised.detail["worst"])
    first.registry.engine.dispose()  # the server stops; a new process carries on from the database

    second = fleet.app()
    for _ in range(3):  # still drifting: the same alert, never a second one
        fleet.window(second, "dev-a", shift=2.0)
        assert second.evaluate_drift() == 1
    assert [a.id for a in fleet.alerts(second, "dev-a")] == [raised.id]
    for _ in range(2):
        fleet.window(second, "dev-a")
        second.evaluate_drift()
    assert fleet.alerts(second, "dev-a")[0].active  # two clean windows: not yet
    fleet.window(second, "dev-a")
    second.evaluate_drift()
    [cleared] = fleet.alerts(second, "dev-a")
    assert not cleared.active and cleared.cleared_by == "hysteresis" and cleared.cleared_at is not None
    with Session(second.registry.engine) as db:
        cond = db.exec(select(AlertCondition).where(AlertCondition.device_id == "dev-a",
                                                    AlertCondition.kind == "drift")).one()
        reports = db.exec(select(DriftReportRow).where(DriftReportRow.device_id == "dev-a")).all()
    assert (cond.active, cond.streak, cond.alert_id) == (False, 0, None)
    assert len(reports) == 8 and sum(r.drifted for r in reports) == 5


def test_two_replicas_hand_the_lease_over_without_a_second_raise(fleet):
    a, b = fleet.app(), fleet.app()
    fleet.window(a, "dev-b", shift=2.0)
    fleet.window(a, "dev-b", shift=2.0)
    assert a.drift_step(ttl=30) == 2
    assert b.drift_step(ttl=30) is None  # a holds the lease
    [raised] = fleet.alerts(a, "dev-b")
    leases.release(a.registry.engine, "drift", a.holder)  # a stops; b takes over
    fleet.window(a, "dev-b", shift=2.0)
    fleet.window(a, "dev-b", shift=2.0)
    assert b.drift_step(ttl=30) == 2 and a.drift_step(ttl=30) is None
    assert [x.id for x in fleet.alerts(b, "dev-b")] == [raised.id]
    for _ in range(3):
        fleet.window(b, "dev-b")
    assert b.drift_step(ttl=30) == 3
    [cleared] = fleet.alerts(a, "dev-b")
    assert not cleared.active and cleared.id == raised.id


def test_a_batch_that_commits_late_is_scored(fleet):
    app = fleet.app()
    fleet.window(app, "dev-c")
    fleet.window(app, "dev-c")
    assert app.evaluate_drift() == 2
    late = fleet.window(app, "dev-c", received_at=datetime.now(timezone.utc) - timedelta(hours=1))
    assert app.evaluate_drift() == 1
    assert app.evaluate_drift() == 0  # and only once
    with Session(app.registry.engine) as db:
        scored = db.exec(select(DriftReportRow).where(DriftReportRow.device_id == "dev-c",
                                                      DriftReportRow.session == late[0],
                                                      DriftReportRow.window_seq == late[1])).all()
    assert len(scored) == 1


def test_a_window_that_does_not_fit_the_reference_is_skipped_and_stops_nothing(fleet):
    """A device's window whose class counts have another length than the reference's (valid on the wire) used to
    break the fleet's sum, roll back the batch and be picked first again: no drift for anybody, ever after."""
    from protocol import FeatureStats, encode

    app = fleet.app()
    fleet.window(app, "dev-good")
    odd = fleet.window(app, "dev-odd")
    with Session(app.registry.engine) as db:
        row = db.get(StatsWindow, ("dev-odd", odd[0], odd[1]))
        stats = FeatureStats.model_validate_json(row.payload)
        cc = stats.class_counts
        row.payload = encode(stats.model_copy(update={"class_counts": [cc[0] + cc[2], cc[1], *cc[3:]][:2]}))
        db.add(row)
        db.commit()
    assert app.evaluate_drift() == 2 and app.windows_misfit == 1
    fleet.window(app, "dev-good")
    assert app.evaluate_drift() == 1  # later windows are scored as ever
    with Session(app.registry.engine) as db:
        assert db.exec(select(StatsWindow).where(col(StatsWindow.scored).is_(False))).all() == []
        reports = db.exec(select(DriftReportRow.device_id).where(DriftReportRow.scope == "device")).all()
    assert sorted(reports) == ["dev-good", "dev-good"]


def test_small_windows_are_summed_until_they_decide(fleet):
    from server import drift

    minimum = getattr(drift, "MIN_WINDOW", None)
    if minimum is None:
        pytest.skip("this server.drift decides every window, whatever its size")
    app = fleet.app()
    rows = max(minimum // 4, 1)
    windows = -(-minimum // rows)  # enough to reach the minimum
    for _ in range(windows):
        fleet.window(app, "dev-d", shift=3.0, rows=rows)
    assert app.evaluate_drift() == windows
    with Session(app.registry.engine) as db:
        reports = db.exec(select(DriftReportRow).where(DriftReportRow.device_id == "dev-d")
                          .order_by(col(DriftReportRow.id))).all()
    assert [r.insufficient for r in reports] == [True] * (windows - 1) + [False]
    assert not any(r.drifted for r in reports[:-1])
    assert reports[-1].n == rows * windows and reports[-1].drifted  # the sum decided, and it drifts
    assert reports[-1].report["windows"] == windows


def test_output_drift_raises_its_own_alert(fleet):
    app = fleet.app()
    for _ in range(2):
        fleet.window(app, "dev-e", classes="all-zero")
    app.evaluate_drift()
    [alert] = fleet.alerts(app, "dev-e")
    assert alert.kind == "output_drift" and alert.detail["reason"].startswith("predicted classes")


def test_resolving_by_hand_restarts_the_condition(fleet):
    app = fleet.app()
    for _ in range(2):
        fleet.window(app, "dev-f", shift=2.0)
    app.evaluate_drift()
    [first] = fleet.alerts(app, "dev-f")
    resolved, entry = alerts.resolve(app.registry.engine, first.id, "otto", "recalibrated the sensor")
    assert alerts.state_of(resolved) is AlertState.CLEARED and resolved.cleared_by == "otto"
    assert (entry.action, entry.subject, entry.actor) == ("alert.resolve", f"alert:{first.id}", "otto")
    with pytest.raises(AlertError, match="is cleared"):
        alerts.acknowledge(app.registry.engine, first.id, "otto")
    for _ in range(2):  # the shift lasts: a new alert
        fleet.window(app, "dev-f", shift=2.0)
    app.evaluate_drift()
    assert [a.active for a in fleet.alerts(app, "dev-f")] == [False, True]


def test_resolving_from_a_shell_without_the_webhook_setting_still_tells_the_webhook(fleet, monkeypatch):
    """The server fired the alert to its webhook; an operator resolves it with `edgeherd alerts resolve` on the host,
    in a shell without EDGEHERD_ALERT_WEBHOOK: the receiver must still hear it resolved."""
    monkeypatch.setenv("EDGEHERD_ALERT_WEBHOOK", "http://127.0.0.1:9/hook")  # the server's environment
    app = fleet.app()
    assert app.notifier is not None
    for _ in range(2):
        fleet.window(app, "dev-f", shift=2.0)
    app.evaluate_drift()
    [alert] = fleet.alerts(app, "dev-f")
    monkeypatch.delenv("EDGEHERD_ALERT_WEBHOOK")  # the operator's shell
    alerts.resolve(app.registry.engine, alert.id, "otto", "fixed")
    with Session(app.registry.engine) as db:
        events = [d.event for d in db.exec(select(AlertDelivery).where(AlertDelivery.alert_id == alert.id)
                                           .order_by(col(AlertDelivery.id)))]
    assert events == ["firing", "resolved"]


# -- acknowledging through the CLI and the API -----------------------------------------------------------------


def _raise(app: ServerApp, device: str) -> int:
    with Session(app.registry.engine) as db:
        alert = Alert(kind="drift", device_id=device, manifest_sha256="c" * 64,
                      detail={"worst": "f1", "n": 200, "reason": "f1: 34 % above the reference maximum"})
        db.add(alert)
        db.commit()
        assert alert.id is not None
        return alert.id


def test_ack_on_the_server_host_is_recorded_and_audited(fleet):
    from server.cli import app as cli

    app = fleet.app()
    (fleet.data / "operators.toml").write_text('[[operator]]\nname = "otto"\nrole = "operator"\n\n'
                                               '[[operator]]\nname = "vic"\nrole = "viewer"\n')
    alert_id = _raise(app, "dev-g")
    runner = CliRunner(env={"COLUMNS": "200"})
    args = ["alerts", "ack", str(alert_id), "--note", "looking at the sensor", "--data-dir", str(fleet.data)]
    refused = runner.invoke(cli, ["--as", "vic", *args])
    assert refused.exit_code == 1 and "vic is a viewer" in refused.output
    done = runner.invoke(cli, ["--as", "otto", *args])
    assert done.exit_code == 0, done.output
    assert "acknowledged; now acknowledged" in done.output
    again = runner.invoke(cli, ["--as", "otto", *args])
    assert again.exit_code == 1 and f"alert {alert_id} is acknowledged" in again.output
    [alert] = fleet.alerts(app, "dev-g")
    assert (alert.acknowledged_by, alert.ack_note, alerts.state_of(alert)) == (
        "otto", "looking at the sensor", AlertState.ACKNOWLEDGED)
    with Session(app.registry.engine) as db:
        [entry] = db.exec(select(AuditEntry).where(AuditEntry.subject == f"alert:{alert_id}")).all()
    assert (entry.actor, entry.action, entry.detail["note"]) == ("otto", "alert.ack", "looking at the sensor")
    listed = runner.invoke(cli, ["alerts", "list", "--data-dir", str(fleet.data)])
    assert listed.exit_code == 0 and "acknowledged" in listed.output and "dev-g" in listed.output, listed.output
    shown = runner.invoke(cli, ["alerts", "show", str(alert_id), "--data-dir", str(fleet.data)])
    assert "34 % above the reference maximum" in shown.output and "otto" in shown.output


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.api_helpers import api_server

    tmp = tmp_path_factory.mktemp("alerts-api")
    os.chmod(tmp, 0o701)  # the managed broker (user mosquitto) reaches the data directory inside
    with api_server(tmp, {"otto": Role.OPERATOR, "vic": Role.VIEWER}) as server:
        yield server


def test_ack_through_the_api_is_recorded_and_audited(srv, monkeypatch):
    from server.api.client import ApiError
    from server.cli import app as cli
    from server.db import make_engine

    engine = make_engine(f"sqlite:///{srv.data / 'edgeherd.db'}")
    try:
        with Session(engine) as db:
            alert = Alert(kind="drift", device_id="dev-api", manifest_sha256="c" * 64,
                          detail={"worst": "temp", "n": 50, "reason": "temp: 34 % above the reference maximum"})
            db.add(alert)
            db.commit()
            alert_id = alert.id
    finally:
        engine.dispose()
    vic, otto = srv.client("vic"), srv.client("otto")
    with pytest.raises(ApiError) as denied:
        vic.request("POST", f"/alerts/{alert_id}/ack", {"note": "mine"})
    assert denied.value.status == 403
    answer = otto.request("POST", f"/alerts/{alert_id}/ack", {"note": "on it"})
    assert (answer["state"], answer["acknowledged_by"], answer["ack_note"]) == ("acknowledged", "otto", "on it")
    with pytest.raises(ApiError) as twice:
        otto.request("POST", f"/alerts/{alert_id}/ack", {})
    assert twice.value.status == 409 and "is acknowledged" in str(twice.value)
    with pytest.raises(ApiError) as missing:
        otto.get("/alerts/999999")
    assert missing.value.status == 404
    shown = vic.get(f"/alerts/{alert_id}")
    assert shown["reason"] == "temp: 34 % above the reference maximum" and shown["deliveries"] == []
    assert [a["id"] for a in vic.get("/alerts", active="true")] == [alert_id]
    entries = vic.get("/audit", text=f"alert:{alert_id}")["entries"]
    assert [(e["actor"], e["action"]) for e in entries] == [("otto", "alert.ack")]
    # the CLI, logged in, goes through the same API
    monkeypatch.setenv("EDGEHERD_URL", srv.url)
    monkeypatch.setenv("EDGEHERD_CA", str(srv.ca_file))
    monkeypatch.setenv("EDGEHERD_TOKEN", srv.tokens["otto"])
    runner = CliRunner(env={"COLUMNS": "200"})
    done = runner.invoke(cli, ["alerts", "resolve", str(alert_id), "--note", "sensor replaced"])
    assert done.exit_code == 0, done.output
    assert otto.get(f"/alerts/{alert_id}")["cleared_by"] == "otto"
    listed = runner.invoke(cli, ["alerts", "list", "--all"])
    assert listed.exit_code == 0 and "dev-api" in listed.output and "cleared" in listed.output, listed.output


# -- the webhook -------------------------------------------------------------------------------------------------


class Receiver:
    """An HTTP server on loopback that records what is POSTed and answers with the statuses it is given."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append({"body": json.loads(body), "type": self.headers["Content-Type"]})
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_the_webhook_gets_alertmanager_json_and_is_retried(fleet, monkeypatch):
    receiver = Receiver([500])
    monkeypatch.setenv("EDGEHERD_ALERT_WEBHOOK", receiver.url)
    try:
        app = fleet.app()
        assert app.notifier is not None and app.notifier.url == receiver.url
        for _ in range(2):
            fleet.window(app, "dev-w", shift=2.0)
        app.evaluate_drift()
        [alert] = fleet.alerts(app, "dev-w")
        now = datetime.now(timezone.utc)
        assert app.notifier.deliver_due(now) == 1  # the receiver fails it
        with Session(app.registry.engine) as db:
            [failed, next_one] = alerts.deliveries(db, alert.id)
        assert (failed.status, failed.http_status, failed.attempt) == ("failed", 500, 1)
        assert failed.error.startswith("HTTP 500") and failed.next_try_at is not None
        assert (next_one.status, next_one.attempt) == ("pending", 2)
        assert app.notifier.deliver_due(now) == 0  # not due yet
        assert app.notifier.deliver_due(failed.next_try_at) == 1
        with Session(app.registry.engine) as db:
            statuses = [(d.attempt, d.status) for d in alerts.deliveries(db, alert.id)]
        assert statuses == [(1, "failed"), (2, "delivered")]

        assert len(receiver.received) == 2 and receiver.received[0] == receiver.received[1]
        payload = receiver.received[1]["body"]
        assert receiver.received[1]["type"] == "application/json"
        assert (payload["version"], payload["status"], payload["receiver"]) == ("4", "firing", "edgeherd")
        [sent] = payload["alerts"]
        assert sent["labels"] == {"alertname": "EdgeherdInputDrift", "device": "dev-w", "model": "watch:1.0.0",
                                  "severity": "warning"}
        assert sent["status"] == "firing" and sent["endsAt"] == "0001-01-01T00:00:00Z"
        assert datetime.fromisoformat(sent["startsAt"].replace("Z", "+00:00")) > now - timedelta(minutes=5)
        assert sent["annotations"]["summary"] == "input drift on dev-w (watch:1.0.0)"
        assert alert.detail["reason"] in sent["annotations"]["description"]
        assert payload["groupKey"] == '{}:{alertname="EdgeherdInputDrift", device="dev-w"}'
        assert payload["commonLabels"] == sent["labels"]

        for _ in range(3):  # clean again: the alert clears and the webhook hears it resolved
            fleet.window(app, "dev-w")
        app.evaluate_drift()
        assert app.notifier.deliver_due() == 1
        resolved = receiver.received[-1]["body"]
        assert resolved["status"] == "resolved" and resolved["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
        with Session(app.registry.engine) as db:
            assert db.exec(select(AlertDelivery).where(AlertDelivery.status == "pending")).all() == []
    finally:
        receiver.close()


def test_an_unreachable_webhook_is_given_up_after_its_attempts(fleet, monkeypatch):
    receiver = Receiver([])
    url = receiver.url
    receiver.close()  # nobody listens there any more
    monkeypatch.setenv("EDGEHERD_ALERT_WEBHOOK", url)
    app = fleet.app()
    assert app.notifier is not None
    app.notifier.max_attempts = 3
    alert_id = _raise(app, "dev-x")
    with Session(app.registry.engine) as db:
        alert = db.get(Alert, alert_id)
        alerts.queue_delivery(db, alert, "firing", datetime.now(timezone.utc))
        db.commit()
    when = datetime.now(timezone.utc)
    for _ in range(4):
        app.notifier.deliver_due(when)
        when += timedelta(hours=2)
    with Session(app.registry.engine) as db:
        rows = alerts.deliveries(db, alert_id)
    assert [(d.attempt, d.status) for d in rows] == [(1, "failed"), (2, "failed"), (3, "abandoned")]
    assert all(d.http_status is None and d.error for d in rows)
    assert rows[1].next_try_at - rows[1].attempted_at == 2 * (rows[0].next_try_at - rows[0].attempted_at)


def test_a_webhook_that_is_not_a_url_is_refused():
    from server.settings import ALERT_WEBHOOK, SettingError

    with pytest.raises(SettingError, match="EDGEHERD_ALERT_WEBHOOK='ftp://x': give an http:// or https:// URL"):
        ALERT_WEBHOOK.read({"EDGEHERD_ALERT_WEBHOOK": "ftp://x"})
    assert ALERT_WEBHOOK.read({}) is None
    assert ALERT_WEBHOOK.read({"EDGEHERD_ALERT_WEBHOOK": " https://hooks.example.com/a "}) == \
        "https://hooks.example.com/a"


# -- the TUI's alert list -----------------------------------------------------------------------------------------


def test_the_tui_lists_alerts_and_acknowledges_one(fleet):
    asyncio.run(_tui(fleet))


async def _tui(fleet: Fleet) -> None:
    from textual.widgets import DataTable

    from server.governance import Governance
    from server.tui.app import EdgeherdApp
    from server.tui.data import FleetData
    from server.tui.modals import ConfirmModal
    from server.tui.screens import AlertsScreen
    from tests.tui_state import settle

    app = fleet.app()
    (fleet.data / "operators.toml").write_text('[[operator]]\nname = "otto"\nrole = "operator"\n\n'
                                               '[[operator]]\nname = "vic"\nrole = "viewer"\n')
    alert_id = _raise(app, "dev-t")
    viewer = EdgeherdApp(FleetData(app.registry, Governance.load(fleet.data), "vic"), refresh_s=0)
    async with viewer.run_test(size=(150, 40)) as pilot:
        await settle(pilot)
        await pilot.press("a")
        await settle(pilot)
        assert isinstance(viewer.screen, AlertsScreen)
        assert viewer.screen.check_action("ack", ()) is None  # greyed out for a viewer
    tui = EdgeherdApp(FleetData(app.registry, Governance.load(fleet.data), "otto"), refresh_s=0)
    async with tui.run_test(size=(150, 40)) as pilot:
        await settle(pilot)
        await pilot.press("a")
        await settle(pilot)
        screen = tui.screen
        assert isinstance(screen, AlertsScreen)
        table = screen.query_one("#alert-list", DataTable)
        assert str(alert_id) in [str(k.value) for k in table.rows]
        assert "34 % above the reference maximum" in str(table.get_row(str(alert_id))[4])
        await pilot.press("k")
        await settle(pilot)
        assert isinstance(tui.screen, ConfirmModal) and f"alert {alert_id}" in tui.screen.question
        await pilot.click("#confirm")
        await settle(pilot)
        assert str(table.get_row(str(alert_id))[1]) == "acknowledged"
    [alert] = fleet.alerts(app, "dev-t")
    assert alert.acknowledged_by == "otto" and alerts.state_of(alert) is AlertState.ACKNOWLEDGED
