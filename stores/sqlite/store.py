"""The SQLite store: the relay's side of an outbox in an SQLite file."""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

from outboxbind import wakeup
from outboxbind.errors import ConfigurationError, LeaseLost
from outboxbind.messages import PersistedMessage
from outboxbind.store import (
    BufferedBatch,
    DeadLetter,
    MarkDetails,
    MarkedOutcome,
    MessageRecord,
    SequenceKey,
    TopicBacklog,
    integer_ids,
    round_robin,
)
from outboxbind.stores.sqlite.persister import insert_entry, wakeup_channel
from outboxbind.stores.sqlite.schema import check_version, migrate, newest_version, queries_for
from outboxbind.wakeup import WakeupThread

__all__ = ["SQLiteBatch", "SQLiteStore"]

log = logging.getLogger("outboxbind.stores.sqlite")


def _message(row: Sequence[Any]) -> PersistedMessage:
    """A message from a row that starts (id, topic, ordering_key, data, attributes, created_at,
    attempts, progress)."""
    id_, topic, key, data, attributes, created_at, attempts, progress = row[:8]
    if not isinstance(data, bytes):
        raise TypeError(f"data is {type(data).__name__}, not a BLOB")
    return PersistedMessage(
        id=str(id_),
        topic=topic,
        data=data,
        attributes=json.loads(attributes) if attributes else None,
        ordering_key=key or None,
        created_at=datetime.fromtimestamp(created_at, UTC),
        attempts=attempts,
        progress=progress,
    )


def _readable_message(row: Sequence[Any]) -> PersistedMessage:
    """As :func:`_message`, but shows a row that was parked as unreadable as best it can."""
    try:
        return _message(row)
    except Exception:
        id_, topic, key, data, _attributes, created_at, attempts, progress = row[:8]
        raw = data if isinstance(data, bytes) else str(data).encode("utf-8", "replace")
        when = created_at if isinstance(created_at, int | float) else 0.0
        return PersistedMessage(
            str(id_),
            str(topic),
            raw,
            None,
            key or None,
            datetime.fromtimestamp(when, UTC),
            attempts,
            progress if isinstance(progress, str) else None,
        )


def _connect(path: str, busy_timeout: float, *, create: bool) -> sqlite3.Connection:
    """Open the store's connection, with clear errors for a file that cannot be one."""
    if create:
        target, uri = path, False
    else:  # mode=rw: open an existing file, never create one
        target, uri = f"file:{urllib.parse.quote(path)}?mode=rw", True
    try:
        conn = sqlite3.connect(
            target, timeout=busy_timeout, isolation_level=None, check_same_thread=False, uri=uri
        )
        conn.execute("PRAGMA schema_version").fetchone()  # reads the header: is it a database?
    except sqlite3.DatabaseError as exc:
        if not os.path.exists(path):
            folder = os.path.dirname(os.path.abspath(path))
            if create:
                raise ConfigurationError(
                    f"cannot create the SQLite database {path!r}: the folder {folder!r} "
                    + ("does not exist" if not os.path.isdir(folder) else f"refused it ({exc})")
                ) from exc
            missing = "" if os.path.isdir(folder) else f" (the folder {folder!r} does not exist)"
            raise ConfigurationError(f"no database at {path!r}{missing}") from exc
        raise _not_a_database(path, exc) from exc
    return conn


def _not_a_database(path: str, error: sqlite3.DatabaseError) -> ConfigurationError:
    if os.path.isdir(path):
        return ConfigurationError(f"{path!r} is a folder, not an SQLite database file")
    return ConfigurationError(f"cannot use {path!r} as an SQLite database: {error}")


class SQLiteStore:
    """An outbox in an SQLite database file, shared by writers and relays of any process.

    The file is put in WAL mode so writers and relays do not block each other's reads. A batch
    holds its sequences through lease rows that expire after ``lease_duration`` seconds, so a
    relay that dies mid-batch holds nothing for longer than that.

    Args:
        path: the database file (created if missing, unless ``create`` is false).
        table: the outbox table name; its companions are ``<table>_dead_letters``,
            ``<table>_leases``, ``<table>_settled`` (published messages kept, see
            :class:`~outboxbind.store.MarkDetails`) and ``<table>_migrations``.
        lease_duration: seconds a batch holds its sequences; must exceed the relay's publish
            timeout.
        busy_timeout: seconds to wait for another connection's write lock.
        migrate: create or upgrade the schema on open.
        create: create the database file when it is missing. When false, the file must exist
            and hold an outbox (for commands that only inspect or repair one): nothing is
            created, and a missing file or an outbox never migrated is a
            :class:`~outboxbind.errors.ConfigurationError`.
        clock: the time source in unix seconds (tests pass a fake one).
        owner: the name recorded on leases (default: host pid and a random suffix).

    Raises:
        ConfigurationError: the file cannot be opened, is not an SQLite database, or (with
            ``create=False``) is missing or holds no outbox.
        SchemaTooNew: the outbox was migrated by a newer outboxbind.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        table: str = "outbox",
        lease_duration: float = 60.0,
        busy_timeout: float = 30.0,
        migrate: bool = True,
        create: bool = True,
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
        self._conn = _connect(self.path, busy_timeout, create=create)
        self._cursor: SequenceKey | None = None  # where the last checkout's sequence walk ended
        self._watcher: _CommitWatcher | None = None
        self._schema_current = False  # the outbox is at the newest version this code knows
        try:
            if not create and self.schema_version() is None:
                raise self._no_outbox()
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            if migrate:
                self.migrate()
        except BaseException:
            self._conn.close()
            raise

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r}, table={self.table!r})"

    def migrate(self) -> list[int]:
        """Create or upgrade the outbox schema; return the versions applied.

        Raises:
            SchemaTooNew: a newer outboxbind migrated the outbox; nothing is changed.
        """
        with self._lock:
            applied = migrate(self._conn, self.table)
            self._schema_current = True
            return applied

    def schema_version(self) -> int | None:
        """The outbox schema version recorded in the database (``None``: never migrated).

        Raises:
            SchemaTooNew: a newer outboxbind migrated the outbox.
        """
        with self._lock:
            try:
                version = check_version(self._conn, self.table)
            except sqlite3.DatabaseError as exc:
                raise _not_a_database(self.path, exc) from exc
            self._schema_current = version == newest_version()
            return version

    def _require_current_schema(self) -> None:
        """Refuse an outbox this store did not migrate and that is older than this code reads,
        naming the fix; once it is current, this costs nothing.

        Raises:
            ConfigurationError: no outbox, or one of an older schema version.
            SchemaTooNew: a newer outboxbind migrated the outbox.
        """
        if self._schema_current:
            return
        version = self.schema_version()
        if version is None:
            raise self._no_outbox()
        if version != newest_version():
            raise ConfigurationError(
                f"the outbox (table {self.table!r}) in the SQLite database {self.path!r} is at "
                f"schema version {version}, older than this outboxbind reads (version "
                f"{newest_version()}): upgrade it with `outboxbind migrate sqlite:///PATH` or "
                "SQLiteStore(path)"
            )

    def close(self) -> None:
        """Close the store's connection."""
        with self._lock:
            self._conn.close()

    def _no_outbox(self) -> ConfigurationError:
        return ConfigurationError(
            f"no outbox (table {self.table!r}) in the SQLite database {self.path!r}: create "
            "it with `outboxbind migrate sqlite:///PATH` or SQLiteStore(path)"
        )

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
        batch, up to ``limit`` due sequences share ``limit`` evenly.
        """
        if not topic_names or limit <= 0:
            return None
        self._require_current_schema()  # a relay refuses to start on a schema it does not know
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
        return SQLiteBatch(round_robin(taken, limit), tokens, self._close_batch)

    def _anything_due(self, topics: list[str]) -> bool:
        """Look for due work without the write lock (a WAL read never waits for writers), so an
        idle relay neither queues behind nor delays the application's write transactions."""
        with self._lock:
            cursor = self._cursor
            try:
                return bool(self._due_sequences(self._conn, topics, 1, self.clock()))
            finally:
                self._cursor = cursor

    def _due_sequences(
        self, conn: sqlite3.Connection, topics: list[str], limit: int, now: float
    ) -> list[SequenceKey]:
        """Up to ``limit`` unleased sequences with a due message, from where the last stopped."""
        leased = {
            (row[0], row[1])
            for row in conn.execute(
                self._q["live_leases"], {"topics": json.dumps(topics), "now": now}
            )
        }
        due: list[SequenceKey] = []
        for sequence in self._walk_sequences(conn, topics):
            if sequence not in leased and self._due_ids(conn, sequence, 1, now):
                due.append(sequence)
                if len(due) >= limit:
                    break
        return due

    def _due_ids(
        self, conn: sqlite3.Connection, sequence: SequenceKey, limit: int, now: float
    ) -> list[int]:
        topic, key = sequence
        params = {"topic": topic, "ordering_key": key, "limit": limit, "now": now}
        return [row[0] for row in conn.execute(self._q["due_ids"], params)]

    def _due_messages(
        self, conn: sqlite3.Connection, topics: list[str], limit: int, now: float
    ) -> dict[SequenceKey, list[PersistedMessage]]:
        """Each due sequence's share of the batch: ``limit`` split evenly across them."""
        sequences = self._due_sequences(conn, topics, limit, now)
        if not sequences:
            return {}
        share = -(-limit // len(sequences))
        ids = {s: self._due_ids(conn, s, share, now) for s in sequences}
        chosen = round_robin(ids, limit)
        rows = conn.execute(self._q["messages_by_id"], {"ids": json.dumps(chosen)}).fetchall()
        by_id: dict[int, PersistedMessage] = {}
        for row in rows:
            try:
                by_id[row[0]] = _message(row)
            except Exception as exc:  # a row written by hand, or by a buggy tool
                self._park_unreadable(conn, row[0], exc, now)
        taken: dict[SequenceKey, list[PersistedMessage]] = {}
        for sequence, sequence_ids in ids.items():
            for id_ in sequence_ids:
                if id_ not in by_id:
                    break  # not chosen this time (or parked): the rest of the sequence waits
                taken.setdefault(sequence, []).append(by_id[id_])
        return taken

    def _park_unreadable(
        self, conn: sqlite3.Connection, id_: int, error: Exception, now: float
    ) -> None:
        reason = f"unreadable outbox row {id_} in {self.table!r}: {type(error).__name__}: {error}"
        log.error("%s; moved to the dead letters", reason)
        params = {"id": id_, "error": reason, "now": now}
        conn.execute(self._q["park_unreadable"], params)
        conn.execute(self._q["delete_message"], params)

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

    # -- applied when a batch closes ---------------------------------------------------------

    def _close_batch(self, batch: BufferedBatch) -> None:
        """Apply the batch's marks and their details in one transaction, sequence by sequence,
        only where the batch still holds the lease (the fencing rule)."""
        lost: list[SequenceKey] = []
        wrote_follow_ups = False
        with self._write() as conn:
            now = self.clock()
            for sequence, token in batch.tokens.items():
                topic, key = sequence
                ended = conn.execute(
                    self._q["end_lease"], {"topic": topic, "ordering_key": key, "token": token}
                ).rowcount
                if not ended:
                    lost.append(sequence)  # its marks, details and follow-ups are dropped
                    continue
                outcomes = batch.outcomes.get(sequence, [])
                if self._apply(conn, outcomes, batch.details, now):
                    wrote_follow_ups = True
        if wrote_follow_ups:  # committed: wake the relays of this process that wait for them
            wakeup.signal(wakeup_channel(self.path))
        if lost:
            names = ", ".join(f"{t}/{k or '*'}" for t, k in lost)
            raise LeaseLost(
                f"{self!r}: the lease of {names} was taken over; its marks were dropped"
            )

    def _apply(
        self,
        conn: sqlite3.Connection,
        outcomes: list[MarkedOutcome],
        details: Mapping[str, MarkDetails],
        now: float,
    ) -> bool:
        """Apply one sequence's marks, each with its details if it has any: its follow-ups are
        written first, then the mark, with the progress when it is not ``None``. Return whether
        any follow-up was written."""
        published: list[int] = []
        wrote_follow_ups = False
        for kind, message, detail, retry_after in outcomes:
            extra = details.get(message.id) if details else None
            progress = None
            if extra is not None:
                progress = extra.progress
                for entry in extra.follow_ups:  # new ids, in order, as a persister writes them
                    insert_entry(conn, self._q["insert_message"], entry, now)
                    wrote_follow_ups = True
            if kind == "published":  # deleted below, all at once; kept as settled if asked
                if extra is not None and extra.keep:
                    conn.execute(
                        self._q["settle_message"],
                        {
                            "id": int(message.id),
                            "progress": progress,
                            "publish_id": detail or "",
                            "now": now,
                        },
                    )
                published.append(int(message.id))
            elif kind == "failed":  # counted; due again after retry_after (None: blocked)
                conn.execute(
                    self._q["record_failure"],
                    {
                        "id": int(message.id),
                        "error": detail,
                        "now": now,
                        "available_at": None
                        if retry_after is None
                        else now + retry_after.total_seconds(),
                        "progress": progress,
                    },
                )
            else:  # dead: moved to the dead letters
                params = {"id": int(message.id), "error": detail, "now": now, "progress": progress}
                conn.execute(self._q["park_message"], params)
                conn.execute(self._q["delete_message"], params)
        if published:
            conn.execute(self._q["delete_published"], {"ids": json.dumps(published)})
        return wrote_follow_ups

    # -- wake-ups ---------------------------------------------------------------------------

    def subscribe_wakeups(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Wake ``callback`` when a transaction of a persister in this process commits.

        A persister signals at its INSERT, before the commit; a watcher thread then reads the
        database's ``PRAGMA data_version`` every millisecond or so until the commit lands (or
        10 s pass), and only then wakes the relay.
        """
        with self._lock:
            if self._watcher is None:
                self._watcher = _CommitWatcher(self.path)
        return self._watcher.subscribe(callback)

    # -- dead letters and backlog (DeadLetterAdmin) -------------------------------------------

    def dead_letters(self, topic: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Parked and blocked messages, oldest first."""
        self._require_current_schema()
        with self._lock:
            rows = self._conn.execute(
                self._q["list_dead_letters"], {"topic": topic, "limit": limit}
            ).fetchall()
        return [
            DeadLetter(
                message=_readable_message(row),
                error=row[8] or "",
                state=row[10],
                since=datetime.fromtimestamp(row[9] or 0, UTC),
            )
            for row in rows
        ]

    def replay_dead_letters(self, ids: Sequence[str]) -> int:
        """Make parked or blocked messages due now with zero attempts, keeping their ids."""
        self._require_current_schema()
        params = {"ids": json.dumps(integer_ids(ids)), "now": self.clock()}
        with self._write() as conn:
            unparked = conn.execute(self._q["unpark_dead_letters"], params).rowcount
            conn.execute(self._q["delete_dead_letters"], params)
            unblocked = conn.execute(self._q["unblock_messages"], params).rowcount
        return unparked + unblocked

    def purge_dead_letters(self, ids: Sequence[str]) -> int:
        """Delete parked or blocked messages for good."""
        params = {"ids": json.dumps(integer_ids(ids))}
        with self._write() as conn:
            parked = conn.execute(self._q["delete_dead_letters"], params).rowcount
            blocked = conn.execute(self._q["delete_blocked"], params).rowcount
        return parked + blocked

    def backlog(self) -> list[TopicBacklog]:
        """Pending, oldest pending age and dead letters, per topic."""
        with self._lock:
            now = self.clock()
            rows = self._conn.execute(self._q["backlog"], {"now": now}).fetchall()
        return [
            TopicBacklog(
                topic=topic,
                pending=pending,
                oldest_pending_age=max(0.0, now - oldest) if oldest is not None else 0.0,
                dead=dead,
            )
            for topic, pending, oldest, dead in rows
        ]

    # -- progress and settled messages (ProgressStore) ----------------------------------------

    def find_message(self, id: str) -> MessageRecord | None:
        """The message of outbox id ``id``: pending, blocked, parked or settled (kept)."""
        [number] = integer_ids([id])
        self._require_current_schema()
        with self._lock:
            row = self._conn.execute(self._q["find_message"], {"id": number}).fetchone()
        if row is None:
            return None
        state, error, since, publish_id = row[8:12]
        return MessageRecord(
            message=_readable_message(row),
            state=state,
            error=error,
            since=None if since is None else datetime.fromtimestamp(since, UTC),
            publish_id=publish_id,
        )

    def purge_settled(self, topic: str, older_than: timedelta) -> int:
        """Delete the kept settled messages of ``topic`` settled more than ``older_than`` ago;
        return how many."""
        self._require_current_schema()
        with self._write() as conn:
            cutoff = self.clock() - older_than.total_seconds()
            purged: int = conn.execute(
                self._q["purge_settled"], {"topic": topic, "cutoff": cutoff}
            ).rowcount
        return purged


class _CommitWatcher(WakeupThread):
    """Turns a writer's signal (sent at its INSERT) into a wake-up at its COMMIT."""

    WATCH_FOR = 10.0  # seconds to wait for a signalled transaction to commit

    def __init__(self, path: str) -> None:
        super().__init__("outboxbind-sqlite-commits")
        self.path = path
        self.signalled = threading.Event()
        self.unsubscribe_signals: Callable[[], None] | None = None

    def started(self) -> None:
        self.unsubscribe_signals = wakeup.subscribe(wakeup_channel(self.path), self.signalled.set)

    def stopped(self) -> None:
        if self.unsubscribe_signals is not None:
            self.unsubscribe_signals()
        self.signalled.set()  # let the thread see that it is stopping

    def listen(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False)
        try:
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            while not self.stopping.is_set():
                self.signalled.wait()
                self.signalled.clear()
                current = conn.execute("PRAGMA data_version").fetchone()[0]
                if current != version:  # a commit since we last looked: perhaps the signaller's
                    version = current
                    self.wake()
                deadline = time.monotonic() + self.WATCH_FOR
                pause = 0.0005
                while not self.stopping.is_set() and time.monotonic() < deadline:
                    current = conn.execute("PRAGMA data_version").fetchone()[0]
                    if current != version:  # another connection committed
                        version = current
                        self.wake()
                        break
                    time.sleep(pause)
                    pause = min(pause * 1.5, 0.005)
        except sqlite3.Error as exc:
            log.warning("the SQLite commit watcher stopped (polling goes on): %s", exc)
        finally:
            conn.close()


class SQLiteBatch(BufferedBatch):
    """Messages leased from an :class:`SQLiteStore`; marks are applied on close."""
