"""SQLite: what a mark carries is applied in the close transaction, with the mark, or not at all.

A trigger made by the test fails the close transaction after it wrote a message's follow-ups;
the rollback must take them back together with the mark and its progress, and leave the message
to be checked out again as it was. Without the trigger, the same close commits both, and wakes
(signals) the relays of its process for the follow-ups.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from outboxbind import wakeup
from outboxbind.messages import OutboxEntry
from outboxbind.store import MarkDetails
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.stores.sqlite.persister import wakeup_channel
from outboxbind.stores.sqlite.schema import queries_for
from outboxbind.testing import FakeClock, entry

#: Where the injected failure strikes, each after the close wrote a follow-up.
FAILURES = {
    "parking-the-message": "BEFORE INSERT ON outbox_dead_letters",
    "writing-the-second-follow-up": (
        "BEFORE INSERT ON outbox "
        "WHEN NEW.topic = 'dead-events' AND CAST(NEW.data AS TEXT) = 'second'"
    ),
}


def write(db_path: Path, entries: Sequence[OutboxEntry]) -> list[str]:
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            publish = persister(conn)
            return [publish(e) for e in entries]
    finally:
        conn.close()


def run_sql(db_path: Path, statement: str) -> None:
    conn = sqlite3.connect(db_path)
    try:
        with conn:
            conn.execute(statement)
    finally:
        conn.close()


@pytest.mark.parametrize("when", FAILURES.values(), ids=FAILURES.keys())
def test_follow_ups_and_their_mark_commit_together_or_not_at_all(
    db_path: Path, store: SQLiteStore, clock: FakeClock, when: str
) -> None:
    [id_] = write(db_path, [entry(key="a")])
    details = {
        id_: MarkDetails(
            progress='{"send": "failed"}',
            follow_ups=[entry("dead-events", b"first"), entry("dead-events", b"second")],
        )
    }
    run_sql(
        db_path,
        f"CREATE TRIGGER injected_failure {when} BEGIN SELECT RAISE(ABORT, 'injected'); END",
    )

    batch = store.checkout_batch(["orders"], 10)
    assert batch is not None
    batch.add_details(details)
    batch.mark_dead(batch.messages[0], "max errors")
    with pytest.raises(sqlite3.IntegrityError, match="injected"):
        batch.close()

    assert store.checkout_batch(["dead-events"], 10) is None  # no follow-up was committed
    assert store.dead_letters() == []  # nor the mark
    assert store.checkout_batch(["orders"], 10) is None  # the lease's end was rolled back too
    clock.advance(store.lease_duration + 1)
    again = store.checkout_batch(["orders"], 10)
    assert again is not None
    [message] = again.messages
    assert (message.id, message.attempts, message.progress) == (id_, 0, None)

    run_sql(db_path, "DROP TRIGGER injected_failure")
    again.add_details(details)
    again.mark_dead(message, "max errors")
    again.close()
    [dead] = store.dead_letters()
    assert (dead.message.id, dead.message.attempts) == (id_, 1)
    assert dead.message.progress == '{"send": "failed"}'
    follow_ups = store.checkout_batch(["dead-events"], 10)
    assert follow_ups is not None
    with follow_ups:
        assert [m.data for m in follow_ups.messages] == [b"first", b"second"]


def test_purge_settled_searches_the_topic_index(db_path: Path, store: SQLiteStore) -> None:
    conn = sqlite3.connect(db_path)
    try:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN " + queries_for("outbox")["purge_settled"],
            {"topic": "orders", "cutoff": 0.0},
        ).fetchall()
    finally:
        conn.close()
    assert [row[3] for row in plan] == [
        "SEARCH outbox_settled USING INDEX outbox_settled_topic_index (topic=? AND settled_at<?)"
    ]


def test_a_close_that_writes_follow_ups_signals_the_relays_of_its_process(
    db_path: Path, store: SQLiteStore
) -> None:
    [id_] = write(db_path, [entry()])
    signalled = threading.Event()
    # the channel the store's commit watcher listens on (its wake-up after the signal is its own
    # business, and timing-dependent: not tested here)
    unsubscribe = wakeup.subscribe(wakeup_channel(str(db_path)), signalled.set)
    try:
        batch = store.checkout_batch(["orders"], 10)
        assert batch is not None
        batch.add_details({id_: MarkDetails(follow_ups=[entry("dead-events")])})
        batch.mark_dead(batch.messages[0], "max errors")
        assert not signalled.is_set()
        batch.close()
        assert signalled.is_set()
    finally:
        unsubscribe()
