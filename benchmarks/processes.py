"""Cases that run relays in their own processes: scale-out and memory.

Each relay is its own Python process (``python -m benchmarks.processes child ...``, started by
the case): a ``Relay`` over a ``PostgresStore`` on the case's outbox, every topic registered,
draining with ``relay.process_messages(batch)`` until the outbox is empty. A child connects,
registers its topics and says ``ready`` on stdout; the case starts the clock once every child
is ready and sends ``go`` on their stdin; each child answers with one JSON line (how much it
published, its rounds, when its last batch closed, its peak memory).

* **Scale-out** (spec section 5: "several relays on many topics scale until the database is the
  bound"): 2 and 4 relay processes draining a backlog spread over 16 topics, against 1 relay
  process draining the same backlog, measured in the same run. On a 2-core machine a relay
  publishing to a null topic is bound by its own CPU, so two of them and PostgreSQL cannot
  scale; to measure the relay design rather than the core count, each topic's
  ``publish_batch`` call takes a fixed 20 ms, like a remote broker's round trip
  (:class:`RemoteTopic`; the relay's default ``publish_concurrency`` of 8, so a batch over 16
  topics takes two such waits), and the batch is small enough (100) that the database is not
  the bound. Every run checks that each message was published exactly once, and prints what
  each process published and how many of its rounds found every due sequence leased by
  another relay ("idle rounds"; it then sleeps 2 ms and tries again). Unkeyed, the 16 topics
  are 16 sequences: a relay whose batch is at least that many leases all of them in one
  checkout, and the others wait for its batch to close.
* **Memory** (spec: "memory stays flat with a backlog of a million messages"): the peak RSS of
  a fresh relay process draining 1,000,000 messages of 1 KB, against the same for 10,000. The
  peak is the child's own ``VmHWM`` (``/proc/self/status``); not ``ru_maxrss``, which Linux
  carries over ``exec`` from the process that forked the child (here the benchmark runner).

The backlogs are written by :func:`benchmarks.common.fill_fast`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from psycopg_pool import ConnectionPool

from benchmarks.cases import Case
from benchmarks.common import DSN, Figure, NullTopic, fill_fast, outbox
from outboxbind import PersistedMessage, Relay
from outboxbind.stores.postgres import PostgresStore
from outboxbind.stores.postgres.schema import names_for
from outboxbind.topics import PublishOutcome

ROOT = Path(__file__).resolve().parent.parent

#: The topics of the scale-out cases, and each publish call's latency there.
SCALE_TOPICS = 16
PUBLISH_LATENCY = 0.020
#: How long a child waits after a round that found nothing due while the outbox is not empty
#: (another relay holds its sequences).
IDLE_SLEEP = 0.002
#: Rows per INSERT transaction when filling a backlog.


class RemoteTopic(NullTopic):
    """A null topic whose every ``publish_batch`` call takes ``latency`` seconds, like a remote
    broker's round trip; it may keep the ids it was given, to check exactly-once delivery."""

    def __init__(self, name: str, latency: float, *, keep_ids: bool) -> None:
        super().__init__(name)
        self.latency = latency
        self.ids: list[str] | None = [] if keep_ids else None

    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        if self.latency > 0:
            time.sleep(self.latency)
        if self.ids is not None:
            self.ids.extend(message.id for message in messages)
        return super().publish_batch(messages, timeout=timeout)


def topic_names(topics: int) -> list[str]:
    return [f"topic-{i}" for i in range(topics)]


def outbox_rows(pool: ConnectionPool[Any], schema: str) -> int:
    with pool.connection() as conn:
        row = conn.execute(
            f"SELECT count(*) FROM {names_for(schema, 'outbox')['outbox']}"
        ).fetchone()
    return int(row[0]) if row else -1


# -- the child process -------------------------------------------------------------------------


def _vm_hwm_kib() -> int:
    """The process's peak resident set so far (VmHWM), in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return -1


def child(args: argparse.Namespace) -> int:
    """One relay process: set up, say ``ready``, wait for ``go``, drain, report one JSON line."""
    with ConnectionPool(DSN, min_size=2, max_size=2, open=True) as pool:
        pool.wait()
        store = PostgresStore(pool, schema=args.schema)
        relay = Relay(store)
        topics = [
            RemoteTopic(name, args.latency, keep_ids=args.ids) for name in topic_names(args.topics)
        ]
        for topic in topics:
            relay.register_topic(topic)
        first_row = (
            f"SELECT id FROM {names_for(args.schema, 'outbox')['outbox']} ORDER BY id LIMIT 1"
        )
        with pool.connection() as conn:
            conn.execute(first_row).fetchall()  # connected, the statement planned once
        setup_kib = _vm_hwm_kib()
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 2
        published = rounds = idle_rounds = 0
        last_done = time.monotonic()
        while True:
            result = relay.process_messages(args.batch)
            if result.store_error is not None or result.errors:
                raise RuntimeError(f"a relay round failed: {result}")
            if result.checked_out:
                published += result.successes
                rounds += 1
                last_done = time.monotonic()
                continue
            with pool.connection() as conn:
                if not conn.execute(first_row).fetchall():
                    break  # the outbox is empty: nothing leased by anyone either
            idle_rounds += 1  # every due sequence is leased by another relay
            time.sleep(IDLE_SLEEP)
    report = {
        "published": published,
        "rounds": rounds,
        "idle_rounds": idle_rounds,
        "last_done": last_done,
        "vm_hwm_kib": _vm_hwm_kib(),
        # not the measure: Linux carries ru_maxrss over exec, so it is at least the peak of
        # the process that started this one (the benchmark runner)
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "setup_hwm_kib": setup_kib,
        "ids": [i for topic in topics for i in (topic.ids or [])],
    }
    print(json.dumps(report), flush=True)
    return 0


# -- running children --------------------------------------------------------------------------


def run_relays(
    schema: str, processes: int, *, topics: int, batch: int, latency: float, keep_ids: bool
) -> tuple[float, list[dict[str, Any]]]:
    """Start ``processes`` relay processes on the outbox ``schema``, wait until all are ready,
    start them at once; return the seconds from the start until the last batch closed, and
    each child's report."""
    command = [
        sys.executable, "-m", "benchmarks.processes", "child", "--schema", schema,
        "--topics", str(topics), "--batch", str(batch), "--latency", str(latency),
    ]  # fmt: skip
    if keep_ids:
        command.append("--ids")
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *([path] if path else [])])}
    children: list[subprocess.Popen[str]] = []
    try:
        for _ in range(processes):
            pipe = subprocess.PIPE
            children.append(
                subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdin=pipe, stdout=pipe)
            )
        for process in children:
            assert process.stdout is not None
            line = process.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a relay process did not start: {line!r}")
        started = time.monotonic()
        for process in children:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        reports = []
        for process in children:
            out, _ = process.communicate(timeout=3600)
            if process.returncode != 0:
                raise RuntimeError(f"a relay process failed with exit status {process.returncode}")
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in children:
            if process.poll() is None:
                process.kill()
                process.wait()
    return max(report["last_done"] for report in reports) - started, reports


def _check_published_once(
    pool: ConnectionPool[Any], schema: str, count: int, reports: list[dict[str, Any]]
) -> None:
    published = sum(report["published"] for report in reports)
    left = outbox_rows(pool, schema)
    if published != count or left != 0:
        raise RuntimeError(f"{published} of {count} messages published, {left} left in the outbox")
    ids = [i for report in reports for i in report["ids"]]
    if ids and (len(ids) != count or len(set(ids)) != count):
        raise RuntimeError(f"{len(ids)} ids published for {count} messages, {len(set(ids))} unique")


# -- scale-out ---------------------------------------------------------------------------------


def scale_out(relays: int, batch: int, target: float | None, *, keys: int = 0) -> Case:
    """``relays`` relay processes against one, draining the same backlog over 16 topics with
    20 ms per publish call (unkeyed, or over ``keys`` ordering keys per topic); each run
    alternates the two and checks exactly-once delivery."""

    def case(quick: bool) -> Figure:
        """Messages per second from the start signal until the backlog is empty: ``relays``
        processes (the case) against one process (the bound)."""
        count = 16_000 if quick else 64_000
        single: list[float] = []
        several: list[float] = []
        for _ in range(3):
            for processes, values in ((1, single), (relays, several)):
                with outbox() as (pool, schema, _store):
                    fill_fast(pool, schema, SCALE_TOPICS, count, keys=keys)
                    seconds, reports = run_relays(
                        schema, processes, topics=SCALE_TOPICS, batch=batch,
                        latency=PUBLISH_LATENCY, keep_ids=True,
                    )  # fmt: skip
                    _check_published_once(pool, schema, count, reports)
                values.append(count / seconds)
                print(
                    f"  {processes} relay(s), batch {batch}: {count / seconds:7.0f} msgs/s;"
                    f" published {[r['published'] for r in reports]},"
                    f" rounds {[r['rounds'] for r in reports]},"
                    f" idle rounds {[r['idle_rounds'] for r in reports]}",
                    flush=True,
                )
        shape = f"{SCALE_TOPICS} topics" + (f" x {keys} keys" if keys else "")
        return Figure(
            f"{relays} relays vs 1, {shape}, batch {batch}, publish 20 ms/call",
            "1 relay", "msgs/s", several, single, higher_is_better=True, target=target,
        )  # fmt: skip

    case.__name__ = f"scale_out_{relays}_relays_b{batch}{f'_k{keys}' if keys else ''}"
    return case


# -- memory ------------------------------------------------------------------------------------


def memory_backlog(quick: bool) -> Figure:
    """Peak RSS (VmHWM) of a fresh relay process draining a big backlog (1,000,000 messages
    of 1 KB; quick: 200,000) against one draining 10,000; batch 500, one null topic."""
    small, big = 10_000, (200_000 if quick else 1_000_000)
    case_values: list[float] = []
    bound_values: list[float] = []
    for _ in range(3):
        for count, values in ((small, bound_values), (big, case_values)):
            with outbox() as (pool, schema, _store):
                fill_fast(pool, schema, 1, count)
                seconds, reports = run_relays(
                    schema, 1, topics=1, batch=500, latency=0.0, keep_ids=False
                )
                _check_published_once(pool, schema, count, reports)
            report = reports[0]
            values.append(report["vm_hwm_kib"] / 1024)
            print(
                f"  backlog {count}: peak RSS (VmHWM) {report['vm_hwm_kib'] / 1024:.1f} MiB"
                f" (after set-up {report['setup_hwm_kib'] / 1024:.1f} MiB),"
                f" {count / seconds:.0f} msgs/s",
                flush=True,
            )
    return Figure(
        f"peak RSS of a relay, backlog {big:,} x 1 KB, batch 500", "backlog 10,000", "MiB",
        case_values, bound_values, higher_is_better=False, target=1.2,
    )  # fmt: skip


ALL: list[Case] = [
    scale_out(2, 100, target=1.6),
    scale_out(4, 100, target=None),
    memory_backlog,
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a relay process of the benchmarks")
    commands = parser.add_subparsers(dest="command", required=True)
    relay = commands.add_parser("child", help="one relay draining an outbox (started by a case)")
    relay.add_argument("--schema", required=True)
    relay.add_argument("--topics", type=int, required=True)
    relay.add_argument("--batch", type=int, required=True)
    relay.add_argument("--latency", type=float, default=0.0, help="seconds per publish call")
    relay.add_argument("--ids", action="store_true", help="report the ids published")
    return child(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
