"""The dataset types every loader returns (a leaf: file, SQL and image-folder loaders all import it, and it imports
none of them): the schema a table declares, the loaded :class:`Dataset`, and the checks a loader applies to what
it read."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from toolchain.errors import DataError

__all__ = ["MAX_FILE_BYTES", "MAX_ROWS", "Dataset", "FeatureSpec", "Rules", "Schema", "check_columns",
           "regression_targets"]

MAX_ROWS = 5_000_000
MAX_FILE_BYTES = 2 * 1024**3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    dtype: Literal["float", "int"] = "float"
    min: float | None = None
    max: float | None = None
    description: str = ""

    @model_validator(mode="after")
    def _range(self) -> FeatureSpec:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"feature {self.name}: min {self.min} is above max {self.max}")
        return self


class Rules(_Strict):
    """Validation thresholds; anything beyond a ``max_*`` is fatal."""

    max_nan_fraction: float = Field(0.0, ge=0, le=1)
    max_out_of_range_fraction: float = Field(0.01, ge=0, le=1)
    min_class_fraction: float = Field(0.01, ge=0, le=1)
    max_duplicate_fraction: float = Field(0.5, ge=0, le=1)
    max_leakage_fraction: float = Field(0.01, ge=0, le=1)


class Schema(_Strict):
    label: str
    #: ``classification`` (the label names a class) or ``regression`` (the label is a number, the target the model
    #: predicts in its own units; no ``classes``).
    task: Literal["classification", "regression"] = "classification"
    features: list[FeatureSpec] = Field(min_length=1, max_length=1024)
    classes: list[str] | None = None
    #: Columns that are not model inputs (site, device batch, season): read as strings and used only to
    #: report accuracy per value (slices) and for ``--min-slice-metric``.
    segments: list[str] = Field(default_factory=list, max_length=32)
    #: Registry features the model consumes instead of the raw ``features`` columns (``name`` or
    #: ``name@version``; definitions from ``--features``): computed in the model's graph (toolchain/features.py).
    registry_features: list[str] = Field(default_factory=list, max_length=256)
    rules: Rules = Rules()

    @model_validator(mode="after")
    def _unique(self) -> Schema:
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        if self.task == "regression" and self.classes is not None:
            raise ValueError("a regression schema has no classes: its label is a number (remove `classes`, or set "
                             "task = \"classification\")")
        if self.label in names:
            raise ValueError(f"label column {self.label!r} is also listed as a feature")
        if len(set(self.segments)) != len(self.segments):
            raise ValueError("segment column names must be unique")
        for seg in self.segments:
            if not seg.strip():
                raise ValueError("a segment column name is empty")
            if seg == self.label:
                raise ValueError(f"segment column {seg!r} is the label column; a segment must not be the label")
            if seg in names:
                raise ValueError(f"segment column {seg!r} is also listed as a feature; a segment is not a model "
                                 "input")
        return self


@dataclass
class Dataset:
    name: str
    kind: Literal["image", "tabular"]
    x: np.ndarray  # float32, (n, *input_shape)
    y: np.ndarray  # int64 class ids, (n,); float64 target values for regression
    classes: list[str]  # empty for regression
    schema: Schema
    sha256: str
    source: str
    extra: dict[str, str] = field(default_factory=dict)
    #: segment column -> str array aligned with rows (``x[i]``, ``y[i]``, ``segments[c][i]``); see Schema.segments.
    #: Index them with the same row indices as ``x`` and ``y`` (see :meth:`take`).
    segments: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for column, values in self.segments.items():
            if len(values) != len(self.x):
                raise DataError(f"segment column {column!r} has {len(values)} values for {len(self.x)} rows")

    def take(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """``(x, y, segments)`` of the given row indices, kept aligned."""
        return self.x[rows], self.y[rows], {c: v[rows] for c, v in self.segments.items()}

    @property
    def task(self) -> Literal["classification", "regression"]:
        return self.schema.task

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def table(self) -> np.ndarray:
        """Inputs flattened to (n, features) for row-wise validation."""
        return self.x.reshape(len(self.x), -1)


def check_columns(what: str, columns: list[str], schema: Schema) -> None:
    """DataError naming what ``what`` (a file, a query) lacks of the columns the schema declares."""
    missing = [c for c in [schema.label, *(f.name for f in schema.features)] if c not in columns]
    if missing:
        raise DataError(f"{what} lacks the column(s) {', '.join(missing)} declared in the schema "
                        f"(it has: {', '.join(columns[:20])})")
    missing = [c for c in schema.segments if c not in columns]
    if missing:
        raise DataError(f"{what} lacks the segment column(s) {', '.join(missing)} declared in the schema's "
                        f"segments (it has: {', '.join(columns[:20])})")


def regression_targets(where: str, column: str, labels: list[str]) -> np.ndarray:
    """A regression label column as float64 values; DataError naming the first row that is not a finite number
    (a missing, NaN or infinite target cannot be trained on or scored)."""
    out = np.empty(len(labels), dtype=np.float64)
    for i, v in enumerate(labels):
        try:
            out[i] = float(v) if v != "" else math.nan
        except ValueError:
            raise DataError(f"{where}: label column {column!r} row {i + 1}: {v[:40]!r} is not a number; a "
                            "regression target must be numeric") from None
        if not math.isfinite(out[i]):
            bad = int((~np.isfinite([_num(t) for t in labels])).sum())
            raise DataError(f"{where}: label column {column!r} has {bad} missing, NaN or infinite value(s) (first "
                            f"at row {i + 1}: {v[:40]!r}); a regression target must be a finite number in every "
                            "row: drop or fill those rows")
    return out


def _num(v: str) -> float:
    try:
        return float(v) if v != "" else math.nan
    except ValueError:
        return math.nan
