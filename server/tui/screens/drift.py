"""Drift: fleet-wide drift per version and feature, worst first, with the selected one over time."""

from __future__ import annotations

from typing import NamedTuple

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.widgets import DataTable, Footer, Header, Label, Sparkline

from server.features import FeatureDriftRow
from server.tui.data import DriftRow
from server.tui.render import drift_cells, drift_series_label, feature_drift_cells
from server.tui.screens.loading import Loading, plot

__all__ = ["DriftScreen", "DriftView"]


class DriftView(NamedTuple):
    """What the drift screen shows: every (version, feature), the selected one, its series, the feature across
    the model versions that consume it."""

    rows: list[DriftRow]
    key: tuple[str, str] | None
    series: list[float]
    across: list[FeatureDriftRow]


class DriftScreen(Loading[DriftView]):
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

    def load(self) -> DriftView:
        rows = self.data.drift()
        key = self.selected or ((rows[0].version, rows[0].feature) if rows else None)
        series = self.data.drift_series(*key) if key else []
        return DriftView(rows, key, series, self.data.feature_drift(key[1]) if key else [])

    def show(self, result: DriftView) -> None:
        rows, key, series, across = result
        versions = self.query_one("#versions", DataTable)
        versions.clear()
        for f in across:
            versions.add_row(*feature_drift_cells(f))
        label = self.query_one("#versions-label", Label)
        label.update(f"registry feature {key[1]} across the model versions that consume it (last 24 h)" if key
                     else "")
        label.display = versions.display = bool(across)
        table = self.query_one("#drift", DataTable)
        cursor = self.selected_key(table)
        table.clear()
        for r in rows:
            table.add_row(*drift_cells(r), key=f"{r.version}|{r.feature}")
        if cursor is not None and cursor in {f"{r.version}|{r.feature}" for r in rows}:
            table.move_cursor(row=table.get_row_index(cursor))
        self.selected = key
        self.query_one("#series-label", Label).update(drift_series_label(key, len(series)))
        plot(self.query_one("#series", Sparkline), series)

    @on(DataTable.RowHighlighted, "#drift")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value is None:
            return
        version, _, feature = str(event.row_key.value).partition("|")
        if (version, feature) != self.selected:
            self.selected = (version, feature)
            self.refresh_data()
