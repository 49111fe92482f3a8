"""A dataset from a SQL query: the SQLAlchemy edge behind :func:`toolchain.data.load_sql`.

Reading only. A query must be one statement that starts like a query
(``SELECT``, ``WITH``, ``VALUES``, ``TABLE``); it runs in a transaction that is
always rolled back, and read-only where the database can enforce it
(PostgreSQL ``SET TRANSACTION READ ONLY``, SQLite ``PRAGMA query_only``). Give
the build its own database user with ``SELECT`` rights only all the same.

Rows are streamed (a server-side cursor on PostgreSQL) :data:`CHUNK_ROWS` at a
time, and each chunk is turned straight into float32 features, label codes and
the canonical row digest (:mod:`toolchain._rows`), so only the numeric arrays
of the whole result are ever held. Row order is the query's: without
``ORDER BY`` a database may return rows in any order, and the splits (and the
digest) change with it.

The password in the URL is never shown: messages, logs and the lineage name
the database as ``backend://user@host:port/database`` (no password, driver or
URL parameters). Better still, leave the password out of the URL: psycopg reads
``PGPASSWORD`` and ``~/.pgpass``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, make_url
from sqlalchemy.engine import URL, Connection
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.pool import NullPool

from toolchain._rows import LabelCoder, RowDigest, cell_text, numbers_from_cells
from toolchain.dataset import MAX_ROWS, Dataset, Schema, check_columns
from toolchain.errors import DataError

__all__ = ["CHUNK_ROWS", "display_url", "load_sql", "sql_source"]

log = logging.getLogger(__name__)

#: Rows fetched and converted at a time.
CHUNK_ROWS = 10_000
#: Seconds to wait for a PostgreSQL connection (unless the URL sets ``connect_timeout``).
CONNECT_TIMEOUT_S = 10
_QUERY_WORDS = ("select", "with", "values", "table")
_MAX_MESSAGE = 400


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except (ArgumentError, ValueError):  # the text may hold a password: do not echo it
        raise DataError("the SQL URL is not a SQLAlchemy URL (dialect[+driver]://user@host[:port]/database, "
                        "or sqlite:///path/to.db)") from None


def display_url(url: str) -> str:
    """``backend://user@host:port/database``: the URL without password, driver or parameters."""
    u = _parse(url)
    return URL.create(u.get_backend_name(), username=u.username, host=u.host, port=u.port,
                      database=u.database).render_as_string(hide_password=True)


def sql_source(url: str, query: str) -> str:
    """The lineage ``dataset_source`` of a query: where it ran and the sha256 of its text."""
    return f"{display_url(url)} query sha256:{hashlib.sha256(query.encode('utf-8')).hexdigest()}"


def _statement_check(query: str, where: str) -> None:
    """Reject what is obviously not one read-only query; the transaction settings do the rest."""
    words: list[str] = []
    statements, i, n = 1, 0, len(query)
    while i < n:
        ch = query[i]
        if query.startswith("--", i):
            i = query.find("\n", i)
            i = n if i < 0 else i
        elif query.startswith("/*", i):
            end = query.find("*/", i + 2)
            i = n if end < 0 else end + 2
            continue
        elif ch in "'\"`":
            end = query.find(ch, i + 1)
            i = n if end < 0 else end + 1
            continue
        elif ch == ";":
            if query[i + 1:].strip() and _has_sql(query[i + 1:]):
                statements += 1
        elif ch.isalpha() and len(words) < 1:
            m = re.match(r"[A-Za-z_]+", query[i:])
            words.append(m.group(0).lower() if m else "")
            i += len(words[-1]) or 1
            continue
        i += 1
    if not words:
        raise DataError(f"the query for {where} is empty")
    if words[0] not in _QUERY_WORDS:
        raise DataError(f"the query for {where} starts with {words[0].upper()}; a dataset is read with one "
                        "SELECT (or WITH, VALUES, TABLE) statement")
    if statements > 1:
        raise DataError(f"the query for {where} holds more than one statement; give one SELECT")


def _has_sql(rest: str) -> bool:
    """Whether text after a ``;`` holds anything but whitespace, comments and more ``;``."""
    rest = re.sub(r"--[^\n]*", "", rest)
    rest = re.sub(r"/\*.*?\*/", "", rest, flags=re.DOTALL)
    return bool(rest.replace(";", "").strip())


def _message(exc: BaseException, secret: str | None) -> str:
    """The database's own words, on one line, without the password."""
    orig = getattr(exc, "orig", None)
    lines = [ln.strip() for ln in str(orig if orig is not None else exc).splitlines()]
    text = "; ".join(ln for ln in lines if ln and not ln.startswith(("LINE ", "^", "(Background on")))
    if secret:
        text = text.replace(secret, "***")
    return text[:_MAX_MESSAGE] or type(exc).__name__


def _target(url: str, where: str) -> tuple[URL, dict[str, Any]]:
    target = _parse(url)
    backend = target.get_backend_name()
    # SQLAlchemy's postgresql:// means psycopg2; edgeherd ships psycopg 3
    if target.drivername == "postgresql" and find_spec("psycopg2") is None and find_spec("psycopg") is not None:
        target = target.set(drivername="postgresql+psycopg")
    connect_args: dict[str, Any] = {}
    if backend == "postgresql" and "connect_timeout" not in target.query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
    if backend == "sqlite" and target.database not in (None, "", ":memory:") and not target.query.get("uri"):
        db = Path(target.database or "")
        if not db.is_file():  # SQLite would create an empty database instead
            raise DataError(f"SQLite database {db} does not exist" if not db.exists() else
                            f"SQLite database {db} is not a file")
    return target, connect_args


def _read_only(conn: Connection, backend: str) -> None:
    if backend == "postgresql":
        conn.exec_driver_sql("SET TRANSACTION READ ONLY")
    elif backend == "sqlite":
        conn.exec_driver_sql("PRAGMA query_only = ON")


@contextmanager
def _result(url: str, query: str, where: str, chunk_rows: int) -> Iterator[tuple[list[str], Iterator[Sequence[Any]]]]:
    """(column names, iterator of row chunks) of ``query``, in a transaction rolled back on the way out."""
    target, connect_args = _target(url, where)
    secret = target.password if isinstance(target.password, str) else None
    try:
        engine = create_engine(target, poolclass=NullPool, connect_args=connect_args)
    except (ImportError, NoSuchModuleError, ArgumentError) as exc:
        raise DataError(f"cannot open {where}: {_message(exc, secret)} (is its driver installed?)") from None
    doing = "cannot connect to"
    try:
        with engine.connect() as conn:
            doing = "the query failed on"
            trans = conn.begin()
            result = None
            try:
                _read_only(conn, target.get_backend_name())
                result = conn.execution_options(stream_results=True, yield_per=chunk_rows,
                                                no_parameters=True).exec_driver_sql(query)
                if not result.returns_rows:
                    raise DataError(f"the query on {where} returned no rows (is it a SELECT?)")
                doing = "reading rows failed on"
                yield list(result.keys()), result.partitions(chunk_rows)
            finally:
                try:
                    if result is not None:
                        result.close()
                finally:
                    if trans.is_active:
                        trans.rollback()  # never commit: a dataset is only read
    except SQLAlchemyError as exc:
        raise DataError(f"{doing} {where}: {_message(exc, secret)}") from None
    finally:
        engine.dispose()


def _dataset_name(url: str) -> str:
    database = _parse(url).database or ""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(database).stem if database else "").strip("-._")
    return stem[:40] or "query"


def load_sql(url: str, query: str, schema: Schema, *, name: str | None = None, chunk_rows: int | None = None,
             on_rows: Callable[[int], None] | None = None) -> Dataset:
    """Run ``query`` on the database at ``url`` and read its rows as described by ``schema``."""
    where = display_url(url)
    _statement_check(query, where)
    chunk = chunk_rows or CHUNK_ROWS
    what = f"the query on {where}"
    digest = RowDigest()
    coder = LabelCoder(what, schema.label, schema.classes)
    xs: list[np.ndarray] = []
    segments: dict[str, list[np.ndarray]] = {c: [] for c in schema.segments}
    source = sql_source(url, query)
    log.info("reading a dataset from %s", source)
    rows_read = 0
    with _result(url, query, where, chunk) as (columns, chunks):
        wanted = [schema.label, *(f.name for f in schema.features)]
        check_columns(what, list(columns), schema)
        twice = sorted({c for c in [*wanted, *schema.segments] if columns.count(c) > 1})
        if twice:
            raise DataError(f"{what} returns the column(s) {', '.join(twice)} more than once")
        at = {c: columns.index(c) for c in [*wanted, *schema.segments]}
        for rows in chunks:
            if rows_read + len(rows) > MAX_ROWS:
                raise DataError(f"{what} returns more than {MAX_ROWS} rows, the limit")
            first = rows_read + 1
            x = np.stack([numbers_from_cells(what, f.name, f.dtype, [r[at[f.name]] for r in rows], first)
                          for f in schema.features], axis=1)
            j = at[schema.label]
            labels = [cell_text(r[j]) for r in rows]
            seg_texts = [[cell_text(r[at[c]]) for r in rows] for c in schema.segments]
            coder.add(labels)
            digest.update(labels, x, seg_texts)
            xs.append(x.astype(np.float32))
            for c, texts in zip(schema.segments, seg_texts, strict=True):
                segments[c].append(np.array(texts, dtype=str))
            rows_read += len(rows)
            if on_rows is not None:
                on_rows(len(rows))
    if rows_read == 0:
        raise DataError(f"{what} returned no rows")
    classes, y = coder.finish()
    log.info("read %d rows from %s", rows_read, where)
    return Dataset(name=name or _dataset_name(url), kind="tabular", x=np.concatenate(xs), y=y, classes=classes,
                   schema=schema, sha256=digest.hexdigest(), source=source,
                   segments={c: np.concatenate(v) for c, v in segments.items()})
