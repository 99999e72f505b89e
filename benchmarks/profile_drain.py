"""Profile the relay draining PostgreSQL to a null topic, to see where a batch goes.

    python -m benchmarks.profile_drain [--batch 500] [--messages 100000] [--topics 1]

Prints, per batch: the wall time, the relay process's CPU time and the database backends' CPU
time (from ``/proc``, so the server must run on this host), for the relay and for the raw drain
(bound 1), each on an outbox of its own after a warm-up; then pyinstrument's call tree of a
relay drain.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

from pyinstrument import Profiler

from benchmarks.cases import _raw_drain
from benchmarks.common import NullTopic, fill_fast, outbox, relay_drain

TICKS = os.sysconf("SC_CLK_TCK")


def backends_cpu(pids: set[int]) -> float:
    """CPU seconds the server processes ``pids`` have used so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def split(name: str, batch: int, count: int, topics: int, profile: bool = False) -> None:
    """Drain ``count`` messages one way and print where a batch's time went."""
    keys = 1 if topics > 1 else 0
    sinks = [NullTopic(f"topic-{i}") for i in range(topics)]
    with outbox(pool_size=4) as (pool, schema, store):
        connections = [pool.getconn() for _ in range(4)]
        pids = {conn.info.backend_pid for conn in connections}
        for conn in connections:
            pool.putconn(conn)
        drain: Callable[[int], int] = (
            (lambda _n: _raw_drain(pool, schema, batch))
            if name == "raw drain"
            else (lambda n: relay_drain(store, sinks, batch, n))
        )
        fill_fast(pool, schema, topics, 20 * batch, keys=keys)
        drain(20 * batch)
        fill_fast(pool, schema, topics, count, keys=keys)
        profiler: Any = Profiler(interval=0.0005) if profile else None
        if profiler:
            profiler.start()
        server, client, wall = backends_cpu(pids), time.process_time(), time.perf_counter()
        drained = drain(count)
        wall, client = time.perf_counter() - wall, time.process_time() - client
        server = backends_cpu(pids) - server
        if profiler:
            profiler.stop()
        batches = drained / batch
        print(
            f"{name:10} {drained / wall:9,.0f} msgs/s; per batch of {batch}: wall "
            f"{wall / batches * 1e3:.2f} ms, client CPU {client / batches * 1e3:.2f} ms, "
            f"server CPU {server / batches * 1e3:.2f} ms"
        )
        if profiler:
            print(profiler.output_text(unicode=False, color=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--topics", type=int, default=1, help="ordered topics (1: unkeyed)")
    args = parser.parse_args()
    for name in ("raw drain", "relay", "raw drain", "relay"):
        split(name, args.batch, args.messages, args.topics)
    split("relay", args.batch, args.messages, args.topics, profile=True)


if __name__ == "__main__":
    main()
