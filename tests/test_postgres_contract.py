"""The PostgreSQL store passes the conformance kit (against a real server)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Collection, Coroutine, Iterator, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from outboxbind.messages import OutboxEntry, PersistedMessage
from outboxbind.store import (
    DeadLetter,
    MarkDetails,
    MessageBatch,
    MessageRecord,
    SequenceKey,
    Store,
    TopicBacklog,
)
from outboxbind.stores.postgres import (
    AsyncPostgresBatch,
    AsyncPostgresStore,
    PostgresStore,
    persister,
)
from outboxbind.testing import (
    ProgressContract,
    ReadAheadContract,
    StoreContract,
    StoreHarness,
)


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


class TestPostgresStore(StoreContract, ReadAheadContract, ProgressContract):
    @pytest.fixture
    def harness(self, pg_pool: ConnectionPool[Any], pg_schema: str) -> StoreHarness:
        return PostgresHarness(pg_pool, pg_schema)


class TestPostgresStoreStrictSequence(StoreContract, ReadAheadContract, ProgressContract):
    """The same contract when every message is written in strict-sequence mode."""

    @pytest.fixture
    def harness(self, pg_pool: ConnectionPool[Any], pg_schema: str) -> StoreHarness:
        class Strict(PostgresHarness):
            def write(self, entries: Sequence[OutboxEntry], *, commit: bool = True) -> list[str]:
                import attrs

                strict = [attrs.evolve(e, strict_sequence=True) for e in entries]
                return super().write(strict, commit=commit)

        return Strict(pg_pool, pg_schema, table="strict_outbox")


# -- the asyncio face, driven by the same kit ----------------------------------------------------

T = TypeVar("T")


class LoopThread:
    """An event loop running in a thread of its own, for synchronous code to wait on."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, call: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(call, self.loop).result(timeout=60)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class BlockingBatch:
    """An :class:`AsyncPostgresBatch` with the synchronous face the kit calls."""

    def __init__(self, batch: AsyncPostgresBatch, loop: LoopThread) -> None:
        self.batch = batch
        self._loop = loop

    @property
    def messages(self) -> Sequence[PersistedMessage]:
        return self.batch.messages

    def mark_published(self, message: PersistedMessage, publish_id: str) -> None:
        self._loop.run(self.batch.mark_published(message, publish_id))

    def mark_failed(
        self, message: PersistedMessage, error: str, retry_after: timedelta | None
    ) -> None:
        self._loop.run(self.batch.mark_failed(message, error, retry_after))

    def mark_dead(self, message: PersistedMessage, error: str) -> None:
        self._loop.run(self.batch.mark_dead(message, error))

    def add_details(self, details: Mapping[str, MarkDetails]) -> None:
        self.batch.add_details(details)

    def read_ahead(
        self,
        topic_names: Sequence[str],
        limit: int,
        continuing: Collection[SequenceKey],
        closing: MessageBatch | None = None,
    ) -> BlockingBatch | None:
        inner = closing.batch if isinstance(closing, BlockingBatch) else None
        batch = self._loop.run(self.batch.read_ahead(topic_names, limit, continuing, inner))
        return None if batch is None else BlockingBatch(batch, self._loop)

    def close(self) -> None:
        self._loop.run(self.batch.close())

    def __enter__(self) -> BlockingBatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class BlockingStore:
    """An :class:`AsyncPostgresStore` with the synchronous face the kit calls: each call waits
    for the coroutine on the store's loop."""

    def __init__(self, store: AsyncPostgresStore, loop: LoopThread) -> None:
        self.store = store
        self._loop = loop

    def checkout_batch(self, topic_names: Sequence[str], limit: int) -> BlockingBatch | None:
        batch = self._loop.run(self.store.checkout_batch(topic_names, limit))
        return None if batch is None else BlockingBatch(batch, self._loop)

    def dead_letters(self, topic: str | None = None, limit: int = 100) -> list[DeadLetter]:
        return self._loop.run(self.store.dead_letters(topic, limit))

    def replay_dead_letters(self, ids: Sequence[str]) -> int:
        return self._loop.run(self.store.replay_dead_letters(ids))

    def purge_dead_letters(self, ids: Sequence[str]) -> int:
        return self._loop.run(self.store.purge_dead_letters(ids))

    def backlog(self) -> list[TopicBacklog]:
        return self._loop.run(self.store.backlog())

    def find_message(self, id: str) -> MessageRecord | None:
        return self._loop.run(self.store.find_message(id))

    def purge_settled(self, topic: str, older_than: timedelta) -> int:
        return self._loop.run(self.store.purge_settled(topic, older_than))


class AsyncPostgresHarness(PostgresHarness):
    """Writes with the synchronous persister; opens :class:`AsyncPostgresStore` relays over an
    asyncio pool, run on ``loop``."""

    def __init__(
        self,
        pool: ConnectionPool[Any],
        async_pool: AsyncConnectionPool[Any],
        loop: LoopThread,
        schema: str,
    ) -> None:
        super().__init__(pool, schema)
        self.async_pool = async_pool
        self.loop = loop

    def open_store(self, clock: Callable[[], float]) -> Store:
        store = AsyncPostgresStore(
            self.async_pool, schema=self.schema, table=self.table, clock=clock, lease_duration=30
        )
        return BlockingStore(store, self.loop)


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    loop = LoopThread()
    yield loop
    loop.stop()


@pytest.fixture
def async_pg_pool(pg_dsn: str, loop_thread: LoopThread) -> Iterator[AsyncConnectionPool[Any]]:
    async def opened() -> AsyncConnectionPool[Any]:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            pg_dsn, min_size=1, max_size=4, open=False
        )
        await pool.open()
        return pool

    pool = loop_thread.run(opened())
    yield pool
    loop_thread.run(pool.close())


class TestAsyncPostgresStore(StoreContract, ReadAheadContract, ProgressContract):
    """The same contract for :class:`AsyncPostgresStore`, each call awaited on a loop thread."""

    @pytest.fixture
    def harness(
        self,
        pg_pool: ConnectionPool[Any],
        async_pg_pool: AsyncConnectionPool[Any],
        loop_thread: LoopThread,
        pg_schema: str,
    ) -> StoreHarness:
        return AsyncPostgresHarness(pg_pool, async_pg_pool, loop_thread, pg_schema)
