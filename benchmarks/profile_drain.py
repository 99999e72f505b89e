"""Profile the relay draining PostgreSQL to a null topic, to see where a batch goes.

    python -m benchmarks.profile_drain [--batch 500] [--messages 100000] [--topics 1]

Prints, per batch: the wall time, the relay process's CPU time and the database backends' CPU
time (from ``/proc``, so the server must run on this host), for the relay (polling in a thread,
as a service runs it) and for the raw drain (bound 1), each on an outbox of its own after a
warm-up. For the relay's call tree across its threads, run it under py-spy::

    py-spy record -r 1000 -f speedscope -o drain.json -- python -m benchmarks.profile_drain
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

from benchmarks.cases import _raw_drain
from benchmarks.common import NullTopic, PollingRelay, fill_fast, outbox

TICKS = os.sysconf("SC_CLK_TCK")


def backends_cpu(pids: set[int]) -> float:
    """CPU seconds the server processes ``pids`` have used so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICKS


def split(name: str, batch: int, count: int, topics: int) -> None:
    """Drain ``count`` messages one way and print where a batch's time went."""
    keys = 1 if topics > 1 else 0
    sinks = [NullTopic(f"topic-{i}") for i in range(topics)]
    with outbox(pool_size=4) as (pool, schema, store), contextlib.ExitStack() as stack:
        connections = [pool.getconn() for _ in range(4)]
        pids = {conn.info.backend_pid for conn in connections}
        for conn in connections:
            pool.putconn(conn)
        relay = (
            None if name == "raw drain" else stack.enter_context(PollingRelay(store, sinks, batch))
        )

        def drain(count: int) -> float:
            """Drain ``count`` messages; return the seconds it took."""
            if relay is None:
                started = time.perf_counter()
                _raw_drain(pool, schema, batch)
                return time.perf_counter() - started
            return count / relay.drain(count)

        fill_fast(pool, schema, topics, 20 * batch, keys=keys)
        drain(20 * batch)
        fill_fast(pool, schema, topics, count, keys=keys)
        server, client = backends_cpu(pids), time.process_time()
        wall = drain(count)
        client = time.process_time() - client
        server = backends_cpu(pids) - server
        batches = count / batch
        print(
            f"{name:10} {count / wall:9,.0f} msgs/s; per batch of {batch}: wall "
            f"{wall / batches * 1e3:.2f} ms, client CPU {client / batches * 1e3:.2f} ms, "
            f"server CPU {server / batches * 1e3:.2f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--topics", type=int, default=1, help="ordered topics (1: unkeyed)")
    args = parser.parse_args()
    for name in ("raw drain", "relay", "raw drain", "relay"):
        split(name, args.batch, args.messages, args.topics)


if __name__ == "__main__":
    main()
