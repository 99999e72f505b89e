"""An in-memory store: the store contract in plain Python, for tests of code that uses a relay.

It passes the same conformance kit as the database stores, so a test that runs a relay over it
sees the real ordering, lease, retry and dead-letter behaviour, without a database::

    store = InMemoryStore()
    with store.transaction() as tx:
        bind(orders, tx).publish(OrderPlaced(...))
    relay = Relay(store)
    relay.register_topic(orders)
    relay.process_messages()
"""

from __future__ import annotations

import bisect
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import attrs

from outboxbind import wakeup
from outboxbind.errors import ConfigurationError, LeaseLost
from outboxbind.messages import OutboxEntry, PersistedMessage
from outboxbind.store import (
    BufferedBatch,
    DeadLetter,
    MarkDetails,
    MarkedOutcome,
    MessageBatch,
    MessageRecord,
    SequenceKey,
    TopicBacklog,
    integer_ids,
    round_robin,
)

__all__ = ["InMemoryBatch", "InMemoryStore", "InMemoryTransaction"]

#: How many batches in a row a read-ahead carries a sequence on after its batch's last message;
#: then it is read from its head again, so a row committed late with an earlier id is not
#: passed over for long.
MOST_CONTINUATIONS = 16


@attrs.define
class _Row:
    id: int
    topic: str
    key: str
    data: bytes
    attributes: dict[str, str]
    created_at: float
    available_at: float | None
    attempts: int = 0
    last_error: str | None = None
    failed_at: float | None = None
    progress: str | None = None

    def message(self) -> PersistedMessage:
        return PersistedMessage(
            id=str(self.id),
            topic=self.topic,
            data=self.data,
            attributes=self.attributes,
            ordering_key=self.key or None,
            created_at=datetime.fromtimestamp(self.created_at, UTC),
            attempts=self.attempts,
            progress=self.progress,
        )


@attrs.define
class _Settled:
    row: _Row
    publish_id: str
    settled_at: float


class InMemoryTransaction:
    """A persister whose writes become visible to the store only on :meth:`commit`."""

    def __init__(self, store: InMemoryStore) -> None:
        self._store = store
        self._pending: list[_Row] = []
        self._done = False

    def __call__(self, entry: OutboxEntry, /) -> str:
        """Stage ``entry``; return the outbox id it will have."""
        if self._done:
            raise RuntimeError("this transaction is already committed or rolled back")
        row = self._store._new_row(entry)
        self._pending.append(row)
        return str(row.id)

    def commit(self) -> None:
        """Make the staged messages visible to relays."""
        self._done = True
        self._store._insert(self._pending)
        self._pending = []

    def rollback(self) -> None:
        """Discard the staged messages."""
        self._done = True
        self._pending = []


class InMemoryStore:
    """The store contract in memory. Thread-safe; not shared across processes.

    Args:
        lease_duration: seconds a batch holds its sequences.
        clock: the time source in unix seconds (tests pass a fake one).
    """

    def __init__(
        self, *, lease_duration: float = 60.0, clock: Callable[[], float] = time.time
    ) -> None:
        if lease_duration <= 0:
            raise ConfigurationError(f"lease_duration must be positive, not {lease_duration!r}")
        self.lease_duration = lease_duration
        self.clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._sequences: dict[SequenceKey, list[_Row]] = {}
        self._leases: dict[SequenceKey, tuple[str, float]] = {}
        self._dead: dict[int, _Row] = {}
        self._settled: dict[int, _Settled] = {}  # published messages kept (MarkDetails.keep)
        self._handed_out: set[int] = set()  # the ids of the messages of batches not closed
        self._cursor: SequenceKey | None = None
        self._channel = f"memory:{id(self)}"

    # -- writing -------------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[InMemoryTransaction]:
        """A transaction to bind topics to; commits on success, rolls back on an exception."""
        tx = InMemoryTransaction(self)
        try:
            yield tx
        except BaseException:
            tx.rollback()
            raise
        tx.commit()

    def _new_row(self, entry: OutboxEntry) -> _Row:
        with self._lock:
            return self._make_row(entry)

    def _make_row(self, entry: OutboxEntry) -> _Row:
        """A row for ``entry`` with the next id; the caller holds the lock."""
        now = self.clock()
        due = entry.deliver_after.timestamp() if entry.deliver_after else now
        return _Row(
            next(self._ids), entry.topic, entry.ordering_key or "", entry.data,
            dict(entry.attributes), now, max(now, due),
        )  # fmt: skip

    def _insert(self, rows: list[_Row]) -> None:
        with self._lock:
            self._place(rows)
        if rows:
            wakeup.signal(self._channel)

    def _place(self, rows: list[_Row]) -> None:
        """Make ``rows`` visible in their sequences; the caller holds the lock."""
        for row in rows:
            sequence = self._sequences.setdefault((row.topic, row.key), [])
            bisect.insort(sequence, row, key=lambda r: r.id)

    # -- the Store protocol --------------------------------------------------------------------

    def checkout_batch(self, topic_names: Sequence[str], limit: int) -> InMemoryBatch | None:
        """Lease up to ``limit`` due messages of ``topic_names``, fairly across sequences."""
        return self._checkout(topic_names, limit)

    def _checkout(
        self,
        topic_names: Sequence[str],
        limit: int,
        parent: InMemoryBatch | None = None,
        continuing: Collection[SequenceKey] = (),
    ) -> InMemoryBatch | None:
        if not topic_names or limit <= 0:
            return None
        wanted = set(topic_names)
        with self._lock:
            now = self.clock()
            due: list[SequenceKey] = []
            for sequence in self._rotation(wanted):
                lease = self._leases.get(sequence)
                if lease is not None and lease[1] > now:
                    continue
                if self._due_prefix(self._sequences[sequence], 1, now):
                    due.append(sequence)
                    if len(due) >= limit:
                        break
            after: dict[SequenceKey, int] = {}  # continued sequences: from after this id
            if parent is not None and self._cannot_fill(due, limit, now):
                after = self._continuable(parent, continuing)
            if not due and not after:
                return None
            share = -(-limit // (len(due) + len(after)))  # limit split evenly
            taken = {s: self._due_prefix(self._sequences[s], share, now) for s in due}
            for sequence, last in after.items():
                rows = [row for row in self._sequences.get(sequence, []) if row.id > last]
                taken[sequence] = self._due_prefix(rows, share, now)
            tokens = {}
            for sequence in taken:
                if sequence in after:
                    tokens[sequence] = self._leases[sequence][0]  # the same lease, extended
                else:
                    tokens[sequence] = secrets.token_hex(16)
                self._leases[sequence] = (tokens[sequence], now + self.lease_duration)
            handed = round_robin(taken, limit)
            self._handed_out.update(row.id for row in handed)
        messages = [row.message() for row in handed]
        last_ids = {(m.topic, m.ordering_key or ""): int(m.id) for m in messages}
        depth = {}
        if parent is not None:
            parent.passed_on = set(after)
            depth = {s: parent.continuations.get(s, 0) + 1 for s in after}
        return InMemoryBatch(messages, tokens, self, last_ids, depth)

    def _cannot_fill(self, due: list[SequenceKey], limit: int, now: float) -> bool:
        found = 0
        for sequence in due:
            found += len(self._due_prefix(self._sequences[sequence], limit - found, now))
            if found >= limit:
                return False
        return True

    def _continuable(
        self, parent: InMemoryBatch, continuing: Collection[SequenceKey]
    ) -> dict[SequenceKey, int]:
        """The sequences a read-ahead carries on: the parent's, still under its lease, each
        with the id of its last message in the parent."""
        after = {}
        for sequence in continuing:
            token, last = parent.tokens.get(sequence), parent.last_ids.get(sequence)
            lease = self._leases.get(sequence)
            if token is None or last is None or lease is None or lease[0] != token:
                continue
            if parent.continuations.get(sequence, 0) >= MOST_CONTINUATIONS:
                continue  # let go, so that a row committed late with an earlier id is read
            now = self.clock()
            rows = self._sequences.get(sequence, [])
            split = bisect.bisect_right(rows, last, key=lambda row: row.id)
            if any(
                row.id not in self._handed_out
                and row.available_at is not None and row.available_at <= now
                for row in rows[:split]
            ):  # fmt: skip
                # a row committed late (or a delayed one fallen due) below the batch's last
                # message and not in flight: let go, so that it is read first, before any
                # message written after it (guarantee 3), not at the end of the chain
                continue
            if self._due_prefix(rows[split:], 1, now):
                after[sequence] = last  # only those with more to publish
        return after

    def _rotation(self, wanted: set[str]) -> Iterator[SequenceKey]:
        ordered = sorted(s for s in self._sequences if s[0] in wanted and self._sequences[s])
        if self._cursor is not None:
            split = bisect.bisect_right(ordered, self._cursor)
            ordered = ordered[split:] + ordered[:split]
        for sequence in ordered:
            self._cursor = sequence
            yield sequence

    @staticmethod
    def _due_prefix(rows: list[_Row], limit: int, now: float) -> list[_Row]:
        due = []
        for row in rows:
            if row.available_at is not None and row.available_at <= now:
                due.append(row)
                if len(due) >= limit:
                    break
            elif row.attempts > 0:
                break  # waiting for a retry, or blocked
        return due

    def _close_batch(self, batch: BufferedBatch) -> None:
        lost = []
        follow_ups: list[_Row] = []
        with self._lock:
            now = self.clock()
            self._handed_out.difference_update(int(m.id) for m in batch.messages)
            for sequence, token in batch.tokens.items():
                lease = self._leases.get(sequence)
                if lease is None or lease[0] != token:
                    lost.append(sequence)
                    continue
                if sequence not in batch.passed_on:  # else the batch read ahead holds it now
                    del self._leases[sequence]
                outcomes = batch.outcomes.get(sequence, [])
                follow_ups += self._apply(sequence, outcomes, batch.details, now)
            self._place(follow_ups)
        if follow_ups:
            wakeup.signal(self._channel)
        if lost:
            names = ", ".join(f"{t}/{k or '*'}" for t, k in lost)
            raise LeaseLost(f"in-memory store: the lease of {names} was taken over")

    def _apply(
        self,
        sequence: SequenceKey,
        outcomes: list[MarkedOutcome],
        details: dict[str, MarkDetails],
        now: float,
    ) -> list[_Row]:
        """Apply one sequence's marks; return the rows of the follow-ups they carry."""
        rows = self._sequences.get(sequence, [])
        by_id = {row.id: row for row in rows}
        gone: set[int] = set()
        follow_ups: list[_Row] = []
        for kind, message, error, retry_after in outcomes:
            row = by_id.get(int(message.id))
            if row is None:
                continue
            extra = details.get(message.id) if details else None
            if extra is not None:
                if extra.progress is not None:
                    row.progress = extra.progress
                follow_ups += [self._make_row(entry) for entry in extra.follow_ups]
            if kind == "published":
                gone.add(row.id)
                if extra is not None and extra.keep:
                    self._settled[row.id] = _Settled(row, error or "", now)
                continue
            row.attempts += 1
            row.last_error = error
            row.failed_at = now
            if kind == "dead":
                gone.add(row.id)
                self._dead[row.id] = row
            else:
                row.available_at = (
                    None if retry_after is None else now + retry_after.total_seconds()
                )
        if gone:
            rows[:] = [row for row in rows if row.id not in gone]
        return follow_ups

    # -- wake-ups ------------------------------------------------------------------------------

    def subscribe_wakeups(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Wake ``callback`` when a transaction on this store commits."""
        return wakeup.subscribe(self._channel, callback)

    # -- DeadLetterAdmin -----------------------------------------------------------------------

    def dead_letters(self, topic: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Parked and blocked messages, oldest first."""
        with self._lock:
            found = [(row, "parked") for row in self._dead.values()]
            found += [
                (row, "blocked")
                for rows in self._sequences.values()
                for row in rows
                if row.available_at is None
            ]
        found = sorted((f for f in found if topic is None or f[0].topic == topic), key=_row_id)
        return [
            DeadLetter(row.message(), row.last_error or "", state,  # type: ignore[arg-type]
                       datetime.fromtimestamp(row.failed_at or 0, UTC))
            for row, state in found[:limit]
        ]  # fmt: skip

    def replay_dead_letters(self, ids: Sequence[str]) -> int:
        """Make parked or blocked messages due now with zero attempts, keeping their ids."""
        wanted = set(integer_ids(ids))
        with self._lock:
            now = self.clock()
            replayed = []
            for id_ in wanted & self._dead.keys():
                replayed.append(self._dead.pop(id_))
            for rows in self._sequences.values():
                replayed += [row for row in rows if row.id in wanted and row.available_at is None]
            for row in replayed:
                row.attempts, row.available_at, row.last_error, row.failed_at = 0, now, None, None
        self._insert([row for row in replayed if row.id not in self._ids_present()])
        return len(replayed)

    def _ids_present(self) -> set[int]:
        with self._lock:
            return {row.id for rows in self._sequences.values() for row in rows}

    def purge_dead_letters(self, ids: Sequence[str]) -> int:
        """Delete parked or blocked messages for good."""
        wanted = set(integer_ids(ids))
        with self._lock:
            purged = len([self._dead.pop(i) for i in wanted & self._dead.keys()])
            for rows in self._sequences.values():
                keep = [r for r in rows if not (r.id in wanted and r.available_at is None)]
                purged += len(rows) - len(keep)
                rows[:] = keep
        return purged

    def backlog(self) -> list[TopicBacklog]:
        """Pending, oldest pending age and dead letters, per topic."""
        with self._lock:
            now = self.clock()
            stats: dict[str, list[float]] = {}
            for (topic, _), rows in self._sequences.items():
                entry = stats.setdefault(topic, [0, now, 0])
                for row in rows:
                    entry[0] += 1
                    if row.available_at is None or row.available_at <= now:  # not delayed
                        entry[1] = min(entry[1], row.created_at)
                    entry[2] += row.available_at is None
            for row in self._dead.values():
                stats.setdefault(row.topic, [0, now, 0])[2] += 1
        return [
            TopicBacklog(topic, int(p), max(0.0, now - oldest) if p else 0.0, int(d))
            for topic, (p, oldest, d) in sorted(stats.items())
            if p or d
        ]

    # -- ProgressStore -------------------------------------------------------------------------

    def find_message(self, id: str) -> MessageRecord | None:
        """The message of outbox id ``id``: pending, blocked, parked or settled (kept)."""
        [number] = integer_ids([id])
        with self._lock:
            if (settled := self._settled.get(number)) is not None:
                return MessageRecord(
                    settled.row.message(), "settled", None,
                    datetime.fromtimestamp(settled.settled_at, UTC), settled.publish_id,
                )  # fmt: skip
            row, state = self._dead.get(number), "parked"
            if row is None:
                row = next((r for rows in self._sequences.values() for r in rows
                            if r.id == number), None)  # fmt: skip
                state = "blocked" if row is not None and row.available_at is None else "pending"
            if row is None:
                return None
            since = None if row.failed_at is None else datetime.fromtimestamp(row.failed_at, UTC)
            return MessageRecord(row.message(), state, row.last_error, since)  # type: ignore[arg-type]

    def purge_settled(self, topic: str, older_than: timedelta) -> int:
        """Delete the kept settled messages of ``topic`` settled more than ``older_than`` ago."""
        with self._lock:
            cutoff = self.clock() - older_than.total_seconds()
            old = [i for i, s in self._settled.items() if s.row.topic == topic
                   and s.settled_at < cutoff]  # fmt: skip
            for id_ in old:
                del self._settled[id_]
        return len(old)

    def pending_ids(self) -> list[str]:
        """The ids of every message not yet published (test helper)."""
        return [str(i) for i in sorted(self._ids_present())]


def _row_id(found: tuple[_Row, str]) -> int:
    return found[0].id


class InMemoryBatch(BufferedBatch):
    """Messages leased from an :class:`InMemoryStore`; marks are applied on close.

    It can read the next batch ahead (:class:`~outboxbind.store.ReadAheadBatch`).
    """

    def __init__(
        self,
        messages: list[PersistedMessage],
        tokens: dict[SequenceKey, str],
        store: InMemoryStore,
        last_ids: dict[SequenceKey, int],
        continuations: dict[SequenceKey, int],
    ) -> None:
        super().__init__(messages, tokens, store._close_batch)
        self._store = store
        self.last_ids = last_ids
        self.continuations = continuations

    def read_ahead(
        self,
        topic_names: Sequence[str],
        limit: int,
        continuing: Collection[SequenceKey],
        closing: MessageBatch | None = None,
    ) -> InMemoryBatch | None:
        """Check out the next batch while this one publishes; the sequences of
        ``continuing`` are carried on when the free ones cannot fill it, at most
        :data:`MOST_CONTINUATIONS` batches in a row. ``closing``, a batch of the same store,
        is closed first."""
        if self.closed:
            raise RuntimeError("this batch is closed")
        if (
            isinstance(closing, InMemoryBatch)
            and closing._store is self._store
            and not closing.closed
        ):
            closing.close_within(lambda: self._store._close_batch(closing))
        return self._store._checkout(topic_names, limit, self, continuing)
