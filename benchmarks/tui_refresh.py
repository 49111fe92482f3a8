"""The Fleet screen's refresh with 10,000 (or 100,000) devices: the paged screen against the whole-fleet table it
replaced, and both against reading the devices table bare, in the same run.

- baseline: ``SELECT * FROM devices`` through SQLAlchemy, every row fetched (what a view of the whole fleet must
  at least do);
- fetch (worker thread): now ``FleetData.fleet()``, one page filtered, sorted and counted in the database; before,
  ``FleetData.devices()``, every device's row;
- first render (event loop): putting the first answer on screen; now a page into the line-API table, before every
  row into a DataTable, then sorted (what the screen did until the table was paged);
- steady render (event loop): an answer where 5 % of the rows changed;
- cycle: one whole refresh, fetch and render, as the operator sees it (now only);
- longest block: the longest the event loop went without running a 2 ms ticker (the latency a key press would see)
  while the screen opened and did its first render, and over the refresh cycles.

Each figure is the median of several runs, with the spread (min–max). The "before" table is built in the same
process (skip it with ``--no-before``; at 100,000 devices it takes minutes).

Run: ``python -m benchmarks.tui_refresh [--devices 10000] [--no-before]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.text import Text
from sqlalchemy import text
from textual.app import App, ComposeResult
from textual.widgets import DataTable

from server.governance import Governance
from server.tui.app import EdgeherdApp
from server.tui.data import DeviceRow, FleetData
from server.tui.render import FLEET_COLUMNS, FLEET_WIDTHS, fleet_cells
from server.tui.screens import FleetScreen
from server.tui.screens.fleet import Fetched, FleetTable
from tests.server_helpers import server_dir
from tests.tui_state import NOW, fill_many, settle

Samples = list[float]


def _runs(fn: Callable[[], Any], repeats: int = 5) -> Samples:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


class Ticker:
    """The longest gap between runs of a task that asks to run every 2 ms: how long the loop was blocked."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - 0.002)
            last = now

    def __enter__(self) -> Ticker:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def _after(fleet: FleetData, n: int) -> dict[str, Samples]:
    out: dict[str, Samples] = {"first block": []}
    for _ in range(3):  # the screen opening: mount, first fetch, first render
        app = EdgeherdApp(fleet, refresh_s=0)
        with Ticker() as ticker:
            async with app.run_test(size=(160, 48)) as pilot:
                await settle(pilot)
                out["first block"].append(ticker.longest)
    app = EdgeherdApp(fleet, refresh_s=0)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, FleetScreen)
        table = screen.query_one("#fleet", FleetTable)
        query = screen._query()
        page = fleet.fleet(query)
        out["first render"], out["steady render"] = [], []
        for k in range(5):
            table.held, table.row_count = {}, 0  # as the screen opened
            t0 = time.perf_counter()
            screen.show(Fetched(query, False, page))
            out["first render"].append(time.perf_counter() - t0)
            await pilot.pause()
            changed = [replace(r, p95_ms=(r.p95_ms or 0) + 1 + k) if i % 20 == 0 else r
                       for i, r in enumerate(page.rows)]
            t0 = time.perf_counter()
            screen.show(Fetched(query, False, replace(page, rows=changed)))
            out["steady render"].append(time.perf_counter() - t0)
            await pilot.pause()
        out["cycle"], out["cycle block"] = [], []
        for _ in range(5):
            done = screen.refreshes
            with Ticker() as ticker:
                t0 = time.perf_counter()
                screen.refresh_data()
                while screen.refreshes == done:
                    await asyncio.sleep(0.001)
                out["cycle"].append(time.perf_counter() - t0)
                await pilot.pause()
            out["cycle block"].append(ticker.longest)
        assert table.row_count == n
    return out


class _Whole(App[None]):
    """The Fleet table as it was: every device a DataTable row, sorted in the widget."""

    def compose(self) -> ComposeResult:
        table: DataTable[Text] = DataTable(id="fleet", cursor_type="row", zebra_stripes=True)
        for key, label, _ in FLEET_COLUMNS:
            table.add_column(label, key=key, width=FLEET_WIDTHS[key])
        yield table

    def fill(self, rows: list[DeviceRow]) -> None:
        table = self.query_one("#fleet", DataTable)
        table.clear()
        for r in rows:
            table.add_row(*fleet_cells(r), key=r.id)
        table.sort("id", key=lambda cell: cell.plain.lower())

    def update(self, rows: list[DeviceRow], old: list[DeviceRow]) -> None:
        table = self.query_one("#fleet", DataTable)
        for new_row, old_row in zip(rows, old, strict=True):
            if new_row != old_row:
                for (col, _, _), a, b in zip(FLEET_COLUMNS, fleet_cells(new_row), fleet_cells(old_row), strict=True):
                    if a != b:
                        table.update_cell(new_row.id, col, a)
        table.sort("id", key=lambda cell: cell.plain.lower())


async def _before(fleet: FleetData) -> dict[str, Samples]:
    rows = fleet.devices()
    app = _Whole()
    out: dict[str, Samples] = {"first render": [], "steady render": []}
    async with app.run_test(size=(160, 48)) as pilot:
        for k in range(3):
            t0 = time.perf_counter()
            app.fill(rows)
            out["first render"].append(time.perf_counter() - t0)
            await pilot.pause()
            changed = [replace(r, p95_ms=(r.p95_ms or 0) + 1 + k) if i % 20 == 0 else r for i, r in enumerate(rows)]
            t0 = time.perf_counter()
            app.update(changed, rows)
            out["steady render"].append(time.perf_counter() - t0)
            await pilot.pause()
    # the render runs on the event loop in one piece: the longest block is at least the first render
    out["first block"] = out["first render"]
    return out


def _fmt(samples: Samples) -> str:
    return (f"{statistics.median(samples) * 1000:8.1f} ms ({min(samples) * 1000:.1f}–{max(samples) * 1000:.1f})"
            if samples else f"{'—':>8}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--no-before", action="store_true", help="skip the whole-fleet DataTable")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, _ = server_dir(Path(tmp) / "data")
        reg = fill_many(data, args.devices)
        fleet = FleetData(reg, Governance.load(data), "viewer", clock=lambda: NOW)

        def bare() -> None:
            with reg.engine.connect() as conn:
                conn.execute(text("SELECT * FROM devices")).fetchall()

        baseline = _runs(bare)
        from server.tui.data import FleetQuery

        after = asyncio.run(_after(fleet, args.devices))
        after["fetch"] = _runs(lambda: fleet.fleet(FleetQuery(limit=135)))
        after["fetch, filtered and sorted"] = _runs(
            lambda: fleet.fleet(FleetQuery(text="lab", sort="p95", reverse=True, limit=135, focus="dev-00040")))
        before: dict[str, Samples] = {}
        if not args.no_before:
            before = asyncio.run(_before(fleet))
            before["fetch"] = _runs(fleet.devices, 3)
        reg.engine.dispose()
    base = statistics.median(baseline)
    print(f"TUI Fleet screen, {args.devices} devices (SQLite): bare SELECT of the devices {_fmt(baseline)}")
    print(f"  {'median (min–max) of runs':<40} {'before (whole-fleet DataTable)':>34} {'now (paged)':>30}  "
          f"now/before  now/bare")
    for name, label in (("fetch", "fetch (worker thread)"), ("fetch, filtered and sorted", "  filtered + sorted"),
                        ("first render", "first render (event loop)"),
                        ("steady render", "steady render, 5 % changed"), ("cycle", "whole refresh cycle"),
                        ("first block", "longest loop block, opening"), ("cycle block", "longest loop block, refresh")):
        b, a = before.get(name, []), after.get(name, [])
        ratio = (f"{statistics.median(a) / statistics.median(b):10.3f}" if a and b else f"{'':10}")
        print(f"  {label:<40} {_fmt(b):>34} {_fmt(a):>30}  {ratio}  {statistics.median(a) / base:7.2f}×")


if __name__ == "__main__":
    main()
