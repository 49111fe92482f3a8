"""Alembic environment: runs on the connection handed over by ``server.db.migrate``."""

from __future__ import annotations

from alembic import context
from sqlmodel import SQLModel

import server.db.models  # noqa: F401 - registers the tables

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through server.db.migrate(engine)")
context.configure(connection=connection, target_metadata=SQLModel.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
