"""``edgeherd device logs`` and ``edgeherd device cmd`` against a real server, its managed Mosquitto (TLS) and a
real ``edgeherd-agent run`` process kept running by a small restart loop, as systemd's ``Restart=on-failure``
does: log lines come back (``--lines`` honoured, a follow returns only new lines, escape sequences neutralised),
``set-log-level`` changes what the agent's ring records, ``report-now`` makes a window arrive, ``rollback``
returns to the previous model, ``restart`` makes the agent exit with its restart status and come back, a device
that is not there gives a clear error, and every command leaves an audit entry."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, func, select

from agent.commands import RESTART_EXIT_STATUS
from protocol import AckStatus, CommandAck, generate_signing_key
from server.app import ServerApp
from server.db.models import AuditEntry, Device, TelemetryRow
from server.diagnostics import clean, fetch_logs, follow_logs, format_line, send_command
from server.registry import Registry, RegistryError
from tests._mosquitto import free_port
from tests.byom_helpers import DEVICE, DeployedAgent
from tests.model_helpers import lookup_onnx, onnx_bundle
from tests.server_helpers import server_dir, wait_for
from tests.tls_device_helpers import reachable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


class Supervised:
    """``edgeherd-agent run`` under a restart loop: started again whenever it exits with the restart status."""

    def __init__(self, config: Path, log: Path, env: dict[str, str]) -> None:
        self.config, self.log, self.env = config, log, {**os.environ, **env}
        self.exits: list[int] = []
        self._stopping = threading.Event()
        self._proc = self._spawn()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        argv = [str(Path(sys.executable).parent / "edgeherd-agent"), "run", "--config", str(self.config)]
        with self.log.open("ab") as fh:
            return subprocess.Popen(argv, cwd=ROOT, stdout=fh, stderr=fh, env=self.env)

    def _loop(self) -> None:
        while True:
            code = self._proc.wait()
            self.exits.append(code)
            if self._stopping.is_set() or code != RESTART_EXIT_STATUS:
                return
            self._proc = self._spawn()

    @property
    def pid(self) -> int:
        return self._proc.pid

    def stop(self) -> None:
        self._stopping.set()
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._thread.join(20)


@dataclass
class Fleet:
    app: ServerApp
    agent: Supervised
    api_port: int

    @property
    def reg(self) -> Registry:
        return self.app.registry

    def device(self) -> Device:
        with Session(self.reg.engine) as db:
            device = db.get(Device, DEVICE)
            assert device is not None
            db.expunge(device)
            return device

    def audit(self) -> list[AuditEntry]:
        with Session(self.reg.engine) as db:
            return list(db.exec(select(AuditEntry).where(AuditEntry.action == "device.command")
                                .order_by(col(AuditEntry.seq))))

    def http(self, raw: bytes) -> None:
        """Send ``raw`` as a request to the agent's local API (byte for byte: urllib refuses odd paths)."""
        with socket.create_connection(("127.0.0.1", self.api_port), timeout=10) as s:
            s.sendall(raw)
            s.recv(4096)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("diag")
    key = generate_signing_key()
    data, _ = server_dir(reachable(tmp) / "server", key)
    roles = {"alice": "operator", "bob": "operator", "carol": "operator", "vic": "viewer"}
    (data / "operators.toml").write_text("".join(f'[[operator]]\nname = "{name}"\nrole = "{role}"\n\n'
                                                 for name, role in roles.items()))
    app = ServerApp(data, metrics_port=0, drift_interval=3600).start()
    agent = None
    try:
        enrolled = app.registry.add_device(DEVICE, "x86-64", ["diag"], custom_profile=True)
        device_dir = shutil.copytree(enrolled.agent_config.parent, tmp / "device")
        api_port = free_port()
        log = tmp / "agent.log"
        agent = Supervised(device_dir / "agent.toml", log, {
            "EDGEHERD_AGENT_DATA_DIR": str(tmp / "agent"), "EDGEHERD_AGENT_API_PORT": str(api_port),
            "EDGEHERD_AGENT_WINDOW_SECONDS": "3600"})
        deployer = DeployedAgent(app, api_port, log)
        model = lookup_onnx(tmp / "lookup.onnx", clip=True)
        for version in ("1.0.0", "1.1.0"):
            bundle, _, _ = onnx_bundle(tmp / f"bundle-{version}", key, model, version=version)
            deployer.deploy(bundle)
        yield Fleet(app, agent, api_port)
    finally:
        if agent is not None:
            agent.stop()
        app.stop()


def test_logs_round_trip_honour_lines_and_follow_returns_only_new_lines(fleet):
    everything = fetch_logs(fleet.reg, DEVICE, 2000, actor="alice")
    texts = [line.text for line in everything.lines]
    assert any("now running lookup 1.1.0" in t for t in texts), texts[-20:]
    seqs = [line.seq for line in everything.lines]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)

    three = fetch_logs(fleet.reg, DEVICE, 3, actor="alice")
    assert len(three.lines) == 3
    assert [b.seq - a.seq for a, b in zip(three.lines, three.lines[1:], strict=False)] == [1, 1]
    assert three.lines[-1].seq >= everything.lines[-1].seq

    follow = follow_logs(fleet.reg, DEVICE, 5, actor="alice", sleep=lambda s: None)
    first = next(follow)
    assert 1 <= len(first.lines) <= 5
    send_command(fleet.reg, DEVICE, "set-log-level", "INFO", actor="alice")
    new = next(follow)
    assert new.lines and all(line.seq > first.next_seq for line in new.lines)
    assert any("log level set to INFO" in line.text for line in new.lines)
    again = next(follow)
    assert all(line.seq > new.next_seq for line in again.lines)
    assert not any("log level set to INFO" in line.text for line in again.lines)

    _audited(fleet, "alice", "send_logs", "done", args="lines=2000,since=0")
    with pytest.raises(RegistryError, match="--lines must be from 1 to 2000"):
        fetch_logs(fleet.reg, DEVICE, 0)
    with pytest.raises(RegistryError, match="--lines must be from 1 to 2000"):
        fetch_logs(fleet.reg, DEVICE, 2001)


def _audited(fleet: Fleet, actor: str, command: str, outcome: str, *, device: str = DEVICE,
             args: str | None = None) -> None:
    """Assert an audit entry names ``actor``, the device, ``command`` and its ``outcome`` (and ``args``)."""
    seen = [(e.actor, e.subject, e.detail["command"], e.detail["outcome"], e.detail["args"]) for e in fleet.audit()]
    assert any(entry[:4] == (actor, f"device:{device}", command, outcome) and args in (None, entry[4])
               for entry in seen), seen


def _api_lines(fleet: Fleet, marker: str, since: int) -> list[str]:
    return [line.text for line in fetch_logs(fleet.reg, DEVICE, 2000, since, actor="alice").lines
            if marker in line.text]


def test_set_log_level_changes_what_the_ring_records_and_escapes_are_neutralised(fleet):
    ack = send_command(fleet.reg, DEVICE, "set-log-level", "debug", actor="alice")
    assert ack.status is AckStatus.DONE and "DEBUG" in ack.message
    start = fetch_logs(fleet.reg, DEVICE, 1).next_seq
    fleet.http(b"GET /diag-debug-probe\x1b[2J\x1b]0;owned\x07 HTTP/1.0\r\n\r\n")
    got = wait_for(lambda: _api_lines(fleet, "diag-debug-probe", start), 20, "the request's debug line")
    assert "\x1b" in got[0]  # the device sent it as it was logged ...
    batch = fetch_logs(fleet.reg, DEVICE, 2000, start)
    shown = "\n".join(format_line(line) for line in batch.lines)
    assert "diag-debug-probe\\x1b[2J\\x1b]0;owned\\x07" in shown  # ... and it reaches a terminal defused
    assert not any(ch in shown.replace("\n", "") for ch in "\x1b\x07\x9b")

    send_command(fleet.reg, DEVICE, "set-log-level", "WARNING", actor="alice")
    quiet = fetch_logs(fleet.reg, DEVICE, 1).next_seq
    fleet.http(b"GET /diag-quiet-probe HTTP/1.0\r\n\r\n")
    send_command(fleet.reg, DEVICE, "set-log-level", "DEBUG", actor="alice")
    fleet.http(b"GET /diag-loud-probe HTTP/1.0\r\n\r\n")
    wait_for(lambda: _api_lines(fleet, "diag-loud-probe", quiet), 20, "the debug line after DEBUG again")
    assert _api_lines(fleet, "diag-quiet-probe", quiet) == []
    send_command(fleet.reg, DEVICE, "set-log-level", "INFO", actor="alice")
    for level in ("DEBUG", "WARNING", "INFO"):
        _audited(fleet, "alice", "set_log_level", "done", args=f"level={level}")

    with pytest.raises(RegistryError, match="set-log-level needs a level"):
        send_command(fleet.reg, DEVICE, "set-log-level", "LOUD")


def test_clean_makes_control_characters_visible():
    assert clean("a\x1b[31mb\tc\x00\x7f\x9b\u202e") == "a\\x1b[31mb\tc\\x00\\x7f\\x9b\\u202e"
    assert clean("plain text, ünïcode") == "plain text, ünïcode"


def test_report_now_makes_a_window_arrive(fleet):
    def windows() -> int:
        with Session(fleet.reg.engine) as db:
            return db.exec(select(func.count()).select_from(TelemetryRow)
                           .where(TelemetryRow.device_id == DEVICE)).one()

    before = windows()
    ack = send_command(fleet.reg, DEVICE, "report-now", actor="alice")
    assert ack.status is AckStatus.DONE
    wait_for(lambda: windows() > before, 30, "the window report-now closed")
    _audited(fleet, "alice", "report_now", "done")


def test_rollback_returns_to_the_previous_model(fleet):
    ack = send_command(fleet.reg, DEVICE, "rollback", actor="bob", timeout=60)
    assert ack.status is AckStatus.DONE, ack.message
    assert "lookup 1.0.0" in ack.message
    wait_for(lambda: _running_version(fleet) == "1.0.0", 30, "the device to report 1.0.0")
    _audited(fleet, "bob", "rollback", "done")


def _running_version(fleet: Fleet) -> str:
    from server.db.models import ModelVersion

    with Session(fleet.reg.engine) as db:
        device = db.get(Device, DEVICE)
        version = db.exec(select(ModelVersion).where(ModelVersion.manifest_sha256 == device.running_manifest)
                          ).first()
        return version.version if version else ""


def test_restart_exits_with_the_restart_status_and_comes_back(fleet):
    first_pid = fleet.agent.pid
    ack = send_command(fleet.reg, DEVICE, "restart", actor="bob")
    assert ack.status is AckStatus.DONE
    wait_for(lambda: fleet.agent.exits, 30, "the agent to exit")
    assert fleet.agent.exits[0] == RESTART_EXIT_STATUS
    wait_for(lambda: fleet.agent.pid != first_pid, 10, "the restart loop to start it again")
    ack = wait_for(lambda: _try_report(fleet), 60, "the restarted agent to answer")
    assert ack.status is AckStatus.DONE
    _audited(fleet, "bob", "restart_agent", "done")


def _try_report(fleet: Fleet) -> CommandAck | None:
    try:
        return send_command(fleet.reg, DEVICE, "report-now", actor="bob", timeout=3)
    except RegistryError:
        return None


def test_offline_device_gives_a_clear_timeout_error(fleet):
    fleet.reg.add_device("diag-off", "x86-64", ["diag"], custom_profile=True)
    with pytest.raises(RegistryError, match=r"diag-off did not answer report-now within 1 s: is it online\?"):
        send_command(fleet.reg, "diag-off", "report-now", actor="carol", timeout=1)
    with pytest.raises(RegistryError, match="did not answer send_logs within 1 s"):
        fetch_logs(fleet.reg, "diag-off", 10, actor="carol", timeout=1)
    with pytest.raises(RegistryError, match="no enrolled device named nobody"):
        send_command(fleet.reg, "nobody", "report-now")
    _audited(fleet, "carol", "report_now", "timeout", device="diag-off")
    _audited(fleet, "carol", "send_logs", "timeout", device="diag-off")


def test_the_commands(fleet):
    from typer.testing import CliRunner

    from server.cli import app

    def run(*args: str) -> Any:
        return CliRunner().invoke(app, ["--as", "alice", "device", *args, "--data-dir", str(fleet.reg.data)],
                                  env={"COLUMNS": "200"})

    result = run("cmd", DEVICE, "set-log-level", "debug")
    assert result.exit_code == 0 and f"{DEVICE}: set-log-level done: log level is DEBUG" in result.output, \
        result.output
    fleet.http(b"GET /cli-probe\x1b[31m\x1b]8;;http://evil\x07 HTTP/1.0\r\n\r\n")
    result = wait_for(lambda: (r := run("logs", DEVICE, "--lines", "2000")).exit_code == 0
                      and "cli-probe" in r.output and r, 20, "the probe in `device logs`")
    assert "cli-probe\\x1b[31m\\x1b]8;;http://evil\\x07" in result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert len(run("logs", DEVICE, "-n", "2").output.strip().splitlines()) == 2
    run("cmd", DEVICE, "set-log-level", "INFO")

    result = CliRunner().invoke(app, ["--as", "vic", "device", "cmd", DEVICE, "restart", "--data-dir",
                                      str(fleet.reg.data)], env={"COLUMNS": "200"})
    assert result.exit_code == 1 and "vic is a viewer" in result.output, result.output
    result = run("logs", DEVICE, "--lines", "0")
    assert result.exit_code == 1 and "--lines must be from 1 to 2000 (got 0)" in result.output
    result = run("cmd", DEVICE, "reboot")
    assert result.exit_code == 1 and "unknown command 'reboot'" in result.output
    result = run("cmd", DEVICE, "set-log-level")
    assert result.exit_code == 1 and "set-log-level needs a level" in result.output


def test_the_device_screen(fleet):
    asyncio.run(_device_screen(fleet))


async def _until(pilot: Any, predicate: Any, what: str, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.1)):
        if predicate():
            return
        await pilot.pause(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def _device_screen(fleet: Fleet) -> None:
    from textual.widgets import Input, Static

    from server.governance import Governance
    from server.tui.app import EdgeherdApp
    from server.tui.data import FleetData
    from server.tui.modals import ConfirmModal
    from server.tui.screens import DeviceScreen
    from server.tui.screens.device_diag import GroupsModal, LevelModal, LogsModal, split_names
    from tests.tui_state import settle

    def commands(name: str) -> int:
        return sum(1 for e in fleet.audit() if e.actor == "alice" and e.detail["command"] == name)

    app = EdgeherdApp(FleetData(fleet.reg, Governance.load(fleet.reg.data), "alice"), refresh_s=0)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        app.push_screen(DeviceScreen(DEVICE))
        await settle(pilot)
        exits = len(fleet.agent.exits)
        await pilot.press("R")  # restart asks first, naming the device; Esc (focus on Cancel) sends nothing
        await settle(pilot)
        assert isinstance(app.screen, ConfirmModal) and f"Restart the agent on {DEVICE}?" in app.screen.question
        await pilot.press("escape")
        await pilot.press("b")
        await settle(pilot)
        assert isinstance(app.screen, ConfirmModal) and f"Roll {DEVICE} back" in app.screen.question
        await pilot.press("escape")
        await settle(pilot)
        assert isinstance(app.screen, DeviceScreen) and len(fleet.agent.exits) == exits

        before = commands("set_log_level")
        await pilot.press("L")
        await settle(pilot)
        assert isinstance(app.screen, LevelModal)
        app.screen.dismiss("DEBUG")
        await _until(pilot, lambda: commands("set_log_level") > before, "set-log-level from the screen")
        fleet.http(b"GET /tui-probe\x1b[5m HTTP/1.0\r\n\r\n")
        wait_for(lambda: _api_lines(fleet, "tui-probe", 0), 20, "the probe in the agent's log")

        await pilot.press("o")
        await _until(pilot, lambda: isinstance(app.screen, LogsModal), "the logs pane")
        text = str(app.screen.query_one("#log-text", Static).render())
        assert "log level set to DEBUG" in text
        assert "tui-probe\\x1b[5m" in text and "\x1b" not in text
        await pilot.press("escape")
        await settle(pilot)

        before = commands("report_now")
        await pilot.press("n")
        await _until(pilot, lambda: commands("report_now") > before, "report-now from the screen")
        await _until(pilot, lambda: any(t in str(n.message) for n in app._notifications
                                        for t in ("report-now done", "window closed")), "the answer's notice")

        # groups and tags: the modal shows the device's own, saving replaces them, audited as the operator
        await pilot.press("g")
        await settle(pilot)
        assert isinstance(app.screen, GroupsModal)
        shown = app.screen.groups
        app.screen.query_one("#groups", Input).value = "line-1, eu-west"
        app.screen.query_one("#tags", Input).value = "camera"
        await pilot.click("#confirm")

        def stored() -> Device | None:
            with Session(fleet.reg.engine) as db:
                return db.get(Device, DEVICE)

        await _until(pilot, lambda: (d := stored()) is not None and d.groups == ["line-1", "eu-west"]
                     and d.tags == ["camera"], "the groups and tags stored")
        with Session(fleet.reg.engine) as db:
            entry = db.exec(select(AuditEntry).where(AuditEntry.action == "device.set")).one()
        assert entry.actor == "alice" and entry.detail["groups_before"] == split_names(shown)
        assert entry.detail["groups"] == ["line-1", "eu-west"] and entry.detail["tags"] == ["camera"]


def test_the_operator_api_and_the_remote_commands(tmp_path):
    """``POST /devices/{id}/logs`` and ``/commands`` through ``edgeherd server run`` with a real agent, as the
    logged-in CLI and TUI use them: the operator role is needed, and each answer is the device's."""
    from server.permissions import Role
    from server.tui.remote import RemoteFleetData
    from tests.api_helpers import api_server
    from tests.test_api import status_of as _status

    tmp = reachable(tmp_path)
    os.chmod(tmp, 0o701)  # the managed broker (user mosquitto) reaches the data directory inside
    with api_server(tmp, {"otto": Role.OPERATOR, "vic": Role.VIEWER}) as srv:
        otto = srv.client("otto")
        files = otto.post("/devices", {"id": "api-1", "profile": "x86-64-cpu"})["files"]
        etc = tmp / "api-1-etc"
        etc.mkdir()
        for name, text in files.items():
            (etc / name).write_text(text)
        agent = Supervised(etc / "agent.toml", tmp / "agent.log", {
            "EDGEHERD_AGENT_DATA_DIR": str(tmp / "api-1-data"), "EDGEHERD_AGENT_API_PORT": str(free_port())})
        try:
            def logs() -> Any:
                try:
                    return otto.post("/devices/api-1/logs", {"lines": 5, "timeout": 2})
                except Exception:  # not online yet
                    return None

            got = wait_for(logs, 60, "the agent's logs through the API")
            assert 1 <= len(got["lines"]) <= 5 and got["next_seq"] >= got["lines"][-1]["seq"]
            assert any("connected to" in line["text"] for line in
                       otto.post("/devices/api-1/logs", {"lines": 2000})["lines"])
            said = otto.post("/devices/api-1/commands", {"command": "set-log-level", "level": "DEBUG"})
            assert said["status"] == "done" and said["message"] == "log level is DEBUG"
            newer = otto.post("/devices/api-1/logs", {"lines": 2000, "since": got["next_seq"]})["lines"]
            assert newer and all(line["seq"] > got["next_seq"] for line in newer)
            assert any("log level set to DEBUG" in line["text"] for line in newer)

            tui = RemoteFleetData(otto)
            assert tui.device_command("api-1", "report-now").startswith("api-1: report-now done")
            assert any("log level set to DEBUG" in line for line in tui.device_logs("api-1", 2000))

            vic = srv.client("vic")
            for path, body in (("/devices/api-1/logs", {}), ("/devices/api-1/commands", {"command": "restart"})):
                code, message = _status(lambda p=path, b=body: vic.post(p, b))
                assert code == 403, message
            assert _status(lambda: otto.post("/devices/api-1/logs", {"lines": 2001}))[0] == 422
            assert _status(lambda: otto.post("/devices/api-1/commands", {"command": "reboot"}))[0] == 422
            assert _status(lambda: otto.post("/devices/nowhere/commands", {"command": "restart"}))[0] == 404
        finally:
            agent.stop()
        code, message = _status(lambda: otto.post("/devices/api-1/commands", {"command": "report-now", "timeout": 1}))
        assert code == 409 and "api-1 did not answer report-now within 1 s" in message
        engine = Registry(srv.data).engine
        with Session(engine) as db:
            done = [(e.actor, e.detail["command"], e.detail["outcome"]) for e in
                    db.exec(select(AuditEntry).where(AuditEntry.action == "device.command"))]
        engine.dispose()
        assert ("otto", "set_log_level", "done") in done and ("otto", "report_now", "timeout") in done
        assert ("otto", "send_logs", "done") in done
