"""Relays in real processes on one Redis: exclusive, ordered, at least once across a SIGKILL,
and back on their feet after a Redis restart.

Each test launches ``tests/redis_relay_process.py`` with ``sys.executable``: relay processes
that publish to a shared append-only log (one line per message) and a writer process that
commits messages in many small ``MULTI``/``EXEC`` transactions over ten topics. The tests read
the log and the writer's record. Nothing is mocked. The first two tests use the machine's Redis
under a fresh key prefix; the restart tests start private ``redis-server`` processes on free
ports and never touch the machine's one.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
import redis
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

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("redis_relay_process.py")


class Line(NamedTuple):
    """One message as a relay published it."""

    outbox_id: str
    topic: str
    key: str
    seq: int
    pid: int
    at: float

    @classmethod
    def from_fields(cls, fields: list[str]) -> Line:
        outbox_id, topic, key, seq, pid, at = fields
        return cls(outbox_id, topic, key, int(seq), int(pid), float(at))

    @property
    def sequence(self) -> OrderingSequence:
        return (self.topic, self.key)

    @property
    def content(self) -> tuple[str, str, int]:
        return (self.topic, self.key, self.seq)

    @property
    def serial(self) -> int:
        return self.seq


class Written(NamedTuple):
    """What the writer executed (by outbox id) and discarded (by sequence number)."""

    committed: dict[str, tuple[str, str, int]]
    rolled_back: set[int]

    def contents(self) -> dict[str, tuple[str, str, int]]:
        return self.committed

    def expected(self) -> dict[OrderingSequence, list[int]]:
        """Per sequence, the sequence numbers in commit order (one writer: seq order)."""
        grouped: dict[OrderingSequence, list[int]] = defaultdict(list)
        for topic, key, seq in self.committed.values():
            grouped[(topic, key)].append(seq)
        return {s: sorted(seqs) for s, seqs in grouped.items()}


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    with Processes(tmp_path, SCRIPT, stop_timeout=30.0, poll_interval=0.02) as procs:
        yield procs


def start_relay(
    procs: Processes, name: str, url: str, prefix: str, log: Path, *options: str
) -> RelayProcess:
    return procs.start_relay(name, log, f"--url={url}", f"--prefix={prefix}", *options)


def write_messages(
    procs: Processes, url: str, prefix: str, count: int, seed: int, *options: str
) -> Written:
    """Run the writer process to completion; return what it committed."""
    out = procs.tmp_path / f"written-{seed}.tsv"
    writer = procs.start(
        f"writer-{seed}", "write", f"--url={url}", f"--prefix={prefix}", f"--out={out}",
        f"--count={count}", f"--seed={seed}", *options,
    )  # fmt: skip
    code = procs.wait(writer, 120)
    assert code == 0, f"writer failed with {code}:\n{procs.output_of(writer)}"
    committed: dict[str, tuple[str, str, int]] = {}
    rolled_back: set[int] = set()
    for state, outbox_id, topic, key, seq in read_rows(out, tuple):
        if state == "C":
            assert outbox_id not in committed, f"outbox id {outbox_id} given twice"
            committed[outbox_id] = (topic, key, int(seq))
        else:
            rolled_back.add(int(seq))
    assert len(committed) == count
    return Written(committed, rolled_back)


def read_log(log: Path) -> list[Line]:
    return read_rows(log, Line.from_fields)


def pending_ids(url: str, prefix: str) -> set[str]:
    """The outbox ids still in the outbox (not acknowledged)."""
    client = redis.Redis.from_url(url)
    try:
        start = len(prefix) + 3  # "<prefix>:m:"
        return {key.decode()[start:] for key in client.scan_iter(f"{prefix}:m:*", count=1000)}
    finally:
        client.close()


def out_of_order(lines: Iterable[Line]) -> list[tuple[Line, int]]:
    """Lines whose sequence number is not above the previous one of their sequence."""
    last: dict[OrderingSequence, int] = {}
    bad = []
    for line in lines:
        previous = last.get(line.sequence)
        if previous is not None and line.seq <= previous:
            bad.append((line, previous))
        last[line.sequence] = line.seq
    return bad


def by_sequence(lines: Iterable[Line]) -> dict[OrderingSequence, list[int]]:
    grouped: dict[OrderingSequence, list[int]] = defaultdict(list)
    for line in lines:
        grouped[line.sequence].append(line.seq)
    return grouped


# -- 1. two relays, 20,000 messages over ten topics ---------------------------------------------


def test_two_relays_publish_20000_messages_once_in_order(
    redis_url: str, redis_prefix: str, tmp_path: Path, processes: Processes
) -> None:
    log = tmp_path / "published.log"
    relays = [
        start_relay(processes, f"relay-{n}", redis_url, redis_prefix, log, "--batch-size=50")
        for n in (1, 2)
    ]
    processes.wait_for(
        lambda: all(r.ready.exists() for r in relays), "both relays to start", 20,
        (r.process for r in relays),
    )  # fmt: skip
    started = time.monotonic()
    written = write_messages(processes, redis_url, redis_prefix, 20_000, 1)
    drained = processes.wait_for(
        lambda: log_size(log) >= len(written.committed),
        "every committed message to be published",
        60,
        (r.process for r in relays),
    )
    elapsed = time.monotonic() - started
    for relay in relays:
        processes.stop(relay.process)

    lines = read_log(log)
    check_identity(lines, written)
    duplicates = duplicates_of(lines)
    assert not duplicates, f"{len(duplicates)} messages published twice: {duplicates}"
    bad = out_of_order(lines)
    assert not bad, f"{len(bad)} messages out of order, e.g. {bad[:5]}"
    assert by_sequence(lines) == written.expected()
    assert pending_ids(redis_url, redis_prefix) == set()
    assert {line.topic for line in lines} == {f"t{i}" for i in range(10)}

    per_relay = Counter(line.pid for line in lines)
    totals = {relay.pid: relay.totals() for relay in relays}
    print(
        f"20,000 messages over 10 topics ({len(written.expected())} sequences) published "
        f"once each in {elapsed:.1f}s (drained {drained:.1f}s after the writer ended); "
        f"per relay pid: {dict(per_relay)}"
    )
    check_relay_totals(relays, per_relay, totals)


# -- 2. a relay killed with SIGKILL mid-drain ----------------------------------------------------


def test_relay_killed_mid_batch_loses_nothing(
    redis_url: str, redis_prefix: str, tmp_path: Path, processes: Processes
) -> None:
    log = tmp_path / "published.log"
    written = write_messages(processes, redis_url, redis_prefix, 3000, 2)
    marker = tmp_path / "stalled"
    relay_a = start_relay(
        processes, "relay-a", redis_url, redis_prefix, log, "--lease=2", "--batch-size=50",
        "--publish-timeout=1", "--stall-after=700", f"--stall-marker={marker}",
    )  # fmt: skip
    processes.wait_for(marker.exists, "relay A to stall mid-batch", 30, [relay_a.process])
    relay_a.process.send_signal(signal.SIGKILL)
    assert processes.wait(relay_a.process, 10) == -signal.SIGKILL

    left = pending_ids(redis_url, redis_prefix)
    published_by_a = [line for line in read_log(log) if line.pid == relay_a.pid]
    unacked = {line.outbox_id for line in published_by_a} & left
    assert len(published_by_a) >= 700
    assert unacked, "relay A was killed after acknowledging everything it published"
    assert left - unacked, "relay A's batch had nothing left to publish"

    killed_at = time.monotonic()
    relay_b = start_relay(
        processes, "relay-b", redis_url, redis_prefix, log, "--lease=2", "--publish-timeout=1",
        "--batch-size=50",
    )  # fmt: skip
    processes.wait_for(
        lambda: not pending_ids(redis_url, redis_prefix),
        "relay B to publish everything",
        30,
        [relay_b.process],
    )
    recovered_after = time.monotonic() - killed_at
    processes.stop(relay_b.process)

    lines = read_log(log)
    check_identity(lines, written)
    counts = Counter(line.outbox_id for line in lines)
    duplicates = {i for i, n in counts.items() if n > 1}
    assert duplicates <= unacked, f"duplicates of acknowledged messages: {duplicates - unacked}"
    assert duplicates == unacked, f"unacknowledged but not published again: {unacked - duplicates}"
    assert all(counts[i] == 2 for i in duplicates)
    assert not out_of_order(first_publications(lines))

    lines_of_b = [line for line in lines if line.pid == relay_b.pid]
    assert not out_of_order(published_by_a)
    assert not out_of_order(lines_of_b)
    acked_by_a = [line for line in published_by_a if line.outbox_id not in left]
    resumed = by_sequence(acked_by_a)
    for sequence, seqs in by_sequence(lines_of_b).items():
        resumed[sequence] = resumed.get(sequence, []) + seqs
    assert dict(resumed) == written.expected()
    print(
        f"relay A published {len(published_by_a)} ({len(unacked)} unacknowledged), relay B "
        f"published {len(lines_of_b)} ({len(duplicates)} again); the outbox was empty "
        f"{recovered_after:.2f}s after the kill"
    )


# -- 3. Redis restarted mid-drain (private servers) ----------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrivateRedis:
    """A ``redis-server`` of our own on a free port, which a test may kill and restart."""

    def __init__(self, directory: Path, *, aof: bool) -> None:
        server = shutil.which("redis-server")
        assert server is not None, "redis-server is not installed"
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"] if aof else ["--appendonly", "no"]
        )
        self.command = [
            server, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory),
            "--save", "", *persistence,
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.directory / "server.log", "ab") as out:
            self.process = subprocess.Popen(self.command, stdout=out, stderr=out)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError(f"the private redis-server on port {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL the server (a crash: nothing is flushed beyond what fsync already wrote)."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PrivateRedis]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = PrivateRedis(directory, aof=bool(request.param))
    server.start()
    try:
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)


def subscribers(client: redis.Redis, channel: str) -> int:
    """How many connections are subscribed to ``channel``."""
    [(_, count)] = client.pubsub_numsub(channel)
    return int(count)


def published_after(log: Path, outbox_id: str) -> Line | None:
    return next((line for line in read_log(log) if line.outbox_id == outbox_id), None)


@pytest.mark.parametrize("private_redis", [True, False], ids=["aof-always", "no-persistence"],
                         indirect=True)  # fmt: skip
def test_relay_rides_out_a_redis_restart(
    private_redis: PrivateRedis, tmp_path: Path, processes: Processes
) -> None:
    url, prefix, aof = private_redis.url, "outbox", "--appendfsync" in private_redis.command
    log = tmp_path / "published.log"
    written = write_messages(processes, url, prefix, 6000, 4)
    common = ["--batch-size=50", "--lease=2", "--publish-timeout=1", "--max-store-backoff=0.5"]
    # A drains (slowed down so that the crash falls mid-drain); B polls only every 5 s, so that
    # how fast it publishes a new commit after the restart shows its wake-up subscription.
    relay_a = start_relay(
        processes, "relay-a", url, prefix, log, *common, "--poll-interval=0.05",
        "--batch-delay=0.02",
    )  # fmt: skip
    relay_b = start_relay(processes, "relay-b", url, prefix, log, *common, "--poll-interval=5")
    both = (relay_a.process, relay_b.process)
    processes.wait_for(lambda: log_size(log) >= 1500, "the drain to be under way", 30, both)

    published_at_crash = log_size(log)
    private_redis.kill()
    time.sleep(1.5)  # down long enough for the relays to fail and retry
    private_redis.start()
    up_at = time.time()
    processes.check_alive(*both)
    left_at_restart = pending_ids(url, prefix)

    if aof:  # every executed transaction was fsynced before EXEC returned: nothing is lost
        processes.wait_for(
            lambda: not pending_ids(url, prefix), "the outbox to drain after the restart", 60, both
        )
    else:  # nothing survives a restart without persistence: the outbox comes back empty
        assert left_at_restart == set()

    # New commits after the restart are published, and quickly: relay B's subscriber is back.
    latencies = []
    probe_ids = []
    client = redis.Redis.from_url(url)
    try:
        from process_support import Event
        from redis_relay_process import RedisLogTopic

        from outboxbind import bind
        from outboxbind.stores.redis import persister

        probe_topic = RedisLogTopic("t0", -1)
        processes.stop(relay_a.process)  # B alone now
        resubscribed = processes.wait_for(
            lambda: subscribers(client, f"{prefix}:wakeup") >= 1,
            "relay B to subscribe to the wake-up channel again", 20, [relay_b.process],
        )  # fmt: skip
        for n in range(3):
            with client.pipeline(transaction=True) as pipe:
                probe_id = bind(probe_topic, persister(pipe, prefix=prefix)).publish(
                    Event(10_000_000 + n, "probe")
                )
                pipe.execute()
            committed = time.time()
            probe_ids.append(probe_id)

            def probe_published(probe_id: str = probe_id) -> bool:
                return published_after(log, probe_id) is not None

            processes.wait_for(
                probe_published,
                f"probe {n + 1} to be published", 10, [relay_b.process],
            )  # fmt: skip
            line = published_after(log, probe_id)
            assert line is not None
            latencies.append(line.at - committed)
            time.sleep(0.3)
    finally:
        client.close()
    processes.stop(relay_b.process)
    totals_a, totals_b = relay_a.totals(), relay_b.totals()

    lines = [line for line in read_log(log) if line.outbox_id not in probe_ids]
    published = {line.outbox_id for line in lines}
    lost = set(written.committed) - published
    # What can always be asserted: nothing uncommitted, nothing altered, order kept.
    wrong = [line for line in lines if written.committed.get(line.outbox_id) != line.content]
    assert not wrong, f"published lines that were never committed: {wrong[:5]}"
    assert not out_of_order(first_publications(lines))
    if aof:
        check_identity(lines, written)  # at least once: every committed message published
        assert not lost
    resumed_after = min((line.at for line in read_log(log) if line.at > up_at), default=-1.0)
    print(
        f"{'AOF appendfsync always' if aof else 'no persistence'}: {len(written.committed)} "
        f"committed; crash after {published_at_crash} publications; after the restart "
        f"{len(left_at_restart)} were still in the outbox, {len(lost)} committed messages were "
        f"lost with the server's memory; {len(duplicates_of(lines))} published twice; "
        f"first publication {resumed_after - up_at:.2f}s after the restart; relay B subscribed "
        f"again {resubscribed:.2f}s after relay A stopped; probe latencies "
        f"{[round(x, 3) for x in latencies]}s; lines per relay pid "
        f"{dict(Counter(line.pid for line in lines))} (A {relay_a.pid}, B {relay_b.pid}); "
        f"totals A {totals_a}, B {totals_b}"
    )
    assert totals_a["store_errors"] > 0, "relay A saw no store error while Redis was down"
    assert max(latencies) < 2.0, (
        f"new commits took {latencies}s to publish: relay B's subscription did not wake it "
        "(its poll interval is 5 s)"
    )
    if not aof:
        assert lost, "without persistence the restart should have lost the unpublished backlog"
