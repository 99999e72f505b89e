"""The PostgreSQL store's keep-published mode and its retention."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from psycopg_pool import ConnectionPool

from outboxbind import Relay, bind
from outboxbind.stores.postgres import PostgresStore, persister
from outboxbind.testing import FakeClock

from support import OrderPlaced, order_topic


def test_keep_published_keeps_each_message_with_its_publish_id_until_purged(
    pg_pool: ConnectionPool[Any], pg_schema: str
) -> None:
    clock = FakeClock()
    store = PostgresStore(pg_pool, schema=pg_schema, keep_published=True, clock=clock)
    store.migrate()
    topic = order_topic()
    with pg_pool.connection() as conn, conn.transaction():
        ids = [
            bind(topic, persister(conn, schema=pg_schema)).publish(OrderPlaced(i, "ann"))
            for i in range(3)
        ]
    relay = Relay(store)
    relay.register_topic(topic)
    assert relay.process_messages().successes == 3
    assert store.backlog() == []
    with pg_pool.connection() as conn:
        kept = conn.execute(
            f'SELECT id, publish_id, data FROM "{pg_schema}".outbox_published ORDER BY id'
        ).fetchall()
    assert [str(row[0]) for row in kept] == ids
    assert [row[1] for row in kept] == [p.publish_id for p in topic.published]
    assert [bytes(row[2]) for row in kept] == [p.data for p in topic.published]

    assert store.purge_published(timedelta(hours=1)) == 0  # all younger than an hour
    clock.advance(7200)
    assert store.purge_published(timedelta(hours=1)) == 3


def test_without_keep_published_nothing_is_kept(
    pg_pool: ConnectionPool[Any], pg_schema: str
) -> None:
    store = PostgresStore(pg_pool, schema=pg_schema)
    store.migrate()
    topic = order_topic()
    with pg_pool.connection() as conn, conn.transaction():
        bind(topic, persister(conn, schema=pg_schema)).publish(OrderPlaced(1, "ann"))
    relay = Relay(store)
    relay.register_topic(topic)
    relay.process_messages()
    with pg_pool.connection() as conn:
        count = conn.execute(f'SELECT count(*) FROM "{pg_schema}".outbox_published').fetchone()
    assert count == (0,)
