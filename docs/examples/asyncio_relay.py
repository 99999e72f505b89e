"""The asyncio face: an AsyncRelay polling as a task while the application writes."""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

import attrs

from outboxbind import AsyncRelay, JsonCodec, bind
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.topics.memory import InMemoryTopic


@attrs.frozen
class OrderPlaced:
    order_id: int
    customer: str


async def serve(store: SQLiteStore, conn: sqlite3.Connection) -> InMemoryTopic[OrderPlaced]:
    orders = InMemoryTopic("orders", JsonCodec(OrderPlaced), ordering_key=lambda m: m.customer)
    relay = AsyncRelay(store)  # a synchronous store runs in worker threads
    relay.register_topic(orders)
    polling = asyncio.create_task(relay.poll_for_messages(batch_size=100))

    for order_id in range(1, 4):  # the application at work, serving requests
        with conn:
            conn.execute("INSERT INTO orders (id, customer) VALUES (?, 'alice')", (order_id,))
            bind(orders, persister(conn)).publish(OrderPlaced(order_id, "alice"))
        await asyncio.sleep(0.01)  # other requests; the relay task runs meanwhile

    # On shutdown: publish what is due, then stop (within 10 s at most).
    assert await relay.stop(drain=True, timeout=10.0)
    await polling  # raises if the loop failed
    return orders


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "app.db"
        with closing(SQLiteStore(path)) as store, closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL)")
            orders = asyncio.run(serve(store, conn))
    assert [m.order_id for m in orders.messages()] == [1, 2, 3]
    print(f"published in order: {orders.messages()}")


if __name__ == "__main__":
    main()
