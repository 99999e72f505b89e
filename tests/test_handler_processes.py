"""Handler topics across real relay processes on one PostgreSQL outbox: two relays never run a
handler of the same message at the same time, each key's messages run in order across them, and
a relay killed mid-handler loses nothing (the handler runs again once the lease expires: at least
once, as docs/handlers.md says). Nothing is mocked; see ``tests/pg_handler_process.py``."""

from __future__ import annotations

import itertools
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from psycopg_pool import ConnectionPool

from outboxbind import JsonCodec
from outboxbind.handlers import HandlerTopic
from outboxbind.stores.postgres import PostgresStore, persister

SCRIPT = Path(__file__).with_name("pg_handler_process.py")
CODEC: JsonCodec[dict[str, Any]] = JsonCodec()
STEPS = HandlerTopic(
    "steps", CODEC, {"Step": {"a": print, "b": print}}, ordering_key=lambda e: e["key"]
)


class Run(NamedTuple):
    """One handler run, from the log: started and (if it did) ended."""

    id: int
    handler: str
    key: str
    n: int
    pid: int
    started: float
    ended: float | None


def read_runs(log: Path) -> list[Run]:
    starts: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    runs: list[Run] = []
    for text in log.read_text().splitlines():
        kind, id_, handler, key, n, pid, at = text.split("\t")
        if kind == "S":
            starts[(id_, handler, pid)].append(at)
        else:
            started = starts[(id_, handler, pid)].pop(0)
            runs.append(Run(int(id_), handler, key, int(n), int(pid), float(started), float(at)))
    for (id_, handler, pid), left in starts.items():
        for started in left:  # started, never ended (killed)
            runs.append(Run(int(id_), handler, "", -1, int(pid), float(started), None))
    return runs


@pytest.fixture
def outbox(pg_dsn: str, pg_schema: str) -> Iterator[ConnectionPool[Any]]:
    pool = ConnectionPool(pg_dsn, min_size=1, max_size=2, open=True)
    PostgresStore(pool, schema=pg_schema).migrate()
    yield pool
    pool.close()


def write_events(pool: ConnectionPool[Any], schema: str, keys: int, per_key: int) -> list[str]:
    with pool.connection() as conn, conn.transaction():
        write = persister(conn, schema=schema)
        return [
            write(STEPS.make_entry({"type": "Step", "key": f"k{k}", "n": n}))
            for n in range(per_key)
            for k in range(keys)
        ]


class Relays:
    def __init__(self, tmp_path: Path, dsn: str, schema: str, log: Path) -> None:
        self.tmp_path, self.dsn, self.schema, self.log = tmp_path, dsn, schema, log
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *options: str) -> subprocess.Popen[bytes]:
        ready = self.tmp_path / f"{name}.ready"
        with open(self.tmp_path / f"{name}.out", "wb") as out:
            process = subprocess.Popen(
                [sys.executable, str(SCRIPT), "relay", f"--dsn={self.dsn}",
                 f"--schema={self.schema}", f"--log={self.log}", f"--ready={ready}", *options],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        self.processes.append(process)
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert process.poll() is None, (self.tmp_path / f"{name}.out").read_text()
            assert time.monotonic() < deadline, f"relay {name} did not start"
            time.sleep(0.05)
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def relays(tmp_path: Path, pg_dsn: str, pg_schema: str) -> Iterator[Relays]:
    relays = Relays(tmp_path, pg_dsn, pg_schema, tmp_path / "handlers.log")
    yield relays
    relays.stop_all()


def wait_until_done(relays: Relays, expected: set[tuple[int, str]], timeout: float) -> list[Run]:
    deadline = time.monotonic() + timeout
    while True:
        runs = read_runs(relays.log) if relays.log.exists() else []
        done = {(run.id, run.handler) for run in runs if run.ended is not None}
        if expected <= done:
            return runs
        assert time.monotonic() < deadline, f"{len(expected - done)} handler runs never ended"
        time.sleep(0.1)


def test_two_relays_never_run_a_handler_of_one_message_at_once_and_keep_key_order(
    outbox: ConnectionPool[Any], pg_schema: str, relays: Relays
) -> None:
    ids = [int(i) for i in write_events(outbox, pg_schema, keys=12, per_key=25)]
    relays.start("one")
    relays.start("two")
    runs = wait_until_done(relays, {(i, h) for i in ids for h in "ab"}, timeout=120)
    relays.stop_all()
    runs = read_runs(relays.log)
    assert {run.pid for run in runs} == {p.pid for p in relays.processes}  # both relays worked
    by_handler: dict[tuple[int, str], list[Run]] = defaultdict(list)
    for run in runs:
        by_handler[(run.id, run.handler)].append(run)
    for (id_, handler), mine in by_handler.items():
        mine.sort(key=lambda run: run.started)
        for earlier, later in itertools.pairwise(mine):
            assert earlier.ended is not None
            assert earlier.ended <= later.started, f"handler {handler} of {id_} ran twice at once"
    by_key: dict[str, dict[int, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        by_key[run.key][run.n].append(run)
    for key, events in by_key.items():
        for n in range(24):  # every handler of event n ended before any of event n + 1 began
            ended = max(run.ended or 0 for run in events[n])
            began = min(run.started for run in events[n + 1])
            assert ended <= began, f"key {key}: event {n + 1} began before event {n} was done"


def test_a_relay_killed_mid_handler_loses_nothing(
    outbox: ConnectionPool[Any], pg_schema: str, relays: Relays, tmp_path: Path
) -> None:
    lease = 4.0
    ids = [int(i) for i in write_events(outbox, pg_schema, keys=1, per_key=3)]
    options = (f"--lease={lease}", "--publish-timeout=2", f"--stall-marker={tmp_path / 'stalled'}")
    first = relays.start("first", *options)
    deadline = time.monotonic() + 30
    while not any(r.id == ids[0] and r.handler == "b" for r in read_runs(relays.log)):
        assert time.monotonic() < deadline, "handler b of the first event never started"
        time.sleep(0.02)
    first.kill()  # SIGKILL mid-handler: nothing of this try was recorded
    first.wait()
    killed_at = time.monotonic()
    relays.start("second", *options)
    runs = wait_until_done(relays, {(i, h) for i in ids for h in "ab"}, timeout=60)
    [stalled] = [r for r in runs if r.pid == first.pid and r.id == ids[0] and r.handler == "b"]
    assert stalled.ended is None  # killed while it ran
    [again] = [r for r in runs if r.pid != first.pid and r.id == ids[0] and r.handler == "b"]
    assert again.ended is not None
    # not before the killed relay's lease ran out (taken at checkout, just before it began)
    assert again.started >= stalled.started + lease - 1.0
    assert again.started >= killed_at
    second_runs = [r for r in runs if r.pid != first.pid and r.ended is not None]
    assert {(r.id, r.handler) for r in second_runs} >= {(i, h) for i in ids for h in "ab"} - {
        (r.id, r.handler) for r in runs if r.pid == first.pid and r.ended is not None
    }
    for n in range(2):  # the key's order held through the kill
        assert max(r.ended or 0 for r in second_runs if r.id == ids[n]) <= min(
            r.started for r in second_runs if r.id == ids[n + 1]
        )
