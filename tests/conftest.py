"""Shared fixtures: a real Mosquitto, PostgreSQL and SQLite databases."""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests._mosquitto import Broker, find_mosquitto, running_broker

#: Servers the tests start serve the operator API on a free port, never the fixed default one.
os.environ.setdefault("EDGEHERD_API_LISTEN", "127.0.0.1:0")
#: Logins (`edgeherd login`) go to a directory of the test run's own, never the user's.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="edgeherd-test-config-")

#: Admin connection used to create and drop per-session test databases.
PG_ADMIN_DSN = os.environ.get("EDGEHERD_TEST_PG_ADMIN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")


@pytest.fixture(scope="session", autouse=True)
def _broker_can_reach_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A managed broker runs as the 'mosquitto' user, which must reach the data directories tests make under
    pytest's private temporary root: make that root and its parents searchable by others (not listable)."""
    base = tmp_path_factory.getbasetemp()
    for d in [base, *base.parents]:
        if d == Path(tempfile.gettempdir()) or d == d.parent:
            break
        if d.stat().st_uid == os.geteuid():
            os.chmod(d, d.stat().st_mode | 0o001)


@pytest.fixture(autouse=True)
def _broker_can_reach_tmp_path(request: pytest.FixtureRequest) -> None:
    """pytest makes each test's ``tmp_path`` 0700: searchable by others too, for data directories in it."""
    if "tmp_path" in request.fixturenames:
        path = request.getfixturevalue("tmp_path")
        os.chmod(path, path.stat().st_mode | 0o001)


@pytest.fixture
def mosquitto() -> Iterator[Broker]:
    """A fresh Mosquitto (no retained state) on a free loopback port."""
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed; `make test` installs it (apt-get install mosquitto)")
    with running_broker() as broker:
        yield broker


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of a fresh PostgreSQL database for this test session.

    Skipped, with the reason, only when no PostgreSQL server answers.
    """
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'edgeherd[server]')")
    try:
        admin = psycopg.connect(PG_ADMIN_DSN, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server answers at {PG_ADMIN_DSN!r}: {exc}".strip())
    name = f"edgeherd_test_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        params = psycopg.conninfo.conninfo_to_dict(PG_ADMIN_DSN)
        user = params.get("user", "postgres")
        host = params.get("host", "127.0.0.1")
        port = params.get("port", "5432")
        try:
            yield f"postgresql+psycopg://{user}@{host}:{port}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """SQLAlchemy URL of a fresh SQLite file."""
    return f"sqlite:///{tmp_path / 'edgeherd.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def engine(db_url: str) -> Iterator[Any]:
    """A migrated registry database at ``db_url`` (SQLite, then PostgreSQL), emptied afterwards. A test module that
    needs rows in it from the start overrides this fixture, asking for it by the same name."""
    from sqlmodel import SQLModel

    from server.db import make_engine, migrate

    eng = make_engine(db_url)
    migrate(eng)
    yield eng
    SQLModel.metadata.drop_all(eng)
    with eng.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    eng.dispose()


@dataclass(frozen=True)
class BuiltBundle:
    dir: Path
    signed: Any
    key: Any

    @property
    def artifacts(self) -> Path:
        return self.dir / "artifacts"


@pytest.fixture(scope="session")
def digits_bundle(tmp_path_factory: pytest.TempPathFactory) -> BuiltBundle:
    """A digits bundle built once per test session (8 epochs: enough for the agent tests)."""
    from protocol import decode_model, generate_signing_key, private_key_to_pem
    from protocol.signing import SignedManifest
    from toolchain.pipeline import BuildSpec, build

    root = tmp_path_factory.mktemp("digits-bundle")
    key = generate_signing_key()
    (root / "signing.key").write_bytes(private_key_to_pem(key))
    result = build(BuildSpec(recipe="digits", out=root / "bundle", key=root / "signing.key", epochs=8, tar=False))
    signed = decode_model(SignedManifest, (result.out / "manifest.json").read_bytes())
    return BuiltBundle(result.out, signed, key)


@pytest.fixture
def fleet(mosquitto: Broker, digits_bundle: BuiltBundle, tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """A fake server on a real broker, and a factory of in-process agents talking to it."""
    from agent.runtime import Agent
    from tests.agent_harness import FakeServer, agent_config

    server = FakeServer(mosquitto, digits_bundle.artifacts)
    agents: list[Any] = []

    def make(device_id: str = "pi-1", **kw: Any) -> Any:
        password = mosquitto.add_device(device_id)
        cfg = agent_config(mosquitto, tmp_path / device_id, device_id, password, digits_bundle.key.public_key(),
                           window_seconds=3600)
        agent = Agent(cfg, download_timeout=kw.pop("download_timeout", 2.0), min_backoff=0.2, max_backoff=1.0,
                      **kw).start()
        agents.append(agent)
        return agent

    yield server, make
    for a in agents:
        a.stop()
    server.close()
