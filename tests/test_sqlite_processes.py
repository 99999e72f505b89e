"""Relays in real processes on one SQLite file: exclusive, ordered, and at least once across a kill.

Each test launches ``tests/relay_process.py`` with ``sys.executable``: relay processes that
publish to a shared append-only log (one line per message: outbox id, topic, key, sequence
number, relay pid) and a writer process that commits messages in many small transactions. The
tests then read the log and the writer's record. Nothing is mocked.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from process_support import (
    OrderingSequence,
    Processes,
    RelayProcess,
    check_identity,
    check_relay_totals,
    duplicates_of,
    first_publications,
    read_rows,
)

from outboxbind.stores.sqlite import SQLiteStore

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("relay_process.py")


class Line(NamedTuple):
    """One message as a relay published it."""

    outbox_id: str
    topic: str
    key: str
    seq: int
    pid: int

    @classmethod
    def from_fields(cls, fields: list[str]) -> Line:
        outbox_id, topic, key, seq, pid = fields
        return cls(outbox_id, topic, key, int(seq), int(pid))

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
    """What the writer process committed (by outbox id: topic, key, sequence number) and rolled
    back (by sequence number)."""

    committed: dict[str, tuple[str, str, int]]
    rolled_back: set[int]

    def contents(self) -> dict[str, tuple[str, str, int]]:
        """The content of each committed message (topic, key, sequence number), by outbox id."""
        return self.committed

    def expected(self) -> dict[OrderingSequence, list[int]]:
        """Per sequence, the committed sequence numbers in commit order."""
        by_sequence: dict[OrderingSequence, list[tuple[int, int]]] = defaultdict(list)
        for outbox_id, (topic, key, seq) in self.committed.items():
            by_sequence[(topic, key)].append((int(outbox_id), seq))
        return {s: [seq for _, seq in sorted(items)] for s, items in by_sequence.items()}


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    with Processes(tmp_path, SCRIPT, stop_timeout=30.0, poll_interval=0.02) as procs:
        yield procs


def start_relay(procs: Processes, name: str, db: Path, log: Path, *options: str) -> RelayProcess:
    return procs.start_relay(name, log, f"--db={db}", "--poll-interval=0.05", *options)


def write_messages(procs: Processes, db: Path, count: int, seed: int, *options: str) -> Written:
    """Run the writer process to completion; return what it committed."""
    out = procs.tmp_path / f"written-{seed}.tsv"
    writer = procs.start(
        f"writer-{seed}",
        "write",
        f"--db={db}",
        f"--out={out}",
        f"--count={count}",
        f"--seed={seed}",
        *options,
    )
    code = procs.wait(writer, 60)
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


def outbox_ids(db: Path) -> set[str]:
    """The ids still in the outbox (not acknowledged)."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        return {str(row[0]) for row in conn.execute("SELECT id FROM outbox")}
    finally:
        conn.close()


def create_schema(db: Path) -> None:
    SQLiteStore(db).close()


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


def test_two_relays_publish_each_message_once_in_order(
    tmp_path: Path, processes: Processes
) -> None:
    db, log = tmp_path / "outbox.db", tmp_path / "published.log"
    create_schema(db)
    relays = [
        start_relay(processes, f"relay-{n}", db, log, "--lease=30", "--batch-size=20")
        for n in (1, 2)
    ]
    processes.wait_for(
        lambda: all(r.ready.exists() for r in relays),
        "both relays to start",
        20,
        (r.process for r in relays),
    )

    written = write_messages(processes, db, 3000, 1, "--pause=0.0005")

    processes.wait_for(
        lambda: {line.outbox_id for line in read_log(log)} >= written.committed.keys(),
        "every committed message to be published",
        30,
        (r.process for r in relays),
    )
    for relay in relays:
        processes.stop(relay.process)

    lines = read_log(log)
    check_identity(lines, written)
    duplicates = duplicates_of(lines)
    assert not duplicates, f"{len(duplicates)} messages published twice: {duplicates}"
    bad = out_of_order(lines)
    assert not bad, f"{len(bad)} messages out of order, e.g. {bad[:5]}"
    assert by_sequence(lines) == written.expected()
    assert outbox_ids(db) == set()

    per_relay = Counter(line.pid for line in lines)
    totals = {relay.pid: relay.totals() for relay in relays}
    print(f"messages published per relay pid: {dict(per_relay)}; totals: {totals}")
    check_relay_totals(relays, per_relay, totals)


def test_relay_killed_mid_batch_loses_nothing(tmp_path: Path, processes: Processes) -> None:
    db, log = tmp_path / "outbox.db", tmp_path / "published.log"
    create_schema(db)
    written = write_messages(processes, db, 600, 2)
    marker = tmp_path / "stalled"
    # A hangs inside publish_batch after its 150th message, with more of that batch to go, and
    # is killed there, before its publish timeout could end the batch.
    relay_a = start_relay(
        processes,
        "relay-a",
        db,
        log,
        "--lease=2",
        "--batch-size=20",
        "--publish-timeout=1",
        "--stall-after=150",
        f"--stall-marker={marker}",
    )
    processes.wait_for(marker.exists, "relay A to stall mid-batch", 20, [relay_a.process])
    relay_a.process.send_signal(signal.SIGKILL)
    assert processes.wait(relay_a.process, 10) == -signal.SIGKILL

    left = outbox_ids(db)
    published_by_a = [line for line in read_log(log) if line.pid == relay_a.pid]
    unacked = {line.outbox_id for line in published_by_a} & left
    assert len(published_by_a) >= 150
    assert unacked, "relay A was killed after acknowledging everything it published"
    assert left - unacked, "relay A's batch had nothing left to publish"

    killed_at = time.monotonic()
    relay_b = start_relay(
        processes, "relay-b", db, log, "--lease=2", "--publish-timeout=1", "--batch-size=20"
    )
    processes.wait_for(
        lambda: not outbox_ids(db),
        "relay B to publish everything",
        30,
        [relay_b.process],
    )
    recovered_after = time.monotonic() - killed_at
    processes.stop(relay_b.process)

    lines = read_log(log)
    check_identity(lines, written)
    assert {line.pid for line in lines} == {relay_a.pid, relay_b.pid}
    counts = Counter(line.outbox_id for line in lines)
    duplicates = {i for i, n in counts.items() if n > 1}
    assert duplicates <= unacked, f"duplicates of acknowledged messages: {duplicates - unacked}"
    assert duplicates == unacked, f"unacknowledged but not published again: {unacked - duplicates}"
    assert all(counts[i] == 2 for i in duplicates), {i: counts[i] for i in duplicates}

    bad = out_of_order(first_publications(lines))
    assert not bad, f"first publications out of order, e.g. {bad[:5]}"

    # Each relay kept order, and B took every sequence up from its first unacknowledged message:
    # what A had acknowledged followed by what B published is exactly what was committed.
    lines_of_b = [line for line in lines if line.pid == relay_b.pid]
    assert not out_of_order(published_by_a)
    assert not out_of_order(lines_of_b)
    acked_by_a = [line for line in published_by_a if line.outbox_id not in left]
    resumed = by_sequence(acked_by_a)
    for sequence, seqs in by_sequence(lines_of_b).items():
        resumed[sequence] = resumed.get(sequence, []) + seqs
    assert dict(resumed) == written.expected()
    print(
        f"relay A published {len(published_by_a)} ({len(unacked)} unacknowledged), "
        f"relay B published {len(lines_of_b)} ({len(duplicates)} again); "
        f"the outbox was empty {recovered_after:.2f}s after the kill"
    )


def test_sigterm_drains_then_exits(tmp_path: Path, processes: Processes) -> None:
    db, log = tmp_path / "outbox.db", tmp_path / "published.log"
    create_schema(db)
    written = write_messages(processes, db, 400, 3)
    relay = start_relay(processes, "relay", db, log, "--batch-size=10", "--batch-delay=0.02")
    processes.wait_for(lambda: bool(read_log(log)), "the first publication", 20, [relay.process])
    published_before_stop = len(read_log(log))
    processes.stop(relay.process)

    assert published_before_stop < len(written.committed), "nothing was left to drain"
    lines = read_log(log)
    check_identity(lines, written)
    assert len(lines) == len(written.committed), "a message was published twice"
    assert not out_of_order(lines)
    assert outbox_ids(db) == set()
    stats = json.loads(relay.stats.read_text())
    assert stats["stopped_in_time"] is True
    assert stats["totals"]["published"] == len(written.committed)
    print(f"{published_before_stop} published before SIGTERM, {len(lines)} after draining")
