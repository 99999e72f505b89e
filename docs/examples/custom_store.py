"""A store of your own, proven by the conformance kit: ``python -m pytest custom_store.py``.

``Database`` stands for your database (its tables, and a lock for its transactions), so the
example runs anywhere; on a real database each ``with db.lock:`` block is one short
transaction and each dict a table. ``main()`` runs the kit on the store with pytest.
"""

from __future__ import annotations

import bisect
import itertools
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import attrs
import pytest

from outboxbind import LeaseLost, OutboxEntry, PersistedMessage
from outboxbind.store import BufferedBatch, SequenceKey, Store, round_robin
from outboxbind.testing import StoreContract, StoreHarness

# -- the database ----------------------------------------------------------------------------


@attrs.define
class Row:
    id: int
    topic: str
    ordering_key: str  # '' for the topic-wide sequence
    data: bytes
    attributes: dict[str, str]
    created_at: float
    available_at: float | None  # due from; None: blocked by the poison policy
    attempts: int = 0
    last_error: str | None = None

    def message(self) -> PersistedMessage:
        return PersistedMessage(
            id=str(self.id),
            topic=self.topic,
            data=self.data,
            attributes=self.attributes,
            ordering_key=self.ordering_key or None,
            created_at=datetime.fromtimestamp(self.created_at, UTC),
            attempts=self.attempts,
        )


class Database:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.lock = threading.Lock()
        self.clock = clock
        self.ids = itertools.count(1)  # a committed id is never reused
        self.outbox: dict[int, Row] = {}
        self.dead_letters: dict[int, Row] = {}
        self.leases: dict[SequenceKey, tuple[str, float]] = {}  # token, expiry


# -- the writing half: a persister -----------------------------------------------------------


class Transaction:
    """The persister: rows become visible to relays at commit, never before."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.rows: list[Row] = []

    def __call__(self, entry: OutboxEntry, /) -> str:
        now = self.db.clock()
        due = max(now, entry.deliver_after.timestamp()) if entry.deliver_after else now
        with self.db.lock:
            id_ = next(self.db.ids)
        key = entry.ordering_key or ""
        self.rows.append(Row(id_, entry.topic, key, entry.data, dict(entry.attributes), now, due))
        return str(id_)

    def commit(self) -> None:
        with self.db.lock:
            self.db.outbox.update((row.id, row) for row in self.rows)


# -- the relay's half: the store and its batch -----------------------------------------------


class DictBatch(BufferedBatch):
    """BufferedBatch keeps the marks (``batch.outcomes``) and the lease tokens
    (``batch.tokens``); the store's ``close_batch``, given when the batch is made, applies them
    once, when the batch is closed."""


class DictStore:
    def __init__(self, db: Database, *, lease_duration: float = 30.0) -> None:
        self.db = db
        self.lease_duration = lease_duration  # the relay checks publish_timeout against it
        self.cursor: SequenceKey | None = None  # where the last checkout's walk stopped

    def checkout_batch(self, topic_names: Sequence[str], limit: int) -> DictBatch | None:
        with self.db.lock:  # one short transaction: find, lease, read
            now = self.db.clock()
            due = [s for s in self.sequences(topic_names) if self.free(s, now)][:limit]
            if not due:
                return None
            self.cursor = due[-1]  # the next batch starts after it: every sequence gets a turn
            share = -(-limit // len(due))  # fair: limit split evenly across the due sequences
            taken = {s: self.due_prefix(s, share, now) for s in due}
            tokens = {s: secrets.token_hex(16) for s in due}
            for sequence, token in tokens.items():
                self.db.leases[sequence] = (token, now + self.lease_duration)
        return DictBatch(round_robin(taken, limit), tokens, self.close_batch)

    def sequences(self, topic_names: Sequence[str]) -> list[SequenceKey]:
        """Every sequence of these topics, starting after the previous checkout's last."""
        found = sorted({(r.topic, r.ordering_key) for r in self.db.outbox.values()})
        found = [s for s in found if s[0] in topic_names]
        split = bisect.bisect_right(found, self.cursor) if self.cursor else 0
        return found[split:] + found[:split]

    def free(self, sequence: SequenceKey, now: float) -> bool:
        """Not leased (or its lease expired), and a message is due at its head."""
        lease = self.db.leases.get(sequence)
        return (lease is None or lease[1] <= now) and bool(self.due_prefix(sequence, 1, now))

    def due_prefix(self, sequence: SequenceKey, limit: int, now: float) -> list[PersistedMessage]:
        """The due messages at the head of a sequence, in write order, up to the first one
        that waits for a retry or is blocked; delayed messages not yet due are stepped over."""
        rows = sorted(
            (r for r in self.db.outbox.values() if (r.topic, r.ordering_key) == sequence),
            key=lambda r: r.id,
        )
        due: list[PersistedMessage] = []
        for row in rows:
            if row.available_at is not None and row.available_at <= now:
                due.append(row.message())
                if len(due) == limit:
                    break
            elif row.attempts > 0:
                break  # it failed and waits (or is blocked): the rest of its sequence waits too
        return due

    def close_batch(self, batch: BufferedBatch) -> None:
        lost = []
        with self.db.lock:  # one short transaction: fence, apply, release
            now = self.db.clock()
            for sequence, token in batch.tokens.items():
                lease = self.db.leases.get(sequence)
                if lease is None or lease[0] != token:
                    lost.append(sequence)  # taken over: this batch changes nothing of it
                    continue
                del self.db.leases[sequence]  # unmarked messages are simply released
                for kind, message, detail, retry_after in batch.outcomes.get(sequence, []):
                    row = self.db.outbox[int(message.id)]
                    if kind == "published":  # detail is the publish id
                        del self.db.outbox[row.id]
                        continue
                    row.attempts += 1  # detail is the error
                    row.last_error = detail
                    if kind == "dead":  # parked: its sequence goes on without it
                        self.db.dead_letters[row.id] = self.db.outbox.pop(row.id)
                    elif retry_after is None:  # blocked: holds its sequence until replayed
                        row.available_at = None
                    else:
                        row.available_at = now + retry_after.total_seconds()
        if lost:
            raise LeaseLost(f"the leases of {sorted(lost)} were taken over by another relay")


# -- proving it: the conformance kit ---------------------------------------------------------


class DictHarness:
    """What the kit needs: stores over one fresh database, and a writer that commits or not."""

    def __init__(self) -> None:
        self.db: Database | None = None

    def open_store(self, clock: Callable[[], float]) -> Store:
        if self.db is None:  # every store opened in a test shares the test's database
            self.db = Database(clock)
        return DictStore(self.db)

    def write(self, entries: Sequence[OutboxEntry], *, commit: bool = True) -> list[str]:
        assert self.db is not None
        tx = Transaction(self.db)
        ids = [tx(entry) for entry in entries]
        if commit:
            tx.commit()
        return ids


class TestDictStore(StoreContract):
    @pytest.fixture
    def harness(self) -> StoreHarness:
        return DictHarness()


def main() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        capture_output=True,
        text=True,
        check=False,
    )
    print(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout + result.stderr


if __name__ == "__main__":
    main()
