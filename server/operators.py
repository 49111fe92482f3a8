"""Adding operators: an ``[[operator]]`` entry appended to ``operators.toml``, a first token, an audit entry.

``edgeherd server init --admin NAME`` creates the file with its first admin on the server host;
``edgeherd operator add NAME --role ROLE`` (an admin, through the API or on the host) appends one more. The file
is appended to, never rewritten, so its comments and layout stay as the operator wrote them; the append and the
check that the name is new hold an exclusive lock on the file.
"""

from __future__ import annotations

import fcntl
import json
import os
from datetime import timedelta
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session

from server import audit
from server.api.tokens import DEFAULT_TTL, MAX_TTL, issue
from server.db.models import OperatorToken
from server.governance import OPERATORS_FILE, GovernanceError, OperatorEntry, Role, load_operators

__all__ = ["add_operator", "init_operators"]


def _entry(name: str, role: Role) -> str:
    return f"\n[[operator]]\nname = {json.dumps(name)}\nrole = {json.dumps(role.value)}\n"


def _append(path: Path, name: str, role: Role, *, create: bool) -> None:
    OperatorEntry(name=name, role=role)  # the same validation the file gets when read
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | (os.O_CREAT if create else 0), 0o640)
    except FileNotFoundError:
        raise GovernanceError(f"{path} does not exist; create it with `edgeherd server init --admin NAME`") from None
    with os.fdopen(fd, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        exists = path.stat().st_size > 0
        if exists and create:
            raise GovernanceError(f"{path} already exists; add operators with `edgeherd operator add`")
        if exists:
            known = load_operators(path)
            if any(e.name.casefold() == name.casefold() for e in known.operator):
                raise GovernanceError(f"{name} is already an operator in {path}")
        else:
            f.write("# Operators and their roles (docs/governance.md). `edgeherd operator add` appends here.\n"
                    "production_groups = []\n")
        f.write(_entry(name, role))
        f.flush()
        os.fsync(f.fileno())
    load_operators(path)  # still valid as a whole


def _check_ttl(ttl: timedelta) -> None:
    if not timedelta(minutes=1) <= ttl <= MAX_TTL:
        raise GovernanceError(f"a token lives between 1 minute and {MAX_TTL.days} days")


def _first_token(engine: Engine, name: str, *, actor: str, ttl: timedelta, detail: dict[str, str]
                 ) -> tuple[str, OperatorToken]:
    with Session(engine) as db:
        with audit.unit_of_work(db, None):  # not anchored here: the next anchored action's anchor covers it
            audit.lock(db)
            audit.append(db, actor, "operator.add", f"operator:{name}", detail)
        return issue(db, name, created_by=actor, ttl=ttl, label="first token")


def init_operators(data_dir: Path, engine: Engine, admin: str, *, actor: str,
                   ttl: timedelta = DEFAULT_TTL) -> tuple[str, OperatorToken]:
    """Create ``operators.toml`` with ``admin`` as its first admin and give them a token: the server host's
    bootstrap. GovernanceError if the file exists."""
    _check_ttl(ttl)
    _append(data_dir / OPERATORS_FILE, admin, Role.ADMIN, create=True)
    return _first_token(engine, admin, actor=actor, ttl=ttl, detail={"role": Role.ADMIN.value, "init": "true"})


def add_operator(data_dir: Path, engine: Engine, name: str, role: Role, *, actor: str,
                 ttl: timedelta = DEFAULT_TTL) -> tuple[str, OperatorToken]:
    """Append ``name`` with ``role`` to ``operators.toml`` and give them a first token (the caller checked that
    ``actor`` is an admin). GovernanceError for a bad or taken name, no operators file, or a lifetime out of
    range (checked before anything is written)."""
    _check_ttl(ttl)
    _append(data_dir / OPERATORS_FILE, name, role, create=False)
    return _first_token(engine, name, actor=actor, ttl=ttl, detail={"role": role.value})
