"""Datasets: the built-in digits recipe, tables (CSV/Parquet, or a SQL query) with a declared schema, NPZ arrays.

Every loader returns a :class:`Dataset` of float32 inputs and integer class
labels (a schema with ``task = "regression"``: float64 target values), plus a
:class:`Schema` saying what valid data looks like, which
:mod:`toolchain.validate` checks before anything trains.

A table's ``sha256`` is the digest of its canonical rows (:mod:`toolchain._rows`),
not of the file's bytes, so the same rows read from CSV, Parquet or SQL give the
same digest.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from hardware.files import sha256_file
from protocol.tomlfile import read_toml
from toolchain._rows import cell_text, rows_sha256
from toolchain.dataset import (
    MAX_FILE_BYTES,
    MAX_ROWS,
    Dataset,
    FeatureSpec,
    Rules,
    Schema,
    check_columns,
    regression_targets,
)
from toolchain.errors import DataError

__all__ = ["MAX_FILE_BYTES", "MAX_ROWS", "Dataset", "FeatureSpec", "Rules", "Schema", "check_columns", "load_digits",
           "load_npz", "load_schema", "load_sql", "load_table", "regression_targets", "split_indices", "strata"]

def load_schema(path: Path) -> Schema:
    raw = read_toml(path, "schema file", DataError)
    try:
        return Schema.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DataError(f"schema {path}: {where}: {first['msg']}") from None


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"dataset {path} does not exist")
    if not path.is_file():
        raise DataError(f"dataset {path} is not a file")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"dataset {path} is empty")
    if size > MAX_FILE_BYTES:
        raise DataError(f"dataset {path} is {size} bytes; the limit is {MAX_FILE_BYTES}")


def _read_csv(path: Path) -> dict[str, list[str]]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                raise DataError(f"{path} has no header row")
            header = [h.strip() for h in header]
            cols: dict[str, list[str]] = {h: [] for h in header}
            for lineno, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(header):
                    raise DataError(f"{path} line {lineno}: {len(row)} fields, the header has {len(header)}")
                for h, v in zip(header, row, strict=True):
                    cols[h].append(v.strip())
                if lineno > MAX_ROWS:
                    raise DataError(f"{path} has more than {MAX_ROWS} rows")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}); is it really a CSV file?") from None
    except csv.Error as exc:
        raise DataError(f"{path} is not valid CSV: {exc}") from None
    return cols


def _read_parquet(path: Path) -> dict[str, list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'edgeherd[toolchain]'") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{path} is not a readable Parquet file: {exc}") from None
    if table.num_rows > MAX_ROWS:
        raise DataError(f"{path} has {table.num_rows} rows; the limit is {MAX_ROWS}")
    # typed cells as CSV-like text (a DOUBLE label 1.0 is class "1", as from SQL): toolchain._rows.cell_text
    return {name: [cell_text(v) for v in table.column(name).to_pylist()] for name in table.column_names}


def _to_float(path: Path, spec: FeatureSpec, values: list[str]) -> np.ndarray:
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        if v == "" or v.lower() in ("nan", "na", "null", "none"):
            out[i] = math.nan
            continue
        try:
            out[i] = float(v)
        except ValueError:
            raise DataError(
                f"{path}: column {spec.name!r} row {i + 1}: {v[:40]!r} is not a number (declared {spec.dtype})"
            ) from None
        if spec.dtype == "int" and math.isfinite(out[i]) and out[i] != int(out[i]):
            raise DataError(f"{path}: column {spec.name!r} row {i + 1}: {v!r} is not an integer")
    return out


def load_table(path: Path, schema: Schema, *, name: str | None = None) -> Dataset:
    """Load a CSV or Parquet file described by ``schema``.

    The dataset's ``sha256`` is the canonical row digest (:mod:`toolchain._rows`), not the file's sha256.
    """
    _check_file(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        cols = _read_csv(path)
    elif suffix in (".parquet", ".pq"):
        cols = _read_parquet(path)
    else:
        raise DataError(f"{path}: unknown table format {suffix!r}; use .csv or .parquet")
    check_columns(str(path), list(cols), schema)
    n = len(cols[schema.label])
    if n == 0:
        raise DataError(f"{path} has a header but no rows")
    x = np.stack([_to_float(path, f, cols[f.name]) for f in schema.features], axis=1)
    labels = cols[schema.label]
    segments = {c: np.array(cols[c], dtype=str) for c in schema.segments}
    if schema.task == "regression":  # digest of the numbers, as a typed column gives them: CSV, Parquet, SQL agree
        y = regression_targets(str(path), schema.label, labels)
        return Dataset(name=name or path.stem, kind="tabular", x=x.astype(np.float32), y=y, classes=[],
                       schema=schema, sha256=rows_sha256([cell_text(float(v)) for v in y], x,
                                                         [cols[c] for c in schema.segments]),
                       source=str(path), segments=segments)
    if any(v == "" for v in labels):
        raise DataError(f"{path}: label column {schema.label!r} has empty values (row {labels.index('') + 1})")
    classes = schema.classes if schema.classes is not None else sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise DataError(f"{path}: labels {unknown[:5]} are not among the declared classes {classes}")
    y = np.array([index[v] for v in labels], dtype=np.int64)
    return Dataset(name=name or path.stem, kind="tabular", x=x.astype(np.float32), y=y, classes=classes,
                   schema=schema, sha256=rows_sha256(labels, x, [cols[c] for c in schema.segments]), source=str(path),
                   segments=segments)


def load_sql(url: str, query: str, schema: Schema, *, name: str | None = None, chunk_rows: int | None = None,
             on_rows: Callable[[int], None] | None = None) -> Dataset:
    """Run a read-only ``query`` on the SQLAlchemy database ``url`` and read its rows as ``schema`` describes.

    One SELECT (or WITH, VALUES, TABLE) statement, run in a transaction that is
    rolled back; give it an ``ORDER BY`` so a rebuild sees the rows, and so the
    splits, in the same order. Rows are streamed ``chunk_rows`` at a time into
    numeric arrays; ``on_rows(n)`` is called after each chunk. ``sha256`` is the
    canonical row digest (equal to :func:`load_table`'s for the same rows) and
    ``source`` names the database without its password plus the sha256 of the
    query. Details in :mod:`toolchain._sql`.
    """
    try:
        from toolchain._sql import load_sql as _load_sql
    except ModuleNotFoundError as exc:
        if exc.name != "sqlalchemy" and not (exc.name or "").startswith("sqlalchemy."):
            raise
        raise DataError("reading a dataset from SQL needs SQLAlchemy: pip install 'edgeherd[server]'") from None
    ds = _load_sql(url, query, schema, name=name, chunk_rows=chunk_rows, on_rows=on_rows)
    if schema.task == "regression":  # the rows' label texts were coded as classes: read them back as numbers
        texts = np.asarray(ds.classes, dtype=object)[ds.y] if len(ds.y) else np.empty(0, dtype=object)
        ds.y, ds.classes = regression_targets(ds.source, schema.label, [str(t) for t in texts]), []
    return ds


def load_npz(path: Path, *, name: str | None = None, value_range: tuple[float, float] | None = None) -> Dataset:
    """Load arrays ``x`` (n, ...) and ``y`` (n,) from an ``.npz`` file."""
    _check_file(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise DataError(f"{path} must hold arrays 'x' and 'y' (it has {sorted(data.files)})")
            x, y = data["x"], data["y"]
    except (ValueError, OSError) as exc:
        raise DataError(f"{path} is not a readable .npz file: {exc}") from None
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise DataError(f"{path}: need x shaped (n, ...) and y shaped (n,), got {x.shape} and {y.shape}")
    if x.dtype.kind not in "fiu" or y.dtype.kind not in "iu":
        raise DataError(f"{path}: x must be numeric and y integer class ids, got {x.dtype} and {y.dtype}")
    n_features = int(np.prod(x.shape[1:]))
    lo, hi = value_range if value_range is not None else (None, None)
    specs = [FeatureSpec(name=f"x{i}", min=lo, max=hi) for i in range(min(n_features, 1024))]
    schema = Schema(label="y", features=specs)
    classes = [str(i) for i in range(int(y.max()) + 1)] if len(y) else []
    return Dataset(name=name or path.stem, kind="image" if x.ndim == 4 else "tabular", x=x.astype(np.float32),
                   y=y.astype(np.int64), classes=classes, schema=schema, sha256=sha256_file(path), source=str(path))


def load_digits() -> Dataset:
    """scikit-learn's bundled 8×8 digits (1797 images, values 0–16): no download."""
    from sklearn.datasets import load_digits as sk_digits

    raw = sk_digits()
    x = raw.data.astype(np.float32).reshape(-1, 1, 8, 8)
    y = raw.target.astype(np.int64)
    schema = Schema(label="digit", features=[FeatureSpec(name=f"px{i}", min=0.0, max=16.0) for i in range(64)],
                    classes=[str(i) for i in range(10)])
    digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()
    return Dataset(name="digits", kind="image", x=x, y=y, classes=[str(i) for i in range(10)], schema=schema,
                   sha256=digest, source="sklearn.datasets.load_digits")


SPLITS = ("train", "calibration", "validation", "test")


def strata(ds: Dataset, bins: int = 10) -> np.ndarray:
    """What the splits are stratified on: the class ids, or for regression the target's quantile bin (so every
    split spans the target's range)."""
    if ds.task != "regression":
        return ds.y
    edges = np.quantile(ds.y, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, ds.y, side="right").astype(np.int64)


def split_indices(y: np.ndarray, seed: int, fractions: tuple[float, float, float, float] = (0.6, 0.1, 0.1, 0.2)
                  ) -> dict[str, np.ndarray]:
    """Stratified, seeded split into train / calibration / validation / test index arrays."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    bounds = np.cumsum(fractions)
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        rng.shuffle(idx)
        cuts = np.round(bounds[:-1] * len(idx)).astype(int)
        for name, chunk in zip(SPLITS, np.split(idx, cuts), strict=True):
            parts[name].append(chunk)
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}
