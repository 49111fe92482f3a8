"""Device: one device's fingerprint, history, latency and error sparklines, drift per feature and alerts."""

from __future__ import annotations

from typing import ClassVar, NamedTuple

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Header, Label, Sparkline, Static

from server.governance import Permission
from server.tui.data import DeviceDetail
from server.tui.modals import ConfirmModal, VersionModal
from server.tui.render import device_features, device_head, fingerprint, when
from server.tui.screens.loading import Loading, plot

__all__ = ["DeviceScreen", "DeviceView"]


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
        return True

    def load(self) -> DeviceView:
        return DeviceView(self.data.device(self.device_id), [m.ref for m in self.data.models()])

    def show(self, result: DeviceView) -> None:
        detail, self.versions = result
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

    def action_revoke(self) -> None:
        def confirmed(ok: bool | None) -> None:
            if ok:
                self.act(f"revoked {self.device_id}", lambda: self.data.revoke(self.device_id))

        self.app.push_screen(ConfirmModal(f"Revoke device {self.device_id}? Its credentials stop working at once "
                                          "and it must be enrolled again.", "Revoke"), confirmed)
