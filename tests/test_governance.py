"""Roles, operators.toml, the version lifecycle, four-eyes, and the CLI that drives them."""

from __future__ import annotations

import itertools
import sqlite3

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

from protocol import encode_model, manifest_digest, sign_manifest
from server import audit
from server.db import make_engine
from server.db.models import Approval, AuditEntry, Device, ModelVersion
from server.governance import (
    SERVICE_ACTORS,
    Governance,
    GovernanceError,
    OperatorEntry,
    OperatorsConfig,
    Permission,
    Role,
    Stage,
    approve,
    check_rollout,
    current_operator,
    find_version,
    governed_history,
    is_production_target,
    load_operators,
    mark_deployed,
    promote,
    reject,
    retire,
    version_card,
)
from tests.samples import SIGNING_KEY, manifest

CONFIG = OperatorsConfig(production_groups=["prod", "prod-eu"], operator=[
    OperatorEntry(name="vic", role=Role.VIEWER),
    OperatorEntry(name="otto", role=Role.OPERATOR),
    OperatorEntry(name="alice", role=Role.APPROVER),  # also the author of the sample versions
    OperatorEntry(name="bob", role=Role.APPROVER),
    OperatorEntry(name="ada", role=Role.ADMIN),
])
GOV = Governance(CONFIG)

OPERATOR_RIGHTS = {Permission.READ, Permission.PUSH_MODEL, Permission.DEPLOY, Permission.ENROLL_DEVICE,
                   Permission.REVOKE_DEVICE, Permission.START_ROLLOUT, Permission.PAUSE_ROLLOUT,
                   Permission.RESUME_ROLLOUT, Permission.ABORT_ROLLOUT, Permission.ROLLBACK_ROLLOUT,
                   Permission.PROMOTE, Permission.ACK_ALERT, Permission.COMMAND_DEVICE}
RIGHTS = {
    "vic": {Permission.READ},
    "otto": OPERATOR_RIGHTS,
    "alice": OPERATOR_RIGHTS | {Permission.APPROVE, Permission.REJECT},
    "bob": OPERATOR_RIGHTS | {Permission.APPROVE, Permission.REJECT},
    "ada": set(Permission),
}


# -- roles and permissions (pure) ---------------------------------------------------------------


@pytest.mark.parametrize(("name", "permission"), list(itertools.product(RIGHTS, Permission)))
def test_permission_matrix(name, permission):
    expected = permission in RIGHTS[name]
    assert GOV.allows(name, permission) is expected
    if expected:
        assert GOV.require(name, permission) == GOV.role(name)
    else:
        with pytest.raises(GovernanceError, match=f"^{name} is an? "):
            GOV.require(name, permission)


@pytest.mark.parametrize(("name", "permission", "message"), [
    ("vic", Permission.START_ROLLOUT, "vic is a viewer; starting a rollout needs the operator role"),
    ("otto", Permission.APPROVE, "otto is an operator; approving a version needs the approver role"),
    ("bob", Permission.RETIRE, "bob is an approver; retiring a version needs the admin role"),
    ("mallory", Permission.READ, "mallory is not an operator in operators.toml; add an [[operator]] entry"),
    ("BOB", Permission.RETIRE, "BOB is an approver; retiring"),  # names match whatever their case
])
def test_refusals_say_who_what_and_what_is_needed(name, permission, message):
    with pytest.raises(GovernanceError) as info:
        GOV.require(name, permission)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(("groups", "production"), [
    ([], False), (["lab"], False), (["prod"], True), (["lab", "prod-eu"], True), (["Prod"], False),
])
def test_is_production_target(groups, production):
    assert is_production_target(CONFIG, groups) is production
    assert GOV.is_production(groups) is production


def test_current_operator_precedence(monkeypatch):
    monkeypatch.setattr("getpass.getuser", lambda: "osuser")
    monkeypatch.delenv("EDGEHERD_OPERATOR", raising=False)
    assert current_operator(None) == "osuser"
    monkeypatch.setenv("EDGEHERD_OPERATOR", "envuser")
    assert current_operator(None) == "envuser"
    assert current_operator("bob") == "bob"
    monkeypatch.delenv("EDGEHERD_OPERATOR")

    def nobody():
        raise OSError("No username set in the environment")

    monkeypatch.setattr("getpass.getuser", nobody)
    with pytest.raises(GovernanceError, match=r"cannot tell who you are.*set EDGEHERD_OPERATOR or pass --as"):
        current_operator(None)


# -- operators.toml ------------------------------------------------------------------------------


def test_operators_toml_loads(tmp_path):
    (tmp_path / "operators.toml").write_text('production_groups = ["prod"]\n\n[[operator]]\nname = "alice"\n'
                                             'role = "admin"\n\n[[operator]]\nname = "bob"\nrole = "approver"\n')
    gov = Governance.load(tmp_path)
    assert not gov.bootstrap
    assert gov.role("alice") is Role.ADMIN and gov.role("bob") is Role.APPROVER
    assert gov.config.production_groups == ["prod"]


@pytest.mark.parametrize(("text", "message"), [
    ('[[operator]]\nname = "bob"\nrole = "god"\n', "operator[1].role: Input should be 'viewer', 'operator', "
                                                   "'approver' or 'admin'"),
    ('[[operator]]\nname = "bob"\nrole = "viewer"\n[[operator]]\nname = "Bob"\nrole = "admin"\n',
     "operator[2].name: 'Bob' is already operator[1]"),
    ('[[operator]]\nname = "bob smith"\nrole = "viewer"\n', "operator[1].name: must be 1 to 64 characters"),
    ('[[operator]]\nname = ""\nrole = "viewer"\n', "operator[1].name: must be 1 to 64 characters"),
    ('[[operator]]\nname = "bob"\n', "operator[1].role: Field required"),
    ('[[operator]]\nname = "bob"\nrole = "viewer"\nemail = "b@x"\n', "operator[1].email: Extra inputs"),
    ('prod_groups = ["prod"]\n', "prod_groups: Extra inputs are not permitted"),
    ('production_groups = [""]\n', "production_groups: group names must not be empty"),
    ('production_groups = "prod"\n', "production_groups: Input should be a valid list"),
    ("[[operator]\n", "is not valid TOML"),
])
def test_operators_toml_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "operators.toml"
    path.write_text(text)
    with pytest.raises(GovernanceError) as info:
        Governance.load(tmp_path)
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)
    with pytest.raises(GovernanceError):
        load_operators(path)


def test_without_operators_toml_the_os_user_is_the_only_admin(tmp_path, monkeypatch):
    monkeypatch.setattr("getpass.getuser", lambda: "carol")
    gov = Governance.load(tmp_path)
    assert gov.bootstrap and gov.role("carol") is Role.ADMIN
    assert gov.config.production_groups == []
    with pytest.raises(GovernanceError, match=r"bob is not a known operator: .*operators.toml does not exist, so "
                                              r"only the bootstrap admin \(carol\) is"):
        gov.role("bob")


# -- the lifecycle on a database -----------------------------------------------------------------


def add_version(engine, version: str = "1.0.0", *, author: str | None = "alice", stage: str = "draft") -> int:
    m = manifest().model_copy(update={"version": version, "author": author})
    row = ModelVersion(name=m.model, version=version, manifest_sha256=manifest_digest(m),
                       signed_manifest=encode_model(sign_manifest(m, SIGNING_KEY)), stage=stage, author=author,
                       lineage=dict(m.lineage))
    with Session(engine) as db:
        db.add(row)
        db.commit()
        db.refresh(row)
        assert row.id is not None
        return row.id


def actions(engine) -> list[tuple[str, str, dict]]:
    with Session(engine) as db:
        return [(e.actor, e.action, e.detail) for e in reversed(audit.entries(db, limit=1000))]


MOVES = {"promote": promote, "approve": approve, "reject": reject, "mark_deployed": mark_deployed, "retire": retire}
ACTION = {"promote": "model.promote", "approve": "model.approve", "reject": "model.reject",
          "mark_deployed": "model.deployed", "retire": "model.retire"}
ANY_STAGE = ["draft", "candidate", "approved", "deployed"]

LIFECYCLE = [
    # (stage before, move, actor, stage after or the refusal)
    ("draft", "promote", "otto", "candidate"),
    ("candidate", "promote", "otto", "digits:1.0.0 is candidate; promoting needs it to be draft"),
    ("approved", "promote", "otto", "is approved; promoting needs it to be draft"),
    ("candidate", "approve", "bob", "approved"),
    ("draft", "approve", "bob", "digits:1.0.0 is draft; approving needs it to be candidate"),
    ("approved", "approve", "bob", "is approved; approving needs it to be candidate"),
    ("candidate", "reject", "bob", "draft"),
    ("approved", "reject", "bob", "is approved; rejecting needs it to be candidate"),
    ("approved", "mark_deployed", "otto", "deployed"),
    ("candidate", "mark_deployed", "otto", "is candidate; marking it deployed needs it to be approved"),
    *[(stage, "retire", "ada", "retired") for stage in ANY_STAGE],
    ("retired", "retire", "ada", "is retired; retiring needs it to be draft, candidate, approved or deployed"),
    ("retired", "promote", "otto", "is retired; promoting needs it to be draft"),
    ("retired", "approve", "bob", "is retired; approving needs it to be candidate"),
]


@pytest.mark.integration
@pytest.mark.parametrize(("before", "move", "actor", "outcome"), LIFECYCLE)
def test_lifecycle(engine, before, move, actor, outcome):
    add_version(engine, stage=before)
    args = ("a reason",) if move in ("approve", "reject") else ()
    with Session(engine) as db:
        version = find_version(db, "digits:1.0.0")
        if outcome in {s.value for s in Stage}:
            moved = MOVES[move](db, version, actor, *args)
            assert (moved.before.value, moved.after.value, moved.changed) == (before, outcome, True)
            assert version.stage == outcome
        else:
            with pytest.raises(GovernanceError, match=outcome):
                MOVES[move](db, version, actor, *args)
    with Session(engine) as db:
        stored = find_version(db, "digits:1.0.0").stage
        entries = audit.entries(db)
    if outcome in {s.value for s in Stage}:
        assert stored == outcome
        [entry] = entries
        assert (entry.actor, entry.action, entry.subject) == (actor, ACTION[move], "model:digits:1.0.0")
        assert entry.detail["from"] == before and entry.detail["to"] == outcome
    else:  # a refusal writes nothing
        assert stored == before and entries == []


@pytest.mark.integration
def test_mark_deployed_twice_changes_nothing(engine):
    add_version(engine, stage="approved")
    with Session(engine) as db:
        version = find_version(db, "digits:1.0.0")
        assert mark_deployed(db, version, "otto").changed
        again = mark_deployed(db, version, "otto")
    assert (again.before, again.after, again.audit_seq, again.changed) == (Stage.DEPLOYED, Stage.DEPLOYED, None,
                                                                           False)
    assert [a for _, a, _ in actions(engine)] == ["model.deployed"]


@pytest.mark.integration
def test_an_unknown_stage_is_an_error_not_a_guess(engine):
    add_version(engine, stage="registered")
    with Session(engine) as db, pytest.raises(GovernanceError, match="unknown stage 'registered'"):
        promote(db, find_version(db, "digits:1.0.0"), "otto")


@pytest.mark.integration
@pytest.mark.parametrize(("ref", "message"), [("digits", "is not NAME:VERSION"), ("digits:", "is not NAME:VERSION"),
                                              ("digits:9.9.9", "no model digits:9.9.9")])
def test_find_version_errors(engine, ref, message):
    with Session(engine) as db, pytest.raises(GovernanceError, match=message):
        find_version(db, ref)


# -- four-eyes -----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize(("author", "actor", "reason", "message"), [
    ("alice", "alice", "fine", "alice is the author of digits:1.0.0 and cannot approve it: another approver must"),
    ("alice", "ALICE", "fine", "ALICE is the author"),
    (None, "bob", "fine", "digits:1.0.0 has no recorded author"),
    ("alice", "bob", "   ", "approving needs a reason"),
    ("alice", "bob", "x" * 1001, "at most 1000"),
])
def test_approval_refusals(engine, author, actor, reason, message):
    add_version(engine, author=author, stage="candidate")
    with Session(engine) as db:
        with pytest.raises(GovernanceError, match=message):
            approve(db, find_version(db, "digits:1.0.0"), actor, reason)
        assert find_version(db, "digits:1.0.0").stage == "candidate"
        assert db.exec(select(Approval)).all() == [] and audit.head(db) is None


@pytest.mark.integration
def test_a_second_approver_can_approve_and_production_then_accepts_it(engine):
    add_version(engine, stage="draft")
    with Session(engine) as db:
        version = find_version(db, "digits:1.0.0")
        promote(db, version, "alice")
        with pytest.raises(GovernanceError, match="is candidate; a production rollout needs an approved version"):
            check_rollout(db, version, production=True)
        check_rollout(db, version, production=False)
        with pytest.raises(GovernanceError, match="author"):
            approve(db, version, "alice", "my own work")
        moved = approve(db, version, "bob", "  accuracy 0.97 on the held-out set  ")
        assert moved.after is Stage.APPROVED
        [approval] = db.exec(select(Approval)).all()
        assert (approval.actor, approval.decision, approval.reason) == ("bob", "approve", "accuracy 0.97 on the "
                                                                                          "held-out set")
        check_rollout(db, version, production=True)
        mark_deployed(db, version, "otto")
        check_rollout(db, version, production=True)


@pytest.mark.integration
@pytest.mark.parametrize(("stage", "approvals", "production", "refusal"), [
    ("draft", [], True, "digits:1.0.0 is draft; a production rollout needs an approved version"),
    ("candidate", [], True, "is candidate; a production rollout needs an approved version"),
    ("draft", [], False, None),
    ("candidate", [], False, None),
    ("approved", [("bob", "approve")], True, None),
    ("deployed", [("bob", "approve")], True, None),
    ("retired", [("bob", "approve")], False, "digits:1.0.0 is retired and cannot be rolled out"),
    ("retired", [("bob", "approve")], True, "is retired"),
    # paths that bypassed approve(): written straight into the tables
    ("approved", [], True, "is approved but has no approval on record"),
    ("approved", [("alice", "approve")], True, "was approved by its own author alice; production needs an approval "
                                               "by someone else"),
    ("approved", [("Alice", "approve")], True, "approved by its own author"),
    ("deployed", [("alice", "approve")], True, "approved by its own author"),
    ("approved", [("bob", "approve"), ("carol", "reject")], True, "no approval on record"),
    ("approved", [("alice", "approve")], False, None),
])
def test_check_rollout(engine, stage, approvals, production, refusal):
    vid = add_version(engine, stage=stage)
    with Session(engine) as db:
        for actor, decision in approvals:
            db.add(Approval(version_id=vid, actor=actor, decision=decision, reason="direct"))
        db.commit()
        version = find_version(db, "digits:1.0.0")
        if refusal is None:
            check_rollout(db, version, production=production)
        else:
            with pytest.raises(GovernanceError, match=refusal):
                check_rollout(db, version, production=production)


@pytest.mark.integration
def test_a_version_without_author_never_reaches_production(engine):
    vid = add_version(engine, author=None, stage="approved")
    with Session(engine) as db:
        db.add(Approval(version_id=vid, actor="bob", decision="approve", reason="direct"))
        db.commit()
        with pytest.raises(GovernanceError, match="no recorded author"):
            check_rollout(db, find_version(db, "digits:1.0.0"), production=True)


# -- the audit trail and the card ----------------------------------------------------------------


@pytest.mark.integration
def test_every_move_lands_in_the_audit_log(engine):
    add_version(engine)
    with Session(engine) as db:
        v = find_version(db, "digits:1.0.0")
        promote(db, v, "otto")
        reject(db, v, "bob", "no drift profile")
        promote(db, v, "otto")
        approve(db, v, "bob", "looks right")
        mark_deployed(db, v, "otto")
        retire(db, v, "ada")
        digest = v.manifest_sha256
    assert actions(engine) == [
        ("otto", "model.promote", {"from": "draft", "to": "candidate", "manifest_sha256": digest}),
        ("bob", "model.reject", {"from": "candidate", "to": "draft", "manifest_sha256": digest,
                                 "reason": "no drift profile"}),
        ("otto", "model.promote", {"from": "draft", "to": "candidate", "manifest_sha256": digest}),
        ("bob", "model.approve", {"from": "candidate", "to": "approved", "manifest_sha256": digest,
                                  "reason": "looks right"}),
        ("otto", "model.deployed", {"from": "approved", "to": "deployed", "manifest_sha256": digest}),
        ("ada", "model.retire", {"from": "deployed", "to": "retired", "manifest_sha256": digest}),
    ]
    with Session(engine) as db:
        assert audit.verify(db).ok
        assert [(a.actor, a.decision) for a in db.exec(select(Approval)).all()] == [("bob", "reject"),
                                                                                    ("bob", "approve")]


@pytest.mark.integration
def test_version_card(engine):
    add_version(engine, "1.0.0")
    add_version(engine, "2.0.0")
    with Session(engine) as db:
        v1 = find_version(db, "digits:1.0.0")
        v2 = find_version(db, "digits:2.0.0")
        db.add(Device(id="pi-1", profile="raspberry-pi-5", running_manifest=v1.manifest_sha256))
        db.add(Device(id="pi-2", profile="raspberry-pi-5", running_manifest=v1.manifest_sha256,
                      desired_manifest=v2.manifest_sha256))
        db.add(Device(id="pi-3", profile="raspberry-pi-5", running_manifest=v2.manifest_sha256))
        db.commit()
        promote(db, v1, "otto")
        approve(db, v1, "bob", "good")
        promote(db, v2, "otto")
        card = version_card(db, v1)
    assert card["stage"] == "approved" and card["author"] == "alice"
    assert card["lineage"]["dataset_sha256"] == "3f" * 32 and card["lineage"]["recipe"] == "digits"
    assert [(a["actor"], a["decision"], a["reason"]) for a in card["approvals"]] == [("bob", "approve", "good")]
    assert card["devices"] == ["pi-1", "pi-2"] and card["desired_by"] == []
    assert [(h["actor"], h["action"]) for h in card["history"]] == [("bob", "model.approve"),
                                                                    ("otto", "model.promote")]


@pytest.mark.integration
def test_concurrent_approvals_approve_once(engine):
    """Two approvers at the same moment: one wins, the other is told the version is already approved."""
    import threading

    add_version(engine, stage="candidate")
    start = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def approver(name: str) -> None:
        with Session(engine) as db:
            version = find_version(db, "digits:1.0.0")
            start.wait()
            try:
                approve(db, version, name, "ok")
                outcomes[name] = "approved"
            except GovernanceError as exc:
                outcomes[name] = str(exc)

    threads = [threading.Thread(target=approver, args=(n,)) for n in ("bob", "ada")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values())[0] == "approved", outcomes
    assert "is approved; approving needs it to be candidate" in sorted(outcomes.values())[1]
    with Session(engine) as db:
        assert len(db.exec(select(Approval)).all()) == 1
        assert audit.verify(db).ok and len(audit.entries(db)) == 1


# -- the CLI -------------------------------------------------------------------------------------

OPERATORS_TOML = """
production_groups = ["prod"]

[[operator]]
name = "vic"
role = "viewer"

[[operator]]
name = "otto"
role = "operator"

[[operator]]
name = "alice"
role = "approver"

[[operator]]
name = "bob"
role = "approver"

[[operator]]
name = "ada"
role = "admin"
"""


@pytest.fixture
def data(tmp_path):
    from server.cli.governance import open_engine

    d = tmp_path / "data"
    eng = open_engine(d)
    add_version(eng)
    eng.dispose()
    (d / "operators.toml").write_text(OPERATORS_TOML)
    return d


def cli(data, *args, user=None, env=None):
    from server.cli import app

    argv = (["--as", user] if user else []) + list(args) + ["--data-dir", str(data)]
    base = {"COLUMNS": "200", "EDGEHERD_OPERATOR": None, "EDGEHERD_DATABASE_URL": None}
    out = CliRunner().invoke(app, argv, env=base | (env or {}))
    return out.exit_code, " ".join(out.output.split())


@pytest.mark.integration
def test_cli_lifecycle_roles_and_audit(data):
    assert cli(data, "model", "promote", "digits:1.0.0", user="vic") == (
        1, "error: vic is a viewer; promoting a version to candidate needs the operator role")
    code, out = cli(data, "model", "promote", "digits:1.0.0", user="otto")
    assert code == 0 and "digits:1.0.0: draft → candidate by otto (audit #1)" in out, out
    code, out = cli(data, "model", "approve", "digits:1.0.0", "--reason", "mine", user="alice")
    assert code == 1 and "alice is the author of digits:1.0.0 and cannot approve it" in out
    code, out = cli(data, "model", "approve", "digits:1.0.0", user="bob")
    assert code == 2 and "--reason" in out  # the reason is required
    code, out = cli(data, "model", "approve", "digits:1.0.0", "--reason", "held-out accuracy 0.97", user="bob")
    assert code == 0 and "candidate → approved by bob (audit #2)" in out, out
    code, out = cli(data, "model", "retire", "digits:1.0.0", user="bob")
    assert code == 1 and "bob is an approver; retiring a version needs the admin role" in out
    code, out = cli(data, "model", "promote", "digits:9.9.9", user="otto")
    assert code == 1 and "no model digits:9.9.9" in out
    code, out = cli(data, "model", "promote", "digits:1.0.0", user="mallory")
    assert code == 1 and "mallory is not an operator in" in out
    # who acts can come from the environment, too
    code, out = cli(data, "model", "reject", "digits:1.0.0", "--reason", "late", env={"EDGEHERD_OPERATOR": "otto"})
    assert code == 1 and "otto is an operator; rejecting a version needs the approver role" in out

    code, out = cli(data, "model", "show", "digits:1.0.0")
    assert code == 0, out
    for expected in ("digits 1.0.0 (approved)", "author: alice", "bob approved: held-out accuracy 0.97",
                     "dataset_sha256: " + "3f" * 32, "running on 0 device(s)", "#2", "model.approve"):
        assert expected in out, (expected, out)

    code, out = cli(data, "audit", "list")
    assert code == 0 and "model.promote" in out and "model.approve" in out and "model:digits:1.0.0" in out
    code, out = cli(data, "audit", "list", "--actor", "bob", "--limit", "5")
    assert "model.approve" in out and "model.promote" not in out
    code, out = cli(data, "audit", "list", "--action", "model.retire")
    assert code == 0 and "no audit entries match" in out
    assert audit.read_anchor(data) is not None and audit.read_anchor(data).seq == 2
    assert cli(data, "audit", "verify") == (0, "audit log OK: 2 entries, chain intact; anchored entry #2 matches "
                                             "approvals OK: 0 signed and verified, 1 unsigned (decided on the "
                                             "server host)")

    code, out = cli(data, "model", "retire", "digits:1.0.0", user="ada")
    assert code == 0 and "approved → retired by ada (audit #3)" in out


@pytest.mark.integration
def test_cli_verify_fails_after_tampering(data):
    assert cli(data, "model", "promote", "digits:1.0.0", user="otto")[0] == 0
    assert cli(data, "model", "approve", "digits:1.0.0", "--reason", "ok", user="bob")[0] == 0
    with sqlite3.connect(data / "edgeherd.db") as conn:
        conn.execute("UPDATE audit_log SET actor = 'alice' WHERE seq = 2")
    code, out = cli(data, "audit", "verify")
    assert code == 1
    assert "audit log FAILED verification" in out and "seq 2: hash does not match the entry's contents" in out


@pytest.mark.integration
def test_cli_verify_catches_a_removed_newest_entry_with_the_anchor(data, tmp_path):
    assert cli(data, "model", "promote", "digits:1.0.0", user="otto")[0] == 0
    offsite = tmp_path / "anchor-copy.json"
    offsite.write_bytes((data / "audit-anchor.json").read_bytes())
    with sqlite3.connect(data / "edgeherd.db") as conn:
        conn.execute("DELETE FROM audit_log WHERE seq = 1")
    (data / "audit-anchor.json").unlink()  # a careful intruder removes the local anchor too
    assert cli(data, "audit", "verify") == (0, "audit log OK: 0 entries, chain intact; no anchor, so removal of "
                                               "the newest entries would not show")
    code, out = cli(data, "audit", "verify", "--anchor", str(offsite))
    assert code == 1 and "seq 1: the anchored entry is missing" in out
    code, out = cli(data, "audit", "verify", "--anchor", str(tmp_path / "nowhere.json"))
    assert code == 1 and "does not exist" in out


@pytest.mark.integration
def test_cli_reports_a_broken_operators_toml(data):
    (data / "operators.toml").write_text('[[operator]]\nname = "bob"\nrole = "superuser"\n')
    code, out = cli(data, "model", "promote", "digits:1.0.0", user="bob")
    assert code == 1 and str(data / "operators.toml") in out and "operator[1].role" in out


@pytest.mark.integration
def test_cli_bootstrap_mode(data):
    (data / "operators.toml").unlink()
    code, out = cli(data, "model", "promote", "digits:1.0.0", env={"LOGNAME": "carol"})
    assert code == 0 and "draft → candidate by carol" in out, out
    code, out = cli(data, "model", "approve", "digits:1.0.0", "--reason", "x", user="bob", env={"LOGNAME": "carol"})
    assert code == 1 and "bob is not a known operator" in out and "does not exist" in out
    eng = make_engine(f"sqlite:///{data / 'edgeherd.db'}")
    with Session(eng) as db:
        assert [e.actor for e in db.exec(select(AuditEntry)).all()] == ["carol"]
    eng.dispose()


# -- bootstrap mode refused where operators.toml was in force, and backups that keep it -----------------------


def test_service_actors_are_the_ones_the_server_records():
    from server.orchestrator import ORCHESTRATOR
    from server.registry import SYSTEM

    assert {SYSTEM, ORCHESTRATOR} == SERVICE_ACTORS


@pytest.mark.parametrize(("entries", "evidence"), [
    ([], None),
    ([("system", "device.add"), ("orchestrator", "rollout.wave_passed")], None),
    ([("carol", "model.push"), ("system", "device.add"), ("carol", "model.promote")], None),  # bootstrap's one admin
    ([("carol", "model.push"), ("Carol", "model.promote")], None),  # one person, whatever the case
    ([("carol", "model.push"), ("system", "device.add"), ("dave", "model.promote"), ("erin", "device.add")],
     "audit #1 and #3: actions by carol and by dave"),
    ([("system", "model.push"), ("carol", "model.approve")], "audit #2: carol approved digits:1.0.0"),
])
def test_governed_history_is_an_approval_or_two_people(engine, entries, evidence):
    for actor, action in entries:
        audit.append_with_retry(engine, actor, action, "model:digits:1.0.0")
    with Session(engine) as db:
        assert governed_history(db) == evidence


@pytest.mark.integration
def test_a_governed_server_without_operators_toml_refuses_to_run(data, tmp_path):
    assert cli(data, "model", "promote", "digits:1.0.0", user="otto")[0] == 0
    assert cli(data, "model", "approve", "digits:1.0.0", "--reason", "fine", user="bob")[0] == 0
    backup = tmp_path / "backup"
    assert cli(data, "server", "backup", str(backup))[0] == 0
    (backup / "operators.toml").unlink()  # a backup that lacks it, as those made before it was kept

    restored = tmp_path / "restored"
    code, out = cli(restored, "server", "restore", str(backup))
    assert code == 0 and "warning:" in out and "would run in bootstrap mode" in out, out
    refusal = (f"error: {restored / 'operators.toml'} does not exist, so edgeherd would run in bootstrap mode (the OS "
               f"user the only operator, an admin; no production groups), but the audit log shows operators were "
               f"governed by one (audit #2: bob approved digits:1.0.0). Restore operators.toml from the backup "
               f"(`edgeherd server backup` keeps it) or recreate it (docs/governance.md)")
    for argv in (("model", "retire", "digits:1.0.0"), ("device", "add", "pi-9", "--profile", "raspberry-pi-5"),
                 ("rollout", "pause", "any"), ("deploy", "digits:1.0.0", "--device", "pi-9"),
                 ("server", "run", "--metrics-port", "0")):
        assert cli(restored, *argv, env={"LOGNAME": "carol"}) == (1, refusal), argv
    assert not (restored / "broker" / "mosquitto.pid").exists()  # the server never started
    # reading stays possible, and putting the file back is the way out
    assert cli(restored, "audit", "verify")[0] == 0
    (restored / "operators.toml").write_text(OPERATORS_TOML)
    code, out = cli(restored, "model", "retire", "digits:1.0.0", user="ada")
    assert code == 0 and "approved → retired by ada" in out, out


@pytest.mark.integration
def test_backup_and_restore_keep_governance(data, tmp_path):
    assert cli(data, "model", "promote", "digits:1.0.0", user="otto")[0] == 0
    backup = tmp_path / "backup"
    code, out = cli(data, "server", "backup", str(backup))
    assert code == 0 and "audit-anchor.json, operators.toml" in out, out
    restored = tmp_path / "restored"
    assert cli(restored, "server", "restore", str(backup))[0] == 0
    assert (restored / "operators.toml").read_text() == OPERATORS_TOML
    assert cli(restored, "audit", "verify") == (0, "audit log OK: 1 entries, chain intact; anchored entry #1 matches")

    # four-eyes and roles hold on the restored server as they did before
    code, out = cli(restored, "model", "approve", "digits:1.0.0", "--reason", "mine", user="alice")
    assert code == 1 and "alice is the author of digits:1.0.0 and cannot approve it" in out, out
    code, out = cli(restored, "model", "approve", "digits:1.0.0", "--reason", "fine", user="otto")
    assert code == 1 and "otto is an operator; approving a version needs the approver role" in out, out
    code, out = cli(restored, "model", "approve", "digits:1.0.0", "--reason", "held-out accuracy fine", user="bob")
    assert code == 0 and "candidate → approved by bob (audit #2)" in out, out
    assert cli(restored, "audit", "verify") == (0, "audit log OK: 2 entries, chain intact; anchored entry #2 "
                                                 "matches approvals OK: 0 signed and verified, 1 unsigned "
                                                 "(decided on the server host)")

    prepared = tmp_path / "prepared"  # restore never overwrites an operators.toml already there
    prepared.mkdir()
    (prepared / "operators.toml").write_text('[[operator]]\nname = "mallory"\nrole = "admin"\n')
    code, out = cli(prepared, "server", "restore", str(backup))
    assert code == 1 and "already holds a server" in out, out
