"""The TUI as the operator API's client: the app driven with key presses against a real ``edgeherd server run``
process over HTTPS (RemoteFleetData, no database in the test's process). The fleet lists the server's devices and
drills down; a rollout started through the API shows, is paused from the TUI and the server says so; one started
through the form is recorded by the server as its operator's; an approver approves a candidate from the TUI with
a signed decision that the server's audit verification accepts."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select
from textual.widgets import DataTable, Select, Static

from protocol.signing import generate_signing_key, private_key_to_pem, public_key_to_text
from server.api.client import ApiClient, ApiError, key_path
from server.db import database_url, make_engine
from server.db.models import Approval
from server.governance import Permission, Role
from server.signatures import verify_decision
from server.tui.app import make_remote_app
from server.tui.data import ActionError, FleetQuery
from server.tui.modals import ConfirmModal, ReasonModal
from server.tui.remote import RemoteFleetData
from server.tui.screens import AuditScreen, DeviceScreen, DriftScreen, FleetScreen, ModelsScreen, RolloutsScreen
from server.tui.screens.fleet import FleetTable
from tests._mosquitto import free_port
from tests.api_helpers import ROOT, ApiServer, api_server
from tests.server_helpers import blob_bundle, wait_for
from tests.tui_state import settle
from tests.web_tui_helpers import printed_url, session_cookie, stream

pytestmark = pytest.mark.integration
SIZE = (160, 48)
DEVICES = {"lab-01": ["lab"], "lab-02": ["lab"], "pi-01": ["pi"]}


def _push(srv: ApiServer, tmp: Path, version: str, operator: str = "otto") -> None:
    bundle, _, _ = blob_bundle(tmp / f"digits-{version}", srv.key, model="digits", version=version, size=4096,
                               author="alice")
    archive = tmp / f"digits-{version}.tar"
    with tarfile.open(archive, "w") as tar:
        for path in sorted(bundle.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(bundle)), recursive=False)
    srv.client(operator).request("POST", "/models/upload", upload=archive)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory):
    """Three devices enrolled, digits 1.0.0 (draft) and 1.1.0 (candidate) pushed by otto, 2.0.0 pushed by bob and
    promoted by otto, and a rollout of 1.0.0 to the lab group that the server has started: all through the API."""
    tmp = tmp_path_factory.mktemp("tui-api")
    os.chmod(tmp, 0o701)  # the managed broker (user mosquitto) reaches the data directory inside
    with api_server(tmp, {"otto": Role.OPERATOR, "bob": Role.APPROVER}) as server:
        otto = server.client("otto")
        for device, groups in DEVICES.items():
            otto.post("/devices", {"id": device, "profile": "x86-64-cpu", "groups": groups})
        _push(server, tmp, "1.0.0")
        _push(server, tmp, "1.1.0")
        otto.post("/models/digits:1.1.0/promote")
        _push(server, tmp, "2.0.0", "bob")
        otto.post("/models/digits:2.0.0/promote")
        otto.post("/rollouts", {"name": "lab-canary", "model": "digits:1.0.0", "target": {"groups": ["lab"]}})
        wait_for(lambda: otto.get("/rollouts/lab-canary")["row"]["state"] == "running", 30,
                 "the server to start the rollout")
        yield server


def _app(srv: ApiServer, operator: str) -> Any:
    return make_remote_app(srv.url, srv.ca_pem, srv.tokens[operator], refresh_s=0)


def _keys(table: DataTable) -> list[str]:
    return [str(table.coordinate_to_cell_key((i, 0)).row_key.value) for i in range(table.row_count)]


def _audit(client: ApiClient, action: str) -> list[dict[str, Any]]:
    return [e for e in client.get("/audit", text=action)["entries"] if e["action"] == action]


def test_the_fleet_screen_lists_the_servers_devices_and_drills_down(srv):
    asyncio.run(_test_the_fleet_screen_lists_the_servers_devices_and_drills_down(srv))


async def _test_the_fleet_screen_lists_the_servers_devices_and_drills_down(srv):
    app = _app(srv, "otto")
    assert isinstance(app.data, RemoteFleetData) and app.data.actor == "otto" and app.data.role() == "operator"
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, FleetScreen) and screen.refreshes >= 1
        assert screen.sub_title == "otto (operator)"
        table = screen.query_one("#fleet", FleetTable)
        assert sorted(table.row_keys()) == sorted(DEVICES)
        assert str(screen.query_one("#summary", Static).render()).startswith("3 devices · 0 online")
        assert screen.rows["lab-01"].groups == "lab" and screen.rows["lab-01"].desired == "digits:1.0.0"
        await pilot.press("slash", *"group:pi", "enter")
        await settle(pilot)
        assert table.row_keys() == ["pi-01"]
        await pilot.press("enter")
        await settle(pilot)
        device = app.screen
        assert isinstance(device, DeviceScreen) and device.device_id == "pi-01" and device.refreshes >= 1
        assert "pi-01" in str(device.query_one("#device-head", Static).render())
        history = device.query_one("#history", DataTable)
        assert [history.get_row_at(i)[1:] for i in range(history.row_count)] == [["device.add", "otto"]]
        assert device.check_action("revoke", ()) is True  # an operator may revoke
        await pilot.press("escape")
        await settle(pilot)
        assert app.screen is screen


def test_the_fleet_is_paged_by_the_server_and_by_the_tui_for_a_server_without_paging(srv):
    otto = srv.client("otto")
    listed = otto.get("/devices")  # no page asked: every device, as before
    assert isinstance(listed, list) and sorted(d["id"] for d in listed) == sorted(DEVICES)
    page = otto.get("/devices", limit=1, offset=1, sort="id", reverse="true")
    assert [r["id"] for r in page["rows"]] == ["lab-02"] and page["rows"][0]["health"] == "off"
    assert (page["offset"], page["matched"], page["total"], page["online"], page["focus"]) == (1, 3, 3, 0, None)
    for bad in ({"limit": 5000}, {"limit": 5, "sort": "colour"}, {"limit": 5, "focus": "No Such"}):
        with pytest.raises(ApiError) as refused:
            otto.get("/devices", **bad)
        assert refused.value.status == 422

    older = srv.client("otto")  # a server from before paging: it answers every device, whatever is asked
    answer = older.get
    older.get = lambda path, **query: answer(path) if path == "/devices" else answer(path, **query)  # type: ignore[method-assign]
    for query in (FleetQuery(text="lab", sort="id", reverse=True, limit=1, focus="lab-01"),
                  FleetQuery(text="group:pi"), FleetQuery(sort="groups", offset=1, limit=5)):
        paged, cut_here = RemoteFleetData(otto).fleet(query), RemoteFleetData(older).fleet(query)
        assert paged == cut_here, query
    assert [r.id for r in paged.rows] == ["lab-02", "pi-01"]
    focused = RemoteFleetData(otto).fleet(FleetQuery(text="lab", reverse=True, limit=1, focus="lab-01"))
    assert ([r.id for r in focused.rows], focused.offset, focused.focus, focused.matched) == (["lab-01"], 1, 1, 2)


def test_a_rollout_started_through_the_api_is_paused_from_the_tui(srv):
    asyncio.run(_test_a_rollout_started_through_the_api_is_paused_from_the_tui(srv))


async def _test_a_rollout_started_through_the_api_is_paused_from_the_tui(srv):
    otto = srv.client("otto")
    app = _app(srv, "otto")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, RolloutsScreen) and screen.refreshes >= 1
        assert _keys(screen.query_one("#rollouts", DataTable)) == ["lab-canary"]
        assert screen.states == {"lab-canary": "running"} and screen.selected == "lab-canary"
        assert "by otto" in str(screen.query_one("#rollout-head", Static).render())
        await pilot.press("p")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmModal) and "groups=lab" in app.screen.question
        await pilot.click("#confirm")
        await settle(pilot)
        assert otto.get("/rollouts/lab-canary")["row"]["state"] == "paused"
        assert screen.states == {"lab-canary": "paused"}  # the screen refreshed from the server after acting
        assert [e["actor"] for e in _audit(otto, "rollout.paused")] == ["otto"]
        with pytest.raises(ActionError, match="409"):  # the server's refusal, as the operator's message
            app.data.command("lab-canary", "pause")
        await pilot.press("u")  # resuming asks nothing
        await settle(pilot)
        assert otto.get("/rollouts/lab-canary")["row"]["state"] == "running"

        await pilot.press("n")  # a new rollout through the form: the server records it as otto's
        await settle(pilot)
        await pilot.press(*"pi-canary")
        app.screen.query_one("#model", Select).value = "digits:1.0.0"
        await pilot.click("#groups")
        await pilot.press(*"pi")
        await pilot.click("#confirm")
        await settle(pilot)
        started = otto.get("/rollouts/pi-canary")
        assert started["created_by"] == "otto" and started["row"]["target"] == "groups=pi"
        assert "pi-canary" in _keys(screen.query_one("#rollouts", DataTable))


def test_an_approver_approves_from_the_tui_with_a_signed_decision(srv, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    key = generate_signing_key()
    key_path().parent.mkdir(parents=True)
    key_path().write_bytes(private_key_to_pem(key))
    public = public_key_to_text(key.public_key())
    srv.client("bob").request("PUT", "/operators/me/key", {"public_key": public})
    asyncio.run(_test_an_approver_approves_from_the_tui_with_a_signed_decision(srv))
    bob = srv.client("bob")
    version = bob.get("/models/digits:1.1.0")
    assert version["stage"] == "approved"
    assert [(a["actor"], a["decision"], a["reason"]) for a in version["approvals"]] == [
        ("bob", "approve", "held-out accuracy fine")]
    engine = make_engine(database_url(srv.data))
    try:
        with Session(engine) as db:
            row = db.exec(select(Approval)).one()
    finally:
        engine.dispose()
    assert row.public_key == public and row.signature
    verify_decision(public, row.signature, manifest_sha256=version["manifest_sha256"], model="digits:1.1.0",
                    decision="approve", operator="bob", reason="held-out accuracy fine")
    checked = bob.get("/audit/verify")
    assert checked["ok"] and checked["approvals"]["signed"] == 1


async def _test_an_approver_approves_from_the_tui_with_a_signed_decision(srv):
    app = _app(srv, "bob")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("m")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, ModelsScreen) and screen.refreshes >= 1
        table = screen.query_one("#models", DataTable)
        assert sorted(_keys(table)) == ["digits:1.0.0", "digits:1.1.0", "digits:2.0.0"]
        # 1.0.0 is a draft; bob pushed 2.0.0, so another approver must approve it (four-eyes)
        assert screen.may_decide == {"digits:1.0.0": False, "digits:1.1.0": True, "digits:2.0.0": False}
        table.move_cursor(row=_keys(table).index("digits:1.0.0"))
        await settle(pilot)
        assert screen.selected == "digits:1.0.0" and screen.check_action("approve", ()) is None  # a draft
        table.move_cursor(row=_keys(table).index("digits:1.1.0"))
        await settle(pilot)
        assert screen.selected == "digits:1.1.0" and screen.check_action("approve", ()) is True
        await pilot.press("a")
        await settle(pilot)
        assert isinstance(app.screen, ReasonModal)
        await pilot.press(*"held-out accuracy fine", "enter")
        await settle(pilot)
        assert app.screen is screen
        row = next(r for r in app.data.models() if r.ref == "digits:1.1.0")
        assert row.stage == "approved" and row.approvals == "bob approve"


def test_approving_without_a_signing_key_says_how_to_make_one(srv, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty"))
    data = RemoteFleetData(srv.client("bob"))
    with pytest.raises(ActionError, match="edgeherd operator keygen"):
        data.decide("digits:1.0.0", "approve", "looks fine")
    otto = RemoteFleetData(srv.client("otto"))  # an operator may not approve: greyed out, and never asked
    assert not otto.may(Permission.APPROVE) and not otto.can_decide("digits:2.0.0")
    assert not data.can_decide("digits:2.0.0")  # bob pushed it: another approver must (four-eyes)
    assert RemoteFleetData(srv.client("admin")).can_decide("digits:2.0.0")


def test_the_drift_and_audit_screens_read_through_the_api(srv):
    asyncio.run(_test_the_drift_and_audit_screens_read_through_the_api(srv))


async def _test_the_drift_and_audit_screens_read_through_the_api(srv):
    app = _app(srv, "bob")
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("d")
        await settle(pilot)
        assert isinstance(app.screen, DriftScreen) and app.screen.refreshes >= 1
        await pilot.press("l")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, AuditScreen) and screen.refreshes >= 1
        assert "audit chain verified" in str(screen.query_one("#chain", Static).render())
        table = screen.query_one("#audit", DataTable)
        actions = {str(table.get_row_at(i)[3]) for i in range(table.row_count)}
        assert {"model.push", "model.promote", "rollout.create"} <= actions


def _cli_env(srv: ApiServer, tmp: Path, token: str) -> dict[str, str]:
    """A login from the environment (as a CI job gives it), nothing else that could name a data directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEHERD_")}
    return env | {"EDGEHERD_URL": srv.url, "EDGEHERD_CA": str(srv.ca_file), "EDGEHERD_TOKEN": token,
                  "XDG_CONFIG_HOME": str(tmp / "config"), "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}


def test_the_tui_command_with_a_login_refuses_a_bad_token_and_as(srv, tmp_path):
    runs = [(subprocess.Popen([sys.executable, "-m", "server.cli", *args], env=_cli_env(srv, tmp_path, token),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), said)
            for args, token, said in ((["tui"], "eh_000000000000_" + "x" * 43, "401"),
                                      (["--as", "bob", "tui"], srv.tokens["otto"],
                                       "--as is for working on the server host"))]
    for proc, said in runs:  # both at once: each is mostly the interpreter starting
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and said in err, err


def test_the_web_tui_with_a_login_serves_the_fleet_through_the_api(srv, tmp_path):
    pytest.importorskip("aiohttp")
    port = free_port()
    log = tmp_path / "web.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "tui", "--web", "--port", str(port)],
                                env=_cli_env(srv, tmp_path, srv.tokens["otto"]), stdout=out, stderr=subprocess.STDOUT)
    try:
        base, token = printed_url(proc, log)
        assert base == f"http://127.0.0.1:{port}"
        screen = stream(base, b"3 devices", cookie=session_cookie(base, token))
        assert "3 devices" in screen and "lab-01" in screen and "otto (operator)" in screen
    finally:
        proc.terminate()
        proc.wait(30)
    assert "the URL's token works once" in log.read_text()
