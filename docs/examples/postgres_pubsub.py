"""PostgreSQL and Google Cloud Pub/Sub: an order and its event in one transaction, relayed.

Needs a PostgreSQL server (``OUTBOXBIND_PG_DSN``, by default
``host=127.0.0.1 port=5432 user=postgres dbname=test``) and the Pub/Sub emulator
(``PUBSUB_EMULATOR_HOST``, for example ``127.0.0.1:8085`` after
``gcloud beta emulators pubsub start``). It works in a schema and on a topic of its own, and
removes them at the end.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import attrs
import psycopg
from google.cloud import pubsub_v1
from psycopg_pool import ConnectionPool

from outboxbind import Relay, bind
from outboxbind.stores.postgres import PostgresStore, persister
from outboxbind.topics.pubsub import PubSubTopic

DSN = os.environ.get("OUTBOXBIND_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
SCHEMA = f"shop_{uuid.uuid4().hex[:8]}"  # the outbox's schema (and, here, the orders')
PROJECT = "example-project"


@attrs.frozen
class OrderPlaced:
    order_id: int
    customer: str


def place_order(
    pool: ConnectionPool[psycopg.Connection[Any]], orders: PubSubTopic[OrderPlaced], customer: str
) -> str:
    with pool.connection() as conn, conn.transaction():
        row = conn.execute(
            "INSERT INTO orders (customer) VALUES (%s) RETURNING id", (customer,)
        ).fetchone()
        assert row is not None
        bound = bind(orders, persister(conn, schema=SCHEMA))  # the same publish() as the topic
        return bound.publish(OrderPlaced(row[0], customer))  # an INSERT in this transaction


def pull(subscriber: Any, subscription: str, count: int, timeout: float = 30.0) -> list[Any]:
    """Pull and acknowledge until ``count`` messages arrived (a consumer, for the checks)."""
    received: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        response = subscriber.pull(subscription=subscription, max_messages=100, timeout=5)
        if response.received_messages:
            received += [r.message for r in response.received_messages]
            subscriber.acknowledge(
                subscription=subscription, ack_ids=[r.ack_id for r in response.received_messages]
            )
    return received


def run(
    pool: ConnectionPool[psycopg.Connection[Any]],
    publisher: Any,
    subscriber: Any,
    paths: tuple[str, str],
) -> None:
    topic_path, subscription_path = paths
    orders = PubSubTopic(publisher, topic_path, OrderPlaced, ordering_key=lambda m: m.customer)
    message_id = orders.publish(OrderPlaced(0, "bob"))  # a direct publish, not transactional

    store = PostgresStore(pool, schema=SCHEMA)
    assert store.migrate() == [1, 2, 3, 4]  # creates the outbox tables; a second call does nothing
    with pool.connection() as conn:
        conn.execute("CREATE TABLE orders (id serial PRIMARY KEY, customer text NOT NULL)")

    relay = Relay(store)
    relay.register_topic(orders)
    thread = threading.Thread(target=relay.poll_for_messages, kwargs={"batch_size": 100})
    thread.start()  # woken by NOTIFY when a transaction that wrote to the outbox commits
    try:
        ids = [place_order(pool, orders, customer) for customer in ("alice", "bob", "alice")]
        try:
            with pool.connection() as conn, conn.transaction():
                bind(orders, persister(conn, schema=SCHEMA)).publish(OrderPlaced(99, "mallory"))
                raise RuntimeError("payment declined")  # rolls back, the message with it
        except RuntimeError:
            pass
        received = pull(subscriber, subscription_path, count=4)
    finally:
        assert relay.stop(drain=True, timeout=10.0)
        thread.join()

    [direct] = [m for m in received if m.message_id == message_id]
    assert "outbox-id" not in direct.attributes  # a direct publish has no outbox id
    relayed = [m for m in received if m is not direct]
    assert sorted(m.attributes["outbox-id"] for m in relayed) == sorted(ids)  # mallory's: never
    alice = [m for m in relayed if m.ordering_key == "alice"]
    assert [m.attributes["outbox-id"] for m in alice] == [ids[0], ids[2]]  # in order per key
    assert orders.codec.decode(alice[0].data) == OrderPlaced(1, "alice")
    assert store.backlog() == []
    print(f"relayed outbox ids {ids} to {topic_path}")


def main() -> None:
    if "PUBSUB_EMULATOR_HOST" not in os.environ:
        raise SystemExit("set PUBSUB_EMULATOR_HOST to a running Pub/Sub emulator first")
    publisher = pubsub_v1.PublisherClient(  # ordering enabled: needed for direct publishes
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
    )
    subscriber = pubsub_v1.SubscriberClient()
    name = f"orders-{uuid.uuid4().hex[:8]}"
    topic_path = publisher.topic_path(PROJECT, name)
    subscription_path = subscriber.subscription_path(PROJECT, name)
    publisher.create_topic(name=topic_path)
    subscriber.create_subscription(
        request={"name": subscription_path, "topic": topic_path, "enable_message_ordering": True}
    )
    try:
        # search_path: the application's own tables (orders) are found in the example's schema
        settings = {"options": f"-c search_path={SCHEMA}"}
        with ConnectionPool(DSN, kwargs=settings, min_size=1, max_size=4) as pool:
            run(pool, publisher, subscriber, (topic_path, subscription_path))
    finally:
        subscriber.delete_subscription(subscription=subscription_path)
        publisher.delete_topic(topic=topic_path)
        subscriber.close()
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')


if __name__ == "__main__":
    main()
