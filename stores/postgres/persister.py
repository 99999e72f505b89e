"""PostgreSQL persisters: psycopg connections (sync and async) and SQLAlchemy sessions.

Each inserts into the outbox inside the caller's open transaction with one statement, which
also sends ``pg_notify`` so that listening relays wake when (and only if) the transaction
commits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, overload

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from outboxbind._extras import needs_extra
from outboxbind.errors import NotInTransaction
from outboxbind.messages import OutboxEntry
from outboxbind.stores.postgres.schema import queries_for

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session

__all__ = [
    "AsyncPostgresPersister",
    "PostgresPersister",
    "insert_params",
    "notify_channel",
    "persister",
    "sqlalchemy_persister",
]


def notify_channel(schema: str, table: str) -> str:
    """The LISTEN/NOTIFY channel of the outbox ``schema.table``."""
    return f"outboxbind_{schema}_{table}"[:63]


def insert_params(entry: OutboxEntry, channel: str) -> dict[str, Any]:
    """The parameters of the ``insert_message`` statement for ``entry``, notifying ``channel``
    (the persisters', and a relay's close for the follow-ups of its marks)."""
    return {
        "topic": entry.topic,
        "ordering_key": entry.ordering_key or "",
        "data": entry.data,
        "attributes": Jsonb(dict(entry.attributes)) if entry.attributes else None,
        "deliver_after": entry.deliver_after,
        "strict": entry.strict_sequence,
        "channel": channel,
    }


def _refuse_autocommit(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any], topic: str
) -> None:
    if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        raise NotInTransaction(
            f"publish to {topic!r}: the psycopg connection is in autocommit mode outside a "
            "transaction block, so the message would be committed on its own; publish inside "
            "`with conn.transaction():` (or use a connection without autocommit)"
        )


class PostgresPersister:
    """Writes outbox entries through a psycopg ``Connection``, in its current transaction.

    Without autocommit (psycopg's default) the INSERT joins the open transaction, or opens one
    that the caller commits. With autocommit, it must run inside ``conn.transaction()``;
    otherwise :class:`~outboxbind.errors.NotInTransaction` is raised and nothing is written.
    """

    __slots__ = ("_channel", "_insert", "conn")

    def __init__(self, conn: psycopg.Connection[Any], *, schema: str, table: str) -> None:
        self.conn = conn
        self._insert = queries_for(schema, table)["insert_message"]
        self._channel = notify_channel(schema, table)

    def __call__(self, entry: OutboxEntry, /) -> str:
        """Insert ``entry`` and return its outbox id; nothing is committed here."""
        _refuse_autocommit(self.conn, entry.topic)
        row = self.conn.execute(self._insert, insert_params(entry, self._channel)).fetchone()
        assert row is not None
        return str(row[0])


class AsyncPostgresPersister:
    """The asyncio twin of :class:`PostgresPersister`, for a psycopg ``AsyncConnection``."""

    __slots__ = ("_channel", "_insert", "conn")

    def __init__(self, conn: psycopg.AsyncConnection[Any], *, schema: str, table: str) -> None:
        self.conn = conn
        self._insert = queries_for(schema, table)["insert_message"]
        self._channel = notify_channel(schema, table)

    async def __call__(self, entry: OutboxEntry, /) -> str:
        """Insert ``entry`` and return its outbox id; nothing is committed here."""
        _refuse_autocommit(self.conn, entry.topic)
        cursor = await self.conn.execute(self._insert, insert_params(entry, self._channel))
        row = await cursor.fetchone()
        assert row is not None
        return str(row[0])


@overload
def persister(
    conn: psycopg.AsyncConnection[Any], *, schema: str = ..., table: str = ...
) -> AsyncPostgresPersister: ...


@overload
def persister(
    conn: psycopg.Connection[Any], *, schema: str = ..., table: str = ...
) -> PostgresPersister: ...


def persister(
    conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any],
    *,
    schema: str = "public",
    table: str = "outbox",
) -> PostgresPersister | AsyncPostgresPersister:
    """Return a persister writing to the outbox ``schema.table`` through ``conn``.

    ``conn`` is a psycopg ``Connection`` or ``AsyncConnection`` (one from a psycopg_pool pool
    is the same thing). Use it inside the transaction that changes your data::

        with pool.connection() as conn, conn.transaction():
            conn.execute("INSERT INTO orders ...")
            bind(orders, persister(conn)).publish(OrderPlaced(...))

    Raises:
        InvalidIdentifier: ``schema`` or ``table`` is not a plain SQL identifier.
    """
    if isinstance(conn, psycopg.AsyncConnection):
        return AsyncPostgresPersister(conn, schema=schema, table=table)
    if isinstance(conn, psycopg.Connection):
        return PostgresPersister(conn, schema=schema, table=table)
    raise TypeError(
        f"persister() needs a psycopg Connection or AsyncConnection, not {type(conn).__name__}; "
        "for SQLAlchemy use sqlalchemy_persister(session)"
    )


class _SQLAlchemyAsyncPersister:
    """Resolves the psycopg connection under an async SQLAlchemy session on first use."""

    def __init__(self, session: AsyncSession | SAAsyncConnection, schema: str, table: str) -> None:
        self.session = session
        self.schema = schema
        self.table = table
        self._inner: AsyncPostgresPersister | None = None

    async def __call__(self, entry: OutboxEntry, /) -> str:
        if self._inner is None:
            from sqlalchemy.ext.asyncio import AsyncSession

            connection = (
                await self.session.connection()
                if isinstance(self.session, AsyncSession)
                else self.session
            )
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            if not isinstance(driver, psycopg.AsyncConnection):
                raise TypeError(
                    "sqlalchemy_persister() needs the psycopg driver "
                    f"(postgresql+psycopg://), not {type(driver).__name__}"
                )
            self._inner = AsyncPostgresPersister(driver, schema=self.schema, table=self.table)
        return await self._inner(entry)


@overload
def sqlalchemy_persister(
    session: AsyncSession | SAAsyncConnection, *, schema: str = ..., table: str = ...
) -> _SQLAlchemyAsyncPersister: ...


@overload
def sqlalchemy_persister(
    session: Session | SAConnection, *, schema: str = ..., table: str = ...
) -> PostgresPersister: ...


def sqlalchemy_persister(
    session: Session | SAConnection | AsyncSession | SAAsyncConnection,
    *,
    schema: str = "public",
    table: str = "outbox",
) -> PostgresPersister | _SQLAlchemyAsyncPersister:
    """A persister for a SQLAlchemy ``Session`` or ``Connection`` (sync or async) on psycopg.

    The outbox row is written on the same database connection, in the same transaction, as the
    session's own statements. The engine must use the psycopg driver
    (``postgresql+psycopg://``).
    """
    with needs_extra("sqlalchemy", "outboxbind.stores.postgres.sqlalchemy_persister"):
        from sqlalchemy.engine import Connection as SAConnection
        from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
        from sqlalchemy.ext.asyncio import AsyncSession
        from sqlalchemy.orm import Session

    if isinstance(session, AsyncSession | SAAsyncConnection):
        return _SQLAlchemyAsyncPersister(session, schema, table)
    if isinstance(session, Session):
        connection = session.connection()
    elif isinstance(session, SAConnection):
        connection = session
    else:
        raise TypeError(
            f"sqlalchemy_persister() needs a SQLAlchemy Session or Connection, "
            f"not {type(session).__name__}"
        )
    driver = connection.connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise TypeError(
            "sqlalchemy_persister() needs the psycopg driver (postgresql+psycopg://), "
            f"not {type(driver).__name__}"
        )
    return PostgresPersister(driver, schema=schema, table=table)
