"""The device screen's modals: the agent's recent log lines, a log level to pick, and the device's groups and tags.

Log lines come from the device: they arrive here with control characters already escaped
(:func:`server.diagnostics.format_line`) and are shown as plain text, never as markup.
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from server.diagnostics import LOG_LEVELS

__all__ = ["GroupsModal", "LevelModal", "LogsModal", "split_names"]


class LogsModal(ModalScreen[None]):
    """A device's newest log lines in a scrollable pane (newest at the bottom, scrolled there)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]
    DEFAULT_CSS = """
    LogsModal #log-pane { height: 1fr; max-height: 40; border: round $primary; }
    LogsModal .dialog { width: 95%; height: 90%; }
    """

    def __init__(self, device_id: str, lines: list[str]) -> None:
        super().__init__()
        self.device_id, self.lines = device_id, lines

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(f"{self.device_id}: the newest {len(self.lines)} log lines (Esc closes)"))
            with VerticalScroll(id="log-pane"):
                yield Static(Text("\n".join(self.lines) or "(no lines)"), id="log-text")
            with Horizontal(classes="buttons"):
                yield Button("Close", id="close")

    def on_mount(self) -> None:
        pane = self.query_one("#log-pane", VerticalScroll)
        pane.focus()
        pane.scroll_end(animate=False)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(None)

    def action_close(self) -> None:
        self.dismiss(None)


class LevelModal(ModalScreen[str | None]):
    """Pick the log level the device's agent records from."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, device_id: str) -> None:
        super().__init__()
        self.device_id = device_id

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(f"Log level of {self.device_id}'s agent?"))
            yield Select([(level, level) for level in LOG_LEVELS], id="level", prompt="level")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Set", id="confirm", variant="primary")

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        value = self.query_one("#level", Select).value
        self.dismiss(str(value) if event.button.id == "confirm" and isinstance(value, str) else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


def split_names(text: str) -> list[str]:
    """Comma- or space-separated names, blanks dropped (the server checks each: server/groups.py)."""
    return [name for name in text.replace(",", " ").split() if name]


class GroupsModal(ModalScreen[tuple[list[str], list[str]] | None]):
    """Edit a device's groups and tags (comma-separated); the device then converges to its groups' release."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, device_id: str, groups: str, tags: str) -> None:
        super().__init__()
        self.device_id, self.groups, self.tags = device_id, groups, tags

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(Text(f"Groups and tags of {self.device_id} (comma-separated; empty: none). It moves to "
                              "the release of its groups."))
            yield Label("groups")
            yield Input(self.groups, placeholder="e.g. line-1, eu-west", id="groups")
            yield Label("tags")
            yield Input(self.tags, placeholder="e.g. camera, pilot", id="tags")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Save", id="confirm", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#groups", Input).focus()

    def _result(self) -> tuple[list[str], list[str]]:
        return (split_names(self.query_one("#groups", Input).value),
                split_names(self.query_one("#tags", Input).value))

    @on(Input.Submitted)
    def _submitted(self, event: Input.Submitted) -> None:
        self.dismiss(self._result())

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self._result() if event.button.id == "confirm" else None)

    def action_cancel(self) -> None:
        self.dismiss(None)
