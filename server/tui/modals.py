"""Dialogs: confirmations that name their target, a typed confirmation, a reason, the rollout form."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import ValidationError
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Grid, Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static

from server.rollouts import Gates, RolloutSpec

__all__ = ["ConfirmModal", "ReasonModal", "RolloutForm", "RolloutRequest", "TypedConfirmModal", "VersionModal"]


class ConfirmModal(ModalScreen[bool]):
    """Yes or no, naming exactly what will happen to what; focus starts on Cancel."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, action: str = "Confirm") -> None:
        super().__init__()
        self.question, self.action_label = question, action

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, id="question")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button(self.action_label, id="confirm", variant="error")

    def on_mount(self) -> None:
        self.query_one("#cancel", Button).focus()

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm")

    def action_cancel(self) -> None:
        self.dismiss(False)


class TypedConfirmModal(ModalScreen[bool]):
    """For what touches a whole fleet: type the name to go on."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, name: str, action: str = "Confirm") -> None:
        super().__init__()
        self.question, self.expected, self.action_label = question, name, action

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, id="question")
            yield Label(f"Type [b]{self.expected}[/b] to confirm:")
            yield Input(placeholder=self.expected, id="typed")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button(self.action_label, id="confirm", variant="error", disabled=True)

    def on_mount(self) -> None:
        self.query_one("#typed", Input).focus()

    @on(Input.Changed, "#typed")
    def _typed(self, event: Input.Changed) -> None:
        self.query_one("#confirm", Button).disabled = event.value != self.expected

    @on(Input.Submitted, "#typed")
    def _submitted(self, event: Input.Submitted) -> None:
        if event.value == self.expected:
            self.dismiss(True)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "confirm" and self.query_one("#typed", Input).value == self.expected)

    def action_cancel(self) -> None:
        self.dismiss(False)


class ReasonModal(ModalScreen[str | None]):
    """A decision that must say why (approvals, rejections, pauses)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, action: str) -> None:
        super().__init__()
        self.question, self.action_label = question, action

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question)
            yield Input(placeholder="reason (required)", id="reason")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button(self.action_label, id="confirm", variant="primary", disabled=True)

    def on_mount(self) -> None:
        self.query_one("#reason", Input).focus()

    @on(Input.Changed, "#reason")
    def _typed(self, event: Input.Changed) -> None:
        self.query_one("#confirm", Button).disabled = not event.value.strip()

    @on(Input.Submitted, "#reason")
    def _submitted(self, event: Input.Submitted) -> None:
        if event.value.strip():
            self.dismiss(event.value.strip())

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        reason = self.query_one("#reason", Input).value.strip()
        self.dismiss(reason if event.button.id == "confirm" and reason else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class VersionModal(ModalScreen[str | None]):
    """Pick a model version (to deploy to one device)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, versions: list[str]) -> None:
        super().__init__()
        self.question, self.versions = question, versions

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question)
            yield Select([(v, v) for v in self.versions], id="version", prompt="version")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Deploy", id="confirm", variant="primary")

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        value = self.query_one("#version", Select).value
        self.dismiss(str(value) if event.button.id == "confirm" and isinstance(value, str) else None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class RolloutRequest:
    """What the form produced, validated."""

    def __init__(self, name: str, model: str, target: dict[str, list[str]], spec: RolloutSpec) -> None:
        self.name, self.model, self.target, self.spec = name, model, target, spec


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


class RolloutForm(ModalScreen[RolloutRequest | None]):
    """Start a rollout: version, target, strategy, waves, soak."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, versions: list[str]) -> None:
        super().__init__()
        self.versions = versions

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog wide"):
            yield Static("[b]New rollout[/b]")
            with Grid(classes="form"):
                yield Label("name")
                yield Input(placeholder="e.g. digits-1-1", id="name", compact=True)
                yield Label("version")
                yield Select([(v, v) for v in self.versions], id="model", prompt="model:version", compact=True)
                yield Label("groups")
                yield Input(placeholder="comma-separated", id="groups", compact=True)
                yield Label("tags")
                yield Input(placeholder="comma-separated", id="tags", compact=True)
                yield Label("devices")
                yield Input(placeholder="comma-separated", id="devices", compact=True)
                yield Label("strategy")
                yield Select([("canary", "canary"), ("all-at-once", "all-at-once")], id="strategy",
                             value="canary", allow_blank=False, compact=True)
                yield Label("waves")
                yield Input(value="1,10%,50%,100%", id="waves", compact=True)
                yield Label("soak (s)")
                yield Input(value="300", id="soak", compact=True)
                yield Label("on failure")
                yield Select([("rollback", "rollback"), ("pause", "pause")], id="on_failure", value="rollback",
                             allow_blank=False, compact=True)
            yield Label("", id="error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Start", id="confirm", variant="primary")

    def on_mount(self) -> None:
        self.query_one("#name", Input).focus()

    def _value(self, widget_id: str) -> str:
        widget: Any = self.query_one(f"#{widget_id}")
        value = widget.value
        return value if isinstance(value, str) else ""

    def _request(self) -> RolloutRequest:
        try:
            soak = float(self._value("soak"))
        except ValueError:
            raise ValueError("soak: a number of seconds") from None
        spec = RolloutSpec(strategy=self._value("strategy"), waves=tuple(_split(self._value("waves"))),
                           soak_s=soak, on_failure=self._value("on_failure"), gates=Gates())
        model = self._value("model")
        if not model:
            raise ValueError("choose a version")
        name = self._value("name").strip()
        if not name:
            raise ValueError("give the rollout a name")
        target = {"groups": _split(self._value("groups")), "tags": _split(self._value("tags")),
                  "devices": _split(self._value("devices"))}
        if not any(target.values()):
            raise ValueError("give a target: groups, tags or devices")
        return RolloutRequest(name, model, target, spec)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        if event.button.id != "confirm":
            self.dismiss(None)
            return
        try:
            self.dismiss(self._request())
        except ValidationError as exc:
            self.query_one("#error", Label).update(
                "[red]" + "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()))
        except ValueError as exc:
            self.query_one("#error", Label).update(f"[red]{exc}")

    def action_cancel(self) -> None:
        self.dismiss(None)
