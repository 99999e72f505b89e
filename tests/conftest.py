"""Fixtures shared by the test suite."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from outboxbind.stores.sqlite import SQLiteStore
from outboxbind.testing import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "app.db"


@pytest.fixture
def store(db_path: Path, clock: FakeClock) -> Iterator[SQLiteStore]:
    store = SQLiteStore(db_path, clock=clock, lease_duration=60)
    yield store
    store.close()


@pytest.fixture
def conn(db_path: Path, store: SQLiteStore) -> Iterator[sqlite3.Connection]:
    """An application connection with a business table, on the store's database."""
    conn = sqlite3.connect(db_path)
    conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL)")
    conn.commit()
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """A running PostgreSQL (started if it is installed but down)."""
    from services import ensure_postgres

    return ensure_postgres()


@pytest.fixture(scope="session")
def pg_pool(pg_dsn: str) -> Iterator[ConnectionPool[Any]]:
    pool = ConnectionPool(pg_dsn, min_size=1, max_size=8, open=True)
    yield pool
    pool.close()


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A fresh schema for one test's outbox, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    yield name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture(scope="session")
def pubsub_host() -> Iterator[str]:
    """A running Pub/Sub emulator: ``PUBSUB_EMULATOR_HOST``, or one started for the session."""
    import os

    from outboxbind.testing.emulator import PubSubEmulator

    given = os.environ.get("PUBSUB_EMULATOR_HOST")
    if given:
        yield given
        return
    emulator = PubSubEmulator().start()
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    try:
        yield emulator.host
    finally:
        del os.environ["PUBSUB_EMULATOR_HOST"]
        emulator.stop()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A running Redis (started if it is installed but down)."""
    from services import ensure_redis

    return ensure_redis()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A fresh key prefix for one test's outbox; its keys are deleted afterwards."""
    import redis as redis_py

    prefix = f"obtest-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis_py.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()
