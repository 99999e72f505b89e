"""A relay running a handler topic in its own process, for ``tests/test_handler_processes.py``.

``relay``: ``Relay(PostgresStore(...))`` with one :class:`HandlerTopic` ("steps", keyed by the
event's ``key``) whose two handlers, ``a`` and ``b``, append a line when they start and when
they end to a log shared by every relay process (``O_APPEND``: one ``write`` per line, so lines
of several processes never mix). SIGTERM stops the relay with a drain and exits 0.

Log line (tab-separated): ``S`` or ``E`` (started, ended), outbox id, handler, event key, event
number, relay pid, monotonic time (one clock for every process on Linux).

``--stall-marker PATH``: handler ``b`` of event number 0 sleeps a minute, ignoring its
cancellation token, the first time it runs anywhere (it creates PATH): a relay to kill mid-handler.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool

from outboxbind import JsonCodec, Relay
from outboxbind.handlers import HandlerContext, HandlerTopic
from outboxbind.stores.postgres import PostgresStore

Event = dict[str, Any]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["relay"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--schema", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--ready", required=True)
    parser.add_argument("--lease", type=float, default=4.0)
    parser.add_argument("--publish-timeout", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--work-ms", type=float, default=3.0)
    parser.add_argument("--stall-marker")
    args = parser.parse_args()

    log_fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    pid = os.getpid()
    stall = Path(args.stall_marker) if args.stall_marker else None

    def line(kind: str, event: Event, context: HandlerContext) -> None:
        fields = [kind, context.message.id, context.handler, event["key"], str(event["n"])]
        os.write(log_fd, ("\t".join([*fields, str(pid), repr(time.monotonic())]) + "\n").encode())

    def handler(name: str) -> Any:
        def run(event: Event, context: HandlerContext) -> None:
            line("S", event, context)
            if name == "b" and event["n"] == 0 and stall is not None and not stall.exists():
                stall.touch()
                time.sleep(60)  # a handler that ignores its token: killed here
            time.sleep(args.work_ms / 1000 * (0.5 + (hash((context.message.id, name)) % 100) / 100))
            line("E", event, context)

        return run

    steps = HandlerTopic(
        "steps",
        JsonCodec(dict),
        {"Step": {"a": handler("a"), "b": handler("b")}},
        ordering_key=lambda event: event["key"],
    )
    pool = ConnectionPool(args.dsn, min_size=1, max_size=4, open=True)
    store = PostgresStore(pool, schema=args.schema, lease_duration=args.lease)
    relay = Relay(store, publish_timeout=args.publish_timeout, poll_interval=0.05)
    relay.register_topic(steps)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    loop = threading.Thread(target=relay.poll_for_messages, args=(args.batch_size,))
    loop.start()
    Path(args.ready).touch()
    stopping.wait()
    relay.stop(timeout=10)
    loop.join(10)
    pool.close()
    os.close(log_fd)


if __name__ == "__main__":
    main()
