"""The benchmark cases, each measured beside its bound in the same run.

Bounds are written by hand as the best a relay could do here:

* ``hand INSERT``: the outbox row inserted with a plain ``INSERT ... VALUES`` in the same kind
  of transaction (one business row, one outbox row, commit);
* ``raw drain``: ``DELETE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING``, the
  payload not parsed, in batches of the same size.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from psycopg_pool import AsyncConnectionPool

from benchmarks.common import (
    DSN,
    PAYLOAD,
    Figure,
    NullTopic,
    PollingRelay,
    commit_to_publish_ms,
    fill_fast,
    outbox,
    relay_over_backlog,
    taking_turns,
    timed,
)
from outboxbind import AsyncRelay, BytesCodec, OutboxEntry, PersistedMessage, bind
from outboxbind.handlers import HandlerContext, HandlerTopic
from outboxbind.stores.postgres import AsyncPostgresStore, persister
from outboxbind.stores.postgres.schema import names_for
from outboxbind.stores.sqlite import SQLiteStore
from outboxbind.stores.sqlite import persister as sqlite_persister
from outboxbind.topics import PublishOutcome, Topic

Case = Callable[[bool], Figure]


# -- publish() in a transaction ----------------------------------------------------------------


def publish_overhead(quick: bool) -> Figure:
    """``bound.publish()`` in a transaction, against a hand INSERT of the same outbox row."""
    transactions = 500 if quick else 5000
    topic = NullTopic("orders")
    with outbox() as (pool, schema, _store):
        outbox_table = names_for(schema, "outbox")["outbox"]
        with pool.connection() as conn:
            conn.execute(f'CREATE TABLE "{schema}".orders (id bigint PRIMARY KEY)')
            conn.commit()
        hand_insert = (
            f"INSERT INTO {outbox_table} (id, position, topic, ordering_key, data, available_at)"
            f" SELECT n, n, %s, '', %s, clock_timestamp()"
            f" FROM nextval('\"{schema}\".outbox_message_ids') AS n"
        )
        business = f'INSERT INTO "{schema}".orders (id) VALUES (%s)'
        order_id = 0
        with pool.connection() as conn:

            def with_publish() -> float:  # us per transaction
                nonlocal order_id
                started = time.perf_counter()
                for _ in range(transactions):
                    order_id += 1
                    with conn.transaction():
                        conn.execute(business, (order_id,))
                        bind(topic, persister(conn, schema=schema)).publish(PAYLOAD)
                return (time.perf_counter() - started) * 1e6 / transactions

            def by_hand() -> float:
                nonlocal order_id
                started = time.perf_counter()
                for _ in range(transactions):
                    order_id += 1
                    with conn.transaction():
                        conn.execute(business, (order_id,))
                        conn.execute(hand_insert, ("orders", PAYLOAD))
                return (time.perf_counter() - started) * 1e6 / transactions

            case_values, bound_values = taking_turns(by_hand, with_publish, 3 if quick else 5)
    return Figure(
        "publish() in a transaction (sync)", "hand INSERT", "us/tx",
        case_values, bound_values, higher_is_better=False, target=1.15,
    )  # fmt: skip


def publish_overhead_async(quick: bool) -> Figure:
    """The asyncio face of :func:`publish_overhead`."""
    transactions = 500 if quick else 5000
    topic = NullTopic("orders")

    async def scenario(schema: str) -> tuple[list[float], list[float]]:
        outbox_table = names_for(schema, "outbox")["outbox"]
        hand_insert = (
            f"INSERT INTO {outbox_table} (id, position, topic, ordering_key, data, available_at)"
            f" SELECT n, n, %s, '', %s, clock_timestamp()"
            f" FROM nextval('\"{schema}\".outbox_message_ids') AS n"
        )
        business = f'INSERT INTO "{schema}".orders (id) VALUES (%s)'
        case_values, bound_values = [], []
        order_id = 0
        async with AsyncConnectionPool(DSN, min_size=1, max_size=2, open=False) as pool:
            for run in range(3 if quick else 5):
                async with pool.connection() as conn:

                    async def by_hand() -> float:
                        nonlocal order_id
                        started = time.perf_counter()
                        for _ in range(transactions):
                            order_id += 1
                            async with conn.transaction():
                                await conn.execute(business, (order_id,))
                                await conn.execute(hand_insert, ("orders", PAYLOAD))
                        return (time.perf_counter() - started) * 1e6 / transactions

                    async def with_publish() -> float:
                        nonlocal order_id
                        started = time.perf_counter()
                        for _ in range(transactions):
                            order_id += 1
                            async with conn.transaction():
                                await conn.execute(business, (order_id,))
                                await bind(topic, persister(conn, schema=schema)).publish(PAYLOAD)
                        return (time.perf_counter() - started) * 1e6 / transactions

                    if run % 2:  # the sides take turns going first
                        case_values.append(await with_publish())
                        bound_values.append(await by_hand())
                    else:
                        bound_values.append(await by_hand())
                        case_values.append(await with_publish())
        return case_values, bound_values

    with outbox() as (pool, schema, _store):
        with pool.connection() as conn:
            conn.execute(f'CREATE TABLE "{schema}".orders (id bigint PRIMARY KEY)')
            conn.commit()
        case_values, bound_values = asyncio.run(scenario(schema))
    return Figure(
        "publish() in a transaction (asyncio)", "hand INSERT", "us/tx",
        case_values, bound_values, higher_is_better=False, target=1.15,
    )  # fmt: skip


# -- draining PostgreSQL to a null topic -------------------------------------------------------


def _raw_drain(pool: Any, schema: str, batch: int) -> int:
    table = names_for(schema, "outbox")["outbox"]
    statement = (
        f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT %s "
        f"FOR UPDATE SKIP LOCKED) RETURNING id, data"
    )
    drained = 0
    with pool.connection() as conn:
        while True:
            with conn.transaction():
                rows = conn.execute(statement, (batch,), binary=True).fetchall()
            if not rows:
                return drained
            drained += len(rows)


def drain_null(batch: int, topics: int, keyed: bool) -> Case:
    """The relay draining PostgreSQL to null topics.

    Unkeyed, against the raw drain of the same rows (target 0.8). Over ordered topics (one
    ordering key each), against the same relay draining the same number of rows unordered,
    one topic: the benchmarks issue's target for ordering is that the drain keeps half of the
    unordered rate (peers collapse there).

    Each side of each run gets an outbox of its own (so neither scans past the rows the other
    deleted), first drains a small backlog there (20 batches: connections open, statements
    prepared), then the measured one. The sides take turns going first.
    """

    def case(quick: bool) -> Figure:
        count = 20_000 if quick else 100_000
        runs = 3 if quick else 5

        def raw() -> float:
            with outbox(pool_size=4) as (pool, schema, _store):
                fill_fast(pool, schema, topics, 20 * batch)
                _raw_drain(pool, schema, batch)
                fill_fast(pool, schema, topics, count)
                return timed(lambda: _raw_drain(pool, schema, batch))

        def unordered() -> float:
            with relay_over_backlog(batch, count) as relay:
                return relay.drain(count)

        def relay() -> float:
            with relay_over_backlog(batch, count, topics, 1 if keyed else 0) as relay:
                return relay.drain(count)

        if keyed:
            case_values, bound_values = taking_turns(unordered, relay, runs)
            return Figure(
                f"drain PostgreSQL -> null, batch {batch}, {topics} ordered topics",
                "same relay, 1 topic unordered", "msgs/s", case_values, bound_values,
                higher_is_better=True, target=0.5,
            )  # fmt: skip
        case_values, bound_values = taking_turns(raw, relay, runs)
        return Figure(
            f"drain PostgreSQL -> null, batch {batch}, {topics} topic", "raw drain", "msgs/s",
            case_values, bound_values, higher_is_better=True, target=0.8,
        )  # fmt: skip

    case.__name__ = f"drain_null_b{batch}_t{topics}{'_keyed' if keyed else ''}"
    return case


class _AsyncNullTopic(NullTopic):
    """The null topic, awaited by the asyncio relay on its loop (no worker thread)."""

    @property
    def async_native(self) -> bool:
        return True

    async def publish_batch_async(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        return self.publish_batch(messages, timeout=timeout)


async def _async_relay_rate(
    pool: Any, schema: str, batch: int, count: int, topic: Topic[Any] | None = None
) -> float:
    """An ``AsyncRelay`` over an ``AsyncPostgresStore``, polling as a task: warmed up on a
    backlog of its own, then woken on ``count`` messages; its rate over them. ``topic``
    (named ``topic-0``) replaces the null topic."""
    async with AsyncConnectionPool(DSN, min_size=2, max_size=4, open=False) as async_pool:
        relay = AsyncRelay(AsyncPostgresStore(async_pool, schema=schema), poll_interval=60.0)
        relay.register_topic(topic or _AsyncNullTopic("topic-0"))
        task = asyncio.create_task(relay.poll_for_messages(batch))
        await asyncio.sleep(0.3)  # polling, and its wake-up connection is up
        try:
            for n in (20 * batch, count):
                await asyncio.to_thread(fill_fast, pool, schema, 1, n)
                target = relay.totals["published"] + n
                started = time.perf_counter()
                relay.wake()
                deadline = time.monotonic() + 120
                while relay.totals["published"] < target and time.monotonic() < deadline:
                    if relay.totals["store_errors"]:
                        raise RuntimeError(f"a relay round failed: {relay.totals}")
                    await asyncio.sleep(0.002)
                elapsed = time.perf_counter() - started
                if relay.totals["published"] != target:
                    raise RuntimeError(f"the asyncio relay did not publish {n} in 120 s")
        finally:
            await relay.stop(drain=False)
            await task
    return count / elapsed


def drain_null_async(quick: bool) -> Figure:
    """The asyncio face: ``AsyncRelay`` over ``AsyncPostgresStore``, batch 500, one topic."""
    count = 20_000 if quick else 100_000

    def raw() -> float:
        with outbox(pool_size=4) as (pool, schema, _store):
            fill_fast(pool, schema, 1, 10_000)
            _raw_drain(pool, schema, 500)
            fill_fast(pool, schema, 1, count)
            return timed(lambda: _raw_drain(pool, schema, 500))

    def relay() -> float:
        with outbox(pool_size=4) as (pool, schema, _store):
            return asyncio.run(_async_relay_rate(pool, schema, 500, count))

    case_values, bound_values = taking_turns(raw, relay, 3 if quick else 5)
    return Figure(
        "drain PostgreSQL -> null, batch 500, 1 topic, asyncio relay", "raw drain", "msgs/s",
        case_values, bound_values, higher_is_better=True, target=0.8,
    )  # fmt: skip


# -- commit -> publish latency ------------------------------------------------------------------


def _latencies_ms(quick: bool) -> list[float]:
    """Commit -> publish latencies with NOTIFY wake-up, one message every 20 ms, null topic."""
    topic = NullTopic("events")
    published_at: dict[str, float] = {}
    topic.on_publish = lambda messages: published_at.update(
        dict.fromkeys((m.id for m in messages), time.perf_counter())
    )
    return commit_to_publish_ms(topic, published_at, 100 if quick else 500)


def latency_null(quick: bool) -> Figure:
    """Commit -> publish latency p50 against the target (2.5 ms); p95 and p99 (target 10 ms) in
    the case's name."""
    p50s, p95s, p99s = [], [], []
    for _ in range(3):
        quantiles = statistics.quantiles(_latencies_ms(quick), n=100)
        p50s.append(quantiles[49])
        p95s.append(quantiles[94])
        p99s.append(quantiles[98])
    return Figure(
        f"commit -> publish latency p50 (p95 {statistics.median(p95s):.1f} ms, "
        f"p99 {statistics.median(p99s):.1f} ms), NOTIFY, null",
        "target p50 2.5 ms", "ms", p50s, [2.5] * len(p50s), higher_is_better=False, target=1.0,
    )  # fmt: skip


# -- handler topics (txob's event processor) ------------------------------------------------------


def drain_handlers(batch: int, style: str) -> Case:
    """The relay running two no-op handlers per event (a handler topic) over a PostgreSQL
    backlog, against the same relay draining the same backlog to a null topic (target 0.5).

    What the handler topic adds is measured: decoding is the identity (``BytesCodec``, the type
    from a function), the handlers do nothing, so the figure is the cost of running, tracking
    and recording two handlers per event. ``style``: ``"async"`` (coroutines, on the batch's
    event loop) or ``"sync"`` (plain functions, on the topic's threads).
    """

    async def nothing_async(event: bytes, context: HandlerContext) -> None:
        return None

    def nothing(event: bytes, context: HandlerContext) -> None:
        return None

    noop = nothing_async if style == "async" else nothing

    def case(quick: bool) -> Figure:
        count = 20_000 if quick else 100_000
        runs = 3 if quick else 5

        def null() -> float:
            with relay_over_backlog(batch, count) as relay:
                return relay.drain(count)

        def handlers() -> float:
            events = HandlerTopic(
                "topic-0", BytesCodec(), {"Event": {"a": noop, "b": noop}},
                type_of=lambda _event: "Event",
            )  # fmt: skip
            with relay_over_backlog(batch, count, sinks=[events]) as relay:
                return relay.drain(count)

        case_values, bound_values = taking_turns(null, handlers, runs)
        return Figure(
            f"handle PostgreSQL events, 2 {style} no-op handlers each, batch {batch}",
            "same relay to a null topic", "msgs/s", case_values, bound_values,
            higher_is_better=True, target=0.5,
        )  # fmt: skip

    case.__name__ = f"drain_handlers_{style}_b{batch}"
    return case


def drain_handlers_asyncio(quick: bool) -> Figure:
    """The asyncio face of :func:`drain_handlers`: ``AsyncRelay`` over ``AsyncPostgresStore``
    running two ``async`` no-op handlers per event, against the same relay to a null topic
    (target 0.5), batch 500."""
    count = 20_000 if quick else 100_000

    async def nothing(event: bytes, context: HandlerContext) -> None:
        return None

    def null() -> float:
        with outbox(pool_size=4) as (pool, schema, _store):
            return asyncio.run(_async_relay_rate(pool, schema, 500, count))

    def handlers() -> float:
        events = HandlerTopic(
            "topic-0", BytesCodec(), {"Event": {"a": nothing, "b": nothing}},
            type_of=lambda _event: "Event",
        )  # fmt: skip
        with outbox(pool_size=4) as (pool, schema, _store):
            return asyncio.run(_async_relay_rate(pool, schema, 500, count, events))

    case_values, bound_values = taking_turns(null, handlers, 3 if quick else 5)
    return Figure(
        "handle PostgreSQL events, 2 async no-op handlers each, batch 500, asyncio relay",
        "same relay to a null topic", "msgs/s", case_values, bound_values,
        higher_is_better=True, target=0.5,
    )  # fmt: skip


ALL: list[Case] = [
    publish_overhead,
    publish_overhead_async,
    drain_null(100, 1, keyed=False),
    drain_null(500, 1, keyed=False),
    drain_null(1000, 1, keyed=False),
    drain_null(100, 10, keyed=True),
    drain_null(500, 10, keyed=True),
    drain_null(1000, 10, keyed=True),
    drain_null_async,
    latency_null,
    drain_handlers(500, "async"),
    drain_handlers(500, "sync"),
    drain_handlers_asyncio,
]


# -- draining SQLite to a null topic ------------------------------------------------------------


def _fill_sqlite(path: Path, count: int) -> None:
    conn = sqlite3.connect(path)
    with conn:
        write = sqlite_persister(conn)
        for _ in range(count):
            write(OutboxEntry("topic", PAYLOAD))
    conn.close()


def _raw_sqlite_drain(path: Path, batch: int) -> int:
    conn = sqlite3.connect(path, isolation_level=None)
    statement = (
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox ORDER BY id LIMIT ?) "
        "RETURNING id, data"
    )
    drained = 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(statement, (batch,)).fetchall()
        conn.execute("COMMIT")
        if not rows:
            conn.close()
            return drained
        drained += len(rows)


def drain_sqlite(batch: int) -> Case:
    """The embedded store against a raw ``DELETE ... RETURNING`` loop on the same file."""

    def case(quick: bool) -> Figure:
        count = 20_000 if quick else 100_000
        case_values, bound_values = [], []
        for _ in range(3 if quick else 5):
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "outbox.db"
                store = SQLiteStore(path)
                _fill_sqlite(path, count)
                bound_values.append(timed(functools.partial(_raw_sqlite_drain, path, batch)))
                with PollingRelay(store, [NullTopic("topic")], batch) as relay:
                    _fill_sqlite(path, count)
                    case_values.append(relay.drain(count))
                store.close()
        return Figure(
            f"drain SQLite -> null, batch {batch}, 1 topic", "raw drain", "msgs/s",
            case_values, bound_values, higher_is_better=True, target=None,
        )  # fmt: skip

    case.__name__ = f"drain_sqlite_b{batch}"
    return case


ALL.append(drain_sqlite(500))
