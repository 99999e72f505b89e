"""Every built-in store passes the conformance kit."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from outboxbind.messages import OutboxEntry
from outboxbind.store import Store
from outboxbind.stores.memory import InMemoryStore, InMemoryTransaction
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.testing import ProgressContract, ReadAheadContract, StoreContract, StoreHarness


class SQLiteHarness:
    def __init__(self, path: Path, table: str = "outbox") -> None:
        self.path = path
        self.table = table
        self.stores: list[SQLiteStore] = []

    def open_store(self, clock: Callable[[], float]) -> Store:
        store = SQLiteStore(self.path, table=self.table, clock=clock, lease_duration=30)
        self.stores.append(store)
        return store

    def write(self, entries: Sequence[OutboxEntry], *, commit: bool = True) -> list[str]:
        conn = sqlite3.connect(self.path)
        try:
            write = persister(conn, table=self.table)
            ids = [write(e) for e in entries]
            conn.commit() if commit else conn.rollback()
            return ids
        finally:
            conn.close()


class TestSQLiteStore(StoreContract, ProgressContract):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> StoreHarness:
        harness = SQLiteHarness(tmp_path / "outbox.db")
        SQLiteStore(harness.path).close()  # create the schema before the first write
        return harness


class TestSQLiteStoreWithCustomTable(StoreContract, ProgressContract):
    @pytest.fixture
    def harness(self, tmp_path: Path) -> StoreHarness:
        harness = SQLiteHarness(tmp_path / "outbox.db", table="app_outbox_v2")
        SQLiteStore(harness.path, table="app_outbox_v2").close()
        return harness


class MemoryHarness:
    def __init__(self) -> None:
        self.store: InMemoryStore | None = None
        self.clock: Callable[[], float] | None = None

    def open_store(self, clock: Callable[[], float]) -> Store:
        # every "relay" shares the one in-memory database
        if self.store is None:
            self.store = InMemoryStore(clock=clock, lease_duration=30)
        return self.store

    def write(self, entries: Sequence[OutboxEntry], *, commit: bool = True) -> list[str]:
        assert self.store is not None
        tx = InMemoryTransaction(self.store)
        ids = [tx(e) for e in entries]
        tx.commit() if commit else tx.rollback()
        return ids


class TestInMemoryStore(StoreContract, ReadAheadContract, ProgressContract):
    @pytest.fixture
    def harness(self) -> StoreHarness:
        return MemoryHarness()
