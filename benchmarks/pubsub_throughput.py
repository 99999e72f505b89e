"""Relay throughput PostgreSQL -> Pub/Sub emulator, beside the raw client's own rates.

Run by hand (never a timed test)::

    python benchmarks/pubsub_throughput.py [--messages 20000] [--batch 500] [--keys 0]

Measured in one run on one machine, each figure with its bound:

* raw batched Publish RPCs: the same 1 KB messages, ``--batch`` per request, sent one request
  after another with the GAPIC client (the bound: the best a relay could hand the emulator);
* the client library's per-message futures (``PublisherClient.publish`` + ``result()``);
* the relay: messages committed to a PostgreSQL outbox, drained by ``Relay.process_messages``
  into a ``PubSubTopic``.

Needs PostgreSQL (``OUTBOXBIND_PG_DSN`` or 127.0.0.1:5432) and the emulator
(``PUBSUB_EMULATOR_HOST``, or one is started).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from outboxbind import OutboxEntry, Relay
from outboxbind.stores.postgres import PostgresStore, persister
from outboxbind.testing.emulator import PubSubEmulator
from outboxbind.topics.pubsub import PubSubTopic

PAYLOAD = b"x" * 1024


def new_topic(publisher: Any) -> str:
    path: str = publisher.topic_path("test", f"bench-{uuid.uuid4().hex[:8]}")
    publisher.create_topic(name=path)
    return path


def raw_batched(publisher: Any, count: int, batch: int, keys: int) -> float:
    from google.pubsub_v1.services.publisher import PublisherClient as Gapic
    from google.pubsub_v1.types import PubsubMessage

    path = new_topic(publisher)
    messages = [
        PubsubMessage(
            data=PAYLOAD,
            attributes={"outbox-id": str(i), "outbox-created-at": "2026-11-23T00:00:00+00:00"},
            ordering_key=f"k{i % keys}" if keys else "",
        )
        for i in range(count)
    ]
    started = time.perf_counter()
    for start in range(0, count, batch):
        Gapic.publish(publisher, topic=path, messages=messages[start : start + batch])
    return count / (time.perf_counter() - started)


def futures(publisher: Any, count: int, keys: int) -> float:
    path = new_topic(publisher)
    started = time.perf_counter()
    pending = [
        publisher.publish(path, PAYLOAD, ordering_key=f"k{i % keys}" if keys else "")
        for i in range(count)
    ]
    for future in pending:
        future.result()
    return count / (time.perf_counter() - started)


def relay_drain(publisher: Any, dsn: str, count: int, batch: int, keys: int) -> float:
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    topic = PubSubTopic(publisher, new_topic(publisher), bytes)
    with ConnectionPool(dsn, min_size=2, max_size=4, open=True) as pool:
        store = PostgresStore(pool, schema=schema)
        store.migrate()
        try:
            with pool.connection() as conn:
                for start in range(0, count, 1000):
                    with conn.transaction():
                        write = persister(conn, schema=schema)
                        for i in range(start, min(count, start + 1000)):
                            key = f"k{i % keys}" if keys else None
                            write(OutboxEntry(topic.name, PAYLOAD, ordering_key=key))
            relay = Relay(store)
            relay.register_topic(topic)
            started = time.perf_counter()
            published = 0
            while published < count:
                result = relay.process_messages(batch)
                if result.errors or result.store_error:
                    raise RuntimeError(f"relay round failed: {result}")
                published += result.successes
            return count / (time.perf_counter() - started)
        finally:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--keys", type=int, default=0, help="ordering keys (0: none)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    dsn = os.environ.get("OUTBOXBIND_PG_DSN", "host=127.0.0.1 user=postgres dbname=test")
    emulator = None
    if not os.environ.get("PUBSUB_EMULATOR_HOST"):
        emulator = PubSubEmulator().start()
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    try:
        from google.cloud import pubsub_v1

        publisher = pubsub_v1.PublisherClient(
            publisher_options=pubsub_v1.types.PublisherOptions(
                enable_message_ordering=bool(args.keys)
            )
        )
        n, b, k = args.messages, args.batch, args.keys
        rates: dict[str, list[float]] = {"raw": [], "futures": [], "relay": []}
        for _ in range(args.repeat):
            rates["raw"].append(raw_batched(publisher, n, b, k))
            rates["futures"].append(futures(publisher, n, k))
            rates["relay"].append(relay_drain(publisher, dsn, n, b, k))
        bound = statistics.median(rates["raw"])
        print(f"{n} messages of 1 KB, batch {b}, ordering keys {k or 'none'}, {args.repeat} runs")
        for name, values in rates.items():
            median = statistics.median(values)
            print(f"  {name:8} {median:10.0f} msgs/s  ({median / bound:5.2f} x raw batched)")
    finally:
        if emulator is not None:
            emulator.stop()


if __name__ == "__main__":
    main()
