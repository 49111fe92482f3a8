"""Rollouts as operators start and command them, under governance: roles, four-eyes, the audit log."""

from __future__ import annotations

import pytest
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from protocol import load_private_key
from server import audit
from server.cli import app
from server.db.models import Approval, AuditEntry, ModelVersion, Rollout
from server.registry import Registry
from tests.server_helpers import blob_bundle, server_dir
from tests.tui_state import OPERATORS

pytestmark = pytest.mark.integration



@pytest.fixture
def data(tmp_path):
    d, key = server_dir(tmp_path / "data")
    (d / "operators.toml").write_text(OPERATORS)
    bundle, _, _ = blob_bundle(tmp_path / "bundle", key, model="blob", version="1.0.0", author="alice")
    reg = Registry(d)
    reg.push_model(bundle)
    reg.add_devices_bulk(["p-1", "p-2"], "x86-64", ["prod"], custom_profile=True)
    reg.add_devices_bulk(["l-1"], "x86-64", ["lab"], custom_profile=True)
    reg.engine.dispose()
    return d


def run(data, user, *args):
    return CliRunner().invoke(app, ["--as", user, *args, "--data-dir", str(data)], env={"COLUMNS": "200"})


def start(data, user, name, group, *extra):
    return run(data, user, "rollout", "start", name, "--model", "blob:1.0.0", "--group", group, "--soak", "5", *extra)


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_production_needs_a_version_approved_by_someone_other_than_its_author(data):
    refused = start(data, "alice", "r-prod", "prod")
    assert refused.exit_code == 1 and "needs an approved version" in _flat(refused.output)
    assert start(data, "alice", "r-lab", "lab").exit_code == 0  # not production: a draft may go to the lab

    assert run(data, "alice", "model", "promote", "blob:1.0.0").exit_code == 0
    own = run(data, "alice", "model", "approve", "blob:1.0.0", "--reason", "looks fine to me")
    assert own.exit_code == 1 and "four-eyes" in _flat(own.output)
    assert run(data, "dave", "model", "approve", "blob:1.0.0", "--reason", "x").exit_code == 1  # a viewer

    approved = run(data, "bob", "model", "approve", "blob:1.0.0", "--reason", "canary metrics reviewed")
    assert approved.exit_code == 0, approved.output
    ok = start(data, "alice", "r-prod", "prod")
    assert ok.exit_code == 0 and "production" in ok.output, ok.output
    viewer = start(data, "dave", "r-other", "lab")
    assert viewer.exit_code == 1 and "viewer" in _flat(viewer.output)

    engine = Registry(data).engine
    with Session(engine) as db:
        rows = {r.name: r for r in db.exec(select(Rollout))}
        assert set(rows) == {"r-lab", "r-prod"} and rows["r-prod"].production and not rows["r-lab"].production
        actions = [(e.actor, e.action) for e in db.exec(select(AuditEntry).order_by(col(AuditEntry.seq)))]
        assert ("alice", "model.promote") in actions and ("bob", "model.approve") in actions
        assert [a for a in actions if a[1] == "rollout.create"] == [("alice", "rollout.create")] * 2
        assert audit.verify(db).ok
    engine.dispose()


def test_a_self_approval_slipped_into_the_database_still_cannot_reach_production(data):
    engine = Registry(data).engine
    with Session(engine) as db:  # as if someone bypassed the CLI: stage set and an approval by the author
        v = db.exec(select(ModelVersion)).one()
        v.stage = "approved"
        db.add(v)
        db.add(Approval(version_id=v.id, actor="alice", decision="approve", reason="mine"))
        db.commit()
    engine.dispose()
    refused = start(data, "bob", "r-prod", "prod")
    assert refused.exit_code == 1 and "own author" in _flat(refused.output)


def test_pause_resume_abort_are_recorded_and_refused_when_they_make_no_sense(data):
    assert start(data, "alice", "r-lab", "lab").exit_code == 0
    assert run(data, "dave", "rollout", "pause", "r-lab").exit_code == 1
    paused = run(data, "alice", "rollout", "pause", "r-lab", "--reason", "weekend")
    assert paused.exit_code == 0 and "paused" in paused.output
    again = run(data, "alice", "rollout", "pause", "r-lab")
    assert again.exit_code == 1 and "cannot pause" in _flat(again.output)
    assert run(data, "alice", "rollout", "resume", "r-lab").exit_code == 0
    assert run(data, "bob", "rollout", "abort", "r-lab", "--reason", "wrong version").exit_code == 0
    shown = run(data, "dave", "rollout", "show", "r-lab")
    assert shown.exit_code == 0 and "aborted" in shown.output
    assert "r-lab" in run(data, "dave", "rollout", "list").output
    clash = start(data, "alice", "r-lab", "lab")
    assert clash.exit_code == 1 and "exists" in clash.output
    engine = Registry(data).engine
    with Session(engine) as db:
        trail = [(e.actor, e.action, e.detail.get("reason")) for e in db.exec(
            select(AuditEntry).where(col(AuditEntry.subject) == "rollout:r-lab").order_by(col(AuditEntry.seq)))]
    engine.dispose()
    assert trail == [("alice", "rollout.create", None), ("alice", "rollout.paused", "weekend"),
                     ("alice", "rollout.resumed", None), ("bob", "rollout.aborted", "wrong version")]


def test_fleet_commands_check_roles_and_leave_an_audit_trail(data, tmp_path):
    assert run(data, "dave", "device", "add", "x-1", "--profile", "x86-64").exit_code == 1  # a viewer
    assert run(data, "alice", "device", "add", "x-1", "--profile", "x86-64", "--custom-profile").exit_code == 0
    assert run(data, "dave", "device", "revoke", "x-1").exit_code == 1
    assert run(data, "bob", "device", "revoke", "x-1").exit_code == 0
    engine = Registry(data).engine
    key = load_private_key((data / "keys" / "signing.key").read_bytes())  # to build a bundle without an author
    bundle, _, _ = blob_bundle(tmp_path / "anon", key, model="blob", version="2.0.0")
    assert run(data, "dave", "model", "push", str(bundle)).exit_code == 1
    assert run(data, "bob", "model", "push", str(bundle)).exit_code == 0
    with Session(engine) as db:
        v2 = db.exec(select(ModelVersion).where(ModelVersion.version == "2.0.0")).one()
        assert v2.author == "bob" and v2.stage == "draft"  # no author in the bundle: whoever pushed it
        trail = [(e.actor, e.action, e.subject) for e in db.exec(select(AuditEntry).order_by(col(AuditEntry.seq)))]
        assert ("alice", "device.add", "device:x-1") in trail and ("bob", "device.revoke", "device:x-1") in trail
        assert ("bob", "model.push", "model:blob:2.0.0") in trail
        assert audit.verify(db, audit.read_anchor(data / audit.ANCHOR_FILE)).ok
    engine.dispose()


def test_four_eyes_holds_against_the_pusher_whatever_author_the_bundle_names(data, tmp_path):
    key = load_private_key((data / "keys" / "signing.key").read_bytes())
    bundle, _, _ = blob_bundle(tmp_path / "carol", key, model="blob", version="3.0.0", author="carol")
    assert run(data, "alice", "model", "push", str(bundle)).exit_code == 0  # alice pushes "carol's" build
    assert run(data, "alice", "model", "promote", "blob:3.0.0").exit_code == 0
    own = run(data, "alice", "model", "approve", "blob:3.0.0", "--reason", "fine")
    assert own.exit_code == 1 and "pushed" in _flat(own.output) and "four-eyes" in _flat(own.output)
    assert run(data, "bob", "model", "approve", "blob:3.0.0", "--reason", "reviewed").exit_code == 0


def test_a_direct_deploy_to_a_production_device_needs_an_approved_version(data):
    refused = run(data, "alice", "deploy", "blob:1.0.0", "--device", "p-1")
    assert refused.exit_code == 1 and "needs an approved version" in _flat(refused.output)
