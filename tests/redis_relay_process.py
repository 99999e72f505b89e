"""A relay or a writer in its own process, for the multi-process Redis tests.

``tests/test_redis_processes.py`` launches this script with ``sys.executable``:

* ``relay``: runs ``Relay(RedisStore(...)).poll_for_messages()`` with the ten test topics, each
  a :class:`RedisLogTopic` appending one line per published message to a shared log file (see
  :class:`process_support.LogTopic`). SIGTERM stops it with ``stop(drain=True)``; it then writes
  its totals to ``--stats`` (:func:`process_support.run_relay_process`). ``--stall-after N``
  makes it hang for good in the middle of a batch once N messages were published (after
  creating ``--stall-marker``), so that the test can SIGKILL it there.
* ``write``: commits messages in many small ``MULTI``/``EXEC`` transactions (some discarded)
  with ``bind(topic, persister(pipe)).publish(...)``, recording what was committed.

Log line (tab-separated): outbox id, topic, ordering key (``-`` for none), sequence number,
relay pid, unix time. Writer record: ``C`` or ``R`` (executed, discarded), outbox id, topic,
ordering key, sequence number.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import redis
from process_support import (
    KEYS,
    NO_KEY,
    Event,
    LogTopic,
    Stall,
    command_line,
    run_relay_process,
)

from outboxbind import Relay, bind
from outboxbind.codecs import JsonCodec
from outboxbind.messages import PersistedMessage
from outboxbind.stores.redis import RedisStore, persister

TOPICS = tuple(f"t{i}" for i in range(10))
KEYED = TOPICS[:5]  # per-key order (some messages topic-wide); the other five: one order each


class RedisLogTopic(LogTopic[Event]):
    """A test topic: logs each message; may wait ``batch_delay`` per batch and stall."""

    def __init__(
        self, name: str, log_fd: int, *, batch_delay: float = 0.0, stall: Stall | None = None
    ) -> None:
        super().__init__(name, JsonCodec(Event), log_fd, keyed=name in KEYED)
        self.batch_delay = batch_delay
        self.stall = stall

    def line(self, outbox_id: str, key: str | None, event: Event, data: bytes) -> str:
        return (
            f"{outbox_id}\t{self.name}\t{key or NO_KEY}\t{event.seq}\t{self.pid}\t{time.time()}\n"
        )

    def before_batch(self) -> None:
        if self.batch_delay:
            time.sleep(self.batch_delay)

    def after_line(self, message: PersistedMessage, remaining: int) -> None:
        if self.stall is not None and self.stall.published_one() and remaining > 0:
            os.fsync(self.log_fd)
            self.stall.marker.write_text(f"{self.pid} {message.id}\n")
            while True:  # mid-batch, nothing acked: wait for SIGKILL
                time.sleep(3600)


def client_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)


def run_relay(args: argparse.Namespace) -> int:
    def open_relay(log_fd: int) -> tuple[Relay, Callable[[], None]]:
        stall = Stall(args.stall_after, Path(args.stall_marker)) if args.stall_after else None
        client = client_for(args.url)
        store = RedisStore(client, prefix=args.prefix, lease_duration=args.lease)
        relay = Relay(
            store,
            poll_interval=args.poll_interval,
            publish_timeout=args.publish_timeout,
            max_store_backoff=args.max_store_backoff,
        )
        for name in TOPICS:
            relay.register_topic(
                RedisLogTopic(name, log_fd, batch_delay=args.batch_delay, stall=stall)
            )
        return relay, client.close

    return run_relay_process(args, open_relay)


def run_writer(args: argparse.Namespace) -> int:
    topics = {name: RedisLogTopic(name, -1) for name in TOPICS}
    client = client_for(args.url)
    rng = random.Random(args.seed)
    seq = written = 0
    with open(args.out, "w", encoding="utf-8") as out:
        while written < args.count:
            size = min(rng.randint(1, args.max_per_tx), args.count - written)
            discard = rng.random() < args.rollback_rate
            records = []
            with client.pipeline(transaction=True) as pipe:
                write = persister(pipe, prefix=args.prefix)
                for _ in range(size):
                    name = rng.choice(TOPICS)
                    key = rng.choice(KEYS) if name in KEYED and rng.random() < 0.8 else None
                    seq += 1
                    outbox_id = bind(topics[name], write).publish(Event(seq, key))
                    records.append(f"{outbox_id}\t{name}\t{key or NO_KEY}\t{seq}\n")
                if discard:
                    pipe.reset()
                else:
                    pipe.execute()
                    written += size
            out.writelines(f"{'R' if discard else 'C'}\t{record}" for record in records)
            if args.pause:
                time.sleep(args.pause)
    client.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser, relay, writer = command_line(
        __doc__,
        run_relay=run_relay,
        run_writer=run_writer,
        batch_size=50,
        drain_timeout=20.0,
        rollback_rate=0.1,
    )
    for command in (relay, writer):
        command.add_argument("--url", required=True)
        command.add_argument("--prefix", required=True)
    relay.add_argument("--stall-after", type=int, default=0)
    relay.add_argument("--stall-marker", default="")
    relay.add_argument("--max-store-backoff", type=float, default=1.0)
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
