"""Where the relay's time goes on its critical path: round by round, and message by message.

    python -m benchmarks.timeline drain [--batch 500] [--messages 100000] [--topics 1]
    python -m benchmarks.timeline latency [--messages 200]

``drain``: the relay drains PostgreSQL to null topics (as in ``benchmarks.cases``: one unkeyed
topic, or with ``--topics`` that many ordered topics of one ordering key each); each round's
next batch is read ahead while the round publishes, so the read-aheads, one after another, are
the critical path. Prints the medians, from the start of a read-ahead, of when the claimed rows
were in, when their decoding into messages began and ended and when it returned; how long
loading the rows took (psycopg) and decoding them (the store); and the time between one
read-ahead's end and the next one's start.

``latency``: one message committed every 20 ms, the relay woken by NOTIFY, to a null topic (as in
``latency_null``). Prints the latency's median and the medians of its parts: wake-up -> checkout
start, the checkout, checkout end -> the topic's ``publish_batch``.

Timings come from wrapping the store's and psycopg's methods for the run: the figures are a
little slower than an unwrapped run's.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import psycopg

from benchmarks.common import NullTopic, commit_to_publish_ms, relay_over_backlog
from outboxbind.stores.postgres import store as postgres
from outboxbind.wakeup import WakeupThread

Event = tuple[str, float, float]  # what, started, ended (time.perf_counter())


@contextmanager
def timing(owner: Any, method: str, events: list[Event], what: str | None = None) -> Iterator[None]:
    """Record each call of ``owner.method`` in ``events`` (as ``what``, by default its name,
    then, for a method returning a list, ``:`` and its length) until the block ends."""
    original = getattr(owner, method)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        result = original(*args, **kwargs)
        label = what or method
        if what is None and isinstance(result, list):
            label = f"{method}:{len(result)}"
        events.append((label, started, time.perf_counter()))
        return result

    setattr(owner, method, timed)
    try:
        yield
    finally:
        setattr(owner, method, original)


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.3f} ms" if values else "-"


def drain(batch: int, count: int, topics: int = 1) -> None:
    """Drain ``count`` messages in batches of ``batch`` (over ``topics`` ordered topics, or one
    unkeyed topic); print the read-aheads' timeline."""
    events: list[Event] = []
    keys = 1 if topics > 1 else 0
    with relay_over_backlog(batch, count, topics, keys) as relay, ExitStack() as stack:
        stack.enter_context(timing(postgres.PostgresBatch, "read_ahead", events))
        stack.enter_context(timing(postgres._Statements, "found", events, "decode"))
        stack.enter_context(timing(psycopg.Pipeline, "sync", events))
        stack.enter_context(timing(psycopg.RawCursor, "fetchall", events))
        rate = relay.drain(count)
    reads = [(start, end) for what, start, end in events if what == "read_ahead"]
    inside: dict[str, list[float]] = {"rows in": [], "decode start": [], "decode end": []}
    for start, end in reads:
        for what, began, ended in events:
            if start <= began <= end:
                if what == "sync":
                    inside["rows in"].append(ended - start)
                elif what == "decode":
                    inside["decode start"].append(began - start)
                    inside["decode end"].append(ended - start)
    print(f"relay {rate:,.0f} msgs/s, batch {batch}; {len(reads)} read-aheads; from one's start:")
    for what, offsets in inside.items():
        print(f"  {what:14} {ms(offsets)}")
    print(f"  {'returned':14} {ms([end - start for start, end in reads])}")
    rows = [end - start for what, start, end in events if what == f"fetchall:{batch}"]
    decode = [end - start for what, start, end in events if what == "decode"]
    gaps = [after[0] - before[1] for before, after in itertools.pairwise(reads)]
    print(f"loading the rows (psycopg) {ms(rows)}; decoding them (the store) {ms(decode)}")
    print(f"from one read-ahead's end to the next one's start {ms(gaps)}")


def latency(count: int) -> None:
    """Commit ``count`` messages 20 ms apart; print the latency and its parts."""
    events: list[Event] = []
    topic = NullTopic("latency-topic")
    published_at: dict[str, float] = {}

    def published(messages: Any) -> None:
        now = time.perf_counter()
        published_at.update((message.id, now) for message in messages)
        events.append(("publish", now, now))

    topic.on_publish = published
    with ExitStack() as stack:
        stack.enter_context(timing(WakeupThread, "wake", events))
        stack.enter_context(timing(postgres.PostgresStore, "_checkout", events, "checkout"))
        latencies = commit_to_publish_ms(topic, published_at, count)
    parts: dict[str, list[float]] = {"wake-up -> checkout": [], "checkout": [], "-> publish": []}
    woken: float | None = None
    checkout: tuple[float, float] | None = None
    for what, start, end in sorted(events, key=lambda event: event[2]):
        if what == "wake" and woken is None:
            woken = start
        elif what == "checkout":
            checkout = (start, end)
        elif what == "publish" and woken is not None and checkout is not None:
            parts["wake-up -> checkout"].append(checkout[0] - woken)
            parts["checkout"].append(checkout[1] - checkout[0])
            parts["-> publish"].append(start - checkout[1])
            woken = checkout = None
    print(f"commit -> publish p50 {statistics.median(latencies):.3f} ms over {count} messages")
    for what, values in parts.items():
        print(f"  {what:20} {ms(values)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("drain", "latency"))
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--messages", type=int, default=0, help="default 100000 / 200")
    parser.add_argument("--topics", type=int, default=1, help="drain: ordered topics (1: unkeyed)")
    args = parser.parse_args()
    run: Callable[[], None]
    if args.what == "drain":
        run = functools.partial(drain, args.batch, args.messages or 100_000, args.topics)
    else:
        run = functools.partial(latency, args.messages or 200)
    run()


if __name__ == "__main__":
    main()
