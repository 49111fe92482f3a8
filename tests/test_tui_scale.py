"""The Fleet screen with 10,000 devices: it holds one page of them, not the fleet; End reaches the last device;
keys are handled while a refresh runs; a refresh repaints only the rows that changed."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace

import pytest

from server.governance import Governance
from server.tui.app import EdgeherdApp
from server.tui.data import FleetData
from server.tui.screens import FleetScreen
from server.tui.screens.fleet import FleetTable
from tests.server_helpers import server_dir
from tests.tui_state import NOW, fill_many, settle

pytestmark = pytest.mark.integration
N = 10_000


def test_ten_thousand_devices_a_page_at_a_time_and_input_is_handled_during_a_refresh(tmp_path):
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
        table = screen.query_one("#fleet", FleetTable)
        assert table.row_count == N and 0 < len(screen.rows) < 500 and table.row_keys()[0] == "dev-00000"
        await pilot.press("end")  # the last device: the page there is fetched
        await settle(pilot)
        assert table.cursor_key == f"dev-{N - 1:05d}" and table.cursor_row == N - 1
        await pilot.press("home")
        await settle(pilot)
        assert table.cursor_key == "dev-00000"

        # hold the next refresh's database read until the UI has answered key presses
        release, reading = threading.Event(), threading.Event()
        real = fleet.fleet

        def slow_fleet(query):  # type: ignore[no-untyped-def]
            reading.set()
            assert release.wait(30), "the UI never answered while the refresh was running"
            return real(query)

        fleet.fleet = slow_fleet  # type: ignore[method-assign]
        done = screen.refreshes
        screen.refresh_data()
        while not reading.is_set():
            await pilot.pause(0.01)
        await pilot.press("s", "s")  # handled now, while the refresh waits on the database
        assert screen.sort_index == 2 and screen._busy
        release.set()
        await settle(pilot)
        # the refresh in flight, then one more for the order asked meanwhile: not one per key
        assert not screen._busy and screen.refreshes == done + 2 and table.row_count == N
        assert [screen.rows[k].groups for k in table.row_keys()[:3]] == ["lab"] * 3  # sorted by group
        fleet.fleet = real  # type: ignore[method-assign]

        # a page where one row on screen changed repaints that line only
        repainted: list[int] = []
        table.refresh_lines = lambda y, n=1: repainted.append(y)  # type: ignore[method-assign]
        page = real(screen._query())
        table.show(page)
        assert repainted == []
        rows = list(page.rows)
        at = next(i for i, r in enumerate(rows) if page.offset + i == table.top + 3)
        rows[at] = replace(rows[at], p95_ms=123.0)
        table.show(replace(page, rows=rows))
        assert repainted == [table.top + 3 + 1]  # the line under the header
