""""online" means the device said so and has been heard from lately: a device whose broker went away with it
(so its last will never came) turns offline once it has been silent longer than EDGEHERD_STALE_AFTER_S, in
the TUI, in `device list`, in /metrics and to the rollout planner alike; and an idle agent stays online."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest
from sqlmodel import Session
from typer.testing import CliRunner

from server.db.models import Device
from server.governance import Governance
from server.presence import is_online, shown_status
from server.tui.data import FleetData
from tests.server_helpers import blob_bundle, server_dir, wait_for

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=timezone.utc)
STALE = timedelta(minutes=3)


@pytest.mark.parametrize(("status", "last_seen", "revoked", "online", "shown"), [
    ("online", NOW - timedelta(seconds=10), False, True, "online"),
    ("online", NOW - STALE, False, True, "online"),  # the bound counts as heard from
    ("online", NOW - STALE - timedelta(seconds=1), False, False, "offline"),  # the broker never said otherwise
    ("online", (NOW - timedelta(seconds=10)).replace(tzinfo=None), False, True, "online"),  # SQLite: naive UTC
    ("online", (NOW - timedelta(hours=1)).replace(tzinfo=None), False, False, "offline"),
    ("online", None, False, False, "offline"),  # said online, never heard from by this server
    ("online", NOW + timedelta(seconds=5), False, True, "online"),  # the server's clock stepped back a little
    ("offline", NOW - timedelta(seconds=10), False, False, "offline"),  # its will, or a clean shutdown
    ("unknown", None, False, False, "unknown"),  # enrolled, never connected
    ("online", NOW - timedelta(seconds=10), True, True, "revoked"),
])
def test_online_needs_the_stored_word_and_a_recent_message(status, last_seen, revoked, online, shown):
    assert is_online(status, last_seen, NOW, STALE) is online
    assert shown_status(status, last_seen, revoked=revoked, now=NOW, stale_after=STALE) == shown


def test_the_period_is_a_setting(monkeypatch):
    seen = datetime.now(timezone.utc) - timedelta(minutes=2)
    assert is_online("online", seen)  # the default: 180 s
    monkeypatch.setenv("EDGEHERD_STALE_AFTER_S", "60")
    assert not is_online("online", seen)


# -- every reader of "online", on one database --------------------------------------------------------------


def _views(data, app, rollout=None):
    """What each reader shows: {device: status} from the TUI data layer and `device list`, the /metrics count,
    and {device: online} as the rollout planner observes it."""
    from server.cli import app as cli
    from server.orchestrator import observe, rollout_view
    from server.registry import Registry

    reg = Registry(data)
    try:
        tui = {r.id: r.status for r in FleetData(reg, Governance.load(data), "viewer").devices()}
        planner = None
        if rollout is not None:
            from server.db.models import Rollout

            with Session(reg.engine) as db:
                row = db.get(Rollout, rollout)
                planner = {d: v.online for d, v in observe(db, row, rollout_view(db, row)).devices.items()}
    finally:
        reg.engine.dispose()
    out = CliRunner().invoke(cli, ["device", "list", "--data-dir", str(data)], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    listed = {cells[0]: cells[3] for line in out.output.splitlines()
              if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 7 and cells[0] in tui}
    metrics = next(int(line.split()[1]) for line in app.metrics_text().splitlines()
                   if line.startswith("edgeherd_server_devices_online "))
    return tui, listed, metrics, planner


@pytest.mark.integration
def test_a_device_silent_too_long_is_offline_to_every_reader(tmp_path):
    from server.app import ServerApp
    from server.orchestrator import create_rollout
    from server.rollouts import RolloutSpec

    data, key = server_dir(tmp_path / "data")
    app = ServerApp(data, metrics_port=0)  # not started: its /metrics reads the same database
    reg = app.registry
    reg.push_model(blob_bundle(tmp_path / "b", key)[0])
    ids = ["fresh", "stale", "gone", "never"]
    reg.add_devices_bulk(ids, "x86-64-cpu", ["lab"])
    now = datetime.now(timezone.utc)
    with Session(reg.engine) as db:
        for device_id, status, seen in (("fresh", "online", now - timedelta(seconds=20)),
                                        ("stale", "online", now - timedelta(minutes=10)),  # its broker went away
                                        ("gone", "offline", now - timedelta(seconds=20))):  # its will came
            d = db.get(Device, device_id)
            d.status, d.last_seen = status, seen
            db.add(d)
        db.commit()
    rollout = create_rollout(reg, name="r", model="blob", version="1.0.0", target={"devices": ids},
                             spec=RolloutSpec(), actor="alice").id
    try:
        tui, listed, metrics, planner = _views(data, app, rollout)
    finally:
        reg.engine.dispose()
    expected = {"fresh": "online", "stale": "offline", "gone": "offline", "never": "unknown"}
    assert tui == expected
    assert listed == expected
    assert metrics == 1
    assert planner == {"fresh": True, "stale": False, "gone": False, "never": False}


# -- end to end: a real agent, server and broker ---------------------------------------------------------------


@pytest.mark.integration
def test_an_idle_agent_stays_online_and_turns_offline_once_broker_and_agent_are_gone(tmp_path, monkeypatch):
    """Before: an idle agent sent nothing after connecting, and nothing ever corrected a stored "online"
    once the broker that would have published the wills was stopped."""
    from agent.config import load_config
    from agent.runtime import Agent
    from server.app import ServerApp
    from tests._mosquitto import free_port

    period = 3.0
    monkeypatch.setenv("EDGEHERD_STALE_AFTER_S", str(period))
    data, _ = server_dir(tmp_path / "data")
    app = ServerApp(data, metrics_port=0, drift_interval=0, rollout_interval=0).start()
    agent, running = None, True
    try:
        enrolled = app.registry.add_device("pi-1", "x86-64-cpu", ["lab"])
        cfg = load_config(enrolled.agent_config, data_dir=tmp_path / "agent", api_port=free_port(), heartbeat_s=1)
        agent = Agent(cfg, min_backoff=0.2, max_backoff=1.0).start()  # no model: it reports no windows

        def status():
            return _views(data, app)

        wait_for(lambda: status()[:3] == ({"pi-1": "online"}, {"pi-1": "online"}, 1), 30, "the agent online")
        time.sleep(2 * period)  # idle for longer than the period: only its heartbeat speaks for it
        assert status()[:3] == ({"pi-1": "online"}, {"pi-1": "online"}, 1)
        app.stop()  # the server and its managed broker: no will of the agent will ever reach the registry
        running = False
        agent.stop()
        agent = None
        wait_for(lambda: status()[:3] == ({"pi-1": "offline"}, {"pi-1": "offline"}, 0), 30,
                 "the silent device to turn offline")
        with Session(app.registry.engine) as db:
            assert db.get(Device, "pi-1").status == "online"  # what the device last said: nothing corrected it
    finally:
        if agent is not None:
            agent.stop()
        if running:
            app.stop()
