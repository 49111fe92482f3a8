"""Backups of a server's state, safe while it runs, and restore.

A backup directory holds:

- ``database.sqlite`` (SQLite's online backup API: a consistent snapshot even
  while the server writes) or ``database.dump`` (``pg_dump -Fc``);
- ``store/``: the content-addressed artifacts (immutable, copied as they are);
- ``keys/``, ``broker/`` (users, password and ACL files, listener) and
  ``devices/`` (agent configs): what the fleet needs to reconnect unchanged;
- ``operators.toml`` (operators, roles, production groups) and
  ``audit-anchor.json`` (the audit log's anchor), where the server has them:
  without the first a restored server would run in bootstrap mode, without
  governance; the anchor is copied *before* the database snapshot is taken, so
  the entry it names is in the snapshot and ``audit verify`` holds after a
  restore;
- ``backup.json``: when, from what, row counts, and which of those two files it holds.

``restore`` refuses to overwrite an existing database or data directory, and
warns when the restored server will refuse to start because its audit log
shows governance that the backup's files do not carry
(:func:`server.governance.check_bootstrap`).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from sqlalchemy import func
from sqlmodel import Session, select

from server.audit import ANCHOR_FILE
from server.db import database_url, make_engine
from server.db.models import Device, ModelVersion, TelemetryRow
from server.errors import ServerError
from server.governance import OPERATORS_FILE, GovernanceError, check_bootstrap

__all__ = ["BackupError", "backup", "restore"]

_TREES = ("store", "keys", "broker", "devices", "pki")
#: Single files of the data directory a backup carries, when the server has them.
_FILES = (OPERATORS_FILE, ANCHOR_FILE)
_SKIP = {"mosquitto.pid", "mosquitto.log"}


class BackupError(ServerError, RuntimeError):
    pass


def _pg_args(url: str) -> tuple[list[str], str]:
    parts = urlsplit(url.replace("postgresql+psycopg", "postgresql"))
    args = ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 5432), "-U", parts.username or "postgres"]
    return args, parts.path.lstrip("/")


def _tool(name: str) -> str:
    exe = shutil.which(name) or next((str(p) for p in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))),
                                     None)
    if exe is None:
        raise BackupError(f"{name} is not installed (apt-get install postgresql-client)")
    return exe


def _copy_tree(src: Path, dst: Path) -> None:
    if not src.exists():
        return
    for path in src.rglob("*"):
        if path.is_dir() or path.name in _SKIP:
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists() or target.stat().st_size != path.stat().st_size:
            shutil.copy2(path, target)


def _copy_file(src: Path, dst: Path) -> bool:
    """Copy one file (mode kept) if it exists; whether it did."""
    if not src.is_file():
        return False
    shutil.copy2(src, dst)
    return True


_COUNTED = (("devices", Device), ("model_versions", ModelVersion), ("telemetry", TelemetryRow))


def _pg_dump(url: str, out_file: Path) -> dict[str, int]:
    """pg_dump from an exported snapshot, counting rows in that same snapshot."""
    import psycopg

    args, name = _pg_args(url)
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        row = conn.execute("SELECT pg_export_snapshot()").fetchone()
        assert row is not None  # noqa: S101
        counts = {}
        for label, table in _COUNTED:
            got = conn.execute(f"SELECT count(*) FROM {table.__tablename__}").fetchone()  # noqa: S608 - our names
            counts[label] = int(got[0]) if got else 0
        out = subprocess.run([_tool("pg_dump"), *args, "-Fc", f"--snapshot={row[0]}", "-f", str(out_file),  # noqa: S603
                              name], capture_output=True, text=True, timeout=3600)
        conn.rollback()
    if out.returncode != 0:
        raise BackupError(f"pg_dump failed: {out.stderr.strip()[:500]}")
    return counts


def backup(data_dir: Path, dest: Path) -> dict[str, object]:
    """Back up the server at ``data_dir`` into ``dest`` (created; must be empty)."""
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty; back up into a new directory")
    dest.mkdir(parents=True, exist_ok=True)
    # files first: an anchor read before the snapshot names an entry the snapshot holds
    files = {name: _copy_file(data_dir / name, dest / name) for name in _FILES}
    url = database_url(data_dir)
    if url.startswith("sqlite"):
        src_path = url.split("///", 1)[1]
        src = sqlite3.connect(src_path)
        dst = sqlite3.connect(str(dest / "database.sqlite"))
        try:
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        kind = "sqlite"
        engine = make_engine(f"sqlite:///{dest / 'database.sqlite'}")
        with Session(engine) as db:
            counts = {name: db.exec(select(func.count()).select_from(table)).one() for name, table in _COUNTED}
        engine.dispose()
    else:
        counts = _pg_dump(url, dest / "database.dump")
        kind = "postgresql"
    for tree in _TREES:
        _copy_tree(data_dir / tree, dest / tree)
    info: dict[str, object] = {"created_at": datetime.now(timezone.utc).isoformat(), "database": kind,
                               "source": str(data_dir), "counts": counts,
                               "files": sorted(name for name, copied in files.items() if copied)}
    (dest / "backup.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def restore(src: Path, data_dir: Path) -> dict[str, object]:
    """Restore a backup made by :func:`backup` into ``data_dir`` (which must not hold a server yet)."""
    try:
        info = json.loads((src / "backup.json").read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{src} is not an edgeherd backup: {exc}") from None
    if data_dir.exists() and any(p.name in (*_TREES, *_FILES, "edgeherd.db") for p in data_dir.iterdir()):
        raise BackupError(f"{data_dir} already holds a server; restore into an empty or new directory")
    data_dir.mkdir(parents=True, exist_ok=True)
    url = database_url(data_dir)
    if info["database"] == "sqlite":
        if not url.startswith("sqlite"):
            raise BackupError("this backup is of a SQLite server; unset EDGEHERD_DATABASE_URL to restore it")
        shutil.copy2(src / "database.sqlite", url.split("///", 1)[1])
    else:
        if url.startswith("sqlite"):
            raise BackupError("this backup is of a PostgreSQL server; set EDGEHERD_DATABASE_URL to an empty database")
        args, name = _pg_args(url)
        out = subprocess.run([_tool("pg_restore"), *args, "--no-owner", "-d", name,  # noqa: S603
                              str(src / "database.dump")], capture_output=True, text=True, timeout=3600)
        if out.returncode != 0:
            raise BackupError(f"pg_restore failed: {out.stderr.strip()[:500]}")
    for tree in _TREES:
        _copy_tree(src / tree, data_dir / tree)
    for name in _FILES:
        _copy_file(src / name, data_dir / name)
    for secret in (data_dir / "keys" / "signing.key", data_dir / "broker" / "server.password"):
        if secret.exists():
            os.chmod(secret, 0o600)
    restored = dict(info)
    try:
        check_bootstrap(data_dir)
    except GovernanceError as exc:  # a backup made without operators.toml, of a governed server
        restored["warnings"] = [str(exc)]
    return restored
