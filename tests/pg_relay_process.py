"""A relay or a writer in its own process, for the multi-process PostgreSQL tests.

``tests/test_postgres_processes.py`` launches this script with ``sys.executable``:

* ``relay``: runs ``Relay(PostgresStore(ConnectionPool(dsn), schema=...)).poll_for_messages()``
  with the three test topics, each a :class:`PostgresLogTopic` that appends one line per
  published message to a log shared by every relay (see :class:`process_support.LogTopic`).
  SIGTERM stops the relay with ``stop(drain=True)``; it then writes its totals to ``--stats``,
  prints them as JSON and exits 0 (:func:`process_support.run_relay_process`).
* ``write``: ``--threads`` writers, each on its own connection, commit messages in many small
  transactions (some rolled back) with ``bind(topic, persister(conn)).publish(...)``, and record
  what they committed, with the monotonic time before each transaction's first insert and after
  its commit returned (``time.monotonic()`` is one clock for every process on Linux; see
  :func:`process_support.write_transactions`).

Log line (tab-separated): outbox id, topic, ordering key (``-`` for none), writer, sequence
number, CRC-32 of the published bytes, relay pid, monotonic time of the publish.
Writer record: ``C`` or ``R`` (committed, rolled back), outbox id, topic, ordering key, writer,
sequence number, CRC-32 of the encoded message, transaction start, commit time.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import psycopg
from process_support import (
    KEYED_TOPICS,
    NO_KEY,
    TOPICS,
    LogTopic,
    command_line,
    run_relay_process,
    write_transactions,
)
from psycopg_pool import ConnectionPool

from outboxbind import Relay, bind
from outboxbind.codecs import JsonCodec
from outboxbind.stores.postgres import PostgresStore, persister


@attrs.frozen
class Event:
    """The test message: who wrote it, the writer's sequence number, its ordering key."""

    writer: int
    seq: int
    key: str | None = None


class PostgresLogTopic(LogTopic[Event]):
    """A test topic of the PostgreSQL relays: logs the writer, the sequence number, the CRC-32
    of the published bytes and the time; may wait ``batch_delay`` after each batch."""

    def __init__(self, name: str, log_fd: int, *, keyed: bool, batch_delay: float = 0.0) -> None:
        super().__init__(name, JsonCodec(Event), log_fd, keyed=keyed)
        self.batch_delay = batch_delay

    def line(self, outbox_id: str, key: str | None, event: Event, data: bytes) -> str:
        return (
            f"{outbox_id}\t{self.name}\t{key or NO_KEY}\t{event.writer}\t{event.seq}\t"
            f"{zlib.crc32(data)}\t{self.pid}\t{time.monotonic():.6f}\n"
        )

    def after_batch(self) -> None:
        """Spend ``batch_delay`` after publishing, before the relay acknowledges: a kill or a
        restart that falls in it leaves the batch published but not acknowledged."""
        if self.batch_delay:
            time.sleep(self.batch_delay)


def topics_for(log_fd: int, batch_delay: float = 0.0) -> dict[str, PostgresLogTopic]:
    """The three test topics, logging to ``log_fd``, by name."""
    return {
        name: PostgresLogTopic(name, log_fd, keyed=name in KEYED_TOPICS, batch_delay=batch_delay)
        for name in TOPICS
    }


def run_relay(args: argparse.Namespace) -> int:
    def open_relay(log_fd: int) -> tuple[Relay, Callable[[], None]]:
        dsn = f"{args.dsn} application_name={args.app_name}" if args.app_name else args.dsn
        pool: ConnectionPool[Any] = ConnectionPool(
            dsn, min_size=1, max_size=args.pool_size, timeout=args.pool_timeout, open=True
        )
        store = PostgresStore(pool, schema=args.schema, lease_duration=args.lease)
        relay = Relay(
            store,
            poll_interval=args.poll_interval,
            publish_timeout=args.publish_timeout,
            max_store_backoff=args.max_store_backoff,
        )
        for topic in topics_for(log_fd, args.batch_delay).values():
            relay.register_topic(topic)
        return relay, pool.close

    return run_relay_process(args, open_relay)


def write_some(
    args: argparse.Namespace, writer: int, count: int, records: list[str], errors: list[str]
) -> None:
    """One writer: commit ``count`` messages in small transactions on its own connection."""
    topics = topics_for(-1)
    try:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            if args.async_commit:
                conn.execute("SET synchronous_commit = off")
            write = persister(conn, schema=args.schema)

            def publish(name: str, key: str | None, seq: int) -> str:
                event = Event(writer, seq, key)
                crc = zlib.crc32(topics[name].codec.encode(event))
                outbox_id = bind(topics[name], write).publish(event)
                return f"{outbox_id}\t{name}\t{key or NO_KEY}\t{writer}\t{seq}\t{crc}"

            for transaction in write_transactions(
                args,
                count,
                random.Random(args.seed * 1000 + writer),
                keys=[f"k{i}" for i in range(args.keys)],
                keyed_share=0.9,
                transaction=conn.transaction,
                publish=publish,
            ):
                started, committed = transaction.started, transaction.committed
                if committed is None:
                    records.extend(f"R\t{line}\t{started:.6f}\t0\n" for line in transaction.records)
                else:
                    records.extend(
                        f"C\t{line}\t{started:.6f}\t{committed:.6f}\n"
                        for line in transaction.records
                    )
    except BaseException as exc:
        errors.append(f"writer {writer}: {exc!r}")
        raise


def run_writer(args: argparse.Namespace) -> int:
    per_thread = [args.count // args.threads] * args.threads
    per_thread[0] += args.count - sum(per_thread)
    records: list[list[str]] = [[] for _ in range(args.threads)]
    errors: list[str] = []
    threads = [
        threading.Thread(
            target=write_some,
            args=(args, args.first_writer + n, per_thread[n], records[n], errors),
            name=f"writer-{n}",
        )
        for n in range(args.threads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with open(args.out, "w", encoding="utf-8") as out:
        for lines in records:
            out.writelines(lines)
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser, relay, writer = command_line(
        __doc__,
        run_relay=run_relay,
        run_writer=run_writer,
        batch_size=300,
        drain_timeout=30.0,
        rollback_rate=0.05,
    )
    relay.add_argument("--dsn", required=True)
    relay.add_argument("--schema", required=True)
    relay.add_argument("--app-name", default="", help="application_name of its connections")
    relay.add_argument("--max-store-backoff", type=float, default=1.0)
    relay.add_argument("--pool-size", type=int, default=2)
    relay.add_argument("--pool-timeout", type=float, default=5.0)
    writer.add_argument("--dsn", required=True)
    writer.add_argument("--schema", required=True)
    writer.add_argument("--threads", type=int, default=1, help="concurrent writers")
    writer.add_argument("--first-writer", type=int, default=0, help="number of the first writer")
    writer.add_argument("--keys", type=int, default=40, help="ordering keys per keyed topic")
    writer.add_argument(
        "--async-commit",
        action="store_true",
        help="synchronous_commit=off (only where the server is never crashed under the test)",
    )
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
