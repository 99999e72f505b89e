"""The PostgreSQL store passes the conformance kit (against a real server)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from outboxbind.messages import OutboxEntry
from outboxbind.store import Store
from outboxbind.stores.postgres import PostgresStore, persister
from outboxbind.testing import ReadAheadContract, StoreContract, StoreHarness


class PostgresHarness:
    def __init__(self, pool: ConnectionPool[Any], schema: str, table: str = "outbox") -> None:
        self.pool = pool
        self.schema = schema
        self.table = table
        PostgresStore(pool, schema=schema, table=table).migrate()

    def open_store(self, clock: Callable[[], float]) -> Store:
        return PostgresStore(
            self.pool, schema=self.schema, table=self.table, clock=clock, lease_duration=30
        )

    def write(self, entries: Sequence[OutboxEntry], *, commit: bool = True) -> list[str]:
        with self.pool.connection() as conn:
            write = persister(conn, schema=self.schema, table=self.table)
            ids = [write(e) for e in entries]
            conn.commit() if commit else conn.rollback()
            return ids


class TestPostgresStore(StoreContract, ReadAheadContract):
    @pytest.fixture
    def harness(self, pg_pool: ConnectionPool[Any], pg_schema: str) -> StoreHarness:
        return PostgresHarness(pg_pool, pg_schema)


class TestPostgresStoreStrictSequence(StoreContract, ReadAheadContract):
    """The same contract when every message is written in strict-sequence mode."""

    @pytest.fixture
    def harness(self, pg_pool: ConnectionPool[Any], pg_schema: str) -> StoreHarness:
        class Strict(PostgresHarness):
            def write(self, entries: Sequence[OutboxEntry], *, commit: bool = True) -> list[str]:
                import attrs

                strict = [attrs.evolve(e, strict_sequence=True) for e in entries]
                return super().write(strict, commit=commit)

        return Strict(pg_pool, pg_schema, table="strict_outbox")
