"""Models: versions with stage, metrics, quantization deltas and approvals; the model card; approve or reject."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.widgets import DataTable, Footer, Header, Markdown

from server.tui.data import ModelRow
from server.tui.modals import ReasonModal
from server.tui.render import model_cells
from server.tui.screens.loading import Loading

__all__ = ["ModelsScreen", "ModelsView"]


class ModelsView(NamedTuple):
    """What the models screen shows: every version, the selected one and its card, who may decide on which."""

    rows: list[ModelRow]
    selected: str | None
    card: str
    may_decide: dict[str, bool]


class ModelsScreen(Loading[ModelsView]):
    """Versions with stage, metrics, quantization deltas, approvals; the model card; approve or reject."""

    AUTO_FOCUS = "#models"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "approve", "Approve"),
        Binding("j", "reject", "Reject"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.selected: str | None = None
        self.may_decide: dict[str, bool] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            table: DataTable[str] = DataTable(id="models", cursor_type="row")
            for label, width in (("version", 16), ("stage", 10), ("author", 12), ("artifacts", 9), ("accuracy", 9),
                                 ("int8 Δ", 8), ("decisions", 24)):
                table.add_column(label, width=width)
            yield table
            with VerticalScroll(id="card-pane"):
                yield Markdown("", id="card")
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("approve", "reject"):
            return True if self.selected and self.may_decide.get(self.selected) else None
        return True

    def load(self) -> ModelsView:
        rows = self.data.models()
        name = self.selected or (rows[0].ref if rows else None)
        card = self.data.card(name) if name else ""
        may = {r.ref: self.data.can_decide(r.ref) for r in rows}
        return ModelsView(rows, name, card, may)

    def show(self, result: ModelsView) -> None:
        rows, name, card, self.may_decide = result
        table = self.query_one("#models", DataTable)
        if {str(k.value) for k in table.rows} != {r.ref for r in rows}:
            table.clear()
            for r in rows:
                table.add_row(*model_cells(r), key=r.ref)
        else:
            for r in rows:
                for col, value in zip(table.columns, model_cells(r), strict=True):
                    table.update_cell(r.ref, col, value)
        self.selected = name
        self.query_one("#card", Markdown).update(card)
        self.refresh_bindings()

    @on(DataTable.RowHighlighted, "#models")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        ref = str(event.row_key.value) if event.row_key.value is not None else None
        if ref and ref != self.selected:
            self.selected = ref
            self.refresh_bindings()
            self.refresh_data()

    def _decide(self, decision: str) -> None:
        ref = self.selected
        if ref is None:
            return

        def reasoned(reason: str | None) -> None:
            if reason:
                self.act(f"{decision}d {ref}" if decision == "approve" else f"rejected {ref}",
                         lambda: self.data.decide(ref, decision, reason))

        verb = "Approve" if decision == "approve" else "Reject"
        self.app.push_screen(ReasonModal(f"{verb} {ref}? Say why (recorded in the audit log).", verb), reasoned)

    def action_approve(self) -> None:
        self._decide("approve")

    def action_reject(self) -> None:
        self._decide("reject")
