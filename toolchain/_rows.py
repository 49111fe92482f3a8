"""Canonical rows of a table: typed cells as text, numeric columns, labels and the dataset digest.

A dataset's ``sha256`` (lineage ``dataset_sha256``) is computed over the rows
read, not over a file's bytes, so the same rows give the same digest whether
they came from a CSV file, a Parquet file or a SQL query. The encoding,
versioned here so anyone can recompute it:

* one line per row, in the order read: the schema's declared columns in schema
  order, i.e. the label, then every feature, then every segment column
  (``Schema.segments``); fields joined with ``\\x1f`` (unit separator), each
  row followed by ``\\n``; UTF-8; SHA-256 over the whole stream;
* a feature value is parsed to a float first and written as ``repr(float)``
  (Python's shortest round-trip form, ``-0.0`` as ``0.0``): CSV ``3``, ``3.0``
  and ``3.000``, a SQL ``INTEGER 3``, ``DOUBLE 3.0`` and ``NUMERIC 3.00`` are
  all ``3.0``; a missing value (empty, ``nan``, ``NA``, SQL ``NULL``) is empty;
* the label and segment values are text by :func:`cell_text` (CSV text as
  written, stripped; typed values from Parquet or SQL by the rules there, so an
  integer label ``1`` is ``"1"`` as in a CSV file); a backslash, ``\\x1f`` or
  newline inside them is escaped as ``\\\\``, ``\\x1f`` and ``\\n``.

The column names are not part of the digest; the row order is (the splits
depend on it).
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence
from decimal import Decimal

import numpy as np

from toolchain.errors import DataError

__all__ = ["LabelCoder", "RowDigest", "cell_text", "numbers_from_cells", "rows_sha256"]

#: Text a CSV cell may hold for a missing number (compared case-insensitively).
MISSING = ("", "nan", "na", "null", "none")
_ESCAPES = str.maketrans({"\\": "\\\\", "\x1f": "\\x1f", "\n": "\\n"})
_EXACT_INT = 2.0**53


def cell_text(value: object) -> str:
    """A typed cell (Parquet, SQL) as the text a CSV file would hold; the rule for labels and segments.

    ``None`` and NaN are ``""`` (missing); text is stripped; ``bool`` is
    ``"true"``/``"false"``; an integer is its decimal digits; a float or
    ``Decimal`` holding a whole number (below 2**53) is that integer (``1.0``
    → ``"1"``, so a label column stored as DOUBLE names the same classes as
    one stored as INTEGER), any other is ``repr(float(value))``; anything else
    is ``str(value)``.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real | Decimal):
        f = float(value)
        if math.isnan(f):
            return ""
        if f.is_integer() and abs(f) < _EXACT_INT:
            return str(int(f))
        return repr(f)
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").strip()
    return str(value).strip()


def _number(value: object) -> float:
    """One cell as a float; raises ValueError/TypeError/OverflowError when it is not a number."""
    if value is None:
        return math.nan
    if isinstance(value, str | bytes):
        text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
        text = text.strip()
        return math.nan if text.lower() in MISSING else float(text)
    if isinstance(value, numbers.Real | Decimal):
        return float(value)
    raise TypeError(type(value).__name__)


def numbers_from_cells(where: str, name: str, dtype: str, cells: Sequence[object], first_row: int = 1
                       ) -> np.ndarray:
    """A column of typed or text cells as float64, NaN where missing; :class:`DataError` names the bad cell.

    ``first_row`` is the 1-based row number of ``cells[0]`` in the whole table.
    """
    try:
        out = np.array(cells, dtype=np.float64)  # fast path: ints, floats, Decimals, None, numeric text
    except (TypeError, ValueError, OverflowError):
        out = np.empty(len(cells), dtype=np.float64)
        for i, v in enumerate(cells):
            try:
                out[i] = _number(v)
            except (TypeError, ValueError, OverflowError):
                shown = v[:40] if isinstance(v, str) else v
                raise DataError(f"{where}: column {name!r} row {first_row + i}: {shown!r} is not a number "
                                f"(declared {dtype})") from None
    if dtype == "int":
        bad = np.flatnonzero(np.isfinite(out) & (out != np.trunc(out)))
        if len(bad):
            i = int(bad[0])
            raise DataError(f"{where}: column {name!r} row {first_row + i}: {cells[i]!r} is not an integer")
    return out


def _text(value: str) -> str:
    return value.translate(_ESCAPES) if ("\\" in value or "\x1f" in value or "\n" in value) else value


class RowDigest:
    """SHA-256 of canonical rows (see the module docstring), fed one chunk of rows at a time."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.rows = 0

    def update(self, labels: Sequence[str], x: np.ndarray, segments: Sequence[Sequence[str]] = ()) -> None:
        """Add rows: label text, float64 features ``(n, features)``, and one text sequence per segment column."""
        n = len(labels)
        if x.shape[0] != n or any(len(s) != n for s in segments):
            raise ValueError("labels, features and segments must have one entry per row")
        seg_rows = list(zip(*segments, strict=True)) if segments else [()] * n
        lines = []
        for label, feats, segs in zip(labels, x.tolist(), seg_rows, strict=True):
            fields = [_text(label)]
            fields += ["" if f != f else repr(f + 0.0) for f in feats]  # f != f: NaN
            fields += [_text(s) for s in segs]
            lines.append("\x1f".join(fields))
        if lines:
            self._hash.update(("\n".join(lines) + "\n").encode("utf-8"))
        self.rows += n

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def rows_sha256(labels: Sequence[str], x: np.ndarray, segments: Sequence[Sequence[str]] = ()) -> str:
    """The canonical digest of a whole table held in memory (see the module docstring), fed 10,000 rows at a
    time so its text never holds the whole table."""
    digest = RowDigest()
    for i in range(0, max(len(labels), 1), 10_000):
        digest.update(labels[i:i + 10_000], x[i:i + 10_000], [s[i:i + 10_000] for s in segments])
    return digest.hexdigest()


class LabelCoder:
    """Label text → class index, chunk by chunk, without keeping the texts of every row.

    With declared ``classes`` an unknown label fails at once; without them the
    classes are the sorted set of labels seen, and the codes are renumbered by
    :meth:`finish`.
    """

    def __init__(self, where: str, column: str, classes: list[str] | None) -> None:
        self.where, self.column, self.declared = where, column, classes
        self._ids: dict[str, int] = {c: i for i, c in enumerate(classes)} if classes is not None else {}
        self._codes: list[np.ndarray] = []
        self._rows = 0

    def add(self, labels: Sequence[str]) -> None:
        ids = self._ids
        codes = np.empty(len(labels), dtype=np.int64)
        for i, label in enumerate(labels):
            code = ids.get(label)
            if code is None:
                if label == "":
                    raise DataError(f"{self.where}: label column {self.column!r} has empty values "
                                    f"(row {self._rows + i + 1})")
                if self.declared is not None:
                    raise DataError(f"{self.where}: label {label!r} (row {self._rows + i + 1}) is not among the "
                                    f"declared classes {self.declared}")
                code = ids[label] = len(ids)
            codes[i] = code
        self._codes.append(codes)
        self._rows += len(labels)

    def finish(self) -> tuple[list[str], np.ndarray]:
        """(classes, int64 class index per row)."""
        codes = np.concatenate(self._codes) if self._codes else np.empty(0, dtype=np.int64)
        if self.declared is not None:
            return list(self.declared), codes
        classes = sorted(self._ids)
        position = {c: i for i, c in enumerate(classes)}
        renumber = np.empty(max(len(self._ids), 1), dtype=np.int64)
        for label, seen in self._ids.items():
            renumber[seen] = position[label]
        return classes, renumber[codes]
