"""Fixtures shared by the test suite."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

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
