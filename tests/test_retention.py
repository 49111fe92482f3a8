"""Retention (server/retention.py): the policy's parsing, what the pruner keeps, bounded batches, and a soak of a
simulated week on the real database (SQLite and PostgreSQL) through the real Ingestor with an injected clock."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select, text, update
from sqlmodel import Session, col

from protocol import FeatureStats, FeatureWindow, LatencySummary, TelemetryWindow, device_topic, encode
from protocol.topics import TopicKind
from server.db.models import Device, DriftPending, DriftReportRow, ModelVersion, Rollout, StatsWindow, TelemetryRow
from server.ingest import Ingestor, TimeBounds
from server.retention import TABLES, Pruner, RetentionError, RetentionPolicy, parse_days

T0 = datetime(2026, 3, 2, tzinfo=timezone.utc)
SHA = "ab" * 32


# -- the policy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("default", "overrides", "expected"), [
    (None, [], dict.fromkeys(TABLES)),
    ("30", [], dict.fromkeys(TABLES, 30.0)),
    ("30", ["telemetry=7", "drift_reports=90"], {"telemetry": 7.0, "feature_stats": 30.0, "drift_reports": 90.0}),
    ("none", ["feature_stats=0.5"], {"telemetry": None, "feature_stats": 0.5, "drift_reports": None}),
    ("7", ["telemetry=forever", "feature_stats=0"], {"telemetry": None, "feature_stats": None, "drift_reports": 7.0}),
])
def test_policy_parses(default: str | None, overrides: list[str], expected: dict[str, float | None]) -> None:
    policy = RetentionPolicy.parse(default, overrides)
    assert dict(policy.days) == expected
    assert policy.active == any(v is not None for v in expected.values())


@pytest.mark.parametrize(("default", "overrides", "message"), [
    ("thirty", [], "give a number of days"),
    ("-1", [], "between 0 and"),
    ("nan", [], "between 0 and"),
    ("1e9", [], "between 0 and"),
    ("30", ["telemetry"], "give TABLE=DAYS"),
    ("30", ["=7"], "give TABLE=DAYS"),
    ("30", ["audit_log=7"], "no table 'audit_log' to prune; give one of telemetry, feature_stats, drift_reports"),
    ("30", ["telemetry=soon"], "--retain telemetry='soon': give a number of days"),
])
def test_policy_refuses_bad_input(default: str, overrides: list[str], message: str) -> None:
    with pytest.raises(RetentionError, match=message.replace("(", r"\(")):
        RetentionPolicy.parse(default, overrides)


def test_policy_limits() -> None:
    assert parse_days(" 0 ") is None and parse_days("OFF") is None and parse_days(2) == 2.0
    with pytest.raises(RetentionError, match="rows per transaction"):
        RetentionPolicy(batch=0)
    with pytest.raises(RetentionError, match="rows per device"):
        RetentionPolicy(keep_last=-1)


# -- rows ---------------------------------------------------------------------------------------------


def _telemetry(device: str, seq: int, end: datetime) -> bytes:
    return encode(TelemetryWindow(device_id=device, session=1, window_seq=seq, start=end - timedelta(minutes=15),
                                  end=end, manifest_sha256=SHA, requests=900, errors=1,
                                  latency_ms=LatencySummary(p50=1.0, p95=3.0, p99=4.0, max=9.0, mean=1.5)))


def _stats(device: str, seq: int, end: datetime) -> bytes:
    features = [FeatureWindow(name=f"f{i}", counts=[90] * 10, below=0, above=0, nan=0, mean=0.5,
                              m2=81.0, min=0.0, max=1.0) for i in range(6)]
    return encode(FeatureStats(device_id=device, session=1, window_seq=seq, start=end - timedelta(minutes=15),
                               end=end, manifest_sha256=SHA, n=900, features=features, class_counts=[90] * 10,
                               confidence_counts=[100, 300, 500]))


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def _enrol(engine: Any, devices: list[str]) -> None:
    with Session(engine) as db:
        for d in devices:
            db.add(Device(id=d, profile="rpi5"))
        db.commit()


def _ingest_hour(ingestor: Ingestor, devices: list[str], hour: int, per_hour: int = 4, start: datetime = T0) -> None:
    """Each device's windows of one hour (the ``hour``-th after ``start``), through the real ingest path; the clock
    stands at the hour's end."""
    msgs = []
    for d in devices:
        for k in range(per_hour):
            seq = hour * per_hour + k
            end = start + timedelta(minutes=15 * (seq + 1))
            msgs.append((device_topic(d, TopicKind.TELEMETRY), _telemetry(d, seq, end)))
            msgs.append((device_topic(d, TopicKind.STATS), _stats(d, seq, end)))
    assert set(ingestor.handle_batch(msgs)) == {"ok"}


def _drift_takes_all(engine: Any, now: datetime) -> None:
    """What drift evaluation does with the windows: takes them, and writes a report for each."""
    with Session(engine) as db:
        fresh = db.execute(select(col(StatsWindow.device_id), col(StatsWindow.session), col(StatsWindow.window_seq))
                        .where(col(StatsWindow.scored).is_(False))).all()
        db.execute(update(StatsWindow).where(col(StatsWindow.scored).is_(False)).values(scored=True))
        for d, s, q in fresh:
            db.add(DriftReportRow(scope="device", device_id=d, manifest_sha256=SHA, n=900, drifted=False, session=s,
                                  window_seq=q, computed_at=now))
        db.add(DriftReportRow(scope="fleet", manifest_sha256=SHA, n=900, drifted=False, computed_at=now))
        db.commit()


def _counts(engine: Any) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}  # noqa: S608


# -- what is kept -------------------------------------------------------------------------------------


def _old_rows(engine: Any, clock: Clock, devices: list[str], hours: int) -> Ingestor:
    _enrol(engine, devices)
    ingestor = Ingestor(engine, bounds=TimeBounds(behind=timedelta(days=30)), clock=clock)
    for h in range(hours):
        clock.now = T0 + timedelta(hours=h + 1)
        _ingest_hour(ingestor, devices, h)
    return ingestor


def test_prune_keeps_what_is_still_needed(engine: Any) -> None:
    clock = Clock()
    _old_rows(engine, clock, ["pi-1", "pi-2"], hours=24)  # 96 windows each, a day
    _drift_takes_all(engine, clock.now)
    with Session(engine) as db:  # pi-2's last four windows were never taken by drift; two are undecided
        db.execute(update(StatsWindow).where(col(StatsWindow.device_id) == "pi-2", col(StatsWindow.window_seq) >= 92)
                .values(scored=False))
        db.add(DriftPending(device_id="pi-2", manifest_sha256=SHA, windows=[[1, 10], [1, 11]], n=10))
        db.commit()
    clock.now = T0 + timedelta(days=10)
    report = Pruner(engine, RetentionPolicy.parse("2", keep_last=3), clock=clock).prune(dry_run=True)
    assert _counts(engine) == {"telemetry": 192, "feature_stats": 192, "drift_reports": 193}  # a dry run deletes none
    assert report.deleted == {"telemetry": 186, "feature_stats": 183, "drift_reports": 186}
    report = Pruner(engine, RetentionPolicy.parse("2", keep_last=3), clock=clock).prune()
    assert report.deleted == {"telemetry": 186, "feature_stats": 183, "drift_reports": 186}
    with Session(engine) as db:
        tele = db.execute(select(col(TelemetryRow.device_id), col(TelemetryRow.window_seq))).all()
        stats = db.execute(select(col(StatsWindow.device_id), col(StatsWindow.window_seq))).all()
        fleet = db.execute(select(func.count()).where(col(DriftReportRow.scope) == "fleet")).scalar_one()
    # the newest three of each device, however old
    assert sorted(tele) == [(d, s) for d in ("pi-1", "pi-2") for s in (93, 94, 95)]
    # pi-2 also keeps its windows not yet taken by drift, and those its undecided windows name
    assert sorted(stats) == [("pi-1", s) for s in (93, 94, 95)] + [("pi-2", s) for s in (10, 11, 92, 93, 94, 95)]
    assert fleet == 1  # the single fleet report is the newest of its model


def test_an_active_rollout_keeps_its_wave(engine: Any) -> None:
    clock = Clock()
    _old_rows(engine, clock, ["pi-1"], hours=24)
    _drift_takes_all(engine, clock.now)
    wave_start = T0 + timedelta(hours=18)
    with Session(engine) as db:
        version = ModelVersion(name="m", version="1", manifest_sha256=SHA, signed_manifest=b"{}")
        db.add(version)
        db.flush()
        db.add(Rollout(name="r", version_id=version.id, state="paused", created_by="ops",
                       wave_started_at=wave_start.timestamp()))
        db.commit()
    clock.now = T0 + timedelta(days=10)
    pruner = Pruner(engine, RetentionPolicy.parse("1", keep_last=0), clock=clock)
    pruner.prune()
    with Session(engine) as db:
        oldest = db.execute(select(func.min(col(TelemetryRow.end)))).scalar_one()
    # its gates read what was received since the wave began: the hours received at 18:00 to 24:00
    assert oldest.replace(tzinfo=timezone.utc) == wave_start - timedelta(minutes=45)
    assert _counts(engine)["telemetry"] == 7 * 4
    with Session(engine) as db:
        db.execute(update(Rollout).values(state="completed"))
        db.commit()
    pruner.prune()
    assert _counts(engine)["telemetry"] == 0


@pytest.fixture
def statements(engine: Any) -> Iterator[list[tuple[str, int]]]:
    """Every DELETE the engine runs, with the rows it deleted."""
    seen: list[tuple[str, int]] = []

    def after(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            seen.append((statement.split()[2], cursor.rowcount))

    event.listen(engine, "after_cursor_execute", after)
    yield seen
    event.remove(engine, "after_cursor_execute", after)


def test_batches_are_bounded(engine: Any, statements: list[tuple[str, int]]) -> None:
    clock = Clock()
    _old_rows(engine, clock, ["pi-1", "pi-2", "pi-3"], hours=6)  # 24 windows each
    _drift_takes_all(engine, clock.now)
    clock.now = T0 + timedelta(days=3)
    pruner = Pruner(engine, RetentionPolicy.parse("1", keep_last=1, batch=10), clock=clock)
    report = pruner.prune()
    assert report.deleted["telemetry"] == 69
    tele = [n for t, n in statements if t == "telemetry"]
    assert sum(tele) == 69 and max(tele) <= 10 and len(tele) == 7  # 69 rows: six full batches and the rest
    assert all(n <= 10 for _, n in statements)
    assert pruner.largest_batch <= 10 and pruner.statements == len(statements)
    metrics = "\n".join(pruner.metrics_lines())
    assert 'edgeherd_server_pruned_rows_total{table="telemetry"} 69' in metrics


# -- the soak -----------------------------------------------------------------------------------------


def _used_bytes(engine: Any) -> int:
    """What the database holds: SQLite's pages in use (not on its free list); PostgreSQL's relations."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar_one()
            free = conn.exec_driver_sql("PRAGMA freelist_count").scalar_one()
            size = conn.exec_driver_sql("PRAGMA page_size").scalar_one()
            return int((pages - free) * size)
        return int(sum(conn.execute(text(f"SELECT pg_total_relation_size('{t}')")).scalar_one()
                       for t in TABLES))


def _file_pages(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("PRAGMA page_count").scalar_one())


def _soak(engine: Any, retain: str | None, days: int = 7) -> list[tuple[dict[str, int], int, int]]:
    """A week compressed in time: 6 devices send four telemetry and four statistics windows an hour; drift takes
    them every hour; the pruner runs at the end of each day. Per day: row counts, bytes used, file pages."""
    devices = [f"pi-{i}" for i in range(6)]
    _enrol(engine, devices)
    clock = Clock()
    ingestor = Ingestor(engine, bounds=TimeBounds(behind=timedelta(days=30)), clock=clock)
    pruner = Pruner(engine, RetentionPolicy.parse(retain, keep_last=3), clock=clock)
    out = []
    for day in range(days):
        for hour in range(24):
            h = day * 24 + hour
            clock.now = T0 + timedelta(hours=h + 1)
            _ingest_hour(ingestor, devices, h)
            _drift_takes_all(engine, clock.now)
        pruner.prune()
        if engine.dialect.name == "postgresql":
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("VACUUM " + ", ".join(TABLES))  # what autovacuum does, now rather than later
        out.append((_counts(engine), _used_bytes(engine), _file_pages(engine) if engine.dialect.name == "sqlite"
                    else 0))
    return out


def test_soak_retention_keeps_the_database_flat(engine: Any) -> None:
    days = _soak(engine, "2")
    # two days kept: per device, the windows that ended in the last 48 hours and the four of the hour before,
    # received at the cutoff itself; the drift reports of the last 49 hourly evaluations (24 device reports and a
    # fleet report each)
    kept = {"telemetry": 6 * (2 * 96 + 4), "feature_stats": 6 * (2 * 96 + 4), "drift_reports": 49 * 25}
    for day, (counts, _, _) in enumerate(days[2:], start=3):
        assert counts == kept, f"day {day}: {counts}"
    sizes = [used for _, used, _ in days[2:]]
    print("retained, bytes used per day:", [u for _, u, _ in days])
    assert max(sizes) <= 1.15 * min(sizes), sizes  # flat at steady state, within 15%
    if engine.dialect.name == "sqlite":
        files = [f for _, _, f in days[2:]]
        print("retained, file pages per day:", [f for _, _, f in days])
        assert max(files) <= 1.15 * min(files), files  # freed pages are reused: the file stops growing


def test_soak_without_retention_grows(engine: Any) -> None:
    days = _soak(engine, None, days=5)
    assert days[4][0]["telemetry"] == 5 * 6 * 96
    print("kept forever, bytes used per day:", [u for _, u, _ in days])
    assert days[4][1] > 1.4 * days[2][1]  # where retention held it flat, it grows with every day



# -- the server and the CLI ---------------------------------------------------------------------------


def test_server_prunes_on_its_own_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ServerApp's retention thread (not the ingest workers) prunes what its real ingest path stored, and /metrics
    counts it."""
    import threading

    from server.app import ServerApp

    monkeypatch.delenv("EDGEHERD_DATABASE_URL", raising=False)
    app = ServerApp(tmp_path / "data", metrics_port=0, drift_interval=0, rollout_interval=0,
                    retention=RetentionPolicy.parse("2", keep_last=1), prune_every=0.05)
    try:
        assert app.pruner is not None
        _enrol(app.registry.engine, ["pi-1"])
        clock = Clock()
        clock.now = datetime.now(timezone.utc) - timedelta(days=5)
        base = clock.now - timedelta(hours=2)
        app.ingestor.clock = clock
        msgs = [(device_topic("pi-1", TopicKind.TELEMETRY), _telemetry("pi-1", s, base + timedelta(minutes=15 * s)))
                for s in range(1, 5)]
        assert set(app.ingestor.handle_batch(msgs)) == {"ok"}
        app.start()  # with its managed broker: the retention thread starts with the others
        assert "edgeherd-retention" in [t.name for t in app._threads]
        for _ in range(400):
            if app.pruner.passes:
                break
            threading.Event().wait(0.05)
        assert _counts(app.registry.engine)["telemetry"] == 1  # the newest one stays
        assert 'edgeherd_server_pruned_rows_total{table="telemetry"} 3' in app.metrics_text()
    finally:
        app.stop()


def test_cli_prune(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from server.cli import app
    from server.cli._common import open_engine

    monkeypatch.delenv("EDGEHERD_DATABASE_URL", raising=False)
    data = tmp_path / "data"
    engine = open_engine(data)
    _enrol(engine, ["pi-1"])
    clock = Clock()
    clock.now = datetime.now(timezone.utc) - timedelta(days=4)
    _ingest_hour(Ingestor(engine, clock=clock), ["pi-1"], 0, start=clock.now - timedelta(hours=1))  # days ago
    clock.now += timedelta(days=3)
    _ingest_hour(Ingestor(engine, clock=clock), ["pi-1"], 1, start=clock.now - timedelta(hours=2))
    engine.dispose()

    def run(*args: str) -> Any:
        return CliRunner().invoke(app, ["server", "prune", "--data-dir", str(data), *args], env={"COLUMNS": "200"})

    out = run("--retain-days", "2", "--retain", "feature_stats=0", "--dry-run")
    assert out.exit_code == 0, out.output
    assert "would delete 4 rows: telemetry 4, feature_stats 0, drift_reports 0" in out.output
    out = run("--retain-days", "2", "--retain", "feature_stats=none")
    assert out.exit_code == 0, out.output
    assert "deleted 4 rows" in out.output
    out = run("--retain-days", "2")
    assert "deleted 0 rows" in out.output  # the statistics are not taken by drift evaluation yet: kept
    out = run("--retain", "telemetry=week")
    assert out.exit_code == 1 and "--retain telemetry='week': give a number of days" in out.output
    out = run()
    assert out.exit_code == 1 and "nothing to prune" in out.output
    out = CliRunner().invoke(app, ["server", "run", "--data-dir", str(data), "--retain", "audit_log=7"])
    assert out.exit_code == 1 and "no table 'audit_log' to prune" in out.output  # refused before anything starts
