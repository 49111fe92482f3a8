"""Every TUI screen, rendered from one fixed database state, compared with its accepted snapshot
(tests/__snapshots__/; refresh with `pytest tests/test_tui_snapshots.py --snapshot-update` and review)."""

from __future__ import annotations

import pytest

from server.governance import Governance
from server.tui.app import EdgeherdApp
from server.tui.data import FleetData
from tests.server_helpers import server_dir
from tests.tui_state import NOW, fill, settle

SIZE = (150, 42)


@pytest.fixture(scope="module")
def fixed(tmp_path_factory):
    data, _ = server_dir(tmp_path_factory.mktemp("tui") / "data")
    reg = fill(data)
    yield reg, Governance.load(data)
    reg.engine.dispose()


def _app(fixed, actor: str = "bob") -> EdgeherdApp:
    reg, gov = fixed
    return EdgeherdApp(FleetData(reg, gov, actor, clock=lambda: NOW), refresh_s=0)


@pytest.mark.parametrize(("name", "keys"), [
    ("fleet", []),
    ("fleet_filtered", ["slash", *"group:prod", "enter"]),
    ("device", [*["down"] * 8, "enter"]),  # pi-04: the drifting device, with an alert and a rollout
    ("rollouts", ["r", "down"]),
    ("models", ["m"]),
    ("drift", ["d"]),
    ("audit", ["l"]),
    ("help", ["question_mark"]),
])
def test_screen(snap_compare, fixed, name, keys):
    async def run_before(pilot) -> None:
        await settle(pilot)
        for key in keys:
            await pilot.press(key)
            await settle(pilot)

    assert snap_compare(_app(fixed), terminal_size=SIZE, run_before=run_before)


@pytest.mark.parametrize(("name", "keys"), [
    ("rollout_form", ["n", *"digits-1-2"]),
    ("typed_rollback_confirmation", ["down", "b", *"digits-1"]),
    ("pause_confirmation", ["down", "p"]),
    ("approve_reason", ["m", "a", *"reviewed"]),
])
def test_dialog(snap_compare, fixed, name, keys):
    async def run_before(pilot) -> None:
        await settle(pilot)
        if keys[0] != "m":
            await pilot.press("r")
            await settle(pilot)
        for key in keys:
            await pilot.press(key)
            await settle(pilot)

    assert snap_compare(_app(fixed, "bob"), terminal_size=SIZE, run_before=run_before)


@pytest.fixture(scope="module")
def empty(tmp_path_factory):
    """A device that has reported nothing yet, and no drift evaluated: graphs must say so, not draw full bars."""
    from sqlmodel import Session

    from server.db.models import Device
    from server.registry import Registry
    from tests.tui_state import OPERATORS

    data, _ = server_dir(tmp_path_factory.mktemp("tui-empty") / "data")
    (data / "operators.toml").write_text(OPERATORS)
    reg = Registry(data)
    with Session(reg.engine) as db:
        db.add(Device(id="pi-new", profile="raspberry-pi-5", groups=["lab"], status="unknown", created_at=NOW))
        db.commit()
    yield reg, Governance.load(data)
    reg.engine.dispose()


@pytest.mark.parametrize(("name", "keys"), [
    ("device_without_telemetry", ["enter"]),
    ("drift_without_evaluations", ["d"]),
])
def test_empty_graphs(snap_compare, empty, name, keys):
    async def run_before(pilot) -> None:
        await settle(pilot)
        for key in keys:
            await pilot.press(key)
            await settle(pilot)

    assert snap_compare(_app(empty), terminal_size=SIZE, run_before=run_before)
