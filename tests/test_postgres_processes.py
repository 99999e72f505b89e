"""Relays in real processes on a real PostgreSQL: exclusive, ordered, at least once across
SIGKILL and across a server restart.

Each test launches ``tests/pg_relay_process.py`` with ``sys.executable``: relay processes that
publish to a shared append-only log (one line per message: outbox id, topic, key, writer,
sequence number, CRC-32 of the published bytes, relay pid, monotonic time) and writer processes
whose threads commit messages concurrently in many small transactions, recording what they
committed and when. The tests then read the log and the writers' records. Nothing is mocked.

Order, with concurrent writers on shared keys (SPEC 3.3): a message is never published before
one of its key whose transaction committed before it was written. The writers record the
monotonic time before each transaction's first insert and after its commit returned, so "X
committed before Y was written" is known for sure when ``X.committed < Y.started``; and one
writer's messages of a key (one transaction after the other, in the order written) must come
out in that writer's order. After kills and restarts this holds for first publications.

The first two tests use the machine's cluster (``pg_dsn``, a fresh schema each); the restart
test makes a private throwaway cluster (``tests/pg_cluster.py``) and never touches the shared one.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import psycopg
import pytest
from pg_cluster import PrivateCluster
from pg_relay_process import Event, topics_for
from process_support import (
    OrderingSequence,
    Processes,
    RelayProcess,
    check_identity,
    check_relay_totals,
    duplicates_of,
    first_publications,
    log_size,
    read_rows,
)
from psycopg_pool import ConnectionPool

from outboxbind import bind
from outboxbind.stores.postgres import PostgresStore, persister

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("pg_relay_process.py")


class Line(NamedTuple):
    """One message as a relay published it."""

    outbox_id: str
    topic: str
    key: str
    writer: int
    seq: int
    crc: int
    pid: int
    at: float  # time.monotonic() of the publish

    @classmethod
    def from_fields(cls, fields: list[str]) -> Line:
        outbox_id, topic, key, writer, seq, crc, pid, at = fields
        return cls(outbox_id, topic, key, int(writer), int(seq), int(crc), int(pid), float(at))

    @property
    def sequence(self) -> OrderingSequence:
        return (self.topic, self.key)

    @property
    def content(self) -> tuple[str, str, int, int, int]:
        return (self.topic, self.key, self.writer, self.seq, self.crc)

    @property
    def serial(self) -> tuple[int, int]:
        return (self.writer, self.seq)


class Record(NamedTuple):
    """One committed message as its writer recorded it."""

    topic: str
    key: str
    writer: int
    seq: int
    crc: int
    started: float  # before the transaction's first insert
    committed: float  # after its commit returned

    @property
    def content(self) -> tuple[str, str, int, int, int]:
        return (self.topic, self.key, self.writer, self.seq, self.crc)


class Written(NamedTuple):
    """What the writers committed (by outbox id) and rolled back (by writer and sequence)."""

    committed: dict[str, Record]
    rolled_back: set[tuple[int, int]]
    transactions: int

    def contents(self) -> dict[str, tuple[str, str, int, int, int]]:
        """The content of each committed message, by outbox id."""
        return {outbox_id: record.content for outbox_id, record in self.committed.items()}


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    with Processes(tmp_path, SCRIPT, stop_timeout=40.0, poll_interval=0.05) as procs:
        yield procs


@pytest.fixture(scope="module")
def private_pg() -> Iterator[PrivateCluster]:
    """A throwaway cluster of our own, which the test may stop and restart at will."""
    cluster = PrivateCluster.create()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


def start_relay(
    procs: Processes, name: str, dsn: str, schema: str, log: Path, *options: str
) -> RelayProcess:
    return procs.start_relay(name, log, f"--dsn={dsn}", f"--schema={schema}", *options)


def migrate(dsn: str, schema: str) -> None:
    with ConnectionPool(dsn, min_size=1, max_size=1, open=True) as pool:
        PostgresStore(pool, schema=schema).migrate()


def outbox_count(dsn: str, schema: str) -> int:
    """Messages still in the outbox (not acknowledged)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{schema}".outbox').fetchone()
        assert row is not None
        return int(row[0])


def wait_until_drained(
    procs: Processes,
    dsn: str,
    schema: str,
    relays: Iterable[RelayProcess],
    what: str,
    timeout: float,
) -> float:
    """Wait, with ``relays`` alive, until the outbox is empty: every message published and
    acknowledged. Return the seconds it took."""
    return procs.wait_for(
        lambda: outbox_count(dsn, schema) == 0,
        what,
        timeout,
        (r.process for r in relays),
        interval=0.2,
    )


def listening(dsn: str, app_name: str) -> bool:
    """Whether the relay whose connections carry ``app_name`` has its LISTEN connection up."""
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = %s AND query LIKE 'LISTEN %%'",
                (app_name,),
            ).fetchone()
    except psycopg.OperationalError:
        return False
    return row is not None and row[0] > 0


def start_writers(
    procs: Processes,
    dsn: str,
    schema: str,
    count: int,
    *,
    processes: int,
    threads: int,
    seed: int,
    options: Iterable[str] = (),
) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """Start ``processes`` writer processes of ``threads`` writers each, ``count`` in all."""
    started = []
    shares = [count // processes] * processes
    shares[0] += count - sum(shares)
    for n, share in enumerate(shares):
        out = procs.tmp_path / f"written-{seed}-{n}.tsv"
        process = procs.start(
            f"writer-{seed}-{n}",
            "write",
            f"--dsn={dsn}",
            f"--schema={schema}",
            f"--out={out}",
            f"--count={share}",
            f"--threads={threads}",
            f"--first-writer={seed * 100 + n * threads}",
            f"--seed={seed * 100 + n}",
            *options,
        )
        started.append((process, out))
    return started


def finish_writers(
    procs: Processes, writers: list[tuple[subprocess.Popen[bytes], Path]], timeout: float
) -> Written:
    """Wait for the writer processes; return what they committed."""
    deadline = time.monotonic() + timeout
    for process, _ in writers:
        code = procs.wait(process, max(1.0, deadline - time.monotonic()))
        assert code == 0, f"writer failed with {code}:\n{procs.output_of(process)}"
    committed: dict[str, Record] = {}
    rolled_back: set[tuple[int, int]] = set()
    transactions: set[tuple[int, float]] = set()
    for _, out in writers:
        for state, outbox_id, topic, key, writer, seq, crc, started, done in read_rows(out, tuple):
            if state == "C":
                assert outbox_id not in committed, f"outbox id {outbox_id} given twice"
                committed[outbox_id] = Record(
                    topic, key, int(writer), int(seq), int(crc), float(started), float(done)
                )
                transactions.add((int(writer), float(started)))
            else:
                rolled_back.add((int(writer), int(seq)))
    return Written(committed, rolled_back, len(transactions))


def read_log(log: Path) -> list[Line]:
    return read_rows(log, Line.from_fields)


def check_order(lines: list[Line], written: Written) -> None:
    """Per key: each writer's messages in its order, and nothing before a message of its key
    that committed before it was written (``lines`` without duplicates)."""
    by_sequence: dict[OrderingSequence, list[Line]] = defaultdict(list)
    for line in lines:
        by_sequence[line.sequence].append(line)
    writer_order: list[tuple[Line, int]] = []
    causal: list[tuple[Line, Line]] = []
    for published in by_sequence.values():
        last: dict[int, int] = {}
        for line in published:
            previous = last.get(line.writer)
            if previous is not None and line.seq <= previous:
                writer_order.append((line, previous))
            last[line.writer] = line.seq
        # Walking back, keep the later-published message that committed earliest: a message
        # written after it committed must not have been published before it.
        earliest: Line | None = None
        for line in reversed(published):
            if (
                earliest is not None
                and written.committed[earliest.outbox_id].committed
                < written.committed[line.outbox_id].started
            ):
                causal.append((line, earliest))
            if (
                earliest is None
                or written.committed[line.outbox_id].committed
                < written.committed[earliest.outbox_id].committed
            ):
                earliest = line
    assert not writer_order, (
        f"{len(writer_order)} messages published before an earlier one of their writer and key, "
        f"e.g. {writer_order[:5]}"
    )
    assert not causal, (
        f"{len(causal)} messages published before a message of their key that had committed "
        f"before they were written, e.g. (published first, committed first) {causal[:5]}"
    )


def describe_duplicates(lines: list[Line], duplicates: dict[str, int]) -> str:
    """Who published a few duplicated messages, and when (for a failure message)."""
    where: dict[str, list[str]] = defaultdict(list)
    start = lines[0].at if lines else 0.0
    for line in lines:
        if line.outbox_id in duplicates:
            where[line.outbox_id].append(f"pid {line.pid} at +{line.at - start:.3f}s")
    return "; ".join(f"{i}: {', '.join(w)}" for i, w in list(where.items())[:5])


# -- 1. three relays, 50,000 messages from concurrent writers: once each, in order ----------------


def test_three_relays_publish_50000_concurrent_messages_once_in_order(
    pg_dsn: str, pg_schema: str, tmp_path: Path, processes: Processes
) -> None:
    log = tmp_path / "published.log"
    migrate(pg_dsn, pg_schema)
    began = time.monotonic()
    writers = start_writers(
        processes, pg_dsn, pg_schema, 50_000, processes=2, threads=2, seed=1
    )  # four concurrent writers, 1-4 messages per transaction, 5% rolled back
    # The relays start on a backlog, as after a deployment, and drain it while writes go on.
    processes.wait_for(
        lambda: outbox_count(pg_dsn, pg_schema) >= 20_000,
        "a backlog of 20,000 messages",
        60,
        (w for w, _ in writers),
        interval=0.2,
    )
    relays = [
        start_relay(
            processes,
            f"relay-{n}",
            pg_dsn,
            pg_schema,
            log,
            "--batch-size=300",
            "--lease=10",
            "--publish-timeout=5",
            "--poll-interval=0.05",
        )
        for n in (1, 2, 3)
    ]
    written = finish_writers(processes, writers, 120)
    wrote_in = time.monotonic() - began
    drained_in = wait_until_drained(
        processes,
        pg_dsn,
        pg_schema,
        relays,
        "every committed message to be published and acknowledged",
        90,
    )
    for relay in relays:
        processes.stop(relay.process)

    lines = read_log(log)
    assert len(written.committed) == 50_000
    check_identity(lines, written)
    check_order(first_publications(lines), written)

    per_relay = Counter(line.pid for line in lines)
    totals = {relay.pid: relay.totals() for relay in relays}
    duplicates = duplicates_of(lines)
    print(
        f"{len(written.committed)} messages in {written.transactions} transactions by 4 writers "
        f"({len(written.rolled_back)} rolled back), written in {wrote_in:.1f}s; outbox empty "
        f"{drained_in:.1f}s later; {len(lines)} publications, {len(duplicates)} duplicated; "
        f"per relay: {dict(per_relay)}; totals: {totals}"
    )
    check_relay_totals(relays, per_relay, totals)
    assert not duplicates, (
        f"{len(duplicates)} messages published more than once in steady state (no crash, no "
        f"restart), e.g. {describe_duplicates(lines, duplicates)}"
    )


# -- 2. relays SIGKILLed at random moments during a drain --------------------------------------


def test_relays_killed_at_random_lose_nothing_and_keep_order(
    pg_dsn: str, pg_schema: str, tmp_path: Path, processes: Processes
) -> None:
    log = tmp_path / "published.log"
    migrate(pg_dsn, pg_schema)
    backlog = start_writers(processes, pg_dsn, pg_schema, 16_000, processes=2, threads=2, seed=2)
    written_before = finish_writers(processes, backlog, 60)
    relay_options = (
        "--batch-size=200",
        "--lease=2",
        "--publish-timeout=1",
        "--poll-interval=0.05",
        "--batch-delay=0.03",
    )
    relays = [
        start_relay(processes, f"relay-{n}", pg_dsn, pg_schema, log, *relay_options)
        for n in (1, 2, 3)
    ]
    # More messages come in while the relays are being killed.
    trickle = start_writers(
        processes,
        pg_dsn,
        pg_schema,
        4_000,
        processes=1,
        threads=2,
        seed=3,
        options=("--pause=0.003",),
    )
    rng = random.Random(20240603)
    kills: list[tuple[float, int, int]] = []  # (seconds since start, pid, messages left)
    began = time.monotonic()
    restarted = 0
    while len(kills) < 12:
        time.sleep(rng.uniform(0.25, 0.6))
        for relay in relays:
            processes.check_alive(relay.process)
        left = outbox_count(pg_dsn, pg_schema)
        if left == 0:
            break  # drained: later kills would not be "during a drain"
        victim = rng.randrange(len(relays))
        relay = relays[victim]
        relay.process.send_signal(signal.SIGKILL)
        assert processes.wait(relay.process, 10) == -signal.SIGKILL
        kills.append((time.monotonic() - began, relay.pid, left))
        restarted += 1
        relays[victim] = start_relay(
            processes, f"relay-r{restarted}", pg_dsn, pg_schema, log, *relay_options
        )
    killed_for = time.monotonic() - began
    written_during = finish_writers(processes, trickle, 60)
    drained_in = wait_until_drained(
        processes, pg_dsn, pg_schema, relays, "the surviving relays to publish everything", 60
    )
    for relay in relays:
        processes.stop(relay.process)

    written = Written(
        {**written_before.committed, **written_during.committed},
        written_before.rolled_back | written_during.rolled_back,
        written_before.transactions + written_during.transactions,
    )
    lines = read_log(log)
    duplicates = duplicates_of(lines)
    print(
        f"{len(kills)} SIGKILLs in {killed_for:.1f}s (seconds, pid, messages left: "
        f"{[(round(t, 2), pid, n) for t, pid, n in kills]}); "
        f"{len(written.committed)} messages, {len(lines)} publications, "
        f"{len(duplicates)} messages published more than once "
        f"(at most {max(duplicates.values(), default=1)} times); "
        f"outbox empty {drained_in:.1f}s after the last kill"
    )
    assert len(kills) >= 10, f"the backlog drained after only {len(kills)} kills"
    check_identity(lines, written)  # duplicates included: same id, same bytes
    check_order(first_publications(lines), written)


# -- 3. PostgreSQL restarted during a drain ------------------------------------------------------


def test_relay_rides_out_a_postgres_restart(
    private_pg: PrivateCluster, tmp_path: Path, processes: Processes
) -> None:
    dsn, schema = private_pg.dsn, "restart_test"
    log = tmp_path / "published.log"
    migrate(dsn, schema)
    backlog = start_writers(processes, dsn, schema, 15_000, processes=1, threads=2, seed=4)
    written = finish_writers(processes, backlog, 60)

    common = ["--batch-size=200", "--lease=2", "--publish-timeout=1", "--max-store-backoff=0.5"]
    common.append("--pool-timeout=2")
    # A drains (short poll interval, slowed down so that the restart falls mid-drain); B polls
    # only every 5 s, so that how fast it publishes a new commit shows its LISTEN connection.
    # Both are slowed down alike, so that B, going again at once after each full batch, does
    # not drain the backlog left at the restart before A's store backoff lets it back in.
    relay_a = start_relay(
        processes, "relay-a", dsn, schema, log, *common, "--poll-interval=0.05",
        "--batch-delay=0.05", "--app-name=relay_a",
    )  # fmt: skip
    relay_b = start_relay(
        processes, "relay-b", dsn, schema, log, *common, "--poll-interval=5",
        "--batch-delay=0.05", "--app-name=relay_b",
    )  # fmt: skip
    both = (relay_a.process, relay_b.process)
    processes.wait_for(lambda: listening(dsn, "relay_b"), "relay B to LISTEN", 20, both)
    processes.wait_for(lambda: log_size(log) >= 3_000, "the drain to be under way", 30, both)

    published_at_stop = log_size(log)
    private_pg.stop("immediate")
    time.sleep(1.5)  # down long enough for the relays to fail and retry
    private_pg.start()
    up_at = time.monotonic()
    processes.check_alive(*both)
    left_at_restart = outbox_count(dsn, schema)
    assert left_at_restart > 0, "the drain ended before the restart"

    drained_in: float | None = None
    relisten_in: float | None = None
    while drained_in is None or relisten_in is None:
        processes.check_alive(*both)
        elapsed = time.monotonic() - up_at
        assert elapsed < 60, (
            f"{elapsed:.0f}s after the restart: outbox drained after {drained_in}s, "
            f"relay B listening again after {relisten_in}s"
        )
        if drained_in is None and outbox_count(dsn, schema) == 0:
            drained_in = elapsed
        if relisten_in is None and listening(dsn, "relay_b"):
            relisten_in = elapsed
        time.sleep(0.05)
    processes.stop(relay_a.process)
    totals_a = relay_a.totals()

    # Relay B alone now: new commits must reach it through its reconnected LISTEN connection,
    # well within its 5 s poll interval.
    probe_topics = topics_for(-1)
    latencies = []
    probes: dict[str, Record] = {}
    for n in range(3):
        time.sleep(0.5)
        event = Event(writer=999, seq=n + 1, key="probe")
        data = probe_topics["alpha"].codec.encode(event)
        with psycopg.connect(dsn, autocommit=True) as conn:
            started = time.monotonic()
            with conn.transaction():
                outbox_id = bind(probe_topics["alpha"], persister(conn, schema=schema)).publish(
                    event
                )
            committed = time.monotonic()
        probes[outbox_id] = Record(
            "alpha", "probe", 999, n + 1, zlib.crc32(data), started, committed
        )

        def published(outbox_id: str = outbox_id) -> bool:
            return any(line.outbox_id == outbox_id for line in read_log(log))

        processes.wait_for(published, f"probe {n + 1} to be published", 10, [relay_b.process])
        at = next(line.at for line in read_log(log) if line.outbox_id == outbox_id)
        latencies.append(at - committed)
    processes.stop(relay_b.process)
    totals_b = relay_b.totals()

    lines = read_log(log)
    resumed_after = min(line.at for line in lines if line.at > up_at) - up_at
    all_written = Written({**written.committed, **probes}, written.rolled_back, 0)
    duplicates = duplicates_of(lines)
    print(
        f"{len(written.committed)} messages; restart after {published_at_stop} publications "
        f"({left_at_restart} left in the outbox); publishing resumed {resumed_after:.2f}s after "
        f"the server was up, outbox empty after {drained_in:.1f}s; relay B listening again "
        f"{relisten_in:.2f}s after; probe latencies {[round(x, 3) for x in latencies]}s; "
        f"{len(duplicates)} messages published twice; totals A {totals_a}, B {totals_b}"
    )
    check_identity(lines, all_written)
    check_order(first_publications(lines), all_written)
    assert any(line.pid == relay_a.pid and line.at > up_at for line in lines), (
        "relay A published nothing after the restart"
    )
    assert totals_a["store_errors"] > 0, "relay A saw no store error while the server was down"
    assert resumed_after < 15, f"publishing resumed only {resumed_after:.1f}s after the restart"
    assert max(latencies) < 2.0, (
        f"new commits took {latencies}s to publish: relay B's LISTEN did not wake it "
        "(its poll interval is 5 s)"
    )
