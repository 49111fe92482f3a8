"""The screens: Fleet, Device, Alerts, Rollouts, Models, Drift, Audit, Help.

Each loads its data in a thread worker (never on the event loop), drops a
refresh while the previous one still runs or while a dialog is open, and
updates its tables in place by row key.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Header, Input, Label, Markdown, ProgressBar, Sparkline, Static

from hardware.profiles import label as profile_label
from server import audit
from server.db.models import AuditEntry
from server.features import FeatureDriftRow
from server.governance import ROLLOUT_COMMANDS, Permission
from server.rollouts import RolloutSpec
from server.tui.data import (
    ActionError,
    AlertRow,
    DeviceDetail,
    DeviceRow,
    DriftRow,
    ModelRow,
    RolloutDetail,
    RolloutRow,
)
from server.tui.modals import (
    ConfirmModal,
    ReasonModal,
    RolloutForm,
    RolloutRequest,
    TypedConfirmModal,
    VersionModal,
)

if TYPE_CHECKING:
    from server.tui.app import EdgeherdApp

__all__ = ["AlertsScreen", "AuditScreen", "DeviceScreen", "DriftScreen", "Fleet", "FleetScreen", "HelpScreen",
           "ModelsScreen", "RolloutsScreen"]


class Fleet(Protocol):
    """What the screens read and do: the registry database on the server host (server/tui/data.py
    ``FleetData``), or the operator API from anywhere (server/tui/remote.py ``RemoteFleetData``). Every method
    but ``may`` and ``role`` may block; the screens call them from worker threads. Refusals are ActionError."""

    actor: str

    def may(self, permission: Permission) -> bool: ...
    def role(self) -> str: ...
    def devices(self, only: str | None = None) -> list[DeviceRow]: ...
    def device(self, device_id: str) -> DeviceDetail: ...
    def rollouts(self) -> list[RolloutRow]: ...
    def rollout(self, name: str) -> RolloutDetail: ...
    def models(self) -> list[ModelRow]: ...
    def card(self, ref: str) -> str: ...
    def drift(self, hours: float = 24.0) -> list[DriftRow]: ...
    def feature_drift(self, feature: str, hours: float = 24.0) -> list[FeatureDriftRow]: ...
    def drift_series(self, version: str, feature: str, points: int = 60) -> list[float]: ...
    def audit_log(self, text: str = "", limit: int = 500) -> tuple[list[AuditEntry], audit.AuditReport]: ...
    def start_rollout(self, *, name: str, model: str, target: dict[str, list[str]], spec: RolloutSpec) -> None: ...
    def command(self, name: str, command: str, reason: str | None = None) -> None: ...
    def decide(self, ref: str, decision: str, reason: str) -> None: ...
    def can_decide(self, ref: str) -> bool: ...
    def deploy(self, device_id: str, ref: str) -> str: ...
    def revoke(self, device_id: str) -> None: ...
    def alerts(self, include_all: bool = False) -> list[AlertRow]: ...
    def acknowledge(self, alert_id: int, note: str | None = None) -> None: ...

HEALTH_STYLE = {"ok": "green", "warn": "yellow", "bad": "bold red", "off": "dim"}
STATE_STYLE = {"running": "cyan", "completed": "green", "rolled_back": "yellow", "rolling_back": "bold yellow",
               "paused": "magenta", "aborted": "dim", "pending": "", "pass": "green", "fail": "bold red",
               "insufficient": "yellow"}


def _fmt(value: float | None, spec: str, dash: str = "—") -> str:
    return dash if value is None else format(value, spec)


def _when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S") if at else "—"


#: A device's profile as shown: ``(custom)`` after a name that is no hardware profile's (one lookup per name).
_profile = lru_cache(maxsize=256)(profile_label)


def _plot(spark: Sparkline, values: Sequence[float]) -> None:
    """Show ``values`` in ``spark``, or hide it when there are none. Textual draws a single value as a full bar
    and scales a series between its own minimum and maximum, so one value is drawn as a flat line."""
    spark.display = bool(values)
    spark.data = list(values) * 2 if len(values) == 1 else list(values)


class Loading(Screen[None]):
    """Shared behaviour: the app's data, refreshing in a worker, actions in a worker, errors as notices."""

    def __init__(self) -> None:
        super().__init__()
        self._busy = False
        #: A refresh was asked for after an action while another ran: fetch once more when that one is done.
        self._again = False
        self.refreshes = 0

    @property
    def eh(self) -> EdgeherdApp:
        return self.app  # type: ignore[return-value]

    @property
    def data(self) -> Fleet:
        return self.eh.data

    def on_mount(self) -> None:
        self.sub_title = f"{self.data.actor} ({self.data.role()})"
        self.refresh_data()
        if self.eh.refresh_s > 0:
            self.set_interval(self.eh.refresh_s, self.refresh_data)

    def on_screen_resume(self) -> None:
        self.refresh_data()

    def refresh_data(self, *, again: bool = False) -> None:
        """Fetch again, unless a fetch is running, a dialog is open, or this screen is not shown. ``again`` (after
        an action): a fetch running now may have read before the action took effect, so fetch once more after it."""
        if isinstance(self.app.screen, ModalScreen) or self.app.screen is not self:
            return
        if self._busy:
            self._again = self._again or again
            return
        self._busy = True
        self._fetch()

    @work(thread=True, group="refresh")
    def _fetch(self) -> None:
        try:
            result = self.load()
        except Exception as exc:  # shown to the operator; the screen keeps going
            self.app.call_from_thread(self.notify, f"refresh failed: {exc}", severity="error")
            result = None
        self.app.call_from_thread(self._done, result)

    def _done(self, result: Any) -> None:
        self._busy = False
        if result is not None:
            self.show(result)
            self.refreshes += 1
        if self._again:
            self._again = False
            self.refresh_data()

    def load(self) -> Any:
        """Runs in a thread: fetch what the screen shows."""
        raise NotImplementedError

    def show(self, result: Any) -> None:
        """Runs on the event loop: put it on screen."""
        raise NotImplementedError

    @work(thread=True, group="action")
    def act(self, what: str, fn: Callable[[], str | None]) -> None:
        """Run an action off the event loop; tell the operator how it went (what ``fn`` returns, else ``what``),
        then refresh."""
        try:
            said = fn()
        except ActionError as exc:
            self.app.call_from_thread(self.notify, str(exc), title=f"{what}: refused", severity="error",
                                      timeout=8)
        else:
            self.app.call_from_thread(self.notify, said or what, title="done")
        self.app.call_from_thread(self.refresh_data, again=True)

    def allowed(self, permission: Permission) -> bool | None:
        """For check_action: True, or None (shown greyed out) when the operator's role does not allow it."""
        return True if self.data.may(permission) else None

    def selected_key(self, table: DataTable[Any]) -> str | None:
        if table.row_count == 0:
            return None
        try:
            key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        except Exception:  # no row under the cursor
            return None
        return str(key) if key is not None else None


# -- Fleet --------------------------------------------------------------------------------------------

FLEET_COLUMNS: list[tuple[str, str, Callable[[DeviceRow], Any]]] = [
    ("id", "device", lambda r: r.id),
    ("profile", "profile", lambda r: r.profile),
    ("groups", "group", lambda r: r.groups),
    ("status", "online", lambda r: r.status),
    ("running", "running", lambda r: r.running),
    ("desired", "desired", lambda r: r.desired),
    ("install", "install", lambda r: r.install),
    ("last_seen", "last seen", lambda r: r.last_seen),
    ("p95", "p95 ms", lambda r: r.p95_ms),
    ("errors", "error %", lambda r: r.error_rate),
    ("drift", "drift", lambda r: r.drift),
]


FLEET_WIDTHS = {"id": 14, "profile": 18, "groups": 10, "status": 8, "running": 14, "desired": 14, "install": 10,
                "last_seen": 19, "p95": 7, "errors": 7, "drift": 6}


def _fleet_cells(r: DeviceRow) -> list[Text]:
    style = HEALTH_STYLE[r.health]
    values = [r.id, _profile(r.profile), r.groups, r.status, r.running, r.desired, r.install, _when(r.last_seen),
              _fmt(r.p95_ms, ".1f"), _fmt(None if r.error_rate is None else 100 * r.error_rate, ".2f"),
              _fmt(r.drift, ".2f")]
    return [Text(v, style=style, justify="right" if i >= 8 else "left") for i, v in enumerate(values)]


def _matches(row: DeviceRow, text: str) -> bool:
    """Words all match; ``group:G``, ``tag:T``, ``status:S``, ``profile:P``, ``health:H`` match that field."""
    fields = {"group": row.groups.split(","), "tag": row.tags.split(","), "status": [row.status],
              "profile": [row.profile], "health": [row.health], "version": [row.running]}
    for word in text.lower().split():
        key, sep, value = word.partition(":")
        if sep and key in fields:
            if value not in [f.lower() for f in fields[key]]:
                return False
        elif not row.matches(word):
            return False
    return True


class FleetScreen(Loading):
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

    def show(self, rows: list[DeviceRow]) -> None:
        self.rows = {r.id: r for r in rows}
        self._render_rows()
        online = sum(r.status == "online" for r in rows)
        bad = sum(r.health == "bad" for r in rows)
        summary = f"{len(rows)} devices · {online} online · {bad} unhealthy"
        if self.filter_text:
            summary += f" · filter “{self.filter_text}”: {len(self.shown)} shown"
        self.query_one("#summary", Static).update(summary)

    def _render_rows(self) -> None:
        table = self.query_one("#fleet", DataTable)
        wanted = {k: r for k, r in self.rows.items() if _matches(r, self.filter_text)}
        if set(wanted) != set(self.shown):  # rows came or went: rebuild, then sort
            cursor = self.selected_key(table)
            table.clear()
            for key, row in wanted.items():
                table.add_row(*_fleet_cells(row), key=key)
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
            for (col_key, _, _), new_cell, old_cell in zip(FLEET_COLUMNS, _fleet_cells(row), _fleet_cells(old),
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


# -- Alerts ------------------------------------------------------------------------------------------------

ALERT_STYLE = {"raised": "bold red", "acknowledged": "yellow", "cleared": "green"}


class AlertsScreen(Loading):
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

    def show(self, rows: list[AlertRow]) -> None:
        table = self.query_one("#alert-list", DataTable)
        cursor = self.selected_key(table)
        table.clear()
        self.rows = {str(r.id): r for r in rows}
        for r in rows:
            table.add_row(Text(str(r.id), justify="right"), Text(r.state, style=ALERT_STYLE.get(r.state, "")),
                          Text(r.kind), Text(r.device), Text(r.reason[:60]), Text(_when(r.raised_at)), Text(r.by),
                          key=str(r.id))
        if cursor in self.rows:
            table.move_cursor(row=table.get_row_index(cursor))
        raised = sum(r.state == "raised" for r in rows)
        acked = sum(r.state == "acknowledged" for r in rows)
        self.query_one("#alert-summary", Static).update(
            f"{raised} raised · {acked} acknowledged · "
            + ("every alert" if self.include_all else "active ones and those cleared in the last 24 hours"))

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


# -- Device ---------------------------------------------------------------------------------------------


def _bar(value: float, width: int = 24) -> Text:
    filled = min(round(min(value, 2.0) / 2.0 * width), width)
    style = "red" if value >= 1 else "yellow" if value >= 0.5 else "green"
    return Text("█" * filled + "░" * (width - filled), style=style)


class DeviceScreen(Loading):
    """One device: fingerprint, history, latency and error sparklines, drift per feature, alerts."""

    AUTO_FOCUS = "#history"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("v", "deploy", "Deploy version"),
        Binding("x", "revoke", "Revoke"),
    ]

    def __init__(self, device_id: str) -> None:
        super().__init__()
        self.device_id = device_id

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll():
            yield Static(f"[b]{self.device_id}[/b]", id="device-head")
            yield Static("", id="fingerprint")
            yield Label("p95 latency (ms), last 60 windows", id="latency-label")
            yield Sparkline([], id="latency")
            yield Label("error rate, last 60 windows", id="errors-label")
            yield Sparkline([], id="errors")
            yield Label("drift per feature (PSI / threshold, latest window)")
            yield Static("", id="features")
            yield Label("history")
            # fixed widths: filled after mounting, auto-sized columns would render one way or another
            history: DataTable[str] = DataTable(id="history")
            for label, width in (("when", 19), ("what", 72), ("who", 16)):
                history.add_column(label, width=width)
            yield history
            yield Label("alerts")
            alerts: DataTable[str] = DataTable(id="alerts")
            for label, width in (("raised", 19), ("alert", 48), ("active", 8)):
                alerts.add_column(label, width=width)
            yield alerts
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "deploy":
            return self.allowed(Permission.DEPLOY)
        if action == "revoke":
            return self.allowed(Permission.REVOKE_DEVICE)
        return True

    def load(self) -> Any:
        return self.data.device(self.device_id), [m.ref for m in self.data.models()]

    def show(self, result: Any) -> None:
        detail, self.versions = result
        r = detail.row
        self.query_one("#device-head", Static).update(
            Text.assemble((r.id, "bold"), f"  {_profile(r.profile)} · ", (r.status, HEALTH_STYLE[r.health]),
                          f" · running {r.running} · desired {r.desired} · install {r.install} · "
                          f"last seen {_when(r.last_seen)}"))
        fp = detail.fingerprint
        self.query_one("#fingerprint", Static).update(
            " · ".join(f"{k} {v}" for k, v in sorted(fp.items()) if not isinstance(v, (dict, list))) or
            "no fingerprint reported yet")
        for name, what, values in (("latency", "p95 latency (ms)", detail.latency),
                                   ("errors", "error rate", detail.errors)):
            self.query_one(f"#{name}-label", Label).update(
                f"{what}, last 60 windows" if values else f"{what}: no telemetry yet")
            _plot(self.query_one(f"#{name}", Sparkline), values)
        lines = [Text.assemble(f"{name[:20]:<20} ", _bar(score), f" {score:.2f}") for name, score in detail.features]
        self.query_one("#features", Static).update(Text("\n").join(lines) if lines else "no drift report yet")
        history = self.query_one("#history", DataTable)
        history.clear()
        for when, what, who in detail.history:
            history.add_row(_when(when), what, who)
        alerts = self.query_one("#alerts", DataTable)
        alerts.clear()
        for at, what, active in detail.alerts:
            alerts.add_row(_when(at), what, "yes" if active else "cleared")

    def action_deploy(self) -> None:
        versions = getattr(self, "versions", [])

        def chosen(ref: str | None) -> None:
            if ref:
                self.act(f"{self.device_id} should now run {ref}", lambda: self.data.deploy(self.device_id, ref))

        self.app.push_screen(VersionModal(f"Deploy which version to {self.device_id}?", versions), chosen)

    def action_revoke(self) -> None:
        def confirmed(ok: bool | None) -> None:
            if ok:
                self.act(f"revoked {self.device_id}", lambda: self.data.revoke(self.device_id))

        self.app.push_screen(ConfirmModal(f"Revoke device {self.device_id}? Its credentials stop working at once "
                                          "and it must be enrolled again.", "Revoke"), confirmed)


# -- Rollouts ---------------------------------------------------------------------------------------------


class RolloutsScreen(Loading):
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

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical():
            table: DataTable[Text] = DataTable(id="rollouts", cursor_type="row")
            for key, label, width in (("name", "rollout", 18), ("version", "version", 14), ("state", "state", 12),
                                      ("wave", "wave", 5), ("progress", "installed", 9), ("target", "target", 30),
                                      ("reason", "why", 50)):
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
        perms = {"new": Permission.START_ROLLOUT, **ROLLOUT_COMMANDS}
        if action in perms:
            return self.allowed(perms[action])
        return True

    def load(self) -> Any:
        rows = self.data.rollouts()
        name = self.selected or (rows[0].name if rows else None)
        detail = self.data.rollout(name) if name and any(r.name == name for r in rows) else None
        return rows, detail, [m.ref for m in self.data.models() if m.stage != "retired"]

    def show(self, result: Any) -> None:
        rows, detail, self.versions = result
        table = self.query_one("#rollouts", DataTable)
        keys = [r.name for r in rows]
        existing = {str(k.value) for k in table.rows}
        if set(keys) != existing:
            table.clear()
        for r in rows:
            cells = [Text(r.name), Text(r.version), Text(r.state, style=STATE_STYLE.get(r.state, "")),
                     Text(r.wave), Text(f"{r.done}/{r.total}"), Text(r.target + (" [production]" if r.production
                                                                                  else "")), Text(r.reason[:60])]
            if r.name in existing and set(keys) == existing:
                for (col, _), cell in zip((("name", 0), ("version", 0), ("state", 0), ("wave", 0), ("progress", 0),
                                           ("target", 0), ("reason", 0)), cells, strict=True):
                    table.update_cell(r.name, col, cell)
            else:
                table.add_row(*cells, key=r.name)
        self.states = {r.name: r.state for r in rows}
        self.targets = {r.name: r.target for r in rows}
        if detail is not None:
            self.selected = detail.row.name
            self._detail(detail)

    def _detail(self, detail: Any) -> None:
        r = detail.row
        self.query_one("#rollout-head", Static).update(
            Text.assemble((r.name, "bold"), f" · {r.version} · ", (r.state, STATE_STYLE.get(r.state, "")),
                          f" · wave {r.wave} · by {detail.created_by}"))
        waves = self.query_one("#waves", Vertical)
        waves.remove_children()
        for wave, done, size in detail.waves:
            bar = ProgressBar(total=max(size, 1), show_eta=False)
            bar.advance(done)
            waves.mount(Horizontal(Label(f"wave {wave + 1}: {done}/{size} "), bar, classes="wave"))
        gates = self.query_one("#gates", DataTable)
        gates.clear()
        for wave, gate, verdict, numbers in detail.gates:
            text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items())
            gates.add_row(str(wave + 1), gate, Text(verdict, style=STATE_STYLE.get(verdict, "")), text[:120])

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

        self.app.push_screen(RolloutForm(getattr(self, "versions", [])), submitted)

    def _command(self, command: str, question: str | None, typed: bool = False) -> None:
        name = self.selected
        if name is None:
            self.notify("no rollout selected", severity="warning")
            return

        def confirmed(ok: bool | None) -> None:
            if ok:
                self.act(f"{command}: {name}", lambda: self.data.command(name, command))

        if question is None:
            confirmed(True)
        elif typed:
            self.app.push_screen(TypedConfirmModal(question.format(name=name, target=self.targets.get(name, "?")),
                                                   name, command.capitalize()), confirmed)
        else:
            self.app.push_screen(ConfirmModal(question.format(name=name, target=self.targets.get(name, "?")),
                                              command.capitalize()), confirmed)

    def action_pause(self) -> None:
        self._command("pause", "Pause rollout {name} on {target}? No device gets it until it is resumed.")

    def action_resume(self) -> None:
        self._command("resume", None)

    def action_abort(self) -> None:
        self._command("abort", "Abort rollout {name} on {target}? Devices keep what they run now.")

    def action_rollback(self) -> None:
        self._command("rollback", "Roll back rollout {name}: every device of {target} it changed goes back to "
                                  "its previous version.", typed=True)


# -- Models -----------------------------------------------------------------------------------------------


class ModelsScreen(Loading):
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

    def load(self) -> Any:
        rows = self.data.models()
        name = self.selected or (rows[0].ref if rows else None)
        card = self.data.card(name) if name else ""
        may = {r.ref: self.data.can_decide(r.ref) for r in rows}
        return rows, name, card, may

    def show(self, result: Any) -> None:
        rows, name, card, self.may_decide = result
        table = self.query_one("#models", DataTable)
        if {str(k.value) for k in table.rows} != {r.ref for r in rows}:
            table.clear()
            for r in rows:
                table.add_row(r.ref, r.stage, r.author, str(r.artifacts), r.accuracy, r.int8_delta, r.approvals,
                              key=r.ref)
        else:
            for r in rows:
                for col, value in zip(table.columns, (r.ref, r.stage, r.author, str(r.artifacts), r.accuracy,
                                                      r.int8_delta, r.approvals), strict=True):
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


# -- Drift ----------------------------------------------------------------------------------------------------


class DriftScreen(Loading):
    """Fleet-wide drift per version and feature, worst first, with the selected one over time."""

    AUTO_FOCUS = "#drift"

    def __init__(self) -> None:
        super().__init__()
        self.selected: tuple[str, str] | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        table: DataTable[Text] = DataTable(id="drift", cursor_type="row")
        for label, width in (("version", 16), ("feature", 16), ("drift (PSI/threshold)", 21), ("windows", 8),
                             ("worst devices", 60)):
            table.add_column(label, width=width)
        yield table
        yield Label("", id="series-label")
        yield Sparkline([], id="series")
        yield Label("", id="versions-label")  # a registry feature: its drift across the model versions using it
        versions: DataTable[Text] = DataTable(id="versions", cursor_type="none")
        for label, width in (("feature", 20), ("model version", 20), ("windows", 8), ("values", 9),
                             ("PSI / limit", 12), ("missing", 8), ("drifted", 8)):
            versions.add_column(label, width=width)
        yield versions
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#versions-label", Label).display = False
        self.query_one("#versions", DataTable).display = False
        super().on_mount()

    def load(self) -> Any:
        rows = self.data.drift()
        key = self.selected or ((rows[0].version, rows[0].feature) if rows else None)
        series = self.data.drift_series(*key) if key else []
        return rows, key, series, self.data.feature_drift(key[1]) if key else []

    def show(self, result: Any) -> None:
        rows, key, series, across = result
        versions = self.query_one("#versions", DataTable)
        versions.clear()
        for r in across:
            d = r.drift
            ratio = d.psi / d.psi_threshold if d.psi_threshold else 0.0
            versions.add_row(Text(r.feature), Text(r.model), Text(str(r.windows), justify="right"),
                             Text(str(d.n), justify="right"),
                             Text(f"{ratio:.2f}", style="red" if d.drifted else "green", justify="right"),
                             Text(f"{d.nan_rate:.1%}", justify="right"), Text("yes" if d.drifted else "no"))
        label = self.query_one("#versions-label", Label)
        label.update(f"registry feature {key[1]} across the model versions that consume it (last 24 h)" if key
                     else "")
        label.display = versions.display = bool(across)
        table = self.query_one("#drift", DataTable)
        cursor = self.selected_key(table)
        table.clear()
        for r in rows:
            style = "red" if r.score >= 1 else "yellow" if r.score >= 0.5 else "green"
            table.add_row(Text(r.version), Text(r.feature), Text(f"{r.score:.2f}", style=style, justify="right"),
                          Text(str(r.windows), justify="right"), Text(r.worst_devices), key=f"{r.version}|{r.feature}")
        if cursor is not None and cursor in {f"{r.version}|{r.feature}" for r in rows}:
            table.move_cursor(row=table.get_row_index(cursor))
        self.selected = key
        self.query_one("#series-label", Label).update(
            "no drift evaluated yet" if key is None else
            f"{key[0]} · {key[1]}: no fleet-wide evaluation of it yet" if not series else
            f"{key[0]} · {key[1]} over the last {len(series)} evaluations (1.0 = threshold)")
        _plot(self.query_one("#series", Sparkline), series)

    @on(DataTable.RowHighlighted, "#drift")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is None:
            return
        version, _, feature = str(event.row_key.value).partition("|")
        if (version, feature) != self.selected:
            self.selected = (version, feature)
            self.refresh_data()


# -- Audit ------------------------------------------------------------------------------------------------------


class AuditScreen(Loading):
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

    def load(self) -> Any:
        return self.data.audit_log(self.filter_text)

    def show(self, result: Any) -> None:
        entries, report = result
        chain = self.query_one("#chain", Static)
        if report.ok:
            chain.update(Text(f"✔ audit chain verified: {report.entries} entries", style="green"))
        else:
            chain.update(Text(f"✘ audit chain BROKEN: {'; '.join(report.problems[:3])}", style="bold red"))
        table = self.query_one("#audit", DataTable)
        table.clear()
        for e in entries:
            detail = ", ".join(f"{k}={v}" for k, v in e.detail.items() if k != "gates")
            table.add_row(str(e.seq), _when(e.at), e.actor, e.action, e.subject, detail[:100], key=str(e.seq))

    def action_filter(self) -> None:
        self.query_one("#audit-filter", Input).focus()

    @on(Input.Changed, "#audit-filter")
    def _changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self.refresh_data()


# -- Help --------------------------------------------------------------------------------------------------------


class HelpScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "app.pop_screen", "Back"),
                                             Binding("question_mark", "app.pop_screen", "Back")]

    def __init__(self, sections: Iterable[tuple[str, list[tuple[str, str]]]]) -> None:
        super().__init__()
        self.sections = list(sections)

    def compose(self) -> ComposeResult:
        lines = ["# edgeherd — keys", ""]
        for title, keys in self.sections:
            lines += [f"## {title}", "", "| key | does |", "|---|---|"]
            lines += [f"| `{k}` | {d} |" for k, d in keys] + [""]
        lines += ["Destructive actions ask first and name their target; rolling back a rollout makes you type "
                  "its name. Actions your role may not take are greyed out in the footer.", ""]
        with VerticalScroll(classes="dialog wide"):
            yield Markdown("\n".join(lines))
