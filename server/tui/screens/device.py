"""Device: one device's fingerprint, history, latency and error sparklines, drift per feature and alerts."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Header, Label, Sparkline, Static

from server.governance import Permission
from server.tui.data import ActionError, DeviceDetail
from server.tui.modals import ConfirmModal, VersionModal
from server.tui.render import device_features, device_head, fingerprint, when
from server.tui.screens.device_diag import GroupsModal, LevelModal, LogsModal
from server.tui.screens.loading import Loading, plot

__all__ = ["DeviceScreen", "DeviceView"]

#: Actions that send the device's agent a command (server/diagnostics.py).
_DIAGNOSTICS = {"logs", "report_now", "log_level", "restart", "rollback"}


class DeviceView(NamedTuple):
    """What the device screen shows: the device, and the versions it may be given."""

    detail: DeviceDetail
    versions: list[str]


class DeviceScreen(Loading[DeviceView]):
    """One device: fingerprint, history, latency and error sparklines, drift per feature, alerts."""

    AUTO_FOCUS = "#history"

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("v", "deploy", "Deploy version"),
        Binding("x", "revoke", "Revoke"),
        Binding("g", "groups", "Groups/tags"),
        Binding("o", "logs", "Agent logs"),
        Binding("n", "report_now", "Report now"),
        Binding("L", "log_level", "Log level"),
        Binding("R", "restart", "Restart agent"),
        Binding("b", "rollback", "Roll back model"),
    ]

    def __init__(self, device_id: str) -> None:
        super().__init__()
        self.device_id = device_id
        self.versions: list[str] = []

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
        if action == "groups":
            return self.allowed(Permission.ENROLL_DEVICE)
        if action in _DIAGNOSTICS:
            return self.allowed(Permission.COMMAND_DEVICE)
        return True

    def load(self) -> DeviceView:
        return DeviceView(self.data.device(self.device_id), [m.ref for m in self.data.models()])

    def show(self, result: DeviceView) -> None:
        detail, self.versions = result
        self.groups, self.tags = detail.row.groups, detail.row.tags
        self.query_one("#device-head", Static).update(device_head(detail.row))
        self.query_one("#fingerprint", Static).update(fingerprint(detail.fingerprint))
        for name, what, values in (("latency", "p95 latency (ms)", detail.latency),
                                   ("errors", "error rate", detail.errors)):
            self.query_one(f"#{name}-label", Label).update(
                f"{what}, last 60 windows" if values else f"{what}: no telemetry yet")
            plot(self.query_one(f"#{name}", Sparkline), values)
        self.query_one("#features", Static).update(device_features(detail.features))
        history = self.query_one("#history", DataTable)
        history.clear()
        for at, what, who in detail.history:
            history.add_row(when(at), what, who)
        alerts = self.query_one("#alerts", DataTable)
        alerts.clear()
        for at, what, active in detail.alerts:
            alerts.add_row(when(at), what, "yes" if active else "cleared")

    def action_deploy(self) -> None:
        def chosen(ref: str | None) -> None:
            if ref:
                self.act(f"{self.device_id} should now run {ref}", lambda: self.data.deploy(self.device_id, ref))

        self.app.push_screen(VersionModal(f"Deploy which version to {self.device_id}?", self.versions), chosen)

    def action_groups(self) -> None:
        def chosen(names: tuple[list[str], list[str]] | None) -> None:
            if names is not None:
                groups, tags = names
                self.act(f"{self.device_id}: groups and tags set",
                         lambda: self.data.set_device(self.device_id, groups, tags))

        self.app.push_screen(GroupsModal(self.device_id, getattr(self, "groups", ""), getattr(self, "tags", "")),
                             chosen)

    def action_revoke(self) -> None:
        def confirmed(ok: bool | None) -> None:
            if ok:
                self.act(f"revoked {self.device_id}", lambda: self.data.revoke(self.device_id))

        self.app.push_screen(ConfirmModal(f"Revoke device {self.device_id}? Its credentials stop working at once "
                                          "and it must be enrolled again.", "Revoke"), confirmed)

    # -- diagnostics (server/diagnostics.py) ---------------------------------------------------------

    @work(thread=True, group="action")
    def action_logs(self) -> None:
        try:
            lines = self.data.device_logs(self.device_id, 500)
        except ActionError as exc:
            self.app.call_from_thread(self.notify, str(exc), title="agent logs: refused", severity="error",
                                      timeout=8)
            return
        self.app.call_from_thread(self.app.push_screen, LogsModal(self.device_id, lines))

    def _command(self, command: str, level: str | None = None) -> None:
        self.act(f"{self.device_id}: {command}", lambda: self.data.device_command(self.device_id, command, level))

    def action_report_now(self) -> None:
        self._command("report-now")

    def action_log_level(self) -> None:
        def chosen(level: str | None) -> None:
            if level:
                self._command("set-log-level", level)

        self.app.push_screen(LevelModal(self.device_id), chosen)

    def action_restart(self) -> None:
        def confirmed(ok: bool | None) -> None:
            if ok:
                self._command("restart")

        self.app.push_screen(ConfirmModal(f"Restart the agent on {self.device_id}? It stops serving until its "
                                          "service manager has started it again.", "Restart"), confirmed)

    def action_rollback(self) -> None:
        def confirmed(ok: bool | None) -> None:
            if ok:
                self._command("rollback")

        self.app.push_screen(ConfirmModal(f"Roll {self.device_id} back to the model in its other slot (the one it "
                                          "ran before)?", "Roll back"), confirmed)
