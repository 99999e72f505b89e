"""What the benchmark cases share: a results record, a null topic, PostgreSQL set-up."""

from __future__ import annotations

import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import attrs
import psycopg
from psycopg_pool import ConnectionPool

from outboxbind import BytesCodec, OutboxEntry, PersistedMessage
from outboxbind.stores.postgres import PostgresStore, persister
from outboxbind.topics import PublishOutcome, Topic

DSN = os.environ.get("OUTBOXBIND_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
PAYLOAD = b"x" * 1024


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


def fill(
    pool: ConnectionPool[Any], schema: str, topics: Sequence[str], count: int, keyed: bool
) -> None:
    """Write ``count`` 1 KB messages spread over ``topics`` in transactions of 1,000."""
    with pool.connection() as conn:
        for start in range(0, count, 1000):
            with conn.transaction():
                write = persister(conn, schema=schema)
                for i in range(start, min(count, start + 1000)):
                    topic = topics[i % len(topics)]
                    write(OutboxEntry(topic, PAYLOAD, ordering_key="k" if keyed else None))


def timed(run: Callable[[], int]) -> float:
    """Call ``run`` (which returns how many messages it handled); return messages per second."""
    started = time.perf_counter()
    handled = run()
    return handled / (time.perf_counter() - started)
