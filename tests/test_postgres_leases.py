"""Guarantee 6 under a stuck relay: no relay ever waits on another relay's transaction.

A relay's claim leases sequences and commits at once, but a relay can stop anywhere: a VM stall,
a GC pause, a partition that keeps its socket open, or (on the read-ahead path) the time it
takes to decode the rows before the claim's COMMIT goes out. Here one relay's claim is run by
hand and left uncommitted, exactly the state such a relay leaves its transaction in, while a
healthy relay works beside it. The healthy relay must skip the stuck relay's sequences and
publish every other one at once; the stuck relay's leases are dated from when they were granted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from psycopg_pool import ConnectionPool

from outboxbind import JsonCodec, Relay, bind
from outboxbind.stores.postgres import PostgresStore, persister
from outboxbind.topics.memory import InMemoryTopic

from support import OrderPlaced

KEYS = [f"key-{n:02d}" for n in range(12)]


def orders_topic() -> InMemoryTopic[OrderPlaced]:
    return InMemoryTopic("orders", JsonCodec(OrderPlaced), ordering_key=lambda m: m.customer)


@pytest.fixture
def stores(pg_pool: ConnectionPool[Any], pg_schema: str) -> tuple[PostgresStore, PostgresStore]:
    """Two relays' stores over one fresh outbox: the stuck one's and the healthy one's."""
    stuck = PostgresStore(pg_pool, schema=pg_schema, lease_duration=30, owner="stuck")
    healthy = PostgresStore(pg_pool, schema=pg_schema, lease_duration=30, owner="healthy")
    stuck.migrate()
    return stuck, healthy


def write_orders(pool: ConnectionPool[Any], schema: str, per_key: int = 2) -> None:
    topic = orders_topic()
    with pool.connection() as conn, conn.transaction():
        bound = bind(topic, persister(conn, schema=schema))
        for n in range(per_key):
            for key in KEYS:
                bound.publish(OrderPlaced(n, key))


@contextmanager
def claim_left_open(dsn: str, store: PostgresStore, limit: int) -> Iterator[set[str]]:
    """Run ``store``'s claim as its relay does, and leave its transaction open (the relay froze
    before its COMMIT) until the block ends; yields the ordering keys it leased."""
    with psycopg.connect(dsn) as conn:
        params = store._s.checkout_params(["orders"], limit)
        rows = psycopg.RawCursor(conn).execute(*store._s.statement("claim_sequences", params))
        leased = {row[1] for row in rows.fetchall()}
        assert leased, "the stuck relay's claim leased nothing"
        try:
            yield leased
        finally:
            conn.rollback()


def timed_round(relay: Relay, limit: int, hold: float) -> tuple[float, Any]:
    """One round of ``relay`` in a thread; its seconds and result, or ``hold`` seconds and
    None if it was still waiting then."""
    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(relay.process_messages(limit)))
    started = time.monotonic()
    worker.start()
    worker.join(hold)
    return time.monotonic() - started, (result[0] if result else None)


def test_lease_g6_a_healthy_relay_never_waits_for_a_claim_another_relay_left_open(
    pg_dsn: str, pg_pool: ConnectionPool[Any], pg_schema: str, stores: Any
) -> None:
    stuck, healthy = stores
    write_orders(pg_pool, pg_schema)
    topic = orders_topic()
    relay = Relay(healthy, publish_timeout=5.0)
    relay.register_topic(topic)
    # the stuck relay's claim inserted fresh lease rows and did not commit; the healthy relay's
    # walk sees those sequences as free (it cannot see the rows) and tries to lease them too
    with claim_left_open(pg_dsn, stuck, limit=8) as stuck_keys:
        seconds, result = timed_round(relay, 100, hold=5.0)
        assert result is not None, f"the healthy relay waited {seconds:.1f}s for the stuck one"
        assert result.store_error is None, result.store_error
        assert seconds < 2.0
        published = {m.customer for m in topic.messages()}
        assert published == set(KEYS) - stuck_keys  # everything but the stuck relay's keys
    # once the stuck relay is gone (its transaction rolled back), its keys go out too
    for _ in range(10):
        relay.process_messages(100)
    assert {m.customer for m in topic.messages()} == set(KEYS)
    assert len(topic.messages()) == 2 * len(KEYS)


def test_lease_g6_a_batch_closes_without_waiting_for_a_relay_taking_its_expired_lease_over(
    pg_dsn: str, pg_pool: ConnectionPool[Any], pg_schema: str, stores: Any
) -> None:
    """A batch outlived its lease; another relay's claim is taking the lease over and froze
    before its COMMIT. The batch's close must not wait for it: the lease is lost either way."""
    _, healthy = stores
    short = PostgresStore(pg_pool, schema=pg_schema, lease_duration=0.5, owner="slow")
    write_orders(pg_pool, pg_schema, per_key=1)
    batch = short.checkout_batch(["orders"], 100)
    assert batch is not None
    for message in batch.messages:
        batch.mark_published(message, "p")
    time.sleep(0.7)  # the batch's leases expire
    with claim_left_open(pg_dsn, healthy, limit=100) as taken:
        assert taken  # the other relay locked the expired leases to take them over
        closed: list[BaseException | None] = []

        def close() -> None:
            try:
                batch.close()
                closed.append(None)
            except Exception as exc:
                closed.append(exc)

        worker = threading.Thread(target=close)
        started = time.monotonic()
        worker.start()
        worker.join(5.0)
        seconds = time.monotonic() - started
        assert closed, f"the close waited {seconds:.1f}s for the relay taking its lease over"
        assert seconds < 2.0
    assert type(closed[0]).__name__ == "LeaseLost"


def test_lease_g6_leases_run_from_when_they_are_granted_not_from_the_transaction_start(
    pg_dsn: str, pg_pool: ConnectionPool[Any], pg_schema: str, stores: Any
) -> None:
    """A claim whose transaction began a while before it was granted its leases (it waited, or
    the server was slow) still holds them for the whole lease duration."""
    _, healthy = stores
    write_orders(pg_pool, pg_schema, per_key=1)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("SELECT pg_sleep(1.5)")  # the transaction has begun: now() is fixed
        params = {**healthy._s.checkout_params(["orders"], 100), "lease_seconds": 2.0}
        psycopg.RawCursor(conn).execute(*healthy._s.statement("claim_sequences", params))
        row = conn.execute(
            f'SELECT min(expires_at - clock_timestamp()) FROM "{pg_schema}".outbox_leases'
        ).fetchone()
        conn.commit()
    assert row is not None
    remaining = row[0].total_seconds()
    assert remaining > 1.8, f"leases of 2 s granted with {remaining:.2f}s left"


def test_lease_g6_a_read_ahead_never_waits_for_a_relay_taking_its_expired_lease_over(
    pg_dsn: str, pg_pool: ConnectionPool[Any], pg_schema: str, stores: Any
) -> None:
    """A batch outlived its lease and reads ahead to carry its sequence on, while another
    relay's claim, frozen before its COMMIT, is taking that lease over. The read-ahead skips
    the sequence instead of waiting for the frozen claim."""
    _, healthy = stores
    short = PostgresStore(pg_pool, schema=pg_schema, lease_duration=0.5, owner="slow")
    with pg_pool.connection() as conn, conn.transaction():
        bound = bind(orders_topic(), persister(conn, schema=pg_schema))
        for n in range(20):
            bound.publish(OrderPlaced(n, "ann"))
    batch = short.checkout_batch(["orders"], 5)
    assert batch is not None
    time.sleep(0.7)  # the batch's lease expires
    with claim_left_open(pg_dsn, healthy, limit=5) as taken:
        assert taken == {"ann"}
        ahead: list[Any] = []
        worker = threading.Thread(
            target=lambda: ahead.append(batch.read_ahead(["orders"], 5, {("orders", "ann")}))
        )
        started = time.monotonic()
        worker.start()
        worker.join(5.0)
        seconds = time.monotonic() - started
        assert ahead, f"the read-ahead waited {seconds:.1f}s for the relay taking its lease over"
        assert ahead == [None]  # nothing else to read: the sequence is the other relay's now
        assert seconds < 2.0
