"""A relay or a writer in its own process, for the multi-process PostgreSQL tests.

``tests/test_postgres_processes.py`` launches this script with ``sys.executable``:

* ``relay``: runs ``Relay(PostgresStore(ConnectionPool(dsn), schema=...)).poll_for_messages()``
  with the three test topics, each a :class:`LogTopic` that appends one line per published
  message to a log shared by every relay (opened with ``O_APPEND``, one ``write`` per line,
  ``fsync`` per batch), through :func:`~outboxbind.topics.publish_in_key_order`. SIGTERM stops
  the relay with ``stop(drain=True)``; it then writes its totals to ``--stats``, prints them as
  JSON and exits 0.
* ``write``: ``--threads`` writers, each on its own connection, commit messages in many small
  transactions (some rolled back) with ``bind(topic, persister(conn)).publish(...)``, and record
  what they committed, with the monotonic time before each transaction's first insert and after
  its commit returned (``time.monotonic()`` is one clock for every process on Linux).

Log line (tab-separated): outbox id, topic, ordering key (``-`` for none), writer, sequence
number, CRC-32 of the published bytes, relay pid, monotonic time of the publish.
Writer record: ``C`` or ``R`` (committed, rolled back), outbox id, topic, ordering key, writer,
sequence number, CRC-32 of the encoded message, transaction start, commit time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import psycopg
from psycopg_pool import ConnectionPool

from outboxbind import Relay, bind
from outboxbind.codecs import JsonCodec
from outboxbind.messages import PersistedMessage
from outboxbind.stores.postgres import PostgresStore, persister
from outboxbind.topics import PublishOutcome, Topic, publish_in_key_order

NO_KEY = "-"
KEYED_TOPICS = ("alpha", "beta")  # ordered per key, some messages topic-wide (key None)
UNKEYED_TOPICS = ("gamma",)  # no ordering key function: one order for the whole topic
TOPICS = KEYED_TOPICS + UNKEYED_TOPICS


@attrs.frozen
class Event:
    """The test message: who wrote it, the writer's sequence number, its ordering key."""

    writer: int
    seq: int
    key: str | None = None


def _key_of(event: Event) -> str | None:
    return event.key


class LogTopic(Topic[Event]):
    """Publishes by appending a line per message to a log shared by every relay process."""

    def __init__(self, name: str, log_fd: int, *, keyed: bool, batch_delay: float = 0.0) -> None:
        super().__init__(name, JsonCodec(Event), ordering_key=_key_of if keyed else None)
        self.log_fd = log_fd
        self.batch_delay = batch_delay
        self.pid = os.getpid()

    def _line(self, outbox_id: str, key: str | None, event: Event, data: bytes) -> None:
        line = (
            f"{outbox_id}\t{self.name}\t{key or NO_KEY}\t{event.writer}\t{event.seq}\t"
            f"{zlib.crc32(data)}\t{self.pid}\t{time.monotonic():.6f}\n"
        )
        os.write(self.log_fd, line.encode())  # one write on an O_APPEND fd: lines never mix

    def publish(self, message: Event, *, attributes: Mapping[str, str] | None = None) -> str:
        """A direct publish (not used by the tests): logged with the outbox id ``direct``."""
        entry = self.make_entry(message, attributes=attributes)
        self._line("direct", entry.ordering_key, message, entry.data)
        return f"{self.name}:direct"

    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        """Log each message in key order; fsync once the batch is written.

        ``batch_delay`` is spent after publishing, before the relay acknowledges: a kill or a
        restart that falls in it leaves the batch published but not acknowledged.
        """

        def send(message: PersistedMessage) -> str:
            event = self.codec.decode(message.data)
            self._line(message.id, message.ordering_key, event, message.data)
            return f"{self.name}:{message.id}"

        try:
            return publish_in_key_order(messages, send)
        finally:
            os.fsync(self.log_fd)
            if self.batch_delay:
                time.sleep(self.batch_delay)


def topics_for(log_fd: int, batch_delay: float = 0.0) -> dict[str, LogTopic]:
    return {
        name: LogTopic(name, log_fd, keyed=name in KEYED_TOPICS, batch_delay=batch_delay)
        for name in TOPICS
    }


def run_relay(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s relay {os.getpid()} %(name)s: %(message)s"
    )
    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop_requested.set())

    log_fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
    failure: list[BaseException] = []

    def poll() -> None:
        try:
            relay.poll_for_messages(args.batch_size)
        except BaseException as exc:  # reported through the exit status
            failure.append(exc)
            raise

    thread = threading.Thread(target=poll, name="relay-poll", daemon=True)
    thread.start()
    Path(args.ready).write_text(f"{os.getpid()}\n")
    while not stop_requested.wait(0.05):
        if not thread.is_alive():
            break
    stopped = relay.stop(drain=True, timeout=args.drain_timeout)
    thread.join(args.drain_timeout)
    pool.close()
    os.close(log_fd)
    stats = {
        "pid": os.getpid(),
        "totals": relay.totals,
        "stopped_in_time": stopped,
        "failure": repr(failure[0]) if failure else None,
    }
    Path(args.stats).write_text(json.dumps(stats))
    print(json.dumps(stats), flush=True)
    return 0 if stopped and not failure and not thread.is_alive() else 3


class _Rollback(Exception):
    """Raised inside a transaction block to roll it back."""


def write_some(
    args: argparse.Namespace, writer: int, count: int, records: list[str], errors: list[str]
) -> None:
    """One writer: commit ``count`` messages in small transactions on its own connection."""
    rng = random.Random(args.seed * 1000 + writer)
    topics = topics_for(-1)
    keys = [f"k{i}" for i in range(args.keys)]
    seq = 0
    written = 0
    try:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            if args.async_commit:
                conn.execute("SET synchronous_commit = off")
            write = persister(conn, schema=args.schema)
            while written < count:
                size = min(rng.randint(1, args.max_per_tx), count - written)
                rollback = rng.random() < args.rollback_rate
                lines = []
                started = time.monotonic()
                try:
                    with conn.transaction():
                        for _ in range(size):
                            name = rng.choice(TOPICS)
                            keyed = name in KEYED_TOPICS and rng.random() < 0.9
                            key = rng.choice(keys) if keyed else None
                            seq += 1
                            event = Event(writer, seq, key)
                            crc = zlib.crc32(topics[name].codec.encode(event))
                            outbox_id = bind(topics[name], write).publish(event)
                            lines.append(
                                f"{outbox_id}\t{name}\t{key or NO_KEY}\t{writer}\t{seq}\t{crc}"
                            )
                        if rollback:
                            raise _Rollback
                except _Rollback:
                    records.extend(f"R\t{line}\t{started:.6f}\t0\n" for line in lines)
                    continue
                committed = time.monotonic()
                records.extend(f"C\t{line}\t{started:.6f}\t{committed:.6f}\n" for line in lines)
                written += size
                if args.pause:
                    time.sleep(args.pause)
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
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    relay = commands.add_parser("relay")
    relay.add_argument("--dsn", required=True)
    relay.add_argument("--schema", required=True)
    relay.add_argument("--log", required=True)
    relay.add_argument("--ready", required=True, help="file written once the relay polls")
    relay.add_argument("--stats", required=True, help="file the totals are written to on exit")
    relay.add_argument("--app-name", default="", help="application_name of its connections")
    relay.add_argument("--lease", type=float, default=30.0)
    relay.add_argument("--batch-size", type=int, default=300)
    relay.add_argument("--poll-interval", type=float, default=0.05)
    relay.add_argument("--publish-timeout", type=float, default=10.0)
    relay.add_argument("--max-store-backoff", type=float, default=1.0)
    relay.add_argument("--batch-delay", type=float, default=0.0)
    relay.add_argument("--drain-timeout", type=float, default=30.0)
    relay.add_argument("--pool-size", type=int, default=2)
    relay.add_argument("--pool-timeout", type=float, default=5.0)
    writer = commands.add_parser("write")
    writer.add_argument("--dsn", required=True)
    writer.add_argument("--schema", required=True)
    writer.add_argument("--out", required=True)
    writer.add_argument("--count", type=int, required=True, help="messages to commit")
    writer.add_argument("--threads", type=int, default=1, help="concurrent writers")
    writer.add_argument("--first-writer", type=int, default=0, help="number of the first writer")
    writer.add_argument("--seed", type=int, default=0)
    writer.add_argument("--keys", type=int, default=40, help="ordering keys per keyed topic")
    writer.add_argument("--max-per-tx", type=int, default=4)
    writer.add_argument("--rollback-rate", type=float, default=0.05)
    writer.add_argument("--pause", type=float, default=0.0, help="seconds between transactions")
    writer.add_argument(
        "--async-commit",
        action="store_true",
        help="synchronous_commit=off (only where the server is never crashed under the test)",
    )
    args = parser.parse_args(argv)
    if args.command == "relay":
        return run_relay(args)
    return run_writer(args)


if __name__ == "__main__":
    sys.exit(main())
