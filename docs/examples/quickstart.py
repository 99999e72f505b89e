"""Quick start: an order and its message in one SQLite transaction, relayed to a topic."""

from __future__ import annotations

import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

import attrs

from outboxbind import JsonCodec, Relay, bind
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.topics.memory import InMemoryTopic


@attrs.frozen
class OrderPlaced:
    order_id: int
    customer: str


# The real topic. InMemoryTopic stands in for a broker here; every topic binds the same way.
orders = InMemoryTopic("orders", JsonCodec(OrderPlaced), ordering_key=lambda m: m.customer)


def place_order(conn: sqlite3.Connection, customer: str) -> str:
    with conn:  # one transaction: commits on success, rolls back on an exception
        row = conn.execute(
            "INSERT INTO orders (customer) VALUES (?) RETURNING id", (customer,)
        ).fetchone()
        message = OrderPlaced(order_id=row[0], customer=customer)
        # Before: orders.publish(message), which could announce an order that never commits.
        return bind(orders, persister(conn)).publish(message)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "app.db"
        store = SQLiteStore(path)  # the relay's side; creates the outbox tables
        with closing(store), closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL)")

            outbox_id = place_order(conn, "alice")

            try:
                with conn:
                    bind(orders, persister(conn)).publish(OrderPlaced(99, "mallory"))
                    raise RuntimeError("payment declined")  # the transaction rolls back...
            except RuntimeError:
                pass  # ...and its message with it

            relay = Relay(store)
            relay.register_topic(orders)
            result = relay.process_messages()  # one round; poll_for_messages() loops

            assert (result.successes, result.errors) == (1, 0)
            assert orders.messages() == [OrderPlaced(order_id=1, customer="alice")]
            assert orders.published[0].attributes["outbox-id"] == outbox_id
            print(f"published {orders.messages()} with outbox id {outbox_id}")


if __name__ == "__main__":
    main()
