"""Fleet: one row per device, a page at a time; filter, sort, drill down into a device or the alerts.

The database filters, sorts and counts (server/tui/data.py ``FleetData.fleet``); the screen asks for the page
around what is on screen, with the device under the cursor as the one to keep in view, and the table
(server/tui/screens/_fleet_table.py) draws only the lines on screen and repaints only the rows that changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Footer, Header, Input, Static

from server.tui.data import DeviceRow, FleetPage, FleetQuery
from server.tui.render import FLEET_COLUMNS, fleet_summary
from server.tui.screens._fleet_table import FleetTable
from server.tui.screens.alerts import AlertsScreen
from server.tui.screens.device import DeviceScreen
from server.tui.screens.loading import Loading

__all__ = ["FleetScreen", "FleetTable"]


@dataclass(frozen=True)
class Fetched:
    """A page, with the query that fetched it and whether the table scrolls to the cursor's device on it."""

    query: FleetQuery
    follow: bool
    page: FleetPage


class FleetScreen(Loading[Fetched]):
    """One row per device, a page at a time; filter, sort, drill down."""

    AUTO_FOCUS = "#fleet"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("slash", "filter", "Filter"),
        Binding("s", "sort", "Sort"),
        Binding("S", "reverse", "Reverse"),
        Binding("enter", "open", "Device", show=True),
        Binding("a", "alerts", "Alerts"),
    ]

    def __init__(self) -> None:
        super().__init__()
        #: The rows of the page held, by device.
        self.rows: dict[str, DeviceRow] = {}
        self.filter_text = ""
        self.sort_index = 0
        self.sort_reverse = False
        #: The next page puts the cursor back on its device and scrolls to it (the order or the filter changed).
        self._follow = False
        self._pending = (FleetQuery(), False)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="summary")
        yield Input(placeholder="filter: words, or group:G tag:T status:online health:bad …", id="filter",
                    classes="hidden")
        yield FleetTable(id="fleet")
        yield Footer()

    @property
    def table(self) -> FleetTable:
        return self.query_one("#fleet", FleetTable)

    def _query(self) -> FleetQuery:
        """The page for what is on screen, in the order and with the filter chosen now."""
        table = self.table
        offset, limit = table.window()
        keep = self._follow or table.top <= table.cursor_row < table.top + table.body_height
        return FleetQuery(text=self.filter_text, sort=FLEET_COLUMNS[self.sort_index][0], reverse=self.sort_reverse,
                          offset=offset, limit=limit, focus=table.cursor_key if keep else None)

    def refresh_data(self, *, again: bool = False) -> None:
        if not self._busy and self.app.screen is self:  # a fetch starts now: with the query as of now
            self._pending = (self._query(), self._follow)
            self._follow = False
        super().refresh_data(again=again)

    def load(self) -> Fetched:
        query, follow = self._pending
        return Fetched(query, follow, self.data.fleet(query))

    def show(self, result: Fetched) -> None:
        page, table = result.page, self.table
        table.show(page, follow=result.follow)
        self.rows = {r.id: r for r in page.rows}
        self.query_one("#summary", Static).update(
            fleet_summary(page.total, page.online, page.unhealthy, result.query.text, page.matched))
        if table.missing():  # scrolled while it was fetched: the page for where the table is now
            self.refresh_data(again=True)

    def _changed(self) -> None:
        """The order or the filter changed: fetch, and keep the cursor's device in view."""
        self._follow = True
        self.refresh_data(again=True)

    @on(FleetTable.Wanted, "#fleet")
    def _wanted(self) -> None:
        self.refresh_data(again=True)

    @on(FleetTable.HeaderSelected, "#fleet")
    def _header(self, event: FleetTable.HeaderSelected) -> None:
        index = next(i for i, (k, _, _) in enumerate(FLEET_COLUMNS) if k == event.column_key)
        self.sort_reverse = not self.sort_reverse if index == self.sort_index else False
        self.sort_index = index
        self._changed()

    def action_sort(self) -> None:
        self.sort_index = (self.sort_index + 1) % len(FLEET_COLUMNS)
        self._changed()
        self.notify(f"sorted by {FLEET_COLUMNS[self.sort_index][1]}", timeout=2)

    def action_reverse(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self._changed()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("hidden")
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self._changed()

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        self.table.focus()
        if not event.value.strip():
            event.input.add_class("hidden")

    @on(FleetTable.Selected, "#fleet")
    def _selected(self, event: FleetTable.Selected) -> None:
        self.app.push_screen(DeviceScreen(event.key))

    def action_open(self) -> None:
        key = self.table.cursor_key
        if key is not None:
            self.app.push_screen(DeviceScreen(key))

    def action_alerts(self) -> None:
        self.app.push_screen(AlertsScreen())
