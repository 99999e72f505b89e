"""asyncio on PostgreSQL: an async persister, AsyncPostgresStore and AsyncRelay as a task.

Needs PostgreSQL (``OUTBOXBIND_PG_DSN``, by default
``host=127.0.0.1 port=5432 user=postgres dbname=test``); it works in a schema of its own and
drops it at the end.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from typing import Any

import attrs
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool

from outboxbind import AsyncRelay, JsonCodec, bind
from outboxbind.stores.postgres import AsyncPostgresStore, persister
from outboxbind.topics.memory import InMemoryTopic

DSN = os.environ.get("OUTBOXBIND_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
SCHEMA = f"shop_{uuid.uuid4().hex[:8]}"


@attrs.frozen
class OrderPlaced:
    order_id: int
    customer: str


orders = InMemoryTopic("orders", JsonCodec(OrderPlaced), ordering_key=lambda m: m.customer)


async def place_order(pool: AsyncConnectionPool[AsyncConnection[Any]], customer: str) -> str:
    async with pool.connection() as conn, conn.transaction():
        cursor = await conn.execute(
            "INSERT INTO orders (customer) VALUES (%s) RETURNING id", (customer,)
        )
        row = await cursor.fetchone()
        assert row is not None
        # persister() of an AsyncConnection is async: the bound publish() is awaited
        return await bind(orders, persister(conn, schema=SCHEMA)).publish(
            OrderPlaced(row[0], customer)
        )


async def serve(pool: AsyncConnectionPool[AsyncConnection[Any]]) -> list[str]:
    store = AsyncPostgresStore(pool, schema=SCHEMA)
    await store.migrate()
    async with pool.connection() as conn:
        await conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, customer text NOT NULL)")

    relay = AsyncRelay(store)
    relay.register_topic(orders)
    polling = asyncio.create_task(relay.poll_for_messages(batch_size=100))
    ids = [await place_order(pool, customer) for customer in ("alice", "bob", "alice")]
    deadline = time.monotonic() + 10.0
    while len(orders.published) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.005)  # the relay task, woken by NOTIFY at each commit, publishes
    assert await relay.stop(drain=True, timeout=10.0)
    await polling
    return ids


async def scenario() -> None:
    settings = {"options": f"-c search_path={SCHEMA}"}  # the example's orders table is there
    pool = AsyncConnectionPool(DSN, kwargs=settings, min_size=1, max_size=4, open=False)
    async with pool:  # opens the pool, and closes it at the end
        try:
            ids = await serve(pool)
        finally:
            async with pool.connection() as conn:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
    assert sorted(orders.outbox_ids()) == sorted(ids)  # each once; in order per customer:
    assert [p.outbox_id for p in orders.published if p.ordering_key == "alice"] == ids[::2]
    print(f"published {orders.messages()}")


def main() -> None:
    asyncio.run(scenario())


if __name__ == "__main__":
    main()
