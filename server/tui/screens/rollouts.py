"""Rollouts: every rollout, the selected one's waves and gates; start, pause, resume, abort, roll back."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Label, ProgressBar, Static

from server.governance import Permission
from server.rollouts import COMMANDS, RolloutCommand
from server.tui.data import RolloutDetail, RolloutRow
from server.tui.modals import ConfirmModal, RolloutForm, RolloutRequest, TypedConfirmModal
from server.tui.render import gate_cells, rollout_cells, rollout_head
from server.tui.screens.loading import Loading

__all__ = ["RolloutsScreen", "RolloutsView"]

#: The rollout table's column keys, in order.
COLUMNS = ("name", "version", "state", "wave", "progress", "target", "reason")


class RolloutsView(NamedTuple):
    """What the rollouts screen shows: every rollout, the selected one's detail, the versions a new one may use."""

    rows: list[RolloutRow]
    detail: RolloutDetail | None
    versions: list[str]


class RolloutsScreen(Loading[RolloutsView]):
    """Every rollout; the selected one's waves and gates. Start, pause, resume, abort, roll back."""

    AUTO_FOCUS = "#rollouts"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "new", "New rollout"),
        Binding("p", "pause", "Pause"),
        Binding("u", "resume", "Resume"),
        Binding("x", "abort", "Abort"),
        Binding("b", "rollback", "Roll back"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.selected: str | None = None
        self.states: dict[str, str] = {}
        self.targets: dict[str, str] = {}
        self.versions: list[str] = []

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical():
            table: DataTable[Text] = DataTable(id="rollouts", cursor_type="row")
            for key, label, width in zip(COLUMNS, ("rollout", "version", "state", "wave", "installed", "target",
                                                   "why"), (18, 14, 12, 5, 9, 30, 50), strict=True):
                table.add_column(label, key=key, width=width)
            yield table
            yield Static("", id="rollout-head")
            yield Vertical(id="waves")
            gates: DataTable[Text] = DataTable(id="gates")
            for label, width in (("wave", 5), ("gate", 12), ("verdict", 13), ("numbers", 110)):
                gates.add_column(label, width=width)
            yield gates
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        perms = {"new": Permission.START_ROLLOUT, **{c.value: rule.permission for c, rule in COMMANDS.items()}}
        if action in perms:
            return self.allowed(perms[action])
        return True

    def load(self) -> RolloutsView:
        rows = self.data.rollouts()
        name = self.selected or (rows[0].name if rows else None)
        detail = self.data.rollout(name) if name and any(r.name == name for r in rows) else None
        return RolloutsView(rows, detail, [m.ref for m in self.data.models() if m.stage != "retired"])

    def show(self, result: RolloutsView) -> None:
        rows, detail, self.versions = result
        table = self.query_one("#rollouts", DataTable)
        keys = [r.name for r in rows]
        existing = {str(k.value) for k in table.rows}
        if set(keys) != existing:
            table.clear()
        for r in rows:
            cells = rollout_cells(r)
            if r.name in existing and set(keys) == existing:
                for col, cell in zip(COLUMNS, cells, strict=True):
                    table.update_cell(r.name, col, cell)
            else:
                table.add_row(*cells, key=r.name)
        self.states = {r.name: r.state for r in rows}
        self.targets = {r.name: r.target for r in rows}
        if detail is not None:
            self.selected = detail.row.name
            self._detail(detail)

    def _detail(self, detail: RolloutDetail) -> None:
        self.query_one("#rollout-head", Static).update(rollout_head(detail))
        waves = self.query_one("#waves", Vertical)
        waves.remove_children()
        for wave, done, size in detail.waves:
            bar = ProgressBar(total=max(size, 1), show_eta=False)
            bar.advance(done)
            waves.mount(Horizontal(Label(f"wave {wave + 1}: {done}/{size} "), bar, classes="wave"))
        gates = self.query_one("#gates", DataTable)
        gates.clear()
        for wave, gate, verdict, numbers in detail.gates:
            gates.add_row(*gate_cells(wave, gate, verdict, numbers))

    @on(DataTable.RowHighlighted, "#rollouts")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        name = str(event.row_key.value) if event.row_key.value is not None else None
        if name and name != self.selected:
            self.selected = name
            self.refresh_data()

    def action_new(self) -> None:
        def submitted(req: RolloutRequest | None) -> None:
            if req is not None:
                self.selected = req.name
                self.act(f"rollout {req.name} recorded", lambda: self.data.start_rollout(
                    name=req.name, model=req.model, target=req.target, spec=req.spec))

        self.app.push_screen(RolloutForm(self.versions), submitted)

    def _command(self, command: RolloutCommand, question: str | None, typed: bool = False) -> None:
        name = self.selected
        if name is None:
            self.notify("no rollout selected", severity="warning")
            return

        def confirmed(ok: bool | None) -> None:
            if ok:
                self.act(f"{command.value}: {name}", lambda: self.data.command(name, command.value))

        if question is None:
            confirmed(True)
        elif typed:
            self.app.push_screen(TypedConfirmModal(question.format(name=name, target=self.targets.get(name, "?")),
                                                   name, command.capitalize()), confirmed)
        else:
            self.app.push_screen(ConfirmModal(question.format(name=name, target=self.targets.get(name, "?")),
                                              command.capitalize()), confirmed)

    def action_pause(self) -> None:
        self._command(RolloutCommand.PAUSE, "Pause rollout {name} on {target}? No device gets it until it is resumed.")

    def action_resume(self) -> None:
        self._command(RolloutCommand.RESUME, None)

    def action_abort(self) -> None:
        self._command(RolloutCommand.ABORT, "Abort rollout {name} on {target}? Devices keep what they run now.")

    def action_rollback(self) -> None:
        self._command(RolloutCommand.ROLLBACK, "Roll back rollout {name}: every device of {target} it changed goes "
                      "back to its previous version.", typed=True)
