"""The database fixtures give a fresh, writable database on both engines."""

from __future__ import annotations

import pytest

sqlalchemy = pytest.importorskip("sqlalchemy", reason="sqlalchemy is part of edgeherd[server]")

pytestmark = pytest.mark.integration


def test_fresh_database_round_trip(db_url):
    engine = sqlalchemy.create_engine(db_url)
    try:
        with engine.begin() as conn:
            assert sqlalchemy.inspect(conn).get_table_names() == []
            conn.execute(sqlalchemy.text("CREATE TABLE probe (id INTEGER PRIMARY KEY, note VARCHAR(20))"))
            conn.execute(sqlalchemy.text("INSERT INTO probe (id, note) VALUES (1, 'edge'), (2, 'herd')"))
        with engine.connect() as conn:
            rows = conn.execute(sqlalchemy.text("SELECT note FROM probe ORDER BY id")).scalars().all()
        assert rows == ["edge", "herd"]
        assert engine.dialect.name == ("sqlite" if db_url.startswith("sqlite") else "postgresql")
    finally:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("DROP TABLE IF EXISTS probe"))
        engine.dispose()
