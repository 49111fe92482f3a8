"""Alerts: active ones and those cleared in the last 24 hours (or every one), newest first; acknowledge one."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Header, Static

from server.governance import Permission
from server.tui.data import AlertRow
from server.tui.modals import ConfirmModal
from server.tui.render import alert_cells, alerts_summary
from server.tui.screens.loading import Loading

__all__ = ["AlertsScreen"]


class AlertsScreen(Loading[list[AlertRow]]):
    """Active alerts and those cleared in the last 24 hours (every one with ``A``), newest first; acknowledge one."""

    AUTO_FOCUS = "#alert-list"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("k", "ack", "Acknowledge"),
        Binding("A", "everything", "All / recent"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.include_all = False
        self.rows: dict[str, AlertRow] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="alert-summary")
        table: DataTable[Text] = DataTable(id="alert-list", cursor_type="row", zebra_stripes=True)
        for label, width in (("id", 6), ("state", 13), ("kind", 13), ("device", 14), ("reason", 60),
                             ("raised", 19), ("by", 14)):
            table.add_column(label, width=width)
        yield table
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "ack":
            return self.allowed(Permission.ACK_ALERT)
        return True

    def load(self) -> list[AlertRow]:
        return self.data.alerts(self.include_all)

    def show(self, result: list[AlertRow]) -> None:
        table = self.query_one("#alert-list", DataTable)
        cursor = self.selected_key(table)
        table.clear()
        self.rows = {str(r.id): r for r in result}
        for r in result:
            table.add_row(*alert_cells(r), key=str(r.id))
        if cursor in self.rows:
            table.move_cursor(row=table.get_row_index(cursor))
        self.query_one("#alert-summary", Static).update(alerts_summary(result, self.include_all))

    def action_everything(self) -> None:
        self.include_all = not self.include_all
        self.refresh_data()

    def action_ack(self) -> None:
        key = self.selected_key(self.query_one("#alert-list", DataTable))
        row = self.rows.get(key or "")
        if row is None:
            self.notify("no alert selected", severity="warning")
            return
        if row.state != "raised":
            self.notify(f"alert {row.id} is {row.state}; only a raised alert is acknowledged", severity="warning")
            return

        def confirmed(ok: bool | None) -> None:
            if ok:
                self.act(f"alert {row.id} acknowledged", lambda: self.data.acknowledge(row.id))

        self.app.push_screen(ConfirmModal(f"Acknowledge alert {row.id} ({row.kind} on {row.device}: {row.reason})? "
                                          "It shows you are on it until it clears.", "Acknowledge"), confirmed)
