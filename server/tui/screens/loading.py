"""The base of every live screen: load off the event loop, then show, and act the same way.

A :class:`Loading` screen says what it fetches (:meth:`Loading.load`, in a thread worker) and how it shows it
(:meth:`Loading.show`, on the event loop); the base drops a refresh while the previous one still runs, while a
dialog is open or while the screen is not shown, and fetches once more when an action finished during a fetch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar, cast

from textual import work
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Sparkline

from server.governance import Permission
from server.tui.data import ActionError
from server.tui.render import plot_values
from server.tui.screens.host import Fleet, Host

__all__ = ["Loading", "plot"]

T = TypeVar("T")


def plot(spark: Sparkline, values: Sequence[float]) -> None:
    """Show ``values`` in ``spark``, or hide it when there are none."""
    spark.display = bool(values)
    spark.data = plot_values(values)


class Loading(Screen[None], Generic[T]):
    """Shared behaviour: the host's data, refreshing in a worker, actions in a worker, errors as notices.

    ``T`` is what :meth:`load` returns and :meth:`show` puts on screen."""

    def __init__(self) -> None:
        super().__init__()
        self._busy = False
        #: A refresh was asked for after an action while another ran: fetch once more when that one is done.
        self._again = False
        self.refreshes = 0

    @property
    def host(self) -> Host:
        return cast("Host", self.app)

    @property
    def data(self) -> Fleet:
        return self.host.data

    def on_mount(self) -> None:
        self.sub_title = f"{self.data.actor} ({self.data.role()})"
        self.refresh_data()
        if self.host.refresh_s > 0:
            self.set_interval(self.host.refresh_s, self.refresh_data)

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
        result: T | None
        try:
            result = self.load()
        except Exception as exc:  # shown to the operator; the screen keeps going
            self.app.call_from_thread(self.notify, f"refresh failed: {exc}", severity="error")
            result = None
        self.app.call_from_thread(self._done, result)

    def _done(self, result: T | None) -> None:
        self._busy = False
        if result is not None:
            self.show(result)
            self.refreshes += 1
        if self._again:
            self._again = False
            self.refresh_data()

    def load(self) -> T:
        """Runs in a thread: fetch what the screen shows."""
        raise NotImplementedError

    def show(self, result: T) -> None:
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
