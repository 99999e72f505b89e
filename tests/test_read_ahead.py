"""The poll loop's read-ahead: the next batch is checked out while this one publishes.

A batch that can read ahead (``ReadAheadBatch``) lets the relay overlap the database's work
with its own. These tests hold it to what the store contract says: the next batch continues a
sequence only after this batch's last message of it, under the same lease; a sequence that did
not finish in this batch is held back in the next and not carried further; nothing is lost or
reordered when the relay stops, is cancelled, or its lease is taken over; a row committed late
with an earlier id still goes out (guarantee 4), before any message written after its commit
(guarantee 3).
The in-memory store shows the relay's side; PostgreSQL shows the real store's.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import Counter
from collections.abc import Collection, Sequence
from typing import Any

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from outboxbind import (
    AsyncRelay,
    LeaseLost,
    NotAttempted,
    PersistedMessage,
    Relay,
    RetryPolicy,
    bind,
)
from outboxbind.store import ReadAheadBatch, SequenceKey
from outboxbind.stores.memory import MOST_CONTINUATIONS, InMemoryBatch, InMemoryStore
from outboxbind.stores.postgres import AsyncPostgresStore, PostgresStore, persister
from outboxbind.stores.postgres.store import MOST_CONTINUATIONS as PG_MOST_CONTINUATIONS
from outboxbind.stores.postgres.store import AsyncPostgresBatch, PostgresBatch
from outboxbind.testing import FakeClock
from outboxbind.topics.memory import InMemoryTopic

from support import OrderPlaced, order_topic

NO_DELAY = RetryPolicy(max_attempts=100, initial_delay=0.001, jitter=0.0)


class WatchedStore(InMemoryStore):
    """An in-memory store that notes each checkout: when it started and ended, and whether it
    was a read-ahead; ``slow`` seconds stand in for the database's time."""

    def __init__(self, slow: float = 0.0) -> None:
        super().__init__()
        self.slow = slow
        self.checkouts: list[tuple[float, float, bool]] = []
        self.handed_out: Counter[str] = Counter()  # messages checked out, per ordering key

    def _checkout(
        self,
        topic_names: Sequence[str],
        limit: int,
        parent: InMemoryBatch | None = None,
        continuing: Collection[SequenceKey] = (),
    ) -> InMemoryBatch | None:
        started = time.monotonic()
        time.sleep(self.slow)
        batch = super()._checkout(topic_names, limit, parent, continuing)
        self.checkouts.append((started, time.monotonic(), parent is not None))
        for message in batch.messages if batch is not None else ():
            self.handed_out[message.ordering_key or ""] += 1
        return batch

    def read_ahead_count(self) -> int:
        return sum(ahead for _, _, ahead in self.checkouts)


class TimedTopic(InMemoryTopic[OrderPlaced]):
    """Orders by customer; notes when each batch's publish started and ended."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("orders", order_topic().codec, ordering_key=lambda m: m.customer, **kwargs)
        self.spans: list[tuple[float, float]] = []

    def publish_batch(self, messages: Sequence[PersistedMessage], *, timeout: float) -> Any:
        started = time.monotonic()
        try:
            return super().publish_batch(messages, timeout=timeout)
        finally:
            self.spans.append((started, time.monotonic()))


def write(store: InMemoryStore, topic: InMemoryTopic[OrderPlaced], *orders: OrderPlaced) -> None:
    with store.transaction() as tx:
        publisher = bind(topic, tx)
        for order in orders:
            publisher.publish(order)


def per_customer(topic: InMemoryTopic[OrderPlaced]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for order in topic.messages():
        seen.setdefault(order.customer, []).append(order.order_id)
    return seen


def poll_until(relay: Relay, batch_size: int, done: Any, timeout: float = 20.0) -> None:
    """Run ``relay`` polling in a thread until ``done()``; stop it (draining) and join."""
    thread = threading.Thread(target=relay.poll_for_messages, args=(batch_size,))
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not done() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert done(), f"not done within {timeout}s: {relay.totals}"
    finally:
        assert relay.stop(timeout=10)
        thread.join(10)


# -- the relay's side, over the in-memory store ---------------------------------------------------


def test_the_next_batch_is_checked_out_while_this_one_publishes() -> None:
    store = WatchedStore(slow=0.015)
    topic = TimedTopic(delay=0.03)
    write(store, topic, *[OrderPlaced(i, "ann") for i in range(100)])
    relay = Relay(store, poll_interval=60.0)
    relay.register_topic(topic)

    poll_until(relay, 10, lambda: len(topic.published) == 100)

    assert per_customer(topic) == {"ann": list(range(100))}  # once each, in order
    read_ahead = [(start, end) for start, end, ahead in store.checkouts if ahead]
    overlapping = [r for r in read_ahead if any(s < r[1] and r[0] < e for s, e in topic.spans)]
    assert len(read_ahead) >= 9  # ten batches of one sequence: each reads the next ahead
    assert overlapping == read_ahead  # each while a publish was under way
    assert store.pending_ids() == []


def test_a_failed_message_holds_back_its_keys_messages_read_ahead() -> None:
    failures = {5: 2, 23: 1}  # order id -> how many times it fails before it goes through

    def fail(message: PersistedMessage) -> BaseException | None:
        order_id = int(message.data.split(b'"order_id":')[1].split(b",")[0])
        if failures.get(order_id, 0) > 0:
            failures[order_id] -= 1
            return ConnectionError(f"order {order_id} refused")
        return None

    store = InMemoryStore()
    topic = TimedTopic(fail=fail)
    write(store, topic, *[OrderPlaced(i, "ann" if i % 2 else "bob") for i in range(60)])
    relay = Relay(store, poll_interval=0.01)
    relay.register_topic(topic, retry=NO_DELAY)

    poll_until(relay, 6, lambda: len(topic.published) == 60)

    assert per_customer(topic) == {
        "bob": list(range(0, 60, 2)),
        "ann": list(range(1, 60, 2)),
    }  # every message once (failures never reached the topic), in order per key
    assert relay.totals["failed"] == 3


def test_a_key_whose_messages_are_not_attempted_is_not_carried_on_and_not_starved() -> None:
    refusals = {"ann": 3}  # the topic refuses ann's messages three times, without an attempt

    def fail(message: PersistedMessage) -> BaseException | None:
        if message.ordering_key == "ann" and refusals["ann"] > 0:
            refusals["ann"] -= 1
            return NotAttempted("circuit open")
        return None

    store = WatchedStore()
    topic = TimedTopic(fail=fail)
    write(store, topic, *[OrderPlaced(i, "ann" if i % 2 else "bob") for i in range(80)])
    relay = Relay(store, poll_interval=0.01)
    relay.register_topic(topic)

    poll_until(relay, 8, lambda: len(topic.published) == 80)

    assert per_customer(topic) == {
        "bob": list(range(0, 80, 2)),
        "ann": list(range(1, 80, 2)),
    }
    assert relay.totals["failed"] == 0  # not attempted is not a failure
    # ann stops being carried on at once: each refusal costs at most this batch's and the
    # next's share of ann (4 each), not a chain of batches that hold ann back
    assert store.handed_out["ann"] <= 40 + 3 * 8 + 8  # (64 seen; 112 when ann is carried on)


def test_stopping_releases_the_batch_read_ahead_unpublished() -> None:
    store = WatchedStore()
    topic = TimedTopic(delay=0.05)
    write(store, topic, *[OrderPlaced(i, "ann") for i in range(200)])
    relay = Relay(store, poll_interval=60.0)
    relay.register_topic(topic)
    thread = threading.Thread(target=relay.poll_for_messages, args=(10,))
    thread.start()
    while store.read_ahead_count() == 0:
        time.sleep(0.005)
    assert relay.stop(drain=False, timeout=10)
    thread.join(10)

    published = [int(id_) for id_ in topic.outbox_ids()]
    assert published == sorted(published)
    # nothing stays leased: another relay gets the rest at once, from where the first stopped
    batch = store.checkout_batch(["orders"], 1000)
    assert batch is not None
    assert [int(m.id) for m in batch.messages] == list(range(len(published) + 1, 201))
    batch.close()


def test_a_row_committed_late_with_an_earlier_id_waits_a_bounded_number_of_batches() -> None:
    store = InMemoryStore()
    topic = TimedTopic(delay=0.002)
    late = store.transaction()
    tx = late.__enter__()
    bind(topic, tx).publish(OrderPlaced(-1, "ann"))  # takes id 1, commits later
    write(store, topic, *[OrderPlaced(i, "ann") for i in range(2000)])
    relay = Relay(store, poll_interval=60.0)
    relay.register_topic(topic)
    thread = threading.Thread(target=relay.poll_for_messages, args=(10,))
    thread.start()
    try:
        while len(topic.published) < 100:
            time.sleep(0.001)
        late.__exit__(None, None, None)  # commit: id 1 is now behind the chain's position
        committed_at = len(topic.published)
        deadline = time.monotonic() + 20
        while "1" not in topic.outbox_ids() and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        relay.stop(drain=False, timeout=10)
        thread.join(10)
    ids = topic.outbox_ids()
    assert "1" in ids
    published_before_it = ids.index("1") - committed_at
    assert published_before_it <= (MOST_CONTINUATIONS + 2) * 10 <= 200


def test_a_message_written_after_a_late_commit_never_goes_out_before_it() -> None:
    """Guarantee 3 across a read-ahead chain (see the PostgreSQL test of the same name)."""
    store = InMemoryStore()
    topic = TimedTopic()
    late = store.transaction()
    bind(topic, late.__enter__()).publish(OrderPlaced(-1, "ann"))  # takes id 1
    write(store, topic, *[OrderPlaced(i, "ann") for i in range(60)])

    def commit_late_then_write(read_ahead: int) -> None:
        if read_ahead == 2:
            late.__exit__(None, None, None)
            write(store, topic, OrderPlaced(60, "ann"))  # id 62

    published, _ = drain_by_hand(store, 10, commit_late_then_write)
    assert sorted(published, key=int) == [str(i) for i in range(1, 63)]
    assert published.index("1") < published.index("62")
    assert published[20] == "1"


def test_async_relay_reads_ahead_and_cancelling_releases_both_batches() -> None:
    store = WatchedStore()
    topic = TimedTopic(delay=0.02)
    write(store, topic, *[OrderPlaced(i, "ann") for i in range(300)])

    async def main() -> None:
        relay = AsyncRelay(store, poll_interval=60.0)
        relay.register_topic(topic)
        task = asyncio.create_task(relay.poll_for_messages(10))
        while store.read_ahead_count() < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    published = [int(id_) for id_ in topic.outbox_ids()]
    assert published == list(range(1, len(published) + 1))
    batch = store.checkout_batch(["orders"], 1000)  # nothing left leased
    assert batch is not None
    assert [int(m.id) for m in batch.messages] == list(range(len(published) + 1, 301))
    batch.close()


# -- the PostgreSQL store ---------------------------------------------------------------------


@pytest.fixture
def clocked(pg_pool: ConnectionPool[Any], pg_schema: str, clock: FakeClock) -> PostgresStore:
    store = PostgresStore(pg_pool, schema=pg_schema, lease_duration=30, clock=clock)
    store.migrate()
    return store


def pg_write(dsn: str, schema: str, *keys: str) -> list[str]:
    """One message per key given, in one transaction; their outbox ids."""
    topic = order_topic()
    with psycopg.connect(dsn) as conn, conn.transaction():
        publisher = bind(topic, persister(conn, schema=schema))
        return [publisher.publish(OrderPlaced(i, key)) for i, key in enumerate(keys)]


def two_batches_in_flight(
    store: PostgresStore, dsn: str, schema: str
) -> tuple[PostgresBatch, PostgresBatch]:
    """Two messages for each of twelve keys; a batch of four keys, one message each, checked
    out and published, and the next batch of four others read ahead from it, still open."""
    pg_write(dsn, schema, *[f"k{i:02}" for i in range(12) for _ in range(2)])
    first = store.checkout_batch(["orders"], 4)
    assert isinstance(first, PostgresBatch)
    second = first.read_ahead(["orders"], 4, set())
    assert isinstance(second, PostgresBatch)
    for message in first.messages:
        first.mark_published(message, "p")
    return first, second


def test_postgres_read_ahead_continues_the_sequence_under_the_same_lease(
    pg_dsn: str, pg_schema: str, clocked: PostgresStore, pg_pool: ConnectionPool[Any]
) -> None:
    ids = pg_write(pg_dsn, pg_schema, *["ann"] * 25)
    other_relay = PostgresStore(pg_pool, schema=pg_schema, lease_duration=30)

    first = clocked.checkout_batch(["orders"], 10)
    assert first is not None
    assert isinstance(first, ReadAheadBatch)
    second = first.read_ahead(["orders"], 10, {("orders", "ann")})
    assert second is not None
    assert [m.id for m in first.messages] == ids[:10]
    assert [m.id for m in second.messages] == ids[10:20]
    assert other_relay.checkout_batch(["orders"], 10) is None  # the sequence is held

    for message in first.messages:
        first.mark_published(message, "p")
    first.close()  # keeps the lease for the second batch: no LeaseLost
    assert other_relay.checkout_batch(["orders"], 10) is None

    for message in second.messages:
        second.mark_published(message, "p")
    second.close()
    rest = other_relay.checkout_batch(["orders"], 10)
    assert rest is not None
    assert [m.id for m in rest.messages] == ids[20:]
    rest.close()


def test_postgres_read_ahead_closes_the_batch_before_in_the_same_round_trip(
    pg_dsn: str, pg_schema: str, clocked: PostgresStore
) -> None:
    ids = pg_write(pg_dsn, pg_schema, *["ann"] * 30)
    first = clocked.checkout_batch(["orders"], 10)
    assert isinstance(first, ReadAheadBatch)
    second = first.read_ahead(["orders"], 10, {("orders", "ann")})
    assert isinstance(second, ReadAheadBatch)
    for message in first.messages:
        first.mark_published(message, "p")
    third = second.read_ahead(["orders"], 10, {("orders", "ann")}, first)
    assert third is not None
    assert [m.id for m in third.messages] == ids[20:]
    assert first.closed  # closed by the read-ahead, before its own close() was called
    with psycopg.connect(pg_dsn) as conn:
        left = conn.execute(f'SELECT id FROM "{pg_schema}".outbox ORDER BY id').fetchall()
    assert [str(row[0]) for row in left] == ids[10:]  # its marks applied, exactly once
    first.close()  # nothing left to do, nothing to raise
    second.close()
    third.close()


def test_postgres_a_read_ahead_whose_close_fails_leaves_no_lease_and_the_batch_before_open(
    pg_dsn: str, pg_schema: str, clocked: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch before is closed in the read-ahead's transaction, while its rows are decoded:
    when that close fails on the server, the claim is rolled back with it (nothing is left
    leased for a batch nobody holds) and the batch before stays open for its own close()."""
    ids = pg_write(pg_dsn, pg_schema, *[f"k{i:02}" for i in range(12) for _ in range(2)])
    first = clocked.checkout_batch(["orders"], 4)  # four keys, one message each
    assert isinstance(first, ReadAheadBatch)
    second = first.read_ahead(["orders"], 4, set())  # four others
    assert isinstance(second, ReadAheadBatch)
    held = sorted({m.ordering_key or "" for m in [*first.messages, *second.messages]})
    assert len(held) == 8
    for message in first.messages:
        first.mark_published(message, "p")
    close_params = clocked._s.close_params

    def unparseable(batch: Any) -> dict[str, Any]:
        return {**close_params(batch), "published": "{not a number}"}  # fails on the server

    monkeypatch.setattr(clocked._s, "close_params", unparseable)
    with pytest.raises(psycopg.errors.InvalidTextRepresentation):
        second.read_ahead(["orders"], 4, set(), first)  # four free keys are left to claim
    monkeypatch.undo()
    assert not first.closed
    with psycopg.connect(pg_dsn) as conn:
        leases = conn.execute(
            f'SELECT ordering_key FROM "{pg_schema}".outbox_leases ORDER BY ordering_key'
        ).fetchall()
    assert [key for (key,) in leases] == held  # the first two batches' leases, no third claim
    first.close()  # applies its marks now, once
    second.close()
    with psycopg.connect(pg_dsn) as conn:
        left = conn.execute(f'SELECT id FROM "{pg_schema}".outbox ORDER BY id').fetchall()
    assert sorted(str(row[0]) for row in left) == sorted(set(ids) - {m.id for m in first.messages})


@pytest.mark.parametrize("autocommit", [False, True], ids=["pool", "autocommit-pool"])
def test_postgres_a_checkout_is_one_transaction_and_gives_the_connection_back_as_it_was(
    pg_dsn: str, pg_schema: str, clock: FakeClock, autocommit: bool
) -> None:
    """The relay's statements begin and commit their own transaction, on a pool of autocommit
    connections too: a read-ahead whose close fails leaves nothing of its claim behind. Each
    connection goes back to the pool in its own mode, idle, after a failure as well."""
    with ConnectionPool(
        pg_dsn, min_size=1, max_size=1, kwargs={"autocommit": autocommit}, open=True
    ) as pool:
        store = PostgresStore(pool, schema=pg_schema, lease_duration=30, clock=clock)
        store.migrate()
        first, second = two_batches_in_flight(store, pg_dsn, pg_schema)
        close_params = store._s.close_params
        store._s.close_params = lambda batch: {  # type: ignore[method-assign]
            **close_params(batch),
            "published": "{not a number}",  # fails on the server, after the claim
        }
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            second.read_ahead(["orders"], 4, set(), first)
        store._s.close_params = close_params  # type: ignore[method-assign]
        with pool.connection() as conn:
            assert conn.autocommit is autocommit
            assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with psycopg.connect(pg_dsn) as conn:
            [(leased,)] = conn.execute(
                f'SELECT count(*) FROM "{pg_schema}".outbox_leases'
            ).fetchall()
        assert leased == 8  # the two batches' four keys each: the failed claim left none
        first.close()
        second.close()
        with pool.connection() as conn:
            assert conn.autocommit is autocommit
        with psycopg.connect(pg_dsn) as conn:
            [(leased,)] = conn.execute(
                f'SELECT count(*) FROM "{pg_schema}".outbox_leases'
            ).fetchall()
            [(left,)] = conn.execute(f'SELECT count(*) FROM "{pg_schema}".outbox').fetchall()
        assert (leased, left) == (0, 20)


def test_postgres_a_read_ahead_that_cannot_decode_its_rows_commits_nothing(
    pg_dsn: str, pg_schema: str, clocked: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read-ahead's transaction commits only after its rows became a batch: if that fails,
    neither its claim nor its close of the batch before is kept."""
    first, second = two_batches_in_flight(clocked, pg_dsn, pg_schema)

    def undecodable(*_args: object) -> object:
        raise MemoryError("no room for the rows")

    monkeypatch.setattr(clocked._s, "batch_messages", undecodable)
    with pytest.raises(MemoryError):
        second.read_ahead(["orders"], 4, set(), first)
    monkeypatch.undo()
    assert not first.closed
    with psycopg.connect(pg_dsn) as conn:
        leases = conn.execute(f'SELECT count(*) FROM "{pg_schema}".outbox_leases').fetchone()
        left = conn.execute(f'SELECT count(*) FROM "{pg_schema}".outbox').fetchone()
    assert leases == (8,)  # the first two batches' only
    assert left == (24,)  # the close was not committed either
    first.close()
    second.close()
    with psycopg.connect(pg_dsn) as conn:
        left = conn.execute(f'SELECT count(*) FROM "{pg_schema}".outbox').fetchone()
    assert left == (20,)


def test_postgres_read_ahead_leaves_its_sequences_when_free_ones_fill_the_batch(
    pg_dsn: str, pg_schema: str, clocked: PostgresStore
) -> None:
    pg_write(pg_dsn, pg_schema, *[f"k{i}" for i in range(8) for _ in range(5)])
    first = clocked.checkout_batch(["orders"], 20)
    assert first is not None
    held = {m.ordering_key for m in first.messages}
    continuing = {("orders", key or "") for key in held}
    second = first.read_ahead(["orders"], 20, continuing)
    assert second is not None
    assert len(second.messages) == 20
    assert held.isdisjoint({m.ordering_key for m in second.messages})  # fair: others first
    assert first.passed_on == set()
    first.close()
    second.close()


def test_postgres_an_interrupt_while_the_read_ahead_closes_the_batch_before_closes_it_once(
    pg_dsn: str, pg_schema: str, pg_pool: ConnectionPool[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C while the poll loop waits for a read-ahead that is closing the batch before in
    its claim's transaction: the relay waits for that call before releasing its batches, so the
    batch's marks are applied once (a failure counts one attempt) and nothing stays leased."""
    from outboxbind import relay as relay_module

    store = PostgresStore(pg_pool, schema=pg_schema, lease_duration=30)
    store.migrate()
    pg_write(pg_dsn, pg_schema, *["ann"] * 6, *["bob"] * 4)
    codec = order_topic().codec
    closing = threading.Event()
    execute = psycopg.RawCursor.execute
    result_or_error = relay_module._result_or_error
    close_batch, _ = store._s.numbered["close_batch"]

    def slow_close(self: psycopg.RawCursor[Any], query: Any, *args: Any, **kwargs: Any) -> Any:
        cursor = execute(self, query, *args, **kwargs)
        if query is close_batch and sys._getframe(1).f_code.co_name == "_checkout":
            closing.set()  # closed within the read-ahead, which holds its locks a while
            self.connection.execute("SELECT pg_sleep(0.5)")
        return cursor

    def interrupted(future: Any) -> object:
        if closing.wait(0.2):  # Ctrl-C while that read-ahead is under way
            raise KeyboardInterrupt
        return result_or_error(future)

    def fail_first(message: PersistedMessage) -> BaseException | None:
        return ConnectionError("refused") if codec.decode(message.data).order_id == 0 else None

    monkeypatch.setattr(psycopg.RawCursor, "execute", slow_close)
    monkeypatch.setattr(relay_module, "_result_or_error", interrupted)
    topic = InMemoryTopic("orders", codec, ordering_key=lambda m: m.customer, fail=fail_first)
    relay = Relay(store, poll_interval=60.0, publish_timeout=5.0)
    relay.register_topic(topic, retry=RetryPolicy(max_attempts=5, initial_delay=30, jitter=0.0))
    with pytest.raises(KeyboardInterrupt):
        relay.poll_for_messages(4)
    monkeypatch.undo()
    assert closing.is_set()
    with psycopg.connect(pg_dsn) as conn:
        attempts = conn.execute(
            f'SELECT attempts FROM "{pg_schema}".outbox WHERE attempts > 0'
        ).fetchall()
        leases = conn.execute(f'SELECT ordering_key FROM "{pg_schema}".outbox_leases').fetchall()
    assert attempts == [(1,)]  # order 0 failed once: one attempt, not two
    assert leases == []


def test_postgres_a_taken_over_chain_can_change_nothing(
    pg_dsn: str, pg_schema: str, clocked: PostgresStore, pg_pool: ConnectionPool[Any],
    clock: FakeClock,
) -> None:  # fmt: skip
    ids = pg_write(pg_dsn, pg_schema, *["ann"] * 30)
    first = clocked.checkout_batch(["orders"], 10)
    assert first is not None
    second = first.read_ahead(["orders"], 10, {("orders", "ann")})
    assert second is not None
    clock.advance(31)  # the lease expires: another relay takes the sequence over
    other = PostgresStore(pg_pool, schema=pg_schema, lease_duration=30, clock=clock)
    taken = other.checkout_batch(["orders"], 30)
    assert taken is not None
    assert [m.id for m in taken.messages] == ids

    for batch in (first, second):
        for message in batch.messages:
            batch.mark_published(message, "p")
        with pytest.raises(LeaseLost):
            batch.close()
    taken.close()  # released, nothing acknowledged by the fenced-off batches
    again = other.checkout_batch(["orders"], 30)
    assert again is not None
    assert [m.id for m in again.messages] == ids
    again.close()


def test_postgres_a_row_committed_late_is_published_within_a_bounded_number_of_batches(
    pg_dsn: str, pg_schema: str, pg_pool: ConnectionPool[Any]
) -> None:
    store = PostgresStore(pg_pool, schema=pg_schema)
    store.migrate()
    topic = TimedTopic(delay=0.002)
    with psycopg.connect(pg_dsn) as late:
        late_id = bind(topic, persister(late, schema=pg_schema)).publish(OrderPlaced(-1, "ann"))
        ids = pg_write(pg_dsn, pg_schema, *["ann"] * 1500)
        assert int(late_id) < int(ids[0])
        relay = Relay(store, poll_interval=60.0)
        relay.register_topic(topic)
        thread = threading.Thread(target=relay.poll_for_messages, args=(10,))
        thread.start()
        try:
            while len(topic.published) < 100:
                time.sleep(0.001)
            late.commit()
            committed_at = len(topic.published)
            deadline = time.monotonic() + 20
            while late_id not in topic.outbox_ids() and time.monotonic() < deadline:
                time.sleep(0.001)
        finally:
            relay.stop(drain=False, timeout=10)
            thread.join(10)
    published = topic.outbox_ids()
    assert late_id in published
    assert published.index(late_id) - committed_at <= (PG_MOST_CONTINUATIONS + 2) * 10 <= 200
    assert len(set(published)) == len(published)  # nothing twice


def drain_by_hand(
    store: PostgresStore | InMemoryStore, limit: int, before_read_ahead: Any = None
) -> tuple[list[str], list[str]]:
    """Publish the "ann" sequence the poll loop's way, batch after batch read ahead: each
    read-ahead closes the batch before it; when none comes back the open batches are closed and
    a fresh checkout reads the sequence from its head. ``before_read_ahead(n)`` runs before the
    n-th read-ahead (from 1). Returns the ids published, in order, and each batch's lease token.
    """
    published: list[str] = []
    tokens: list[str] = []
    batch = store.checkout_batch(["orders"], limit)
    previous: PostgresBatch | InMemoryBatch | None = None
    read_aheads = 0
    while batch is not None:
        tokens.append(batch.tokens[("orders", "ann")])
        read_aheads += 1
        if before_read_ahead is not None:
            before_read_ahead(read_aheads)
        following = batch.read_ahead(["orders"], limit, {("orders", "ann")}, previous)
        for message in batch.messages:
            batch.mark_published(message, "p")
        published += [message.id for message in batch.messages]
        if previous is not None and not previous.closed:
            previous.close()
        previous, batch = batch, following
        if batch is None:  # let go: the open batch ends, the sequence is read from its head
            previous.close()
            previous, batch = None, store.checkout_batch(["orders"], limit)
    if previous is not None:
        previous.close()
    return published, tokens


def test_postgres_a_long_read_ahead_chain_keeps_its_lease_while_nothing_comes_late(
    pg_dsn: str, pg_schema: str, clocked: PostgresStore
) -> None:
    ids = pg_write(pg_dsn, pg_schema, *["ann"] * 400)
    published, tokens = drain_by_hand(clocked, 10)
    assert published == ids
    # past the point where the store looks for rows committed late (twice), no round without
    # a batch read ahead: one lease all along
    assert len(tokens) == 40 > 2 * PG_MOST_CONTINUATIONS
    assert set(tokens) == {tokens[0]}


def test_postgres_a_row_committed_late_between_the_batches_in_flight_is_found(
    pg_dsn: str, pg_schema: str, clocked: PostgresStore
) -> None:
    """The late row's position lies between the first and last of the two batches in flight
    when the store looks: only a count of the rows below, not their lowest one, finds it."""
    earlier = pg_write(pg_dsn, pg_schema, *["ann"] * (10 * PG_MOST_CONTINUATIONS + 5))
    with psycopg.connect(pg_dsn) as late:
        late_id = bind(order_topic(), persister(late, schema=pg_schema)).publish(
            OrderPlaced(-1, "ann")
        )
        later = pg_write(pg_dsn, pg_schema, *["ann"] * 100)
        looked_at = PG_MOST_CONTINUATIONS + 1  # the read-ahead of the batch that many in a row

        def commit_late(read_ahead: int) -> None:
            if read_ahead == looked_at:
                late.commit()

        published, tokens = drain_by_hand(clocked, 10, commit_late)
    in_flight = published[10 * (looked_at - 2) : 10 * looked_at]  # the batches before it
    assert int(in_flight[0]) < int(late_id) < int(in_flight[-1])
    assert sorted(published, key=int) == sorted([*earlier, late_id, *later], key=int)
    assert len(set(published)) == len(published)  # nothing twice
    # let go at once: the late row leads the first batch read from the head again
    assert published.index(late_id) == 10 * looked_at
    assert len(set(tokens)) == 2


def test_postgres_a_message_written_after_a_late_commit_never_goes_out_before_it(
    pg_dsn: str, pg_schema: str, clocked: PostgresStore
) -> None:
    """Guarantee 3 across a read-ahead chain: the late row's transaction commits, then a new
    message of its key is written. The chain reads on after the open batch's last position,
    past the late row's; the new message must still not be published before the late row,
    however few batches the chain has run."""
    with psycopg.connect(pg_dsn) as late:
        late_id = bind(order_topic(), persister(late, schema=pg_schema)).publish(
            OrderPlaced(-1, "ann")
        )
        earlier = pg_write(pg_dsn, pg_schema, *["ann"] * 60)
        written_after: list[str] = []

        def commit_late_then_write(read_ahead: int) -> None:
            if read_ahead == 2:  # two batches read (by the head, then after it), the second open
                late.commit()
                written_after.extend(pg_write(pg_dsn, pg_schema, "ann"))

        published, _ = drain_by_hand(clocked, 10, commit_late_then_write)
    assert sorted(published, key=int) == sorted([late_id, *earlier, *written_after], key=int)
    assert len(set(published)) == len(published)  # nothing twice
    assert published.index(late_id) < published.index(written_after[0])
    # found at the first read-ahead after its commit: what was in flight, then the late row
    assert published[20] == late_id


def test_postgres_a_commit_that_leaves_nothing_late_keeps_the_chain_going(
    pg_dsn: str, pg_schema: str, clocked: PostgresStore
) -> None:
    """Other transactions commit while the chain runs (with a transaction id: they wrote):
    a row of the sequence may have come late, so the store counts the rows below and, finding
    only the batches' own, carries the sequence on."""
    ids = pg_write(pg_dsn, pg_schema, *["ann"] * 100)

    def another_transaction_commits(read_ahead: int) -> None:
        with psycopg.connect(pg_dsn) as conn:
            conn.execute("SELECT pg_current_xact_id()")  # takes a transaction id; commits

    published, tokens = drain_by_hand(clocked, 10, another_transaction_commits)
    assert published == ids
    assert set(tokens) == {tokens[0]}  # one lease all along: no round without a read-ahead


class CountingAsyncStore(AsyncPostgresStore):
    """An asyncio PostgreSQL store that counts the batches read ahead."""

    read_ahead = 0

    async def _checkout(
        self,
        topic_names: Sequence[str],
        limit: int,
        parent: AsyncPostgresBatch | None = None,
        continuing: Collection[SequenceKey] = (),
        closing: AsyncPostgresBatch | None = None,
    ) -> AsyncPostgresBatch | None:
        self.read_ahead += parent is not None
        return await super()._checkout(topic_names, limit, parent, continuing, closing)


@pytest.mark.parametrize("autocommit", [False, True], ids=["pool", "autocommit-pool"])
def test_postgres_async_relay_reads_ahead_in_order_and_leaves_nothing_leased(
    pg_dsn: str, pg_schema: str, clocked: PostgresStore, autocommit: bool
) -> None:
    keys = ["ann"] * 150 + [f"k{i % 7}" for i in range(150)]
    ids = pg_write(pg_dsn, pg_schema, *keys)
    topic = TimedTopic(delay=0.002)

    async def main() -> int:
        async with AsyncConnectionPool(
            pg_dsn, min_size=1, max_size=4, kwargs={"autocommit": autocommit}
        ) as pool:
            store = CountingAsyncStore(pool, schema=pg_schema)
            relay = AsyncRelay(store, poll_interval=60.0)
            relay.register_topic(topic)
            task = asyncio.create_task(relay.poll_for_messages(20))
            deadline = time.monotonic() + 20
            while len(topic.published) < len(ids) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            assert await relay.stop(timeout=10)
            await task
            async with pool.connection() as conn:  # given back in its own mode
                assert conn.autocommit is autocommit
            return store.read_ahead

    assert asyncio.run(main()) >= 5
    published = topic.outbox_ids()
    assert sorted(published, key=int) == ids  # every one, once
    per_key: dict[str, list[int]] = {}
    for message in topic.published:
        per_key.setdefault(message.ordering_key or "", []).append(int(message.outbox_id or 0))
    assert all(order == sorted(order) for order in per_key.values())
    with psycopg.connect(pg_dsn) as conn:
        leases = conn.execute(f'SELECT count(*) FROM "{pg_schema}".outbox_leases').fetchone()
        rows = conn.execute(f'SELECT count(*) FROM "{pg_schema}".outbox').fetchone()
    assert leases == (0,)
    assert rows == (0,)


def test_a_batch_that_could_not_take_its_marks_holds_back_its_sequences_read_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second batch's marks are lost (its messages are released on close, unacknowledged,
    and published again): no later message of its key may go out before they do. The round's
    store error makes the loop close both batches (the one read ahead released unpublished)
    before it backs off, so the next round starts again from the released messages."""
    calls = {"n": 0}
    record = InMemoryBatch.record

    def flaky_record(self: InMemoryBatch, marks: Sequence[Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("lost the marks")
        record(self, marks)

    monkeypatch.setattr(InMemoryBatch, "record", flaky_record)
    store = InMemoryStore()
    topic = TimedTopic(delay=0.002)
    write(store, topic, *[OrderPlaced(i, "ann") for i in range(60)])
    relay = Relay(store, poll_interval=0.01)
    relay.register_topic(topic)

    poll_until(relay, 10, lambda: store.pending_ids() == [])

    order = [int(id_) for id_ in topic.outbox_ids()]
    last_seen = {id_: index for index, id_ in enumerate(order)}
    assert sorted(last_seen) == list(range(1, 61))
    assert len(order) > 60  # the second batch went out twice
    # a subscriber keeping the latest delivery of each message sees them in write order: the
    # second batch went out again before anything after it, not after later batches
    assert sorted(last_seen, key=last_seen.__getitem__) == list(range(1, 61)), order
