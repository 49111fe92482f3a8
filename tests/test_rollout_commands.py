"""Operator commands and what the planner decides for the orchestrator to carry out: the one command table, devices
a rollback leaves alone (superseded), and a completed rollout marking its version deployed in the step's own
transaction."""

from __future__ import annotations

from dataclasses import replace

import pytest
from sqlmodel import Session, SQLModel, col, select

from server import audit, leases
from server.db.models import AuditEntry, ModelVersion, Rollout
from server.governance import ROLLOUT_COMMANDS, Governance, GovernanceError, OperatorEntry, OperatorsConfig, Role
from server.orchestrator import ORCHESTRATOR, command_governed, create_rollout, rollout_view
from server.registry import Registry
from server.rollouts import (
    COMMANDS,
    AssignmentState,
    DeviceView,
    Gates,
    Metrics,
    Observation,
    Plan,
    Revert,
    RolloutCommand,
    RolloutSpec,
    RolloutView,
    State,
    apply_command,
    plan,
)
from tests.server_helpers import blob_bundle, server_dir

NEW, OLD, THIRD = "a" * 64, "b" * 64, "c" * 64
SPEC = RolloutSpec(soak_s=10, install_timeout_s=60, waves=("100%",), gates=Gates(min_requests=10, min_drift_windows=0))


def test_every_command_has_its_states_and_permission_in_one_table():
    assert set(COMMANDS) == set(RolloutCommand)
    assert {c.value: rule.permission for c, rule in COMMANDS.items()} == ROLLOUT_COMMANDS
    assert "pause" in ROLLOUT_COMMANDS and f"{RolloutCommand.PAUSE}" == "pause"  # as typed, in URLs and messages


def _assigned(desired: str | None) -> tuple[RolloutView, Observation]:
    """One device assigned the new version (it ran OLD before); its desired state now is ``desired``."""
    devices = {"d0": DeviceView("d0", True, OLD, "art", "done", None, OLD)}
    started = plan(RolloutView("r", State.PENDING, 0, None, SPEC, NEW, None), Observation(("d0",), devices), 1000.0)
    return started.rollout, Observation(("d0",), {"d0": replace(devices["d0"], desired_manifest=desired)})


@pytest.mark.parametrize(("desired", "unregistered", "state", "reverted"), [
    (NEW, frozenset(), AssignmentState.REVERTING, True),  # still meant to run the rollout's version
    (OLD, frozenset(), AssignmentState.REVERTING, True),  # already set back to what it ran: tracked back there
    (None, frozenset(), AssignmentState.REVERTING, True),
    (THIRD, frozenset(), AssignmentState.SUPERSEDED, False),  # another deploy moved it on: left there
    (NEW, frozenset({OLD}), AssignmentState.SUPERSEDED, False),  # what it ran is gone from the registry
])
def test_a_rollback_leaves_devices_moved_on_since_where_they_are(desired, unregistered, state, reverted):
    view, obs = _assigned(desired)
    rb = apply_command(view, RolloutCommand.ROLLBACK, 1001.0, "bad canary", replace(obs, unregistered=unregistered))
    device = rb.rollout.assignments["d0"]
    assert device.state is state and rb.rollout.state is State.ROLLING_BACK
    assert rb.actions == ([Revert("d0", OLD, "art")] if reverted else [])
    skipped = [d for e, d in rb.events if e == "rollout.revert_skipped"]
    assert skipped == ([] if reverted else [{"devices": ["d0"], "why": "desired state changed since this rollout"}])
    assert ("rollout.rollback_started", {"reason": "bad canary", "devices": 1}) in rb.events
    if not reverted:
        assert device.error == "moved to another version since"
        done = plan(rb.rollout, obs, 1002.0)  # nothing to wait for: rolled back at once
        assert done.rollout.state is State.ROLLED_BACK and done.rollout.assignments["d0"].state is state


def test_only_the_step_that_completes_a_rollout_says_its_version_is_deployed():
    view, obs = _assigned(NEW)
    running = replace(obs, devices={"d0": replace(obs.devices["d0"], running_manifest=NEW)},
                      new=Metrics(100, 0, 5.0))
    soaking = plan(view, running, 1001.0)
    assert soaking.rollout.state is State.RUNNING and not soaking.deployed
    done = plan(soaking.rollout, running, 1012.0)
    assert done.rollout.state is State.COMPLETED and done.deployed
    assert not plan(done.rollout, running, 1013.0).deployed  # terminal: nothing more happens


# -- the orchestrator carries the decisions out ----------------------------------------------------------------


@pytest.fixture
def registry(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEHERD_DATABASE_URL", db_url)
    data, key = server_dir(tmp_path / "data")
    reg = Registry(data)
    reg.push_model(blob_bundle(tmp_path / "b", key, model="blob", version="1.0.0")[0])
    with Session(reg.engine) as db:  # approved, as governance would have it after four-eyes
        version = db.exec(select(ModelVersion)).one()
        version.stage = "approved"
        db.add(version)
        db.commit()
    create_rollout(reg, name="r1", model="blob", version="1.0.0", target={"groups": ["nobody"]}, spec=SPEC,
                   actor="alice")
    yield reg
    SQLModel.metadata.drop_all(reg.engine)
    with reg.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    reg.engine.dispose()


def _complete(registry: Registry, *, lose_lease: bool = False) -> None:
    """One orchestrator step whose plan completes the rollout."""
    from server.orchestrator import _apply, _under_lease

    def step(db: Session, row: Rollout) -> None:
        view = rollout_view(db, row)
        if lose_lease:  # the step takes longer than its lease: another replica takes the rollout over
            with registry.engine.begin() as conn:
                conn.exec_driver_sql("UPDATE leases SET expires_at = 0 WHERE name = 'rollout:r1'")
            assert leases.acquire(registry.engine, "rollout:r1", "replica-b", ttl=60)
        _apply(db, registry, None, row, Plan(replace(view, state=State.COMPLETED), deployed=True,
                                             events=[("rollout.completed", {"devices": 0})]), ORCHESTRATOR)

    _under_lease(registry, "r1", "replica-a", 0.0, step)


def _trail(registry: Registry) -> list[tuple[str, str, str, dict]]:
    with Session(registry.engine) as db:
        return [(e.actor, e.action, e.subject, e.detail)
                for e in db.exec(select(AuditEntry).order_by(col(AuditEntry.seq)))]


@pytest.mark.integration
def test_a_completed_rollout_marks_its_approved_version_deployed_in_the_same_transaction(registry):
    _complete(registry)
    with Session(registry.engine) as db:
        version = db.exec(select(ModelVersion)).one()
        assert version.stage == "deployed" and db.exec(select(Rollout)).one().state == "completed"
        assert audit.verify(db).ok
    trail = _trail(registry)
    # the groups it targeted track the version from now on (server/groups.py), in the same transaction
    assert [a for _, a, _, _ in trail][-3:] == ["rollout.completed", "group.release", "model.deployed"]
    assert trail[-2][3]["via"] == "rollout:r1"
    actor, _, subject, detail = trail[-1]
    assert (actor, subject) == (ORCHESTRATOR, "model:blob:1.0.0")
    assert detail == {"from": "approved", "to": "deployed", "manifest_sha256": version.manifest_sha256,
                      "rollout": "r1"}


@pytest.mark.integration
def test_a_step_that_lost_its_lease_marks_nothing_deployed(registry):
    from server.orchestrator import _LeaseBusy

    with pytest.raises(_LeaseBusy, match="expired during the step"):
        _complete(registry, lose_lease=True)
    with Session(registry.engine) as db:
        assert db.exec(select(ModelVersion)).one().stage == "approved"
        assert db.exec(select(Rollout)).one().state == "pending"
    assert "model.deployed" not in [a for _, a, _, _ in _trail(registry)]


@pytest.mark.integration
def test_commands_are_checked_against_the_table_before_anything_happens(registry):
    gov = Governance(OperatorsConfig(operator=[OperatorEntry(name="vic", role=Role.VIEWER),
                                               OperatorEntry(name="otto", role=Role.OPERATOR)]))
    with pytest.raises(GovernanceError, match="vic is a viewer; pausing a rollout needs the operator role"):
        command_governed(registry, gov, "vic", "r1", "pause")
    from server.orchestrator import RolloutError

    with pytest.raises(RolloutError, match=r"unknown command 'explode' \(pause, resume, abort, rollback\)"):
        command_governed(registry, gov, "otto", "r1", "explode")
    with pytest.raises(RolloutError, match=r"cannot resume a rollout that is pending \(only when paused\)"):
        command_governed(registry, gov, "otto", "r1", RolloutCommand.RESUME)
    assert command_governed(registry, gov, "otto", "r1", RolloutCommand.PAUSE).state is State.PAUSED


@pytest.mark.integration
def test_an_operator_rollback_leaves_a_device_another_deploy_moved_on_where_it_is(registry):
    from server.db.models import Device, RolloutDevice

    registry.add_devices_bulk(["d1"], "x86-64", ["lab"], custom_profile=True)
    with Session(registry.engine) as db:
        row = db.exec(select(Rollout)).one()
        row.state = "running"
        device = db.get(Device, "d1")
        device.desired_manifest = THIRD  # a later deploy
        db.add_all([row, device, RolloutDevice(rollout_id=row.id, device_id="d1", wave=0, state="installed",
                                               previous_manifest=OLD, previous_artifact="art", assigned_at=1.0)])
        db.commit()
    gov = Governance(OperatorsConfig(operator=[OperatorEntry(name="otto", role=Role.OPERATOR)]))
    view = command_governed(registry, gov, "otto", "r1", "rollback", "bad canary")
    assert view.state is State.ROLLING_BACK and view.assignments["d1"].state is AssignmentState.SUPERSEDED
    with Session(registry.engine) as db:
        assert db.exec(select(RolloutDevice)).one().state == "superseded"
        assert db.get(Device, "d1").desired_manifest == THIRD  # left where the later deploy put it
    skipped = [d for _, a, _, d in _trail(registry) if a == "rollout.revert_skipped"]
    assert skipped == [{"devices": ["d1"], "why": "desired state changed since this rollout"}]
