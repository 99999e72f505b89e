"""PostgreSQL -> Pub/Sub emulator cases, each measured beside a bound taken in the same run.

* ``drain_pubsub_*``: 1 KB messages drained from a PostgreSQL outbox by
  ``Relay.process_messages(500)`` into a :class:`~outboxbind.topics.pubsub.PubSubTopic`, with no
  ordering key, one key, or 100 keys. The bound, ``raw drain + Publish``, is written by hand: a
  raw ``DELETE ... WHERE id IN (SELECT ... ORDER BY id LIMIT 500 FOR UPDATE SKIP LOCKED)
  RETURNING id, ordering_key, data, created_at`` (binary, payload not parsed), and in the same
  transaction one ``Publish`` RPC of those rows, built as raw protobuf with the same
  attributes as the relay's (``outbox-id``, ``outbox-created-at``) and the ordering key. Like
  the relay, it sends one request at a time, so no key ever has two requests in flight and each
  key's messages go out in outbox order.
* ``latency_pubsub``: commit -> the emulator's acknowledgement of the message (the ``Publish``
  RPC that carried it returned), with NOTIFY wake-ups and one message committed every 20 ms;
  p50 against the target of 2.5 ms, p95 and p99 in the case's name (p99 target: 10 ms), with
  the time a lone one-message ``Publish`` RPC takes at the same rhythm.

One emulator serves the whole module: the one ``PUBSUB_EMULATOR_HOST`` names, or one started on
first use and stopped at exit. Every measurement publishes to a topic of its own with no
subscription (the emulator drops what it accepted), from a fresh outbox schema.
"""

from __future__ import annotations

import atexit
import functools
import os
import statistics
import time
import uuid
from collections.abc import Sequence
from typing import Any

from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher import PublisherClient as Gapic
from google.pubsub_v1.types import PublishRequest
from psycopg_pool import ConnectionPool

from benchmarks.cases import Case
from benchmarks.common import (
    PAYLOAD,
    Figure,
    PollingRelay,
    commit_to_publish_ms,
    fill_fast,
    outbox,
    taking_turns,
    timed,
)
from outboxbind import PersistedMessage
from outboxbind.stores.postgres.schema import names_for
from outboxbind.testing.emulator import PubSubEmulator
from outboxbind.topics import PublishOutcome
from outboxbind.topics.pubsub import PubSubTopic

BATCH = 500
#: Messages published to a fresh emulator before anything is measured (about 2 s).
WARM_UP = 100_000

_REQUEST_PB = PublishRequest.pb()


# -- the emulator, started once ---------------------------------------------------------------


@functools.cache
def publisher() -> Any:
    """The module's publisher client, on the emulator (started here, once, if none is given).

    The first call starts the emulator unless ``PUBSUB_EMULATOR_HOST`` is set, registers its
    stop at exit, and warms it up with :data:`WARM_UP` messages, half of them with ordering
    keys: its publish rate climbs by half over the first hundred thousand or so (the JVM's
    JIT), and the first measurements must not be the ones that pay for it.
    """
    if not os.environ.get("PUBSUB_EMULATOR_HOST"):
        emulator = PubSubEmulator().start()
        atexit.register(emulator.stop)
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    client = pubsub_v1.PublisherClient()
    path = new_topic(client)
    created = "2026-01-01T00:00:00+00:00"
    unkeyed = [(str(i), "", PAYLOAD, created) for i in range(BATCH)]
    keyed = [(str(i), f"k{i % 100}", PAYLOAD, created) for i in range(BATCH)]
    for i in range(WARM_UP // BATCH):
        _publish(client, path, keyed if i % 2 else unkeyed)
    return client


def new_topic(client: Any) -> str:
    """A fresh emulator topic; its path."""
    path: str = client.topic_path("test", f"bench-{uuid.uuid4().hex[:8]}")
    client.create_topic(name=path)
    return path


Row = tuple[str, str, bytes, str]  # outbox id, ordering key ('' for none), data, created at


def _publish(client: Any, path: str, rows: Sequence[Row]) -> None:
    """One ``Publish`` RPC of ``rows``, built as the relay builds its requests (raw protobuf,
    each message added in place)."""
    raw = _REQUEST_PB(topic=path)
    add = raw.messages.add
    for id_, key, data, created in rows:
        attributes = add(data=data, ordering_key=key).attributes
        attributes["outbox-id"] = id_
        attributes["outbox-created-at"] = created
    request = PublishRequest.wrap(raw)
    response = Gapic.publish(client, request=request, timeout=30.0)
    if len(response.message_ids) != len(rows):
        raise RuntimeError(f"the emulator returned {len(response.message_ids)} ids for {len(rows)}")


# -- draining PostgreSQL to the emulator ------------------------------------------------------


def _raw_drain_publish(pool: ConnectionPool[Any], schema: str, client: Any, path: str) -> int:
    """The bound: a raw ``DELETE ... RETURNING`` of ``BATCH`` rows and one ``Publish`` of them,
    in one transaction (committed once the emulator has the messages), until the outbox is
    empty."""
    table = names_for(schema, "outbox")["outbox"]
    statement = (
        f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT %s "
        f"FOR UPDATE SKIP LOCKED) RETURNING id, ordering_key, data, created_at"
    )
    drained = 0
    with pool.connection() as conn:
        while True:
            with conn.transaction():
                rows = conn.execute(statement, (BATCH,), binary=True).fetchall()
                if rows:
                    _publish(
                        client,
                        path,
                        [
                            (str(id_), key, data, created.isoformat())
                            for id_, key, data, created in rows
                        ],
                    )
            if not rows:
                return drained
            drained += len(rows)


def drain_pubsub(keys: int) -> Case:
    """Drain PostgreSQL -> emulator through the relay, against ``raw drain + Publish``, with
    ``keys`` ordering keys (0: none); batch 500."""

    def case(quick: bool) -> Figure:
        count = 20_000 if quick else 100_000
        client = publisher()

        def bound() -> float:
            path = new_topic(client)
            with outbox() as (pool, schema, _store):
                fill_fast(pool, schema, 1, count, keys=keys, topic=path.rsplit("/", 1)[1])
                return timed(lambda: _raw_drain_publish(pool, schema, client, path))

        def relayed() -> float:
            topic = PubSubTopic(client, new_topic(client), bytes)
            with outbox() as (pool, schema, store), PollingRelay(store, [topic], BATCH) as relay:
                fill_fast(pool, schema, 1, count, keys=keys, topic=topic.name)
                return relay.drain(count)

        case_values, bound_values = taking_turns(bound, relayed, 3 if quick else 5)
        shape = {0: "no ordering key", 1: "1 ordering key"}.get(keys, f"{keys} ordering keys")
        return Figure(
            f"drain PostgreSQL -> Pub/Sub emulator, batch {BATCH}, {shape}",
            "raw drain + Publish", "msgs/s", case_values, bound_values,
            higher_is_better=True, target=0.8,
        )  # fmt: skip

    case.__name__ = f"drain_pubsub_k{keys}"
    return case


# -- commit -> acknowledgement latency --------------------------------------------------------


class _AckTimedTopic(PubSubTopic[bytes]):
    """A Pub/Sub topic that notes when each message's ``Publish`` RPC returned."""

    def __init__(self, client: Any, path: str) -> None:
        super().__init__(client, path, bytes)
        self.acked_at: dict[str, float] = {}

    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        outcomes = super().publish_batch(messages, timeout=timeout)
        now = time.perf_counter()
        for message, outcome in zip(messages, outcomes, strict=True):
            if isinstance(outcome, str):
                self.acked_at[message.id] = now
        return outcomes


def _ack_latencies_ms(quick: bool) -> list[float]:
    """Commit -> acknowledgement latencies with NOTIFY wake-up, one message every 20 ms."""
    topic = _AckTimedTopic(publisher(), new_topic(publisher()))
    return commit_to_publish_ms(topic, topic.acked_at, 100 if quick else 500)


def _lone_publish_ms(client: Any, path: str, count: int = 100) -> float:
    """The median time of a ``Publish`` RPC of one 1 KB message, one every 20 ms as the commits
    come: the emulator's (and gRPC's) own share of the latency. Back to back the same RPC is
    faster (the channel and the emulator's threads do not idle in between) and would understate
    it."""
    times = []
    for i in range(count):
        started = time.perf_counter()
        _publish(client, path, [(str(i), "", PAYLOAD, "2026-01-01T00:00:00+00:00")])
        times.append((time.perf_counter() - started) * 1000)
        time.sleep(0.02)
    return statistics.median(times)


def latency_pubsub(quick: bool) -> Figure:
    """Commit -> emulator acknowledgement latency p50 against 2.5 ms; p95 and p99 (target 10
    ms) and the median time of a lone ``Publish`` RPC at the same rhythm (measured in the same
    run, for scale: it is part of every message's latency) in the name."""
    p50s, p95s, p99s, lone = [], [], [], []
    for _ in range(3):
        quantiles = statistics.quantiles(_ack_latencies_ms(quick), n=100)
        p50s.append(quantiles[49])
        p95s.append(quantiles[94])
        p99s.append(quantiles[98])
        lone.append(_lone_publish_ms(publisher(), new_topic(publisher())))
    return Figure(
        f"commit -> Pub/Sub ack latency p50 (p95 {statistics.median(p95s):.1f} ms, "
        f"p99 {statistics.median(p99s):.1f} ms; a lone Publish {statistics.median(lone):.1f} ms)"
        ", NOTIFY, emulator",
        "target p50 2.5 ms", "ms", p50s, [2.5] * len(p50s), higher_is_better=False, target=1.0,
    )  # fmt: skip


ALL: list[Case] = [
    drain_pubsub(0),
    drain_pubsub(1),
    drain_pubsub(100),
    latency_pubsub,
]
