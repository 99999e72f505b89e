"""Strict sequence on PostgreSQL: per-key publish order equals the writers' commit order.

Two writers interleave: A writes its event first but commits last. The database ends on A's
state; with ``strict_sequence=True`` subscribers end on it too. Needs PostgreSQL
(``OUTBOXBIND_PG_DSN``, by default ``host=127.0.0.1 port=5432 user=postgres dbname=test``); it
works in a schema of its own and drops it at the end.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import attrs
from psycopg import Connection
from psycopg_pool import ConnectionPool

from outboxbind import JsonCodec, Relay, bind
from outboxbind.stores.postgres import PostgresStore, persister
from outboxbind.topics.memory import InMemoryTopic

DSN = os.environ.get("OUTBOXBIND_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
SCHEMA = f"accounts_{uuid.uuid4().hex[:8]}"


@attrs.frozen
class AccountChanged:
    account: str
    state: str


def account_topic(name: str, *, strict: bool) -> InMemoryTopic[AccountChanged]:
    return InMemoryTopic(
        name, JsonCodec(AccountChanged), ordering_key=lambda m: m.account, strict_sequence=strict
    )


def interleave(pool: ConnectionPool[Connection[Any]], topic: InMemoryTopic[AccountChanged]) -> None:
    """Writer A publishes first and commits last; writer B commits in between."""
    with pool.connection() as a, pool.connection() as b:
        bind(topic, persister(a, schema=SCHEMA)).publish(AccountChanged("acct-1", "A"))
        with b.transaction():  # B: update, publish, commit, while A's transaction is open
            b.execute("UPDATE accounts SET state = 'B' WHERE id = 'acct-1'")
            bind(topic, persister(b, schema=SCHEMA)).publish(AccountChanged("acct-1", "B"))
        a.execute("UPDATE accounts SET state = 'A' WHERE id = 'acct-1'")
        a.commit()  # A commits last: the account ends in state A


def run(pool: ConnectionPool[Connection[Any]]) -> None:
    store = PostgresStore(pool, schema=SCHEMA)
    store.migrate()
    with pool.connection() as conn:
        conn.execute("CREATE TABLE accounts (id text PRIMARY KEY, state text NOT NULL)")
        conn.execute("INSERT INTO accounts VALUES ('acct-1', 'new')")
    strict = account_topic("accounts", strict=True)
    interleave(pool, strict)
    plain = account_topic("accounts-plain", strict=False)
    interleave(pool, plain)

    relay = Relay(store)
    relay.register_topic(strict)
    relay.register_topic(plain)
    relay.process_messages()
    with pool.connection() as conn:
        assert conn.execute("SELECT state FROM accounts").fetchone() == ("A",)
    # strict: published in commit order, so subscribers end on A, as the database does
    assert [m.state for m in strict.messages()] == ["B", "A"]
    # without it: in the order the messages were written (their ids), ending on B
    assert [m.state for m in plain.messages()] == ["A", "B"]
    print(f"strict: {strict.messages()}\nplain: {plain.messages()}")


def main() -> None:
    settings = {"options": f"-c search_path={SCHEMA}"}  # the example's tables are found there
    with ConnectionPool(DSN, kwargs=settings, min_size=2, max_size=4) as pool:
        try:
            run(pool)
        finally:
            with pool.connection() as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')


if __name__ == "__main__":
    main()
