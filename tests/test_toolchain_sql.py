"""A table read with ``--sql/--query`` builds the same bundle as the same rows in a CSV file.

The dataset digest is over canonical rows (toolchain/_rows.py), so CSV text
``3`` and ``3.0``, a DOUBLE, a NUMERIC and an INTEGER column holding the same
numbers give the same ``dataset_sha256``, the same splits and the same model.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from protocol import generate_signing_key, private_key_to_pem
from toolchain import _sql
from toolchain._rows import cell_text, rows_sha256
from toolchain.data import load_schema, load_sql, load_table, split_indices
from toolchain.errors import DataError
from toolchain.pipeline import BuildSpec, build

SCHEMA = """\
label = "fault"

[[features]]
name = "rms"
min = -10.0
max = 10.0

[[features]]
name = "peak_hz"
min = -10.0
max = 10.0

[[features]]
name = "kurtosis"
min = -10.0
max = 10.0

[[features]]
name = "cycles"
dtype = "int"
min = 0.0
max = 20.0
"""
COLUMNS = ("id", "rms", "peak_hz", "kurtosis", "cycles", "fault")
QUERY = "SELECT id, rms, peak_hz, kurtosis, cycles, fault FROM {table} ORDER BY id"
NOT_SHOWN = "hunter2-not-shown"


def plant_rows(n: int = 600, seed: int = 7) -> list[dict[str, Any]]:
    """Three classes (integer labels) in three float features and one integer feature, in id order."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    centres = np.array([[0.0, 0.0, 0.0], [2.5, -2.0, 1.0], [-2.0, 2.5, -1.0]])
    x = centres[y] + rng.normal(0, 0.6, size=(n, 3))
    cycles = np.clip(np.round(3 + 4 * y + rng.normal(0, 1, n)), 0, 20).astype(int)
    return [{"id": i, "rms": float(x[i, 0]), "peak_hz": float(x[i, 1]), "kurtosis": round(float(x[i, 2]), 4),
             "cycles": int(cycles[i]), "fault": int(y[i])} for i in range(n)]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """The same numbers written differently from how a database returns them: %.17g, 4 places, 3 and 3.0."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in rows:
            i = int(r["id"])
            w.writerow([i, repr(r["rms"]), f"{r['peak_hz']:.17g}", f"{r['kurtosis']:.4f}",
                        f"{r['cycles']}.0" if i % 2 else f"{r['cycles']}", r["fault"]])
    return path


def write_table(url: str, table: str, rows: list[dict[str, Any]]) -> None:
    """DOUBLE, NUMERIC and INTEGER columns, inserted in shuffled order (the query's ORDER BY restores it)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    shuffled = [rows[i] for i in np.random.default_rng(1).permutation(len(rows))]
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, rms DOUBLE PRECISION, "
                                 "peak_hz DOUBLE PRECISION, kurtosis NUMERIC(10, 4), cycles INTEGER, fault INTEGER)")
            insert = f"INSERT INTO {table} VALUES (:id, :rms, :peak_hz, :kurtosis, :cycles, :fault)"  # noqa: S608
            conn.execute(sa.text(insert),
                         [r | {"kurtosis": f"{r['kurtosis']:.4f}"} for r in shuffled])
    finally:
        engine.dispose()


def count_rows(url: str, table: str) -> int:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar_one())  # noqa: S608
    finally:
        engine.dispose()


def with_password(url: str) -> str:
    return sa.make_url(url).set(password=NOT_SHOWN).render_as_string(hide_password=False)


@pytest.fixture
def schema_file(tmp_path: Path) -> Path:
    path = tmp_path / "plant.toml"
    path.write_text(SCHEMA)
    return path


@pytest.fixture
def sqlite_db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'plant.db'}"
    write_table(url, "plant", plant_rows())
    return url


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "signing.key"
    path.write_bytes(private_key_to_pem(generate_signing_key()))
    return path


# --- the canonical encoding ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "text"), [
    (None, ""), (" ok ", "ok"), (1, "1"), (-7, "-7"), (1.0, "1"), (2.5, "2.5"), (float("nan"), ""),
    (Decimal("2.50"), "2.5"), (Decimal("3"), "3"), (True, "true"), (False, "false"), (np.int64(4), "4"),
    (1e300, "1e+300"), (b"bearing", "bearing"),
])
def test_cell_text(value: object, text: str) -> None:
    assert cell_text(value) == text


def test_row_digest_is_the_documented_encoding() -> None:
    x = np.array([[3.0, math.nan, -0.0], [0.1, 1e-7, 2.0]])
    expected = hashlib.sha256(b"ok\x1f3.0\x1f\x1f0.0\x1fsite\\x1fa\nbad\\nlabel\x1f0.1\x1f1e-07\x1f2.0\x1fb\n"
                              ).hexdigest()
    assert rows_sha256(["ok", "bad\nlabel"], x, [["site\x1fa", "b"]]) == expected


def test_csv_number_formatting_does_not_change_the_digest(tmp_path: Path, schema_file: Path) -> None:
    rows = plant_rows(30)
    schema = load_schema(schema_file)
    a = load_table(write_csv(tmp_path / "a.csv", rows), schema)
    plain = tmp_path / "b.csv"
    with plain.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        w.writerows([[r[c] for c in COLUMNS] for r in rows])
    b = load_table(plain, schema)
    assert a.sha256 == b.sha256
    assert a.sha256 != hashlib.sha256((tmp_path / "a.csv").read_bytes()).hexdigest()  # rows, not file bytes


# --- SQLite ---------------------------------------------------------------------------------------------------


def test_sqlite_query_reads_the_same_rows_as_the_csv(tmp_path: Path, schema_file: Path, sqlite_db: str) -> None:
    schema = load_schema(schema_file)
    from_csv = load_table(write_csv(tmp_path / "plant.csv", plant_rows()), schema)
    query = QUERY.format(table="plant")
    from_sql = load_sql(sqlite_db, query, schema)
    assert from_sql.sha256 == from_csv.sha256
    assert np.array_equal(from_sql.x, from_csv.x) and np.array_equal(from_sql.y, from_csv.y)
    assert from_sql.classes == from_csv.classes == ["0", "1", "2"]
    assert from_sql.name == "plant"
    query_sha = hashlib.sha256(query.encode()).hexdigest()
    assert from_sql.source == f"sqlite:///{tmp_path / 'plant.db'} query sha256:{query_sha}"


def test_segment_columns_are_read_and_digested_alike(tmp_path: Path) -> None:
    schema_path = tmp_path / "seg.toml"
    schema_path.write_text('label = "fault"\nsegments = ["site"]\n\n[[features]]\nname = "rms"\n')
    schema = load_schema(schema_path)
    (tmp_path / "seg.csv").write_text("rms,fault,site\n1,1, A \n2.5,0,B\n3,1,7\n")
    url = f"sqlite:///{tmp_path / 'seg.db'}"
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE seg (id INTEGER, rms DOUBLE PRECISION, fault INTEGER, site)")
        conn.exec_driver_sql("INSERT INTO seg VALUES (1, 1.0, 1, 'A'), (2, 2.5, 0, 'B'), (3, 3, 1, 7)")
    engine.dispose()
    from_csv = load_table(tmp_path / "seg.csv", schema)
    from_sql = load_sql(url, "SELECT rms, fault, site FROM seg ORDER BY id", schema, chunk_rows=2)
    assert from_sql.sha256 == from_csv.sha256
    assert list(from_sql.segments["site"]) == list(from_csv.segments["site"]) == ["A", "B", "7"]
    other = load_sql(url, "SELECT rms, fault, 'X' AS site FROM seg ORDER BY id", schema)
    assert other.sha256 != from_sql.sha256


def test_rows_are_streamed_in_chunks(schema_file: Path, sqlite_db: str) -> None:
    schema = load_schema(schema_file)
    seen: list[int] = []
    chunked = load_sql(sqlite_db, QUERY.format(table="plant"), schema, chunk_rows=64, on_rows=seen.append)
    whole = load_sql(sqlite_db, QUERY.format(table="plant"), schema, chunk_rows=10_000)
    assert seen == [64] * 9 + [24]
    assert chunked.sha256 == whole.sha256 and np.array_equal(chunked.x, whole.x)
    assert np.array_equal(chunked.y, whole.y) and chunked.classes == whole.classes


def test_classes_are_numbered_by_sorted_label_across_chunks(tmp_path: Path, schema_file: Path) -> None:
    url = f"sqlite:///{tmp_path / 'labels.db'}"
    rows = plant_rows(60)
    for r in rows:
        r["fault"] = 2 - int(r["fault"])  # the first chunk sees "2" first
    write_table(url, "plant", rows)
    ds = load_sql(url, QUERY.format(table="plant"), load_schema(schema_file), chunk_rows=7)
    assert ds.classes == ["0", "1", "2"]
    assert [ds.classes[c] for c in ds.y[:4]] == ["2", "1", "0", "2"]


def test_empty_result_is_an_error(schema_file: Path, sqlite_db: str) -> None:
    with pytest.raises(DataError, match="returned no rows"):
        load_sql(sqlite_db, "SELECT * FROM plant WHERE id < 0", load_schema(schema_file))


def test_bad_query_names_the_database_and_its_message(schema_file: Path, sqlite_db: str) -> None:
    with pytest.raises(DataError, match=r"the query failed on sqlite:///.*plant\.db: no such table: nope"):
        load_sql(sqlite_db, "SELECT * FROM nope", load_schema(schema_file))


def test_missing_columns_are_named(schema_file: Path, sqlite_db: str) -> None:
    with pytest.raises(DataError, match=r"lacks the column\(s\) fault, kurtosis declared in the schema "
                                        r"\(it has: id, rms, peak_hz, cycles\)"):
        load_sql(sqlite_db, "SELECT id, rms, peak_hz, cycles FROM plant", load_schema(schema_file))


def test_a_text_cell_that_is_not_a_number_is_named(schema_file: Path, sqlite_db: str) -> None:
    query = "SELECT id, rms, CASE WHEN id = 5 THEN 'lots' ELSE peak_hz END AS peak_hz, kurtosis, cycles, fault " \
            "FROM plant ORDER BY id"
    with pytest.raises(DataError, match=r"column 'peak_hz' row 6: 'lots' is not a number"):
        load_sql(sqlite_db, query, load_schema(schema_file), chunk_rows=4)


def test_row_cap(monkeypatch: pytest.MonkeyPatch, schema_file: Path, sqlite_db: str) -> None:
    monkeypatch.setattr(_sql, "MAX_ROWS", 100)
    with pytest.raises(DataError, match="more than 100 rows"):
        load_sql(sqlite_db, QUERY.format(table="plant"), load_schema(schema_file), chunk_rows=30)


@pytest.mark.parametrize(("query", "why"), [
    ("DELETE FROM plant", "starts with DELETE"),
    ("  -- tidy up\n  DROP TABLE plant", "starts with DROP"),
    ("SELECT * FROM plant; DELETE FROM plant", "more than one statement"),
    ("/* nothing */ ", "is empty"),
])
def test_only_one_select_is_run(schema_file: Path, sqlite_db: str, query: str, why: str) -> None:
    with pytest.raises(DataError, match=why):
        load_sql(sqlite_db, query, load_schema(schema_file))
    assert count_rows(sqlite_db, "plant") == 600


def test_selects_in_other_shapes_are_accepted(schema_file: Path, sqlite_db: str) -> None:
    schema = load_schema(schema_file)
    q = "-- the training rows\nWITH t AS (SELECT * FROM plant WHERE rms <> ';') SELECT * FROM t ORDER BY id;\n"
    assert len(load_sql(sqlite_db, q, schema).x) == 600


def test_sqlite_database_is_read_only(schema_file: Path, sqlite_db: str) -> None:
    # a statement that writes despite looking like a query is stopped by PRAGMA query_only
    q = "WITH x AS (SELECT 1) INSERT INTO plant SELECT id + 1000, rms, peak_hz, kurtosis, cycles, fault FROM plant"
    with pytest.raises(DataError, match=r"readonly"):
        load_sql(sqlite_db, q, load_schema(schema_file))
    assert count_rows(sqlite_db, "plant") == 600


def test_missing_sqlite_file_is_not_created(tmp_path: Path, schema_file: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_sql(f"sqlite:///{tmp_path / 'nope.db'}", "SELECT 1", load_schema(schema_file))
    assert not (tmp_path / "nope.db").exists()


def test_a_url_that_does_not_parse_is_not_echoed(schema_file: Path) -> None:
    with pytest.raises(DataError, match="not a SQLAlchemy URL") as err:
        load_sql(f"::{NOT_SHOWN}", "SELECT 1", load_schema(schema_file))
    assert NOT_SHOWN not in str(err.value)


def test_unknown_dialect(schema_file: Path) -> None:
    with pytest.raises(DataError, match="cannot open nosuchdb://me@h/db") as err:
        load_sql(f"nosuchdb://me:{NOT_SHOWN}@h/db", "SELECT 1", load_schema(schema_file))
    assert NOT_SHOWN not in str(err.value)


def test_build_spec_repr_hides_the_url(tmp_path: Path) -> None:
    spec = BuildSpec(recipe="tabular", out=tmp_path / "b", key=tmp_path / "k",
                     sql=f"postgresql://me:{NOT_SHOWN}@db/x", query="SELECT 1")
    assert NOT_SHOWN not in repr(spec)


@pytest.mark.parametrize(("spec_kw", "why"), [
    ({"data": Path("x.csv")}, "not both"),
    ({"query": None}, "go together"),
    ({"schema": None}, "needs a schema"),
    ({"recipe": "digits"}, "digits recipe has its own data"),
])
def test_build_spec_sql_usage_errors(tmp_path: Path, key: Path, schema_file: Path, sqlite_db: str,
                                     spec_kw: dict[str, object], why: str) -> None:
    kw: dict[str, object] = {"recipe": "tabular", "out": tmp_path / "b", "key": key, "schema": schema_file,
                             "sql": sqlite_db, "query": QUERY.format(table="plant")} | spec_kw
    with pytest.raises(DataError, match=why):
        build(BuildSpec(**kw))  # type: ignore[arg-type]
    assert not (tmp_path / "b").exists()


# --- the CLI ----------------------------------------------------------------------------------------------------


def edgeherd(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "edgeherd"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})


@pytest.mark.parametrize(("args", "why"), [
    (["--data", "x.csv", "--sql", "sqlite:///x.db", "--query", "SELECT 1", "--schema", "s.toml"], "give one of them"),
    (["--sql", "sqlite:///x.db", "--schema", "s.toml"], "go together"),
    (["--query", "SELECT 1", "--schema", "s.toml"], "go together"),
    (["--sql", "sqlite:///x.db", "--query", "SELECT 1"], "needs --schema"),
])
def test_cli_sql_usage_errors(args: list[str], why: str) -> None:
    out = edgeherd("build", *args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert why in out.stderr


def test_cli_reports_a_failed_query_without_the_password(tmp_path: Path, key: Path, schema_file: Path,
                                                         sqlite_db: str) -> None:
    out = edgeherd("build", "--sql", sqlite_db, "--query", "SELECT * FROM nope", "--schema", str(schema_file),
                   "--key", str(key), "--out", str(tmp_path / "b"), "--no-tar")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "no such table: nope" in " ".join(out.stderr.split())
    assert not (tmp_path / "b").exists()


# --- PostgreSQL ---------------------------------------------------------------------------------------------------


class _Recorder:
    """A reporter that records what each step was told."""

    def __init__(self) -> None:
        self.advances: dict[str, list[int]] = {}

    @contextmanager
    def step(self, title: str, total: int | None = None) -> Iterator[_Recorder._Step]:
        yield _Recorder._Step(self.advances.setdefault(title, []))

    def info(self, text: str) -> None:
        pass

    class _Step:
        def __init__(self, log: list[int]) -> None:
            self.log = log

        def advance(self, n: int = 1) -> None:
            self.log.append(n)

        def note(self, text: str) -> None:
            pass


@pytest.fixture
def pg_table(postgres_url: str) -> Iterator[str]:
    table = f"plant_{uuid.uuid4().hex[:8]}"
    write_table(postgres_url, table, plant_rows())
    yield table
    engine = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    engine.dispose()


@pytest.mark.integration
def test_postgres_and_csv_build_the_same_bundle(tmp_path: Path, key: Path, schema_file: Path, postgres_url: str,
                                               pg_table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.backends import open_backend
    from toolchain.bundle import ARTIFACTS
    from toolchain.validate import validate

    csv_path = write_csv(tmp_path / "plant.csv", plant_rows())
    common = {"recipe": "tabular", "key": key, "schema": schema_file, "name": "plant", "epochs": 4, "seed": 0,
              "tflite": False, "tar": False}
    from_csv = build(BuildSpec(out=tmp_path / "csv", data=csv_path, **common))  # type: ignore[arg-type]
    monkeypatch.setattr(_sql, "CHUNK_ROWS", 100)
    reporter = _Recorder()
    query = QUERY.format(table=pg_table)
    from_pg = build(BuildSpec(out=tmp_path / "pg", sql=with_password(postgres_url), query=query,  # type: ignore[arg-type]
                              **common), reporter)

    assert reporter.advances["load and validate data"] == [100] * 6  # streamed, with progress
    a, b = from_csv.manifest.lineage, from_pg.manifest.lineage
    assert a["dataset_sha256"] == b["dataset_sha256"]
    assert a["split_sha256"] == b["split_sha256"] and a["split_sizes"] == b["split_sizes"]
    u = sa.make_url(postgres_url)
    assert b["dataset_source"] == (f"postgresql://{u.username}@{u.host}:{u.port}/{u.database} "
                                   f"query sha256:{hashlib.sha256(query.encode()).hexdigest()}")
    assert NOT_SHOWN not in str(from_pg.manifest.model_dump())
    acc_csv = {x.name: x.metrics["accuracy"] for x in from_csv.manifest.artifacts}
    acc_pg = {x.name: x.metrics["accuracy"] for x in from_pg.manifest.artifacts}
    assert acc_csv == acc_pg and acc_csv["plant-onnx-fp32"] >= 0.9

    ds = load_table(csv_path, load_schema(schema_file))
    _, kept = validate(ds)
    test_rows = kept[split_indices(ds.y[kept], 0)["test"]]
    outputs = []
    for result in (from_csv, from_pg):
        fp32 = next(x for x in result.manifest.artifacts if x.name == "plant-onnx-fp32")
        outputs.append(open_backend(result.out / ARTIFACTS / fp32.sha256, "onnxruntime").predict(ds.x[test_rows]))
    diff = float(np.abs(outputs[0] - outputs[1]).max())
    assert diff == 0.0, f"fp32 ONNX outputs on the test split differ by up to {diff:.3g}"


@pytest.mark.integration
def test_postgres_bad_query_shows_the_database_message_not_the_password(schema_file: Path, postgres_url: str,
                                                                         pg_table: str) -> None:
    with pytest.raises(DataError) as err:
        load_sql(with_password(postgres_url), "SELECT * FROM nope ORDER BY 1", load_schema(schema_file))
    message = str(err.value)
    u = sa.make_url(postgres_url)
    assert f"the query failed on postgresql://{u.username}@{u.host}:{u.port}/{u.database}" in message
    assert 'relation "nope" does not exist' in message
    assert NOT_SHOWN not in message and "***" not in message


@pytest.mark.integration
@pytest.mark.parametrize(("query", "why"), [
    ("WITH gone AS (DELETE FROM {table} RETURNING *) SELECT * FROM gone ORDER BY id", "data-modifying"),
    # nextval() is not undone by a rollback: only the read-only transaction stops it
    ("SELECT nextval('{table}_seq') AS n, * FROM {table} ORDER BY id", "nextval.* in a read-only transaction"),
])
def test_postgres_transaction_is_read_only(schema_file: Path, postgres_url: str, pg_table: str, query: str,
                                           why: str) -> None:
    engine = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SEQUENCE {pg_table}_seq")
    with pytest.raises(DataError, match=why):
        load_sql(postgres_url, query.format(table=pg_table), load_schema(schema_file))
    assert count_rows(postgres_url, pg_table) == 600
    with engine.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT is_called FROM {pg_table}_seq").scalar_one() is False  # noqa: S608
    engine.dispose()


@pytest.mark.integration
def test_postgres_streams_and_keeps_percent_signs(schema_file: Path, postgres_url: str, pg_table: str) -> None:
    seen: list[int] = []
    q = f"SELECT * FROM {pg_table} WHERE 'a%b' LIKE 'a%' AND rms::text NOT LIKE '%:%' ORDER BY id"  # noqa: S608
    ds = load_sql(postgres_url, q, load_schema(schema_file), chunk_rows=128, on_rows=seen.append)
    assert seen == [128] * 4 + [88] and len(ds.x) == 600
    empty = f"SELECT * FROM {pg_table} WHERE id < 0"  # noqa: S608
    with pytest.raises(DataError, match="returned no rows"):
        load_sql(postgres_url, empty, load_schema(schema_file))
