"""A relay or a writer in its own process, for the multi-process SQLite tests.

``tests/test_sqlite_processes.py`` launches this script with ``sys.executable``:

* ``relay``: runs ``Relay(SQLiteStore(...)).poll_for_messages()`` with the three test topics,
  each a :class:`SQLiteLogTopic` that appends one line per published message to a shared log
  file (see :class:`process_support.LogTopic`). SIGTERM stops the relay with
  ``stop(drain=True)``; it then writes its totals to ``--stats``, prints them as JSON and exits
  0 (:func:`process_support.run_relay_process`). ``--stall-after N`` makes the topic hang for
  good in the middle of a batch once N messages were published (after creating
  ``--stall-marker``), so that the test can SIGKILL it there.
* ``write``: writes messages in many small committed transactions (some rolled back) with
  ``bind(topic, persister(conn)).publish(...)``, recording what was committed
  (:func:`process_support.write_transactions`).

Log line (tab-separated): outbox id, topic, ordering key (``-`` for none), sequence number,
relay pid. Writer record: ``C`` or ``R`` (committed, rolled back), outbox id, topic, ordering
key, sequence number.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from process_support import (
    KEYED_TOPICS,
    KEYS,
    NO_KEY,
    TOPICS,
    Event,
    LogTopic,
    Stall,
    command_line,
    run_relay_process,
    write_transactions,
)

from outboxbind import Relay, bind
from outboxbind.codecs import JsonCodec
from outboxbind.messages import PersistedMessage
from outboxbind.stores.sqlite import SQLiteStore, persister


class SQLiteLogTopic(LogTopic[Event]):
    """A test topic of the SQLite relays: logs the sequence number; may wait ``batch_delay``
    before each batch and ``stall`` mid-batch."""

    def __init__(
        self,
        name: str,
        log_fd: int,
        *,
        keyed: bool,
        batch_delay: float = 0.0,
        stall: Stall | None = None,
    ) -> None:
        super().__init__(name, JsonCodec(Event), log_fd, keyed=keyed)
        self.batch_delay = batch_delay
        self.stall = stall

    def line(self, outbox_id: str, key: str | None, event: Event, data: bytes) -> str:
        return f"{outbox_id}\t{self.name}\t{key or NO_KEY}\t{event.seq}\t{self.pid}\n"

    def before_batch(self) -> None:
        if self.batch_delay:
            time.sleep(self.batch_delay)

    def after_line(self, message: PersistedMessage, remaining: int) -> None:
        """Once ``stall`` is reached with more of the batch to send, hang: nothing acked."""
        if self.stall is not None and self.stall.published_one() and remaining > 0:
            os.fsync(self.log_fd)
            self.stall.marker.write_text(f"{self.pid} {message.id}\n")
            while True:  # mid-batch, nothing acked: wait for SIGKILL
                time.sleep(3600)


def run_relay(args: argparse.Namespace) -> int:
    def open_relay(log_fd: int) -> tuple[Relay, Callable[[], None]]:
        stall = Stall(args.stall_after, Path(args.stall_marker)) if args.stall_after else None
        store = SQLiteStore(args.db, lease_duration=args.lease)
        relay = Relay(store, poll_interval=args.poll_interval, publish_timeout=args.publish_timeout)
        for name in TOPICS:
            relay.register_topic(
                SQLiteLogTopic(
                    name,
                    log_fd,
                    keyed=name in KEYED_TOPICS,
                    batch_delay=args.batch_delay,
                    stall=stall,
                )
            )
        return relay, store.close

    return run_relay_process(args, open_relay)


def run_writer(args: argparse.Namespace) -> int:
    topics = {name: SQLiteLogTopic(name, -1, keyed=name in KEYED_TOPICS) for name in TOPICS}
    conn = sqlite3.connect(args.db, timeout=30)
    conn.execute("PRAGMA synchronous=NORMAL")

    def publish(name: str, key: str | None, seq: int) -> str:
        outbox_id = bind(topics[name], persister(conn)).publish(Event(seq, key))
        return f"{outbox_id}\t{name}\t{key or NO_KEY}\t{seq}\n"

    transactions = write_transactions(
        args,
        args.count,
        random.Random(args.seed),
        keys=KEYS,
        keyed_share=0.8,
        transaction=lambda: conn,  # ``with conn:`` commits, or rolls back on an exception
        publish=publish,
    )
    with open(args.out, "w", encoding="utf-8") as out:
        for transaction in transactions:
            state = "R" if transaction.committed is None else "C"
            out.writelines(f"{state}\t{record}" for record in transaction.records)
    conn.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser, relay, writer = command_line(
        __doc__,
        run_relay=run_relay,
        run_writer=run_writer,
        batch_size=20,
        drain_timeout=20.0,
        rollback_rate=0.1,
    )
    relay.add_argument("--db", required=True)
    relay.add_argument("--stall-after", type=int, default=0)
    relay.add_argument("--stall-marker", default="")
    writer.add_argument("--db", required=True)
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
