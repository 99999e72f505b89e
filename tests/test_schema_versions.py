"""An outbox migrated by a newer outboxbind is refused, on every store, with both versions named.

Each test records a schema version one above the newest this code ships (read from the
migrations folder, not from the code under test), then checks that ``migrate()``, the store's
construction where it migrates, the relay's first round and its poll loop all raise
:class:`SchemaTooNew` instead of reporting "up to date" or relaying.

The other way round, on SQLite: an outbox older than this code reads, opened without migrating
(as the command line's inspections do), is refused with the fix named, until it is migrated.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest

from outboxbind import AsyncRelay, ConfigurationError, JsonCodec, Relay, SchemaTooNew
from outboxbind.cli import main
from outboxbind.stores.sqlite import SQLiteStore
from outboxbind.topics.memory import InMemoryTopic


def newest_shipped(store: str) -> int:
    """The highest migration number in ``outboxbind.stores.<store>.migrations``."""
    folder = files(f"outboxbind.stores.{store}.migrations")
    return max(
        int(match.group(1))
        for entry in folder.iterdir()
        if (match := re.fullmatch(r"(\d{4})_\w+\.sql", entry.name))
    )


def too_new(found: int, newest: int) -> str:
    return (
        rf"the outbox schema is at version {found}, newer than this outboxbind knows "
        rf"\(up to version {newest}\).*upgrade outboxbind"
    )


def a_relay(store: Any) -> Relay:
    relay = Relay(store, publish_timeout=1.0, poll_interval=0.01)
    relay.register_topic(InMemoryTopic("orders", JsonCodec()))
    return relay


def assert_relay_refuses(store: Any, match: str) -> None:
    with pytest.raises(SchemaTooNew, match=match):
        a_relay(store).process_messages()
    relay = a_relay(store)
    started = time.monotonic()
    with pytest.raises(SchemaTooNew, match=match):
        relay.poll_for_messages()  # raises at once, rather than retrying a store error forever
    assert time.monotonic() - started < 5
    assert not relay.is_polling


# -- SQLite ---------------------------------------------------------------------------------------


@pytest.fixture
def newer_sqlite(tmp_path: Path) -> tuple[Path, int, int]:
    db = tmp_path / "app.db"
    SQLiteStore(db).close()
    newest = newest_shipped("sqlite")
    with sqlite3.connect(db) as conn:
        conn.execute(
            "INSERT INTO outbox_migrations (version, name, applied_at) VALUES (?, 'future', 0)",
            (newest + 1,),
        )
    conn.close()
    return db, newest + 1, newest


def test_sqlite_refuses_a_schema_newer_than_it_knows(
    newer_sqlite: tuple[Path, int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    db, found, newest = newer_sqlite
    match = too_new(found, newest)
    with pytest.raises(SchemaTooNew, match=match) as caught:
        SQLiteStore(db)  # migrates on open
    assert (caught.value.found, caught.value.newest) == (found, newest)
    assert str(db) in str(caught.value)

    store = SQLiteStore(db, migrate=False)
    try:
        with pytest.raises(SchemaTooNew, match=match):
            store.migrate()
        with pytest.raises(SchemaTooNew, match=match):
            store.schema_version()
    finally:
        store.close()
    for _ in range(2):
        store = SQLiteStore(db, migrate=False)
        try:
            assert_relay_refuses(store, match)
        finally:
            store.close()

    assert main(["migrate", f"sqlite:///{db}"]) == 2
    assert main(["status", f"sqlite:///{db}"]) == 2
    out, err = capsys.readouterr()
    assert "up to date" not in out
    assert len(err.splitlines()) == 2
    assert all(re.search(match, line) for line in err.splitlines())
    with sqlite3.connect(db) as conn:  # nothing was changed
        assert conn.execute("SELECT MAX(version) FROM outbox_migrations").fetchone() == (found,)
    conn.close()


@pytest.fixture
def version_1_sqlite(tmp_path: Path) -> Path:
    """An outbox as outboxbind's first schema version made it (migration 0001, applied by hand),
    with a pending message and a parked one."""
    db = tmp_path / "app.db"
    script = (files("outboxbind.stores.sqlite.migrations") / "0001_create_outbox.sql").read_text()
    tables = {
        "outbox": '"outbox"',
        "outbox_sequence_index": '"outbox_sequence_index"',
        "outbox_waiting_index": '"outbox_waiting_index"',
        "dead_letters": '"outbox_dead_letters"',
        "leases": '"outbox_leases"',
    }
    conn = sqlite3.connect(db)
    with conn:
        conn.executescript(script.format_map(tables))
        conn.executescript(
            """
            CREATE TABLE outbox_migrations
                (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL);
            INSERT INTO outbox_migrations VALUES (1, 'create_outbox', 0);
            INSERT INTO outbox (id, topic, data, created_at, available_at)
                VALUES (1, 'orders', x'7b7d', 0, 0);
            INSERT INTO outbox_dead_letters
                VALUES (2, 'orders', '', x'7b7d', NULL, 0, 3, 'boom', 1);
            """
        )
    conn.close()
    return db


def test_sqlite_asks_to_migrate_an_outbox_older_than_it_reads(
    version_1_sqlite: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db, newest = version_1_sqlite, newest_shipped("sqlite")
    match = rf"at schema version 1, older than this outboxbind reads \(version {newest}\): upgrade"
    store = SQLiteStore(db, migrate=False, create=False)
    try:
        assert store.schema_version() == 1
        with pytest.raises(ConfigurationError, match=match):
            store.checkout_batch(["orders"], 10)
        with pytest.raises(ConfigurationError, match=match):
            store.dead_letters()
        with pytest.raises(ConfigurationError, match=match):
            store.find_message("1")
        assert [(b.topic, b.pending, b.dead) for b in store.backlog()] == [("orders", 1, 1)]
    finally:
        store.close()

    url = f"sqlite:///{db}"
    assert main(["dead-letters", "list", url]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert main(["migrate", url]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"applied migrations: {list(range(2, newest + 1))}"
    ]
    store = SQLiteStore(db, migrate=False, create=False)
    try:
        [parked] = store.dead_letters()
        assert (parked.message.id, parked.message.progress, parked.error) == ("2", None, "boom")
        batch = store.checkout_batch(["orders"], 10)
        assert batch is not None
        with batch:
            assert [(m.id, m.progress) for m in batch.messages] == [("1", None)]
    finally:
        store.close()


# -- PostgreSQL -----------------------------------------------------------------------------------


def test_postgres_refuses_a_schema_newer_than_it_knows(pg_dsn: str, pg_schema: str) -> None:
    import psycopg
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

    from outboxbind.stores.postgres import AsyncPostgresStore, PostgresStore

    newest = newest_shipped("postgres")
    match = too_new(newest + 1, newest)
    with ConnectionPool(pg_dsn, min_size=1, max_size=4, open=True) as pool:
        assert PostgresStore(pool, schema=pg_schema).migrate()[-1] == newest
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(
                f'INSERT INTO "{pg_schema}".outbox_migrations (version, name) VALUES (%s, %s)',
                (newest + 1, "future"),
            )
        store = PostgresStore(pool, schema=pg_schema)
        with pytest.raises(SchemaTooNew, match=match) as caught:
            store.migrate()
        assert f"{pg_schema}.outbox" in str(caught.value)
        assert_relay_refuses(PostgresStore(pool, schema=pg_schema), match)

    async def asyncio_face() -> None:
        async with AsyncConnectionPool(pg_dsn, min_size=1, max_size=2, open=False) as pool:
            with pytest.raises(SchemaTooNew, match=match):
                await AsyncPostgresStore(pool, schema=pg_schema).migrate()
            relay = AsyncRelay(AsyncPostgresStore(pool, schema=pg_schema), publish_timeout=1.0)
            relay.register_topic(InMemoryTopic("orders", JsonCodec()))
            with pytest.raises(SchemaTooNew, match=match):
                await relay.process_messages()
            with pytest.raises(SchemaTooNew, match=match):
                await asyncio.wait_for(relay.poll_for_messages(), 5)

    asyncio.run(asyncio_face())


# -- Redis ----------------------------------------------------------------------------------------


def test_redis_refuses_a_layout_newer_than_it_knows(redis_url: str, redis_prefix: str) -> None:
    import redis
    import redis.asyncio

    from outboxbind.stores.redis import AsyncRedisStore, RedisStore
    from outboxbind.stores.redis._scripts import SCHEMA_VERSION

    client = redis.Redis.from_url(redis_url)
    try:
        store = RedisStore(client, prefix=redis_prefix)
        assert store.schema_version() is None
        assert store.migrate() == [SCHEMA_VERSION]
        assert store.migrate() == []
        assert store.schema_version() == SCHEMA_VERSION
        client.set(f"{redis_prefix}:schema", SCHEMA_VERSION + 1)
        match = too_new(SCHEMA_VERSION + 1, SCHEMA_VERSION)
        with pytest.raises(SchemaTooNew, match=match) as caught:
            RedisStore(client, prefix=redis_prefix).migrate()
        assert redis_prefix in str(caught.value)
        assert client.get(f"{redis_prefix}:schema") == str(SCHEMA_VERSION + 1).encode()
        assert_relay_refuses(RedisStore(client, prefix=redis_prefix), match)
    finally:
        client.close()

    async def asyncio_face() -> None:
        aclient = redis.asyncio.Redis.from_url(redis_url)
        try:
            with pytest.raises(SchemaTooNew, match=match):
                await AsyncRedisStore(aclient, prefix=redis_prefix).migrate()
            relay = AsyncRelay(AsyncRedisStore(aclient, prefix=redis_prefix), publish_timeout=1.0)
            relay.register_topic(InMemoryTopic("orders", JsonCodec()))
            with pytest.raises(SchemaTooNew, match=match):
                await relay.process_messages()
        finally:
            await aclient.aclose()

    asyncio.run(asyncio_face())
