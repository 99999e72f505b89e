"""Two persisters of your own: a wrapper around the shipped one, and one for another driver."""

from __future__ import annotations

import json
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, Protocol

import attrs

from outboxbind import BytesCodec, NotInTransaction, OutboxEntry, Persister, Relay, bind
from outboxbind.sql import check_identifier, quote_identifier
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.topics.memory import InMemoryTopic

# -- 1. A wrapper: add attributes to every message, whatever the driver ------------------------


class WithAttributes:
    """Adds fixed attributes (a tenant, a region) to every message ``inner`` writes."""

    def __init__(self, inner: Persister, **extra: str) -> None:
        self.inner = inner
        self.extra = extra

    def __call__(self, entry: OutboxEntry, /) -> str:
        return self.inner(attrs.evolve(entry, attributes={**self.extra, **entry.attributes}))


# -- 2. A persister for another DB-API driver of SQLite (pysqlite3, sqlcipher3, ...) ----------


class Cursor(Protocol):
    @property
    def lastrowid(self) -> int | None: ...

    def execute(self, sql: str, parameters: Sequence[Any], /) -> Any: ...


class Connection(Protocol):
    @property
    def in_transaction(self) -> bool: ...

    @property
    def isolation_level(self) -> str | None: ...

    def cursor(self) -> Cursor: ...


class DBAPIPersister:
    """Writes into the SQLite store's outbox table through a DB-API connection (qmark style).

    The row is the one :class:`SQLiteStore` reads: see the store's migrations for the columns.
    """

    def __init__(self, conn: Connection, table: str = "outbox") -> None:
        self.conn = conn
        self.sql = (
            f"INSERT INTO {quote_identifier(check_identifier(table))}"
            " (topic, ordering_key, data, attributes, created_at, available_at)"
            " VALUES (?, ?, ?, ?, ?, ?)"
        )

    def __call__(self, entry: OutboxEntry, /) -> str:
        if self.conn.isolation_level is None and not self.conn.in_transaction:
            raise NotInTransaction(
                f"publish to {entry.topic!r}: the connection autocommits and no transaction "
                "is open; BEGIN one first"
            )
        now = time.time()
        due = max(now, entry.deliver_after.timestamp()) if entry.deliver_after else now
        cursor = self.conn.cursor()
        cursor.execute(
            self.sql,
            (
                entry.topic,
                entry.ordering_key or "",  # '' is the sequence of messages without a key
                entry.data,  # the codec's bytes, untouched
                json.dumps(dict(entry.attributes)) if entry.attributes else None,
                now,
                due,
            ),
        )
        assert cursor.lastrowid is not None
        return str(cursor.lastrowid)  # never commit: the caller's transaction decides


def main() -> None:
    invoices = InMemoryTopic("invoices", BytesCodec())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "billing.db"
        store = SQLiteStore(path, table="billing_outbox")  # a table name of your choice
        with closing(store), closing(sqlite3.connect(path)) as conn:
            with conn:
                shipped = WithAttributes(persister(conn, table="billing_outbox"), tenant="acme")
                first = bind(invoices, shipped).publish(b"invoice 1")
                second = bind(invoices, DBAPIPersister(conn, "billing_outbox")).publish(
                    b"invoice 2", attributes={"currency": "EUR"}
                )

            conn.isolation_level = None  # autocommit, and no BEGIN: refused, nothing written
            try:
                bind(invoices, DBAPIPersister(conn, "billing_outbox")).publish(b"lost")
            except NotInTransaction:
                pass
            else:
                raise AssertionError("a message was written outside a transaction")

            relay = Relay(store)
            relay.register_topic(invoices)
            relay.process_messages()
            assert invoices.outbox_ids() == [first, second]
            assert invoices.published[0].attributes["tenant"] == "acme"
            assert invoices.published[1].attributes["currency"] == "EUR"
            print([(p.data, dict(p.attributes)) for p in invoices.published])


if __name__ == "__main__":
    main()
