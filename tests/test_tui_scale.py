"""The Fleet screen with 10,000 devices: it loads them all, and keys are handled while a refresh runs."""

from __future__ import annotations

import asyncio
import threading

import pytest
from textual.widgets import DataTable

from server.governance import Governance
from server.tui.app import EdgeherdApp
from server.tui.data import FleetData
from server.tui.screens import FleetScreen
from tests.server_helpers import server_dir
from tests.tui_state import NOW, fill_many, settle

pytestmark = pytest.mark.integration
N = 10_000


def test_ten_thousand_devices_load_and_input_is_handled_during_a_refresh(tmp_path):
    data, _ = server_dir(tmp_path / "data")
    reg = fill_many(data, N)
    fleet = FleetData(reg, Governance.load(data), "viewer", clock=lambda: NOW)
    asyncio.run(_drive(EdgeherdApp(fleet, refresh_s=0), fleet))
    reg.engine.dispose()


async def _drive(app: EdgeherdApp, fleet: FleetData) -> None:
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, FleetScreen)
        table = screen.query_one("#fleet", DataTable)
        assert table.row_count == N and len(screen.rows) == N
        # hold the next refresh's database read until the UI has answered key presses
        release, reading = threading.Event(), threading.Event()
        real = fleet.devices

        def slow_devices():
            reading.set()
            assert release.wait(30), "the UI never answered while the refresh was running"
            return real()

        fleet.devices = slow_devices  # type: ignore[method-assign]
        screen.refresh_data()
        while not reading.is_set():
            await pilot.pause(0.01)
        before = screen.sort_index
        await pilot.press("s", "s")  # handled now, while the refresh waits on the database
        assert screen.sort_index == before + 2 and screen._busy
        screen.refresh_data()  # an overlapping refresh is dropped, not queued
        release.set()
        await settle(pilot)
        assert not screen._busy and screen.refreshes == 2 and table.row_count == N
