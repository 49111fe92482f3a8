"""Group releases on a real Mosquitto and database: a completed rollout records its version as its groups'
release, and devices that join the group later (enrolled into it, or moved into it with ``device set``) converge
to it; a release set by hand is audited and converges the members; bad input is refused with a message."""

from __future__ import annotations

import multiprocessing as mp
import shutil
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlmodel import Session, col, select
from typer.testing import CliRunner

from server import audit
from server.app import ServerApp
from server.cli import app as cli
from server.db.models import AuditEntry, Device, GroupRelease, Rollout
from server.groups import Release, pick, releases, set_group_release
from server.orchestrator import create_rollout
from server.registry import Registry, RegistryError
from server.rollouts import Gates, RolloutSpec
from server.simulate import Behaviour, SimConfig, simulate
from tests.agent_harness import AgentProcess
from tests.server_helpers import blob_bundle, server_dir, wait_for
from tests.tls_device_helpers import reachable
from tests.tui_state import OPERATORS

SPEC = RolloutSpec(soak_s=1.0, install_timeout_s=30, gates=Gates(min_requests=20, error_margin=0.05,
                                                                  min_drift_windows=0))


def run(data: Path, user: str, *args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, ["--as", user, *args, "--data-dir", str(data)], env={"COLUMNS": "200"})


def entries(engine, prefix: str) -> list[AuditEntry]:  # type: ignore[no-untyped-def]
    with Session(engine) as db:
        return list(db.exec(select(AuditEntry).where(col(AuditEntry.action).startswith(prefix))
                            .order_by(col(AuditEntry.seq))))


def device(engine, device_id: str) -> Device:  # type: ignore[no-untyped-def]
    with Session(engine) as db:
        d = db.get(Device, device_id)
        assert d is not None
        return d


def test_precedence_is_the_most_recently_set_release_then_the_group_name():
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    a = Release("a", "m", "1", "1" * 64, "x", "hand", t)
    b = Release("b", "m", "2", "2" * 64, "x", "hand", t + timedelta(seconds=1))
    c = Release("c", "m", "3", "3" * 64, "x", "hand", t + timedelta(seconds=1))
    assert pick([a, b]) is b and pick([b, a]) is b
    assert pick([c, b]) is b  # a tie: the name that sorts first
    assert pick([a.__class__("z", "m", "1", "1" * 64, "x", "hand", t.replace(tzinfo=None))]) is not None
    assert pick([]) is None


@pytest.mark.integration
def test_a_device_enrolled_after_a_rollout_to_its_group_completed_converges_to_its_version(tmp_path):
    data, key = server_dir(reachable(tmp_path) / "server")
    b1, _, v1 = blob_bundle(tmp_path / "b1", key, model="sim", version="1.0.0")
    b2, _, v2 = blob_bundle(tmp_path / "b2", key, model="sim", version="1.1.0")
    server = ServerApp(data, metrics_port=0, drift_interval=0, rollout_interval=0.3).start()
    stops: list[tuple[threading.Thread, object]] = []

    def fleet(creds, running) -> None:  # type: ignore[no-untyped-def]
        stop = mp.get_context("spawn").Event()
        cfg = SimConfig(reg.broker_url, creds, seconds=300, interval=0.2, processes=1, follow_desired=True,
                        install_s=0.2, running=running, behaviours={v1: Behaviour(error_rate=0.01, p95_ms=3.0),
                                                                    v2: Behaviour(error_rate=0.01, p95_ms=3.0)},
                        requests_per_window=20)
        thread = threading.Thread(target=simulate, args=(cfg, stop), daemon=True)
        thread.start()
        stops.append((thread, stop))

    try:
        reg = server.registry
        reg.push_model(b1)
        reg.push_model(b2)
        ids = [f"lab-{i}" for i in range(4)]
        fleet(reg.add_devices_bulk(ids, "x86-64", ["lab"], custom_profile=True), (v1, "blob"))
        wait_for(lambda: all(device(reg.engine, d).running_manifest == v1 for d in ids), 60, "the fleet on 1.0.0")
        create_rollout(reg, name="sim-1-1", model="sim", version="1.1.0", target={"groups": ["lab"]}, spec=SPEC,
                       actor="alice")

        def completed() -> bool:
            with Session(reg.engine) as db:
                return db.exec(select(Rollout)).one().state == "completed"

        wait_for(completed, 120, "the rollout to complete")
        with Session(reg.engine) as db:
            release = db.get(GroupRelease, "lab")
            assert release is not None and release.via == "rollout:sim-1-1"
            assert audit.verify(db).ok
        recorded = entries(reg.engine, "group.release")
        assert [(e.subject, e.detail["version"], e.detail["via"]) for e in recorded] == [
            ("group:lab", "1.1.0", "rollout:sim-1-1")]

        # late: enrolled into "lab" after the rollout; it has said nothing yet, so the version waits for its hello
        fleet(reg.add_devices_bulk(["late-1"], "x86-64", ["lab"], custom_profile=True), None)
        assert device(reg.engine, "late-1").desired_manifest == v2
        wait_for(lambda: device(reg.engine, "late-1").running_manifest == v2, 60, "the late device to run 1.1.0")
        converged = entries(reg.engine, "group.converge")
        assert [(e.subject, e.detail["group"], e.detail["version"]) for e in converged] == [
            ("device:late-1", "lab", "1.1.0")]
        # a device outside the group is not touched
        fleet(reg.add_devices_bulk(["other-1"], "x86-64", ["field"], custom_profile=True), None)
        wait_for(lambda: device(reg.engine, "other-1").status == "online", 60, "the other device to connect")
        assert device(reg.engine, "other-1").desired_manifest is None
    finally:
        for thread, stop in stops:
            stop.set()  # type: ignore[attr-defined]
            thread.join(60)
        server.stop()


@pytest.mark.integration
def test_a_real_agent_moved_into_a_group_with_a_release_by_hand_installs_it(digits_bundle, tmp_path):
    data, _ = server_dir(reachable(tmp_path) / "server", digits_bundle.key)
    (data / "operators.toml").write_text(OPERATORS)
    server = ServerApp(data, metrics_port=0, drift_interval=3600).start()
    agent = None
    try:
        reg = server.registry
        version = reg.push_model(digits_bundle.dir)
        enrolled = reg.add_device("pi-1", "x86-64", ["field"], custom_profile=True)
        device_dir = shutil.copytree(enrolled.agent_config.parent, tmp_path / "device")
        agent = AgentProcess(device_dir / "agent.toml", tmp_path / "agent.log",
                             env={"EDGEHERD_AGENT_DATA_DIR": str(tmp_path / "agent")})
        wait_for(lambda: device(reg.engine, "pi-1").fingerprint, 60, "the agent's hello")

        # by hand, audited; no member yet
        res = run(data, "alice", "group", "release", "lab", "digits:1.0.0")
        assert res.exit_code == 0, res.output
        assert "0 device(s)" in res.output
        assert [(e.actor, e.subject, e.detail["via"]) for e in entries(reg.engine, "group.release")] == [
            ("alice", "group:lab", "hand")]
        assert device(reg.engine, "pi-1").desired_manifest is None

        # moved into the group: converges, the agent installs the artifact its runtimes call for
        res = run(data, "alice", "device", "set", "pi-1", "--group", "lab", "--tag", "cam")
        assert res.exit_code == 0, res.output

        def running() -> Device | None:
            d = device(reg.engine, "pi-1")
            return d if d.running_manifest == version.manifest_sha256 and d.install_step == "done" else None

        d = wait_for(running, 90, "the agent to install the group's release")
        assert d.groups == ["lab"] and d.tags == ["cam"] and d.running_artifact == d.desired_artifact
        moved = entries(reg.engine, "device.set")
        assert moved[-1].actor == "alice" and moved[-1].detail["groups_before"] == ["field"]
        assert entries(reg.engine, "group.converge")[-1].detail["artifact"] == d.running_artifact
        res = run(data, "alice", "group", "show", "lab")
        assert res.exit_code == 0 and "digits:1.0.0" in res.output and "pi-1" in res.output, res.output
        with Session(reg.engine) as db:
            assert audit.verify(db).ok
    finally:
        if agent is not None:
            agent.stop()
        server.stop()


@pytest.mark.integration
def test_bad_input_is_refused_with_a_message(tmp_path):
    data, key = server_dir(tmp_path / "data")
    (data / "operators.toml").write_text(OPERATORS)
    bundle, _, _ = blob_bundle(tmp_path / "bundle", key, model="blob", version="1.0.0")
    reg = Registry(data)
    reg.push_model(bundle)
    reg.add_devices_bulk(["d-1"], "x86-64", ["lab"], custom_profile=True)
    reg.engine.dispose()
    cases = [
        (["device", "set", "nope", "--group", "lab"], "no enrolled device named nope"),
        (["device", "set", "d-1", "--group", "bad/name"], "is not a valid group name"),
        (["device", "set", "d-1", "--tag", " "], "is not a valid tag name"),
        (["device", "set", "d-1"], "nothing to change"),
        (["group", "release", "lab", "blob:9.9.9"], "no model blob:9.9.9"),
        (["group", "release", "lab", "blob"], "is not NAME:VERSION"),
        (["group", "release", "bad name", "blob:1.0.0"], "is not a valid group name"),
        (["group", "show", "ghost"], "no device is in group"),
    ]
    for args, message in cases:
        res = run(data, "alice", *args)
        assert res.exit_code == 1, (args, res.output)
        assert message in " ".join(res.output.split()), (args, res.output)
    reg = Registry(data)
    assert device(reg.engine, "d-1").groups == ["lab"]
    assert not entries(reg.engine, "group.") and not entries(reg.engine, "device.set")
    reg.engine.dispose()


def test_convergence_precedence_and_rollouts_on_each_database(engine, tmp_path):
    """On SQLite and PostgreSQL: members that have not said hello get the release recorded (sent with their hello),
    the most recent of several groups' releases wins, and a device an active rollout targets is left to it."""
    data, key = server_dir(tmp_path / "data")
    reg = Registry(data, engine=engine)
    b1, _, v1 = blob_bundle(tmp_path / "b1", key, model="blob", version="1.0.0")
    b2, _, v2 = blob_bundle(tmp_path / "b2", key, model="blob", version="2.0.0")
    reg.push_model(b1)
    second = reg.push_model(b2)
    reg.add_devices_bulk(["a-1", "a-2", "both-1"], "x86-64", ["a"], custom_profile=True)
    with Session(engine) as db:
        db.add(Rollout(name="r", version_id=second.id, target={"devices": ["a-2"]}, state="running",
                       created_by="alice"))
        db.commit()
    assert set_group_release(reg, "a", "blob", "1.0.0", "alice") == ["a-1", "both-1"]
    assert device(engine, "a-1").desired_manifest == v1 and device(engine, "a-1").desired_artifact is None
    assert device(engine, "a-2").desired_manifest is None  # left to rollout r
    assert set_group_release(reg, "b", "blob", "2.0.0", "alice") == []  # no member yet
    reg.set_device("both-1", groups=["a", "b"], actor="alice")  # b's release is the newer
    assert device(engine, "both-1").desired_manifest == v2
    with pytest.raises(RegistryError, match=r"no model blob:3\.0\.0"):
        set_group_release(reg, "a", "blob", "3.0.0", "alice")
    with pytest.raises(RegistryError, match="not a valid group name"):
        reg.set_device("a-1", groups=["a", "b c"], actor="alice")
    with Session(engine) as db:
        assert [r.version for r in releases(db)] == ["1.0.0", "2.0.0"]
        assert audit.verify(db).ok
    assert [e.subject for e in entries(engine, "group.converge")] == ["device:a-1", "device:both-1",
                                                                      "device:both-1"]


@pytest.mark.integration
def test_device_set_through_the_operator_api(tmp_path):
    from server.api.client import ApiError
    from server.governance import Role
    from tests.api_helpers import api_server
    from tests.test_api_cli import Home, _token_file, cli

    with api_server(tmp_path, {"otto": Role.OPERATOR, "vic": Role.VIEWER}) as srv:
        otto = srv.client("otto")
        otto.post("/devices", {"id": "api-1", "profile": "x86-64", "groups": ["lab"], "custom_profile": True})
        answer = otto.post("/devices/api-1/set", {"groups": ["field", "lab"], "tags": ["cam"]})["device"]
        assert answer["groups"] == ["field", "lab"] and answer["tags"] == ["cam"]
        for who, path, body, code in [("otto", "/devices/ghost/set", {"groups": ["lab"]}, 404),
                                      ("otto", "/devices/api-1/set", {"groups": ["bad/name"]}, 422),
                                      ("otto", "/devices/api-1/set", {}, 422),
                                      ("vic", "/devices/api-1/set", {"groups": ["lab"]}, 403)]:
            with pytest.raises(ApiError) as caught:
                srv.client(who).post(path, body)
            assert caught.value.status == code, (path, body, str(caught.value))
        # the command line, logged in, goes through the same endpoint; the group commands say they need the host
        home = Home(tmp_path / "home-otto")
        home.path.mkdir()
        token = _token_file(home, srv.tokens["otto"])
        cli(home, "login", srv.url, "--ca", str(srv.ca_file), "--token-file", str(token))
        assert "groups field,lab, tags —" in cli(home, "device", "set", "api-1", "--no-tags").stdout
        assert "works on the server host only" in cli(home, "group", "list", ok=False).stderr
    reg = Registry(srv.data)
    assert device(reg.engine, "api-1").groups == ["field", "lab"] and device(reg.engine, "api-1").tags == []
    assert [e.actor for e in entries(reg.engine, "device.set")] == ["otto", "otto"]
    reg.engine.dispose()
