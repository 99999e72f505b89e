"""The SQLite persister: ``bind(topic, persister(conn))`` inserts into the caller's transaction."""

from __future__ import annotations

import json
import os
import sqlite3
import time

from outboxbind import wakeup
from outboxbind.errors import NotInTransaction
from outboxbind.messages import OutboxEntry
from outboxbind.stores.sqlite.schema import queries_for

__all__ = ["SQLitePersister", "insert_entry", "persister", "wakeup_channel"]


def wakeup_channel(database_file: str) -> str:
    """The in-process wake-up channel of an SQLite database file."""
    return "sqlite:" + os.path.realpath(database_file)


class SQLitePersister:
    """Writes outbox entries with a stdlib ``sqlite3.Connection``, inside its transaction.

    Made by :func:`persister`. With the default ``isolation_level`` the ``sqlite3`` module
    opens a transaction before the INSERT if none is open, and nothing is committed until the
    caller commits (or leaves ``with conn:``). A connection in autocommit mode
    (``isolation_level=None``) must have begun a transaction explicitly, else the insert would
    commit alone: that raises :class:`~outboxbind.errors.NotInTransaction`.
    """

    __slots__ = ("_channel", "_insert", "conn", "table")

    def __init__(self, conn: sqlite3.Connection, table: str = "outbox") -> None:
        if not isinstance(conn, sqlite3.Connection):
            raise TypeError(f"persister() needs a sqlite3.Connection, not {type(conn).__name__}")
        self.conn = conn
        self.table = table
        self._insert = queries_for(table)["insert_message"]
        self._channel: str | None = None

    def __call__(self, entry: OutboxEntry, /) -> str:
        """Insert ``entry``; return its outbox id. Nothing is committed here."""
        conn = self.conn
        if not conn.in_transaction and _autocommits(conn):
            raise NotInTransaction(
                f"publish to {entry.topic!r}: the sqlite3 connection is in autocommit mode and "
                "no transaction is open, so the message would be committed on its own; "
                'run conn.execute("BEGIN") first (or use the default isolation_level)'
            )
        id_ = insert_entry(conn, self._insert, entry, time.time())
        self._signal()
        return str(id_)

    def _signal(self) -> None:
        if self._channel is None:
            row = self.conn.execute("PRAGMA database_list").fetchone()
            self._channel = wakeup_channel(row[2]) if row and row[2] else ""
        if self._channel:
            wakeup.signal(self._channel)


def insert_entry(conn: sqlite3.Connection, insert: str, entry: OutboxEntry, now: float) -> int:
    """Insert ``entry`` with ``insert`` (the ``insert_message`` statement of its outbox table) as
    written at ``now`` (unix seconds), in the transaction open on ``conn``; return its id.

    The one way a row of the outbox is written: by the persister, and by the store for the
    follow-ups a batch's close writes.
    """
    deliver_after = entry.deliver_after.timestamp() if entry.deliver_after else None
    cursor = conn.execute(
        insert,
        {
            "topic": entry.topic,
            "ordering_key": entry.ordering_key or "",
            "data": entry.data,
            "attributes": json.dumps(dict(entry.attributes)) if entry.attributes else None,
            "created_at": now,
            "available_at": max(now, deliver_after) if deliver_after else now,
        },
    )
    assert cursor.lastrowid is not None
    return cursor.lastrowid


def _autocommits(conn: sqlite3.Connection) -> bool:
    autocommit = getattr(conn, "autocommit", None)  # Python 3.12+
    if autocommit is True:
        return True
    return conn.isolation_level is None and autocommit is not False


def persister(conn: sqlite3.Connection, *, table: str = "outbox") -> SQLitePersister:
    """Return a persister writing to the outbox table ``table`` through ``conn``.

    Use it inside the transaction that changes your data::

        with conn:  # commits on success, rolls back on error
            conn.execute("INSERT INTO orders ...")
            bind(orders, persister(conn)).publish(OrderPlaced(...))

    Raises:
        InvalidIdentifier: ``table`` is not a plain SQL identifier.
    """
    return SQLitePersister(conn, table)
