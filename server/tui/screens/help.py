"""Help: every key, by screen, in a dialog."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

from server.tui.render import help_markdown

__all__ = ["HelpScreen"]


class HelpScreen(ModalScreen[None]):
    """The keys of each screen (``sections``: title, then key and what it does), closed with Esc or ``?``."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "app.pop_screen", "Back"),
                                             Binding("question_mark", "app.pop_screen", "Back")]

    def __init__(self, sections: Iterable[tuple[str, list[tuple[str, str]]]]) -> None:
        super().__init__()
        self.sections = list(sections)

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="dialog wide"):
            yield Markdown(help_markdown(self.sections))
