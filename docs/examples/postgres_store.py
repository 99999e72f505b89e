"""The PostgreSQL store's settings: schema and table names, migrations, keep-published mode.

Needs a PostgreSQL server: ``OUTBOXBIND_PG_DSN``, by default
``host=127.0.0.1 port=5432 user=postgres dbname=test``. It works in a schema of its own and
drops it at the end.
"""

from __future__ import annotations

import os
import uuid
from datetime import timedelta
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from outboxbind import BytesCodec, InvalidIdentifier, NotInTransaction, Relay, bind
from outboxbind.stores.postgres import PostgresStore, persister
from outboxbind.topics.memory import InMemoryTopic

DSN = os.environ.get("OUTBOXBIND_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
SCHEMA = f"billing_{uuid.uuid4().hex[:8]}"

invoices = InMemoryTopic("invoices", BytesCodec())


def run(pool: ConnectionPool[psycopg.Connection[Any]]) -> None:
    try:
        PostgresStore(pool, schema="billing; DROP TABLE users")
    except InvalidIdentifier as exc:  # names must be plain identifiers; they are always quoted
        print(f"refused: {exc}")
    else:
        raise AssertionError("a hostile schema name was accepted")

    store = PostgresStore(
        pool,
        schema=SCHEMA,  # created by migrate() if missing
        table="billing_outbox",  # and billing_outbox_dead_letters, _leases, _published, ...
        lease_duration=60.0,  # the relay's publish_timeout must be at most half of it
        keep_published=True,  # keep what was published, with its publish id
    )
    assert store.migrate() == [1, 2, 3, 4]  # the versions applied
    assert store.migrate() == []  # up to date: nothing to do

    # Writers name the same schema and table.
    with pool.connection() as conn, conn.transaction():
        outbox = bind(invoices, persister(conn, schema=SCHEMA, table="billing_outbox"))
        ids = [outbox.publish(b"invoice 1"), outbox.publish(b"invoice 2")]

    with psycopg.connect(DSN, autocommit=True) as conn:
        outbox = bind(invoices, persister(conn, schema=SCHEMA, table="billing_outbox"))
        try:
            outbox.publish(b"lost")  # autocommit and no transaction: it would commit alone
        except NotInTransaction:
            pass
        else:
            raise AssertionError("a message was written outside a transaction")
        with conn.transaction():  # an explicit transaction block is fine
            ids.append(outbox.publish(b"invoice 3"))

    relay = Relay(store, publish_timeout=30.0)
    relay.register_topic(invoices)
    assert relay.process_messages().successes == 3
    assert invoices.outbox_ids() == ids
    assert store.backlog() == []

    with pool.connection() as conn:
        kept = conn.execute(
            f'SELECT id, publish_id FROM "{SCHEMA}".billing_outbox_published ORDER BY id'
        ).fetchall()
    assert [(str(id_), publish_id) for id_, publish_id in kept] == [
        (p.outbox_id, p.publish_id) for p in invoices.published
    ]
    settled = store.find_message(ids[0])  # where a message stands, by its outbox id
    assert settled is not None
    assert (settled.state, settled.publish_id) == ("settled", invoices.published[0].publish_id)
    assert store.purge_settled("invoices", older_than=timedelta(days=30)) == 0  # one topic's
    assert store.purge_published(older_than=timedelta(days=30)) == 0  # the retention
    assert store.purge_published(older_than=timedelta(0)) == 3
    assert store.find_message(ids[0]) is None  # gone for good
    print(f"published and kept {ids}, then purged them")


def main() -> None:
    with ConnectionPool(DSN, min_size=1, max_size=4) as pool:
        try:
            run(pool)
        finally:
            with pool.connection() as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')


if __name__ == "__main__":
    main()
