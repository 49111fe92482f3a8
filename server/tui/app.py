"""``edgeherd tui``: the fleet, rollouts, models, drift and the audit log, live, from the keyboard.

Each top-level screen is a mode with its own stack (Fleet → Device, …);
``f r m d l`` switch between them, Esc goes back, ``?`` shows every key.

The screens read and act through a :class:`~server.tui.screens.Fleet`: the registry database on the server host
(:func:`make_app`), or the operator API with a login, from anywhere (:func:`make_remote_app`). The app is their
:class:`~server.tui.screens.Host`; they never import this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from textual.app import App
from textual.binding import Binding, BindingType
from textual.widgets import Input

from server.api.client import ApiClient
from server.governance import Governance
from server.registry import Registry
from server.tui.data import FleetData
from server.tui.screens import (
    AuditScreen,
    DeviceScreen,
    DriftScreen,
    Fleet,
    FleetScreen,
    HelpScreen,
    Host,
    ModelsScreen,
    RolloutsScreen,
)

__all__ = ["EdgeherdApp", "make_app", "make_remote_app"]

#: Seconds the remote TUI waits for one answer of the API before it says the refresh failed.
REMOTE_TIMEOUT = 20.0

CSS = """
.hidden { display: none; }
#summary, #chain, #rollout-head { height: 1; padding: 0 1; }
#fleet { height: 1fr; }
#rollouts { height: 12; }
#waves { height: auto; max-height: 8; padding: 0 1; }
.wave { height: 1; }
.wave Label { width: 24; }
#gates { height: 1fr; }
#models { width: 3fr; }
#card-pane { width: 2fr; border-left: solid $primary; }
Sparkline { height: 3; margin: 0 1; }
#history, #alerts { height: auto; max-height: 12; }
#device-head, #fingerprint, #features { padding: 0 1; height: auto; }
ModalScreen { align: center middle; }
.dialog { width: 72; height: auto; max-height: 90%; border: thick $primary; background: $surface; padding: 1 2; }
.dialog.wide { width: 96; }
.buttons { height: auto; align-horizontal: right; margin-top: 1; }
.buttons Button { margin-left: 2; }
.form { grid-size: 2; grid-columns: 14 1fr; grid-rows: 1; height: auto; grid-gutter: 1 1; margin-top: 1; }
#error { height: auto; }
"""


class EdgeherdApp(App[None]):
    TITLE = "edgeherd"
    CSS = CSS
    MODES: ClassVar[dict[str, type]] = {  # type: ignore[assignment]
        "fleet": FleetScreen, "rollouts": RolloutsScreen, "models": ModelsScreen, "drift": DriftScreen,
        "audit": AuditScreen,
    }
    DEFAULT_MODE = "fleet"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "switch_mode('fleet')", "Fleet"),
        Binding("r", "switch_mode('rollouts')", "Rollouts"),
        Binding("m", "switch_mode('models')", "Models"),
        Binding("d", "switch_mode('drift')", "Drift"),
        Binding("l", "switch_mode('audit')", "Audit log"),
        Binding("question_mark", "help", "Help"),
        Binding("escape", "go_back", "Back", show=False),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, data: Fleet, *, refresh_s: float = 2.0) -> None:
        super().__init__()
        self.data = data
        #: Seconds between refreshes of the screen shown; 0: only on entering it and after actions (tests).
        self.refresh_s = refresh_s

    def action_go_back(self) -> None:
        """Esc: out of a filter box back to the table, else back one screen."""
        if isinstance(self.focused, Input):
            target = self.screen.AUTO_FOCUS
            if target:
                self.screen.query_one(target).focus()
                return
        if len(self.screen_stack) > 1:
            self.pop_screen()

    def action_help(self) -> None:
        sections = [("Everywhere", [(b.key, b.description) for b in self._bindings_of(EdgeherdApp)])]
        for title, screen in (("Fleet", FleetScreen), ("Rollouts", RolloutsScreen), ("Models", ModelsScreen),
                              ("Audit", AuditScreen), ("Device", DeviceScreen)):
            sections.append((title, [(b.key, b.description) for b in self._bindings_of(screen)]))
        self.push_screen(HelpScreen(sections))

    @staticmethod
    def _bindings_of(cls: type) -> list[Binding]:
        names = {"question_mark": "?", "slash": "/", "escape": "Esc", "enter": "Enter"}
        return [Binding(names.get(b.key, b.key), b.action, b.description)
                for b in getattr(cls, "BINDINGS", []) if isinstance(b, Binding)]


if TYPE_CHECKING:
    _HOST: type[Host] = EdgeherdApp  # the screens' Host holds for the app: checked by mypy, not at run time


def make_app(data_dir: Path, actor: str, *, broker_url: str | None = None, refresh_s: float = 2.0) -> EdgeherdApp:
    registry = Registry(data_dir, broker_url=broker_url)
    return EdgeherdApp(FleetData(registry, Governance.load(data_dir, registry.engine), actor), refresh_s=refresh_s)


def make_remote_app(url: str, ca_pem: str, token: str, *, refresh_s: float = 2.0) -> EdgeherdApp:
    """The TUI through the operator API at ``url`` (its CA pinned), as the operator ``token`` belongs to.

    Asks the server who that is first: :class:`~server.tui.data.ActionError` when it cannot be reached or refuses
    the token (:class:`~server.api.client.LoginError` for a CA bundle that is not PEM)."""
    from server.tui.remote import RemoteFleetData

    return EdgeherdApp(RemoteFleetData(ApiClient(url, ca_pem, token, timeout=REMOTE_TIMEOUT)), refresh_s=refresh_s)
