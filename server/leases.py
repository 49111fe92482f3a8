"""Leases: which server replica acts on something (a rollout, the drift evaluation), and until when.

A lease is a row ``(name, holder, expires_at)``. :func:`acquire` takes or
renews it in one conditional statement, so with several replicas on one
PostgreSQL at most one holds a given lease at any moment; a replica that
dies simply stops renewing and another takes over once the lease expires.
Times are the database's clock, so replicas with skewed clocks still agree.
On SQLite (one machine) the same statements hold, serialized by its write lock.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

__all__ = ["acquire", "db_now", "holder_of", "release", "still_held"]


def _now_sql(dialect: str) -> str:
    if dialect == "postgresql":
        return "extract(epoch from clock_timestamp())"
    return "((julianday('now') - 2440587.5) * 86400.0)"


def db_now(engine: Engine) -> float:
    """The database's clock, in epoch seconds."""
    with engine.connect() as conn:
        return float(conn.execute(text(f"SELECT {_now_sql(engine.dialect.name)}")).scalar_one())


def acquire(engine: Engine, name: str, holder: str, ttl: float) -> bool:
    """Take or renew lease ``name`` for ``ttl`` seconds; True when ``holder`` holds it now."""
    now = _now_sql(engine.dialect.name)
    try:
        with engine.begin() as conn:
            renewed = conn.execute(text(
                f"UPDATE leases SET holder = :holder, expires_at = {now} + :ttl "  # noqa: S608 - constant SQL
                f"WHERE name = :name AND (holder = :holder OR expires_at < {now})"),
                {"name": name, "holder": holder, "ttl": ttl}).rowcount
            if renewed:
                return True
            exists = conn.execute(text("SELECT 1 FROM leases WHERE name = :name"), {"name": name}).first()
            if exists:
                return False
            conn.execute(text(f"INSERT INTO leases (name, holder, expires_at) VALUES (:name, :holder, {now} + :ttl)"),  # noqa: S608
                         {"name": name, "holder": holder, "ttl": ttl})
            return True
    except IntegrityError:  # another replica inserted it first
        return False
    except OperationalError as exc:  # SQLite busy beyond its timeout: not this time
        if engine.dialect.name == "sqlite":
            return False
        raise exc


def still_held(conn: Connection, name: str, holder: str, ttl: float) -> bool:
    """Inside the caller's transaction: renew lease ``name`` if ``holder`` still holds it unexpired.

    Call it just before committing work done under a lease: if the lease expired meanwhile (and another
    replica may have taken it), this returns False and the caller must roll back instead of committing.
    """
    now = _now_sql(conn.dialect.name)
    renewed = conn.execute(text(
        f"UPDATE leases SET expires_at = {now} + :ttl "  # noqa: S608 - constant SQL
        f"WHERE name = :name AND holder = :holder AND expires_at >= {now}"),
        {"name": name, "holder": holder, "ttl": ttl}).rowcount
    return bool(renewed)


def release(engine: Engine, name: str, holder: str) -> None:
    """Give the lease up now (if ``holder`` holds it), so another replica need not wait for it to expire."""
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM leases WHERE name = :name AND holder = :holder"),
                     {"name": name, "holder": holder})


def holder_of(engine: Engine, name: str) -> str | None:
    """Who holds lease ``name`` now (None when nobody, or it has expired)."""
    now = _now_sql(engine.dialect.name)
    with engine.connect() as conn:
        row = conn.execute(text(f"SELECT holder FROM leases WHERE name = :name AND expires_at >= {now}"),  # noqa: S608
                           {"name": name}).first()
    return None if row is None else str(row[0])
