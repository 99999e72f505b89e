"""What the benchmark cases share: a results record, a null topic, PostgreSQL set-up."""

from __future__ import annotations

import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import psycopg
from psycopg_pool import ConnectionPool

from outboxbind import BytesCodec, OutboxEntry, PersistedMessage, Relay
from outboxbind.stores.postgres import PostgresStore, persister
from outboxbind.stores.postgres.schema import names_for
from outboxbind.topics import PublishOutcome, Topic

DSN = os.environ.get("OUTBOXBIND_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
PAYLOAD = b"x" * 1024
FILL_CHUNK = 250_000  # rows per INSERT ... SELECT of fill_fast


@attrs.frozen
class Figure:
    """One measured case beside its bound, from several runs.

    Attributes:
        case: what was measured.
        bound: what it is measured against (measured in the same run).
        unit: the unit of the values ("msgs/s", "us/tx", "ms").
        values: the case's value per run.
        bound_values: the bound's value per run.
        higher_is_better: whether a larger value is better (throughput) or worse (latency).
        target: the ratio case/bound to meet (>= when higher is better, <= otherwise).
    """

    case: str
    bound: str
    unit: str
    values: list[float]
    bound_values: list[float]
    higher_is_better: bool
    target: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def bound_median(self) -> float:
        return statistics.median(self.bound_values)

    @property
    def ratio(self) -> float:
        return self.median / self.bound_median

    @property
    def meets_target(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio >= self.target if self.higher_is_better else self.ratio <= self.target


class NullTopic(Topic[bytes]):
    """A destination that accepts everything at once: the relay's own cost, nothing else."""

    def __init__(self, name: str) -> None:
        super().__init__(name, BytesCodec())
        self.count = 0
        self.on_publish: Callable[[Sequence[PersistedMessage]], None] | None = None

    def publish(self, message: bytes, *, attributes: Any = None) -> str:
        self.count += 1
        return str(self.count)

    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        if self.on_publish is not None:
            self.on_publish(messages)
        self.count += len(messages)
        return [message.id for message in messages]


@contextmanager
def outbox(pool_size: int = 4) -> Iterator[tuple[ConnectionPool[Any], str, PostgresStore]]:
    """A fresh outbox schema with its pool and store; dropped afterwards."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    with ConnectionPool(DSN, min_size=2, max_size=pool_size, open=True) as pool:
        store = PostgresStore(pool, schema=schema)
        store.migrate()
        try:
            yield pool, schema, store
        finally:
            with psycopg.connect(DSN, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def fill_fast(
    pool: ConnectionPool[Any],
    schema: str,
    topics: int,
    count: int,
    *,
    keys: int = 0,
    topic: str | None = None,
) -> None:
    """Write ``count`` 1 KB messages, due now, spread evenly over ``topics`` (``topic-0``...,
    round robin by id), with ids from the outbox's own sequence; then ANALYZE the table and
    take a checkpoint (see :func:`checkpoint`). No relay is woken: the rows are written by
    plain SQL, without the persister's NOTIFY.

    Unkeyed by default; with ``keys``, each topic's messages are spread over that many
    ordering keys (``k0``, ``k1``...), each key a sequence of its own. ``topic`` names the one
    topic instead (with ``topics`` 1).
    """
    names = names_for(schema, "outbox")
    key = f"'k' || mod(n / {int(topics)}, {int(keys)})" if keys else "''"
    name = "%s::text" if topic is not None else "'topic-' || mod(n, %s)"
    insert = (
        f"INSERT INTO {names['outbox']} (id, position, topic, ordering_key, data, available_at)"
        f" SELECT n, n, {name}, {key}, %s, now()"
        f" FROM (SELECT nextval({names['message_ids_literal']}) AS n"
        f" FROM generate_series(1, %s)) AS ids"
    )
    with pool.connection() as conn:
        for start in range(0, count, FILL_CHUNK):
            with conn.transaction():
                rows = min(FILL_CHUNK, count - start)
                conn.execute(insert, (topic if topic is not None else topics, PAYLOAD, rows))
        conn.execute(f"ANALYZE {names['outbox']}")
    checkpoint()


_checkpoints_refused = False


def checkpoint() -> None:
    """Write the server's dirty pages out now, so that no checkpoint of the writes before
    lands in the measurement after (a checkpoint started mid-drain moved a drain's rate by up
    to a third, either side's). Needs a superuser or ``pg_checkpoint``; without, it says so
    once and goes on."""
    global _checkpoints_refused
    if _checkpoints_refused:
        return
    with psycopg.connect(DSN, autocommit=True) as conn:
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege as exc:
            _checkpoints_refused = True
            print(f"benchmarks: no CHECKPOINT before each drain ({exc}); figures are noisier")


def timed(run: Callable[[], int]) -> float:
    """Call ``run`` (which returns how many messages it handled); return messages per second."""
    started = time.perf_counter()
    handled = run()
    return handled / (time.perf_counter() - started)


def taking_turns(
    bound: Callable[[], float], case: Callable[[], float], runs: int
) -> tuple[list[float], list[float]]:
    """Measure ``case`` and ``bound`` ``runs`` times each, taking turns going first, so that
    neither always meets a warmer (or busier) server; return (case values, bound values)."""
    case_values, bound_values = [], []
    for run in range(runs):
        if run % 2:
            case_values.append(case())
            bound_values.append(bound())
        else:
            bound_values.append(bound())
            case_values.append(case())
    return case_values, bound_values


class _Unwoken:
    """A store without its wake-ups: the relay it serves runs only when woken by hand."""

    def __init__(self, store: Any) -> None:
        self.store = store  # the relay reads the inner store's lease_duration through this

    def checkout_batch(self, topic_names: Sequence[str], limit: int) -> Any:
        return self.store.checkout_batch(topic_names, limit)


class PollingRelay:
    """A relay polling in a thread, the way a service runs it, for timing drains.

    ``drain(count)`` wakes it and returns the rate, in messages per second, from the wake-up to
    the moment ``count`` more messages were published. The relay is started before and stopped
    after, so neither is timed; it does not listen for the store's own wake-ups (the backlog is
    written while it idles), so only ``drain`` sets it going.
    """

    def __init__(self, store: Any, topics: Sequence[Topic[Any]], batch: int) -> None:
        # idle until woken by hand; a backlog never waits once it is going
        self.relay = Relay(_Unwoken(store), poll_interval=60.0)
        for topic in topics:
            self.relay.register_topic(topic)
        self.thread = threading.Thread(target=self.relay.poll_for_messages, args=(batch,))
        self.published = 0

    def __enter__(self) -> PollingRelay:
        self.thread.start()
        time.sleep(0.1)  # polling
        return self

    def __exit__(self, *_exc: object) -> None:
        self.relay.stop(drain=False, timeout=30)
        self.thread.join(30)

    def drain(self, count: int) -> float:
        """Wake the relay; return its rate over the next ``count`` messages (waits at most
        120 s; raises if a round failed, or the relay was busy before it was woken)."""
        if self.relay.totals["published"] != self.published:
            raise RuntimeError("the relay started on the backlog before it was woken")
        target = self.published + count
        started = time.perf_counter()
        self.relay.wake()
        deadline = time.monotonic() + 120
        while True:
            totals = self.relay.totals
            if totals["failed"] or totals["store_errors"]:
                raise RuntimeError(f"a relay round failed: {totals}")
            if totals["published"] >= target or time.monotonic() > deadline:
                elapsed = time.perf_counter() - started
                break
            time.sleep(0.002)  # seldom enough not to take the GIL from the relay
        time.sleep(0.05)  # let the last round end
        self.published = self.relay.totals["published"]
        if self.published != target:
            raise RuntimeError(f"the relay published {self.published - target + count} of {count}")
        return count / elapsed


@contextmanager
def relay_over_backlog(
    batch: int,
    count: int,
    topics: int = 1,
    keys: int = 0,
    sinks: Sequence[Topic[Any]] | None = None,
) -> Iterator[PollingRelay]:
    """A :class:`PollingRelay` of null topics (``topic-0``...) on an outbox of its own, warmed
    up on a backlog of twenty batches there (connections open, statements prepared), with
    ``count`` more messages written for it to drain: over ``topics`` topics of ``keys``
    ordering keys each, or unkeyed. ``sinks`` replaces the null topics (named alike)."""
    if sinks is None:
        sinks = [NullTopic(f"topic-{i}") for i in range(topics)]
    with outbox(pool_size=4) as (pool, schema, store), PollingRelay(store, sinks, batch) as relay:
        fill_fast(pool, schema, topics, 20 * batch, keys=keys)
        relay.drain(20 * batch)
        fill_fast(pool, schema, topics, count, keys=keys)
        yield relay


def commit_to_publish_ms(
    topic: Topic[Any], published_at: Mapping[str, float], count: int
) -> list[float]:
    """Commit -> publish latencies, sorted, in ms: ``count`` messages to ``topic``, one committed
    every 20 ms, with a polling relay woken by NOTIFY. ``published_at`` is filled by the topic
    (outbox id -> ``time.perf_counter()`` when it counts as published)."""
    committed_at: dict[str, float] = {}
    with outbox() as (_pool, schema, store):
        relay = Relay(store, poll_interval=5.0)
        relay.register_topic(topic)
        thread = threading.Thread(target=relay.poll_for_messages, args=(100,))
        thread.start()
        try:
            time.sleep(0.5)  # the LISTEN connection is up
            with psycopg.connect(DSN) as conn:
                for _ in range(count):
                    with conn.transaction():
                        entry = OutboxEntry(topic.name, PAYLOAD)
                        outbox_id = persister(conn, schema=schema)(entry)
                    committed_at[outbox_id] = time.perf_counter()
                    time.sleep(0.02)
            deadline = time.monotonic() + 10
            while len(published_at) < count and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            relay.stop(timeout=10)
            thread.join(10)
    missing = [i for i in committed_at if i not in published_at]
    if missing:
        raise RuntimeError(f"{len(missing)} of {count} messages were not published in time")
    return sorted((published_at[i] - committed_at[i]) * 1000 for i in committed_at)
