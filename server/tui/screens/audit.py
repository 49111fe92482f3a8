"""Audit: the audit log, newest first, filterable, with the verification of its hash chain."""

from __future__ import annotations

from typing import ClassVar

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import DataTable, Footer, Header, Input, Static

from server.audit import AuditReport
from server.db.models import AuditEntry
from server.tui.render import audit_cells, audit_chain
from server.tui.screens.loading import Loading

__all__ = ["AuditScreen"]


class AuditScreen(Loading[tuple[list[AuditEntry], AuditReport]]):
    """The audit log, newest first, filterable, with the chain's verification."""

    AUTO_FOCUS = "#audit"

    BINDINGS: ClassVar[list[BindingType]] = [Binding("slash", "filter", "Filter")]

    def __init__(self) -> None:
        super().__init__()
        self.filter_text = ""

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="chain")
        yield Input(placeholder="filter: actor, action, subject or detail words", id="audit-filter")
        table: DataTable[str] = DataTable(id="audit", cursor_type="row")
        for label, width in (("#", 6), ("when", 19), ("actor", 14), ("action", 24), ("subject", 28),
                             ("detail", 60)):
            table.add_column(label, width=width)
        yield table
        yield Footer()

    def load(self) -> tuple[list[AuditEntry], AuditReport]:
        return self.data.audit_log(self.filter_text)

    def show(self, result: tuple[list[AuditEntry], AuditReport]) -> None:
        entries, report = result
        self.query_one("#chain", Static).update(audit_chain(report))
        table = self.query_one("#audit", DataTable)
        table.clear()
        for e in entries:
            table.add_row(*audit_cells(e), key=str(e.seq))

    def action_filter(self) -> None:
        self.query_one("#audit-filter", Input).focus()

    @on(Input.Changed, "#audit-filter")
    def _changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self.refresh_data()
