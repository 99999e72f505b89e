"""The SQLite store: the relay's side of an outbox in an SQLite file."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from outboxbind import wakeup
from outboxbind.errors import ConfigurationError, LeaseLost
from outboxbind.messages import PersistedMessage
from outboxbind.store import (
    BufferedBatch,
    DeadLetter,
    MarkedOutcome,
    SequenceKey,
    TopicBacklog,
    round_robin,
)
from outboxbind.stores.sqlite.persister import wakeup_channel
from outboxbind.stores.sqlite.schema import migrate, queries_for

__all__ = ["SQLiteBatch", "SQLiteStore"]


def _message(topic: str, key: str, row: Sequence[Any]) -> PersistedMessage:
    id_, data, attributes, created_at, attempts = row[:5]
    return PersistedMessage(
        id=str(id_),
        topic=topic,
        data=bytes(data),
        attributes=json.loads(attributes) if attributes else None,
        ordering_key=key or None,
        created_at=datetime.fromtimestamp(created_at, UTC),
        attempts=attempts,
    )


class SQLiteStore:
    """An outbox in an SQLite database file, shared by writers and relays of any process.

    The file is put in WAL mode so writers and relays do not block each other's reads. A batch
    holds its sequences through lease rows that expire after ``lease_duration`` seconds, so a
    relay that dies mid-batch holds nothing for longer than that.

    Args:
        path: the database file (created if missing).
        table: the outbox table name; its companions are ``<table>_dead_letters``,
            ``<table>_leases`` and ``<table>_migrations``.
        lease_duration: seconds a batch holds its sequences; must exceed the relay's publish
            timeout.
        busy_timeout: seconds to wait for another connection's write lock.
        migrate: create or upgrade the schema on open.
        clock: the time source in unix seconds (tests pass a fake one).
        owner: the name recorded on leases (default: host pid and a random suffix).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = "outbox",
        lease_duration: float = 60.0,
        busy_timeout: float = 30.0,
        migrate: bool = True,
        clock: Callable[[], float] = time.time,
        owner: str | None = None,
    ) -> None:
        if lease_duration <= 0:
            raise ConfigurationError(f"lease_duration must be positive, not {lease_duration!r}")
        self.path = os.fspath(path)
        self.table = table
        self.lease_duration = lease_duration
        self.clock = clock
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"
        self._q = queries_for(table)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._cursor: SequenceKey | None = None  # where the last checkout's sequence walk ended
        if migrate:
            self.migrate()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, table={self.table!r})"

    def migrate(self) -> list[int]:
        """Create or upgrade the outbox schema; return the versions applied."""
        with self._lock:
            return migrate(self._conn, self.table)

    def close(self) -> None:
        """Close the store's connection."""
        with self._lock:
            self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # -- the Store protocol ------------------------------------------------------------------

    def checkout_batch(self, topic_names: Sequence[str], limit: int) -> SQLiteBatch | None:
        """Lease up to ``limit`` due messages of ``topic_names``, fairly across sequences.

        Sequences are visited in (topic, ordering key) order starting after where the previous
        checkout stopped, so over successive batches every sequence gets its turn; within a
        batch, the sequences found share ``limit`` round-robin.
        """
        if not topic_names or limit <= 0:
            return None
        topics = sorted(set(topic_names))
        if not self._anything_due(topics):
            return None
        with self._write() as conn:
            now = self.clock()
            taken = self._due_messages(conn, topics, limit, now)
            if not taken:
                return None
            tokens: dict[SequenceKey, str] = {}
            for topic, key in taken:
                token = secrets.token_hex(16)
                conn.execute(
                    self._q["take_lease"],
                    {
                        "topic": topic,
                        "ordering_key": key,
                        "token": token,
                        "owner": self.owner,
                        "expires_at": now + self.lease_duration,
                    },
                )
                tokens[(topic, key)] = token
        return SQLiteBatch(self, round_robin(taken, limit), tokens)

    def _anything_due(self, topics: list[str]) -> bool:
        """Look for due work without the write lock (a WAL read never waits for writers), so an
        idle relay neither queues behind nor delays the application's write transactions."""
        with self._lock:
            cursor = self._cursor
            try:
                return bool(self._due_messages(self._conn, topics, 1, self.clock()))
            finally:
                self._cursor = cursor

    def _due_messages(
        self, conn: sqlite3.Connection, topics: list[str], limit: int, now: float
    ) -> dict[SequenceKey, list[PersistedMessage]]:
        leased = {
            (row[0], row[1])
            for row in conn.execute(
                self._q["live_leases"], {"topics": json.dumps(topics), "now": now}
            )
        }
        taken: dict[SequenceKey, list[PersistedMessage]] = {}
        found = 0
        for sequence in self._walk_sequences(conn, topics):
            if sequence in leased:
                continue
            messages = self._due_prefix(conn, sequence, limit, now)
            if messages:
                taken[sequence] = messages
                found += len(messages)
                if found >= limit:
                    break
        return taken

    def _walk_sequences(self, conn: sqlite3.Connection, topics: list[str]) -> Iterator[SequenceKey]:
        """Every sequence of ``topics`` once, starting after where the last checkout stopped."""
        walk: list[tuple[str, str | None, str | None]] = []  # (topic, after key, up to key)
        if self._cursor is None or self._cursor[0] not in topics:
            walk = [(topic, None, None) for topic in topics]
        else:
            cursor_topic, cursor_key = self._cursor
            walk = [(cursor_topic, cursor_key, None)]
            walk += [(topic, None, None) for topic in topics if topic > cursor_topic]
            walk += [(topic, None, None) for topic in topics if topic < cursor_topic]
            walk += [(cursor_topic, None, cursor_key)]
        for topic, after, upto in walk:
            for key in self._keys(conn, topic, after):
                if upto is not None and key > upto:
                    break
                self._cursor = (topic, key)
                yield (topic, key)

    def _keys(self, conn: sqlite3.Connection, topic: str, after: str | None) -> Iterator[str]:
        """The ordering keys of ``topic`` in order (after ``after``), one index step each."""
        if after is None:
            row = conn.execute(self._q["first_sequence"], {"topic": topic}).fetchone()
        else:
            row = conn.execute(
                self._q["next_sequence"], {"topic": topic, "after": after}
            ).fetchone()
        while row is not None:
            yield row[0]
            row = conn.execute(
                self._q["next_sequence"], {"topic": topic, "after": row[0]}
            ).fetchone()

    def _due_prefix(
        self, conn: sqlite3.Connection, sequence: SequenceKey, limit: int, now: float
    ) -> list[PersistedMessage]:
        """The due messages at the head of a sequence, up to the first one waiting for a retry.

        Delayed messages that are not due yet (never attempted) are stepped over.
        """
        topic, key = sequence
        rows = conn.execute(
            self._q["sequence_head"],
            {"topic": topic, "ordering_key": key, "limit": limit + 64},
        ).fetchall()
        messages = []
        for row in rows:
            available_at, attempts = row[5], row[4]
            if available_at is not None and available_at <= now:
                messages.append(_message(topic, key, row))
                if len(messages) >= limit:
                    break
            elif attempts > 0:
                break  # waiting for a retry, or blocked: the rest of the sequence waits
        return messages

    # -- applied when a batch closes ---------------------------------------------------------

    def _close_batch(self, batch: SQLiteBatch) -> None:
        lost: list[SequenceKey] = []
        with self._write() as conn:
            now = self.clock()
            for sequence, token in batch.tokens.items():
                topic, key = sequence
                ended = conn.execute(
                    self._q["end_lease"], {"topic": topic, "ordering_key": key, "token": token}
                ).rowcount
                if not ended:
                    lost.append(sequence)
                    continue
                self._apply(conn, batch.outcomes.get(sequence, []), now)
        if lost:
            names = ", ".join(f"{t}/{k or '*'}" for t, k in lost)
            raise LeaseLost(
                f"{self!r}: the lease of {names} was taken over; its marks were dropped"
            )

    def _apply(self, conn: sqlite3.Connection, outcomes: list[MarkedOutcome], now: float) -> None:
        published = [int(m.id) for kind, m, _, _ in outcomes if kind == "published"]
        if published:
            conn.execute(self._q["delete_published"], {"ids": json.dumps(published)})
        for kind, message, error, retry_after in outcomes:
            if kind == "failed":
                conn.execute(
                    self._q["record_failure"],
                    {
                        "id": int(message.id),
                        "error": error,
                        "now": now,
                        "available_at": None
                        if retry_after is None
                        else now + retry_after.total_seconds(),
                    },
                )
            elif kind == "dead":
                params = {"id": int(message.id), "error": error, "now": now}
                conn.execute(self._q["park_message"], params)
                conn.execute(self._q["delete_message"], params)

    # -- wake-ups ---------------------------------------------------------------------------

    def subscribe_wakeups(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Wake ``callback`` when a persister in this process writes to this database."""
        return wakeup.subscribe(wakeup_channel(self.path), callback)

    # -- dead letters and backlog (DeadLetterAdmin) -------------------------------------------

    def dead_letters(self, topic: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Parked and blocked messages, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                self._q["list_dead_letters"], {"topic": topic, "limit": limit}
            ).fetchall()
        return [
            DeadLetter(
                message=_message(row[1], row[2], (row[0], *row[3:7])),
                error=row[7] or "",
                state=row[9],
                since=datetime.fromtimestamp(row[8] or 0, UTC),
            )
            for row in rows
        ]

    def replay_dead_letters(self, ids: Sequence[str]) -> int:
        """Make parked or blocked messages due now with zero attempts, keeping their ids."""
        params = {"ids": json.dumps([int(i) for i in ids]), "now": self.clock()}
        with self._write() as conn:
            unparked = conn.execute(self._q["unpark_dead_letters"], params).rowcount
            conn.execute(self._q["delete_dead_letters"], params)
            unblocked = conn.execute(self._q["unblock_messages"], params).rowcount
        return unparked + unblocked

    def purge_dead_letters(self, ids: Sequence[str]) -> int:
        """Delete parked or blocked messages for good."""
        params = {"ids": json.dumps([int(i) for i in ids])}
        with self._write() as conn:
            parked = conn.execute(self._q["delete_dead_letters"], params).rowcount
            blocked = conn.execute(self._q["delete_blocked"], params).rowcount
        return parked + blocked

    def backlog(self) -> list[TopicBacklog]:
        """Pending, oldest pending age and dead letters, per topic."""
        with self._lock:
            rows = self._conn.execute(self._q["backlog"]).fetchall()
        now = self.clock()
        return [
            TopicBacklog(
                topic=topic,
                pending=pending,
                oldest_pending_age=max(0.0, now - oldest) if oldest is not None else 0.0,
                dead=dead,
            )
            for topic, pending, oldest, dead in rows
        ]


class SQLiteBatch(BufferedBatch):
    """Messages leased from an :class:`SQLiteStore`; marks are applied on close."""

    def __init__(
        self, store: SQLiteStore, messages: list[PersistedMessage], tokens: dict[SequenceKey, str]
    ) -> None:
        super().__init__(messages, tokens)
        self._store = store

    def _apply(self) -> None:
        self._store._close_batch(self)
