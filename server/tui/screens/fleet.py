"""Fleet: one row per device, updated in place; filter, sort, drill down into a device or the alerts."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Header, Input, Static

from server.tui.data import DeviceRow
from server.tui.render import FLEET_COLUMNS, FLEET_WIDTHS, fleet_cells, fleet_matches, fleet_summary
from server.tui.screens.alerts import AlertsScreen
from server.tui.screens.device import DeviceScreen
from server.tui.screens.loading import Loading

__all__ = ["FleetScreen"]


class FleetScreen(Loading[list[DeviceRow]]):
    """One row per device, updated in place; filter, sort, drill down."""

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
        self.rows: dict[str, DeviceRow] = {}
        self.shown: dict[str, DeviceRow] = {}
        self.filter_text = ""
        self.sort_index = 0
        self.sort_reverse = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="summary")
        yield Input(placeholder="filter: words, or group:G tag:T status:online health:bad …", id="filter",
                    classes="hidden")
        table: DataTable[Text] = DataTable(id="fleet", cursor_type="row", zebra_stripes=True)
        for key, label, _ in FLEET_COLUMNS:  # fixed widths: the same layout however the rows arrive
            table.add_column(label, key=key, width=FLEET_WIDTHS[key])
        yield table
        yield Footer()

    def load(self) -> list[DeviceRow]:
        return self.data.devices()

    def show(self, result: list[DeviceRow]) -> None:
        self.rows = {r.id: r for r in result}
        self._render_rows()
        self.query_one("#summary", Static).update(fleet_summary(result, self.filter_text, len(self.shown)))

    def _render_rows(self) -> None:
        table = self.query_one("#fleet", DataTable)
        wanted = {k: r for k, r in self.rows.items() if fleet_matches(r, self.filter_text)}
        if set(wanted) != set(self.shown):  # rows came or went: rebuild, then sort
            cursor = self.selected_key(table)
            table.clear()
            for key, row in wanted.items():
                table.add_row(*fleet_cells(row), key=key)
            self.shown = wanted
            self._apply_sort()
            if cursor in wanted:
                table.move_cursor(row=table.get_row_index(cursor))
            return
        changed = False
        for key, row in wanted.items():  # same rows: touch only the cells that changed
            old = self.shown[key]
            if row == old:
                continue
            for (col_key, _, _), new_cell, old_cell in zip(FLEET_COLUMNS, fleet_cells(row), fleet_cells(old),
                                                           strict=True):
                if new_cell != old_cell:
                    table.update_cell(key, col_key, new_cell)
                    changed = True
        self.shown = wanted
        if changed:
            self._apply_sort()

    def _apply_sort(self) -> None:
        """Sort on the underlying values (numbers as numbers, dates as dates), missing values last."""
        _, _, getter = FLEET_COLUMNS[self.sort_index]
        values = {k: getter(r) for k, r in self.shown.items()}

        def sort_key(id_cell: Text) -> tuple[bool, Any]:
            v = values.get(id_cell.plain)
            if v is None:
                return (True, "")
            return (False, v.lower() if isinstance(v, str) else v)

        table = self.query_one("#fleet", DataTable)
        cursor = self.selected_key(table)
        table.sort("id", key=sort_key, reverse=self.sort_reverse)
        if cursor is not None and cursor in self.shown:  # the cursor stays on its device
            table.move_cursor(row=table.get_row_index(cursor))

    @on(DataTable.HeaderSelected, "#fleet")
    def _header(self, event: DataTable.HeaderSelected) -> None:
        index = next(i for i, (k, _, _) in enumerate(FLEET_COLUMNS) if k == event.column_key.value)
        self.sort_reverse = not self.sort_reverse if index == self.sort_index else False
        self.sort_index = index
        self._apply_sort()

    def action_sort(self) -> None:
        self.sort_index = (self.sort_index + 1) % len(FLEET_COLUMNS)
        self._apply_sort()
        self.notify(f"sorted by {FLEET_COLUMNS[self.sort_index][1]}", timeout=2)

    def action_reverse(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self._apply_sort()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.remove_class("hidden")
        box.focus()

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self._render_rows()

    @on(Input.Submitted, "#filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        self.query_one("#fleet", DataTable).focus()
        if not event.value.strip():
            event.input.add_class("hidden")

    @on(DataTable.RowSelected, "#fleet")
    def _selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value is not None:
            self.app.push_screen(DeviceScreen(str(event.row_key.value)))

    def action_open(self) -> None:
        key = self.selected_key(self.query_one("#fleet", DataTable))
        if key is not None:
            self.app.push_screen(DeviceScreen(key))

    def action_alerts(self) -> None:
        self.app.push_screen(AlertsScreen())
