"""The Fleet table: a line-API widget that draws only the rows on screen, from the page of the fleet it was
given (server/tui/data.py ``FleetPage``), however many devices match.

It knows how many rows there are (``row_count``, the scrollbar's length) and holds the rows of one page, by
position; a row it does not hold yet is drawn as a placeholder, and :class:`FleetTable.Wanted` asks the screen for
the page around what is on screen. A new page repaints only the lines whose row changed.

Keys and mouse as in Textual's DataTable: up/down/page up/page down/home/end move the cursor, Enter or a click on a
row selects it (:class:`FleetTable.Selected`), a click on a header asks to sort on that column
(:class:`FleetTable.HeaderSelected`).
"""

from __future__ import annotations

from typing import ClassVar

from rich.cells import cell_len, set_cell_size
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from server.tui.data import DeviceRow, FleetPage
from server.tui.render import FLEET_COLUMNS, FLEET_WIDTHS, HEALTH_STYLE, fleet_cells

__all__ = ["FleetTable"]

#: Blank columns either side of a cell, as DataTable's default cell padding.
PAD = 1
#: Rows drawn per strip cache entry kept (a few screens' worth).
CACHE = 512


class FleetTable(ScrollView, can_focus=True):
    """A header line, then one line per device: the ``row_count`` matched devices, of which it holds a page."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {"fleet-table--header", "fleet-table--cursor", "fleet-table--even-row",
                                             "fleet-table--odd-row", "fleet-table--loading"}

    DEFAULT_CSS = """
    FleetTable {
        background: $surface;
        color: $foreground;
        height: 1fr;
        &:focus {
            background-tint: $foreground 5%;
            & > .fleet-table--cursor {
                background: $block-cursor-background;
                color: $block-cursor-foreground;
                text-style: $block-cursor-text-style;
            }
            & > .fleet-table--header {
                background-tint: $foreground 5%;
            }
        }
        &:dark > .fleet-table--even-row {
            background: $surface-darken-1 40%;
        }
        & > .fleet-table--header {
            text-style: bold;
            background: $panel;
            color: $foreground;
        }
        & > .fleet-table--even-row {
            background: $surface-lighten-1 50%;
        }
        & > .fleet-table--cursor {
            background: $block-cursor-blurred-background;
            color: $block-cursor-blurred-foreground;
            text-style: $block-cursor-blurred-text-style;
        }
        & > .fleet-table--loading {
            color: $text-muted;
        }
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "select", "Select", show=False),
        Binding("up", "cursor(-1)", "Cursor up", show=False),
        Binding("down", "cursor(1)", "Cursor down", show=False),
        Binding("pageup", "page(-1)", "Page up", show=False),
        Binding("pagedown", "page(1)", "Page down", show=False),
        Binding("home,ctrl+home", "first", "Top", show=False),
        Binding("end,ctrl+end", "last", "Bottom", show=False),
    ]

    class _Message(Message):
        def __init__(self, table: FleetTable) -> None:
            super().__init__()
            self.table = table

        @property
        def control(self) -> FleetTable:
            return self.table

    class Selected(_Message):
        """A device's row was chosen (Enter, or a click on it)."""

        def __init__(self, table: FleetTable, key: str) -> None:
            super().__init__(table)
            self.key = key

    class HeaderSelected(_Message):
        """A column's header was clicked: sort on it."""

        def __init__(self, table: FleetTable, column_key: str) -> None:
            super().__init__(table)
            self.column_key = column_key

    class Wanted(_Message):
        """Rows on screen are not held: fetch the page around them."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.row_count = 0
        self.cursor_row = 0
        #: Position among the matched devices → its row, for the page held.
        self.held: dict[int, DeviceRow] = {}
        self._positions: dict[str, int] = {}
        self._strips: dict[tuple[DeviceRow, Style], Strip] = {}
        self._edges: list[tuple[int, int, str]] = []  # x from, x to, column key
        x = 0
        for key, _, _ in FLEET_COLUMNS:
            width = FLEET_WIDTHS[key] + 2 * PAD
            self._edges.append((x, x + width, key))
            x += width
        self._width = x
        self.virtual_size = Size(self._width, 1)

    # -- what it holds ----------------------------------------------------------------------------

    @property
    def cursor_key(self) -> str | None:
        """The device under the cursor, when its row is held."""
        row = self.held.get(self.cursor_row)
        return row.id if row is not None else None

    @property
    def body_height(self) -> int:
        """Lines for rows: the height less the header."""
        return max(self.scrollable_content_region.height - 1, 1)

    @property
    def top(self) -> int:
        """Position of the first row on screen."""
        return round(self.scroll_y)

    def window(self) -> tuple[int, int]:
        """The page to fetch for what is on screen: (offset, limit), a screen's worth above and below it."""
        height = max(self.body_height, 20)
        return max(self.top - height, 0), 3 * height

    def row_keys(self) -> list[str]:
        """The held rows' devices, in table order."""
        return [self.held[i].id for i in sorted(self.held)]

    def missing(self) -> bool:
        """Whether a row on screen is not held."""
        return any(i not in self.held for i in range(self.top, min(self.top + self.body_height, self.row_count)))

    def show(self, page: FleetPage, *, follow: bool = False) -> None:
        """Hold ``page``; repaint the lines whose row changed. The cursor stays on its device where the page
        holds it; ``follow``: scroll to it as well (after a sort or a new filter)."""
        key = self.cursor_key
        held = {page.offset + i: r for i, r in enumerate(page.rows)}
        changed = [i for i in set(held) | set(self.held) if held.get(i) != self.held.get(i)]
        self.held, self._positions = held, {r.id: i for i, r in held.items()}
        if page.matched != self.row_count:
            self.row_count = page.matched
            self.virtual_size = Size(self._width, self.row_count + 1)
            self.refresh()
        else:
            for i in changed:
                self._refresh_row(i)
        if page.focus is not None:
            self._set_cursor(page.focus, scroll=follow or self._on_screen(self.cursor_row))
        elif key is not None and key in self._positions:
            self._set_cursor(self._positions[key], scroll=False)
        else:
            self._set_cursor(self.cursor_row, scroll=False)

    # -- cursor and scrolling ---------------------------------------------------------------------

    def _on_screen(self, position: int) -> bool:
        return self.top <= position < self.top + self.body_height

    def _refresh_row(self, position: int) -> None:
        if self._on_screen(position):
            self.refresh_lines(position + 1)  # line 0 of the content is the header

    def _set_cursor(self, position: int, *, scroll: bool) -> None:
        position = max(0, min(position, self.row_count - 1))
        if position != self.cursor_row:
            self._refresh_row(self.cursor_row)
            self.cursor_row = position
            self._refresh_row(position)
        if scroll and not self._on_screen(position):
            top = position if position < self.top else position - self.body_height + 1
            self.scroll_to(y=top, animate=False, immediate=True)

    def move_cursor(self, *, row: int) -> None:
        """Put the cursor on row ``row`` (a position among the matched devices) and scroll to it."""
        self._set_cursor(row, scroll=True)

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        if self.missing():
            self.post_message(self.Wanted(self))

    def on_resize(self) -> None:
        if self.missing():
            self.post_message(self.Wanted(self))

    def action_cursor(self, step: int) -> None:
        self.move_cursor(row=self.cursor_row + step)

    def action_page(self, step: int) -> None:
        self.move_cursor(row=self.cursor_row + step * self.body_height)

    def action_first(self) -> None:
        self.move_cursor(row=0)

    def action_last(self) -> None:
        self.move_cursor(row=self.row_count - 1)

    def action_select(self) -> None:
        if self.cursor_key is not None:
            self.post_message(self.Selected(self, self.cursor_key))

    async def _on_click(self, event: events.Click) -> None:
        x = event.x + round(self.scroll_x)
        if event.y == 0:
            column = next((key for start, end, key in self._edges if start <= x < end), None)
            if column is not None:
                self.post_message(self.HeaderSelected(self, column))
            return
        position = self.top + event.y - 1
        if position < self.row_count:
            self._set_cursor(position, scroll=True)
            self.action_select()

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    # -- drawing ----------------------------------------------------------------------------------

    def render_line(self, y: int) -> Strip:
        base = self.rich_style
        if y == 0:
            strip = self._header(base + self.get_component_rich_style("fleet-table--header"))
        else:
            position = self.top + y - 1
            if position >= self.row_count:
                return Strip.blank(self.size.width, base)
            zebra = "fleet-table--even-row" if position % 2 == 0 else "fleet-table--odd-row"
            style = base + self.get_component_rich_style(zebra)
            cursor = self.get_component_rich_style("fleet-table--cursor") if position == self.cursor_row else None
            row = self.held.get(position)
            if row is None:
                loading = style + self.get_component_rich_style("fleet-table--loading")
                strip = Strip([Segment(set_cell_size(" " * PAD + "…", self._width), loading + (cursor or Style()))])
            else:
                strip = self._row(row, style, cursor)
        scroll_x = round(self.scroll_x)
        return strip.crop(scroll_x, scroll_x + self.size.width).extend_cell_length(self.size.width, base)

    def _header(self, style: Style) -> Strip:
        cells = [" " * PAD + set_cell_size(label, FLEET_WIDTHS[key]) + " " * PAD for key, label, _ in FLEET_COLUMNS]
        return Strip([Segment("".join(cells), style)], self._width)

    def _row(self, row: DeviceRow, style: Style, cursor: Style | None) -> Strip:
        style = style + Style.parse(HEALTH_STYLE[row.health]) + (cursor or Style())
        cached = self._strips.get((row, style))
        if cached is not None:
            return cached
        parts = []
        for (key, _, _), cell in zip(FLEET_COLUMNS, fleet_cells(row), strict=True):
            width, text = FLEET_WIDTHS[key], cell.plain
            if cell_len(text) > width:
                text = set_cell_size(text, width - 1) + "…"
            pad = " " * (width - cell_len(text))
            parts.append(" " * PAD + (pad + text if cell.justify == "right" else text + pad) + " " * PAD)
        strip = Strip([Segment("".join(parts), style)], self._width)
        if len(self._strips) >= CACHE:
            self._strips.clear()
        self._strips[(row, style)] = strip
        return strip
