"""A relay or a writer in its own process, for the multi-process SQLite tests.

``tests/test_sqlite_processes.py`` launches this script with ``sys.executable``:

* ``relay``: runs ``Relay(SQLiteStore(...)).poll_for_messages()`` with the three test topics,
  each a :class:`LogTopic` that appends one line per published message to a shared log file
  (opened with ``O_APPEND``, one ``write`` per line, ``fsync`` per batch). SIGTERM stops the
  relay with ``stop(drain=True)``; it then writes its totals to ``--stats`` and exits 0.
  ``--stall-after N`` makes the topic hang for good in the middle of a batch once N messages
  were published (after creating ``--stall-marker``), so that the test can SIGKILL it there.
* ``write``: writes messages in many small committed transactions (some rolled back) with
  ``bind(topic, persister(conn)).publish(...)``, recording what was committed.

Log line (tab-separated): outbox id, topic, ordering key (``-`` for none), sequence number,
relay pid. Writer record: ``C`` or ``R`` (committed, rolled back), outbox id, topic, ordering
key, sequence number.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs

from outboxbind import Relay, bind
from outboxbind.codecs import JsonCodec
from outboxbind.messages import PersistedMessage
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.topics import PublishOutcome, Topic, publish_in_key_order

NO_KEY = "-"
KEYED_TOPICS = ("alpha", "beta")  # ordered per key, some messages topic-wide (key None)
UNKEYED_TOPICS = ("gamma",)  # no ordering key function: one order for the whole topic
TOPICS = KEYED_TOPICS + UNKEYED_TOPICS
KEYS = tuple(f"k{i}" for i in range(5))


@attrs.frozen
class Event:
    """The test message: a writer-wide sequence number and its ordering key."""

    seq: int
    key: str | None = None


def _key_of(event: Event) -> str | None:
    return event.key


class Stall:
    """Hang the relay mid-batch once ``after`` messages were published, process-wide."""

    def __init__(self, after: int, marker: Path) -> None:
        self.after = after
        self.marker = marker
        self._count = 0
        self._lock = threading.Lock()

    def published_one(self) -> bool:
        """Count one published message; whether the threshold is reached."""
        with self._lock:
            self._count += 1
            return self._count >= self.after


class LogTopic(Topic[Event]):
    """Publishes by appending a line per message to a log shared by every relay process."""

    def __init__(
        self,
        name: str,
        log_fd: int,
        *,
        keyed: bool,
        batch_delay: float = 0.0,
        stall: Stall | None = None,
    ) -> None:
        super().__init__(name, JsonCodec(Event), ordering_key=_key_of if keyed else None)
        self.log_fd = log_fd
        self.batch_delay = batch_delay
        self.stall = stall
        self.pid = os.getpid()

    def _line(self, outbox_id: str, key: str | None, seq: int) -> None:
        line = f"{outbox_id}\t{self.name}\t{key or NO_KEY}\t{seq}\t{self.pid}\n"
        os.write(self.log_fd, line.encode())  # one write on an O_APPEND fd: lines never mix

    def publish(self, message: Event, *, attributes: Mapping[str, str] | None = None) -> str:
        """A direct publish (not used by the tests): logged with the outbox id ``direct``."""
        entry = self.make_entry(message, attributes=attributes)
        self._line("direct", entry.ordering_key, message.seq)
        return f"{self.name}:direct"

    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        """Log each message in key order; fsync once the batch is written."""
        if self.batch_delay:
            time.sleep(self.batch_delay)
        left = len(messages)

        def send(message: PersistedMessage) -> str:
            nonlocal left
            left -= 1
            event = self.codec.decode(message.data)
            self._line(message.id, message.ordering_key, event.seq)
            if self.stall is not None and self.stall.published_one() and left > 0:
                os.fsync(self.log_fd)
                self.stall.marker.write_text(f"{self.pid} {message.id}\n")
                while True:  # mid-batch, nothing acked: wait for SIGKILL
                    time.sleep(3600)
            return f"{self.name}:{message.id}"

        try:
            return publish_in_key_order(messages, send)
        finally:
            os.fsync(self.log_fd)


def run_relay(args: argparse.Namespace) -> int:
    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop_requested.set())

    log_fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    stall = Stall(args.stall_after, Path(args.stall_marker)) if args.stall_after else None
    store = SQLiteStore(args.db, lease_duration=args.lease)
    relay = Relay(store, poll_interval=args.poll_interval, publish_timeout=args.publish_timeout)
    for name in TOPICS:
        relay.register_topic(
            LogTopic(
                name, log_fd, keyed=name in KEYED_TOPICS, batch_delay=args.batch_delay, stall=stall
            )
        )
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
    store.close()
    os.close(log_fd)
    stats = {"pid": os.getpid(), "totals": relay.totals, "stopped_in_time": stopped}
    Path(args.stats).write_text(json.dumps(stats))
    return 0 if stopped and not failure and not thread.is_alive() else 3


def run_writer(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    topics: dict[str, LogTopic] = {
        name: LogTopic(name, -1, keyed=name in KEYED_TOPICS) for name in TOPICS
    }
    conn = sqlite3.connect(args.db, timeout=30)
    conn.execute("PRAGMA synchronous=NORMAL")
    seq = 0
    written = 0
    with open(args.out, "w", encoding="utf-8") as out:
        while written < args.count:
            size = min(rng.randint(1, args.max_per_tx), args.count - written)
            rollback = rng.random() < args.rollback_rate
            records = []
            try:
                with conn:
                    for _ in range(size):
                        name = rng.choice(TOPICS)
                        keyed = name in KEYED_TOPICS and rng.random() < 0.8
                        key = rng.choice(KEYS) if keyed else None
                        seq += 1
                        outbox_id = bind(topics[name], persister(conn)).publish(Event(seq, key))
                        records.append(f"{outbox_id}\t{name}\t{key or NO_KEY}\t{seq}\n")
                    if rollback:
                        raise _Rollback
            except _Rollback:
                out.writelines("R\t" + record for record in records)
                continue
            out.writelines("C\t" + record for record in records)
            written += size
            if args.pause:
                time.sleep(args.pause)
    conn.close()
    return 0


class _Rollback(Exception):
    """Raised inside ``with conn:`` to roll a transaction back."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    relay = commands.add_parser("relay")
    relay.add_argument("--db", required=True)
    relay.add_argument("--log", required=True)
    relay.add_argument("--ready", required=True, help="file written once the relay polls")
    relay.add_argument("--stats", required=True, help="file the totals are written to on exit")
    relay.add_argument("--lease", type=float, default=30.0)
    relay.add_argument("--batch-size", type=int, default=20)
    relay.add_argument("--poll-interval", type=float, default=0.05)
    relay.add_argument("--publish-timeout", type=float, default=10.0)
    relay.add_argument("--batch-delay", type=float, default=0.0)
    relay.add_argument("--drain-timeout", type=float, default=20.0)
    relay.add_argument("--stall-after", type=int, default=0)
    relay.add_argument("--stall-marker", default="")
    writer = commands.add_parser("write")
    writer.add_argument("--db", required=True)
    writer.add_argument("--out", required=True)
    writer.add_argument("--count", type=int, required=True, help="messages to commit")
    writer.add_argument("--seed", type=int, default=0)
    writer.add_argument("--max-per-tx", type=int, default=4)
    writer.add_argument("--rollback-rate", type=float, default=0.1)
    writer.add_argument("--pause", type=float, default=0.0, help="seconds between transactions")
    args = parser.parse_args(argv)
    if args.command == "relay":
        return run_relay(args)
    return run_writer(args)


if __name__ == "__main__":
    sys.exit(main())
