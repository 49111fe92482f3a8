"""Rollout state in the database: leases between replicas, and a restart in every state changes nothing.
Each test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
from sqlmodel import Session, SQLModel, select

from server import leases
from server.db.models import AuditEntry, Rollout
from server.orchestrator import Orchestrator, create_rollout, rollout_view, store_view
from server.registry import Registry
from server.rollouts import Assignment, DeviceView, Gates, Metrics, Observation, RolloutSpec, State, plan
from tests.server_helpers import blob_bundle, server_dir

pytestmark = pytest.mark.integration


@pytest.fixture
def registry(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEHERD_DATABASE_URL", db_url)
    data, key = server_dir(tmp_path / "data")
    reg = Registry(data)
    reg.push_model(blob_bundle(tmp_path / "b", key, model="blob", version="1.0.0")[0])
    yield reg
    SQLModel.metadata.drop_all(reg.engine)
    with reg.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    reg.engine.dispose()


def test_a_lease_has_one_holder_until_it_is_released_or_expires(registry):
    engine = registry.engine
    assert leases.acquire(engine, "rollout:x", "a", ttl=30)
    assert not leases.acquire(engine, "rollout:x", "b", ttl=30)
    assert leases.acquire(engine, "rollout:x", "a", ttl=0.3)  # renewing, shorter
    assert leases.holder_of(engine, "rollout:x") == "a"
    time.sleep(0.5)
    assert leases.holder_of(engine, "rollout:x") is None
    assert leases.acquire(engine, "rollout:x", "b", ttl=30)  # expired: b takes it over
    leases.release(engine, "rollout:x", "a")  # not a's any more: nothing happens
    assert leases.holder_of(engine, "rollout:x") == "b"
    leases.release(engine, "rollout:x", "b")
    assert leases.acquire(engine, "rollout:x", "c", ttl=30)
    assert abs(leases.db_now(engine) - time.time()) < 60


def test_replicas_racing_for_a_lease_get_it_exactly_once(registry):
    wins: list[str] = []
    go = threading.Barrier(8)

    def race(holder: str) -> None:
        go.wait()
        if leases.acquire(registry.engine, "rollout:race", holder, ttl=60):
            wins.append(holder)

    threads = [threading.Thread(target=race, args=(f"replica-{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(wins) == 1


def test_a_replica_does_not_step_a_rollout_another_one_holds(registry):
    create_rollout(registry, name="r1", model="blob", version="1.0.0", target={"groups": ["nobody"]},
                   spec=RolloutSpec(), actor="alice")
    first, second = Orchestrator(registry, holder="replica-a"), Orchestrator(registry, holder="replica-b")
    assert leases.acquire(registry.engine, "rollout:r1", "replica-a", ttl=60)  # a is in the middle of a step
    assert second.step() == 0
    with Session(registry.engine) as db:
        assert db.exec(select(Rollout)).one().state == "pending"
    leases.release(registry.engine, "rollout:r1", "replica-a")
    assert second.step() == 1 and first.step() == 1
    with Session(registry.engine) as db:
        assert db.exec(select(Rollout)).one().state == "running"
        started = db.exec(select(AuditEntry).where(AuditEntry.action == "rollout.started")).all()
        assert len(started) == 1  # the second step found it running: nothing to start again
    assert leases.holder_of(registry.engine, "rollout:r1") is None  # released after each step


SPEC = RolloutSpec(soak_s=10, install_timeout_s=60, gates=Gates(min_requests=10, min_drift_windows=0))
NEW_DEVICES = {f"d{i}": DeviceView(f"d{i}", True, "b" * 64, "blob", "done", None, "b" * 64) for i in range(10)}


@pytest.mark.parametrize("state", list(State))
def test_a_restart_in_any_state_plans_exactly_the_same_next_step(registry, state):
    """Write a rollout in ``state`` with devices in every state, read it back as a restarted server would, and
    plan the next step from both: the same decisions, actions and events."""
    row = create_rollout(registry, name=f"r-{state.value.replace('_', '-')}", model="blob", version="1.0.0",
                         target={"devices": sorted(NEW_DEVICES)}, spec=SPEC, actor="alice")
    rid = row.id
    with Session(registry.engine) as db:
        row = db.get(Rollout, rid)
        fresh = rollout_view(db, row)
        states = ["assigned", "installed", "failed", "reverting", "reverted", "revert_failed"]
        view = replace(fresh, state=state, wave=1, wave_started_at=1000.5, reason="why not", assignments={
            f"d{i}": Assignment(f"d{i}", i % 2, states[i % len(states)], "b" * 64, "blob", 1000.25 + i,
                                None if i % 3 else 1001.125, "boom" if i % 4 == 0 else None)
            for i in range(6)})
        store_view(db, row, view)
        db.commit()
    with Session(registry.engine) as db:  # a new process would see only this
        restored = rollout_view(db, db.get(Rollout, rid))
    assert restored == view
    obs = Observation(tuple(sorted(NEW_DEVICES)), NEW_DEVICES, Metrics(100, 1, 5.0), Metrics(1000, 10, 5.0))
    for now in (1005.0, 1020.0, 5000.0):
        assert plan(restored, obs, now) == plan(view, obs, now)


def test_a_step_whose_lease_was_lost_meanwhile_is_rolled_back(registry):
    from server.orchestrator import _LeaseBusy, _under_lease

    create_rollout(registry, name="r1", model="blob", version="1.0.0", target={"groups": ["nobody"]},
                   spec=RolloutSpec(), actor="alice")

    def slow_step(db, row):
        # the step took longer than its lease: it expired and another replica took it over
        with registry.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE leases SET expires_at = 0 WHERE name = 'rollout:r1'")
        assert leases.acquire(registry.engine, "rollout:r1", "replica-b", ttl=60)
        row.state = "paused"
        db.add(row)

    with pytest.raises(_LeaseBusy, match="expired during the step"):
        _under_lease(registry, "r1", "replica-a", 0.0, slow_step)
    with Session(registry.engine) as db:
        assert db.exec(select(Rollout)).one().state == "pending"  # nothing of that step was committed
    assert leases.holder_of(registry.engine, "rollout:r1") == "replica-b"


def test_a_rollout_leaves_out_devices_another_one_is_moving_and_unplanned_production_devices(registry):
    from server.db.models import RolloutDevice
    from server.orchestrator import observe

    registry.add_devices_bulk(["d1", "d2", "d3"], "x86-64", ["lab"], custom_profile=True)
    registry.add_devices_bulk(["p1"], "x86-64", ["lab", "prod"], custom_profile=True)  # joined a production group too
    a = create_rollout(registry, name="a", model="blob", version="1.0.0", target={"devices": ["d1"]},
                       spec=RolloutSpec(), actor="alice")
    with Session(registry.engine) as db:
        row_a = db.get(Rollout, a.id)
        row_a.state = "running"
        db.add(row_a)
        db.add(RolloutDevice(rollout_id=a.id, device_id="d1", wave=0, state="assigned", assigned_at=1.0))
        db.commit()
        b = Rollout(name="b", version_id=row_a.version_id, target={"groups": ["lab"]}, spec=RolloutSpec().model_dump(
            mode="json"), state="running", created_by="alice")
        db.add(b)
        db.commit()
        db.refresh(b)
        view = rollout_view(db, b)
        assert observe(db, b, view).target == ("d2", "d3", "p1")
        assert observe(db, b, view, {"prod"}).target == ("d2", "d3")  # b is not a production rollout
