"""The Fleet screen's refresh with 10,000 devices, against reading the devices table bare, in the same run.

- baseline: ``SELECT * FROM devices`` through SQLAlchemy, every row fetched (what any view of the fleet
  must at least do);
- fetch: ``FleetData.devices()`` (devices, recent telemetry aggregated per device, latest drift score),
  in the worker thread;
- first render: putting 10,000 rows into the table (once, when the screen opens);
- steady render: a refresh where 5 % of the devices changed (cells updated in place);
- cycle: one whole refresh, fetch and render, as the operator sees it.

The render steps run on the UI's event loop (they are what could block input); the fetch does not.

Run: ``python -m benchmarks.tui_refresh [--devices 10000]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from sqlalchemy import text

from server.governance import Governance
from server.tui.app import EdgeherdApp
from server.tui.data import FleetData
from server.tui.screens import FleetScreen
from tests.server_helpers import server_dir
from tests.tui_state import NOW, fill_many, settle


def _median(fn, repeats: int = 5) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


async def _ui(fleet: FleetData, n: int) -> tuple[float, float, float]:
    app = EdgeherdApp(fleet, refresh_s=0)
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, FleetScreen)
        rows = fleet.devices()
        screen.shown, screen.rows = {}, {}
        screen.query_one("#fleet").clear()  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        screen.show(rows)
        first = time.perf_counter() - t0
        steady = []
        for k in range(5):
            changed = [replace(r, p95_ms=(r.p95_ms or 0) + 1 + k) if i % 20 == 0 else r for i, r in enumerate(rows)]
            t0 = time.perf_counter()
            screen.show(changed)
            steady.append(time.perf_counter() - t0)
        cycles = []
        for _ in range(3):
            done = screen.refreshes
            t0 = time.perf_counter()
            screen.refresh_data()
            while screen.refreshes == done:
                await pilot.pause(0.005)
            cycles.append(time.perf_counter() - t0)
        assert screen.query_one("#fleet").row_count == n  # type: ignore[attr-defined]
    return first, statistics.median(steady), statistics.median(cycles)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--devices", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, _ = server_dir(Path(tmp) / "data")
        reg = fill_many(data, args.devices)
        fleet = FleetData(reg, Governance.load(data), "viewer", clock=lambda: NOW)

        def bare() -> None:
            with reg.engine.connect() as conn:
                conn.execute(text("SELECT * FROM devices")).fetchall()

        baseline = _median(bare)
        fetch = _median(fleet.devices)
        first, steady, cycle = asyncio.run(_ui(fleet, args.devices))
        reg.engine.dispose()
    print(f"TUI Fleet screen, {args.devices} devices (SQLite): bare SELECT of the devices {baseline * 1000:.0f} ms")
    for name, value in (("fetch (worker thread)", fetch), ("first render (event loop)", first),
                        ("steady render, 5 % changed (event loop)", steady), ("whole refresh cycle", cycle)):
        print(f"  {name:<42} {value * 1000:8.0f} ms  = {value / baseline:5.1f} × the bare SELECT")


if __name__ == "__main__":
    main()
