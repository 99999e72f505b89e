"""A Pub/Sub topic: direct publishes, what publish() refuses, and what a subscriber receives.

The outbox here is SQLite: any store relays to any topic. Needs the Pub/Sub emulator
(``PUBSUB_EMULATOR_HOST``, for example ``127.0.0.1:8085`` after
``gcloud beta emulators pubsub start``); it creates a topic of its own and deletes it at the end.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import attrs
from google.cloud import pubsub_v1
from opentelemetry.sdk.trace import TracerProvider

from outboxbind import InvalidAttributes, InvalidOrderingKey, PublishError, Relay, bind
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.topics.pubsub import PubSubTopic

PROJECT = "example-project"


@attrs.frozen
class Shipped:
    order_id: int
    customer: str


def pull(subscriber: Any, subscription: str, count: int, timeout: float = 30.0) -> list[Any]:
    """Pull and acknowledge until ``count`` messages arrived."""
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


def run(publisher: Any, subscriber: Any, topic_path: str, subscription: str) -> None:
    shipments = PubSubTopic(publisher, topic_path, Shipped, ordering_key=lambda m: m.customer)
    assert shipments.name == topic_path.rsplit("/", 1)[1]  # the outbox's name for it: the id

    # Direct: published now, not transactionally; returns Pub/Sub's message id.
    message_id = shipments.publish(Shipped(1, "alice"), attributes={"carrier": "dhl"})

    refused = []
    for message, attributes in [
        (Shipped(2, "k" * 1025), None),  # an ordering key over 1024 bytes
        (Shipped(3, "alice"), {"googclient_x": "1"}),  # 'goog' names belong to Pub/Sub
        (Shipped(4, "alice"), {"outbox-id": "42"}),  # 'outbox-' names belong to outboxbind
        (Shipped(5, "alice"), {"note": "x" * 1025}),  # a value over 1024 bytes
    ]:
        try:
            shipments.publish(message, attributes=attributes)
        except PublishError as exc:  # InvalidOrderingKey, InvalidAttributes, ...
            refused.append(type(exc))
    assert refused == [InvalidOrderingKey, InvalidAttributes, InvalidAttributes, InvalidAttributes]

    # Through the outbox, with the trace context of the span active at publish().
    tracer = TracerProvider().get_tracer("shop")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shop.db"
        store = SQLiteStore(path)
        with closing(store), closing(sqlite3.connect(path)) as conn:
            with tracer.start_as_current_span("ship-order") as span, conn:
                outbox_id = bind(shipments, persister(conn)).publish(
                    Shipped(6, "alice"), attributes={"carrier": "ups"}
                )
            relay = Relay(store)
            relay.register_topic(shipments)
            assert relay.process_messages().successes == 1

    direct, relayed = pull(subscriber, subscription, count=2)  # one key: in order
    assert direct.message_id == message_id
    assert dict(direct.attributes) == {"carrier": "dhl"}
    assert relayed.ordering_key == "alice"
    assert relayed.attributes["carrier"] == "ups"
    assert relayed.attributes["outbox-id"] == outbox_id  # the same on every redelivery
    assert "outbox-created-at" in relayed.attributes  # when publish() wrote it, ISO 8601
    trace_id = f"{span.get_span_context().trace_id:032x}"
    assert relayed.attributes["traceparent"].split("-")[1] == trace_id  # W3C trace context
    print(dict(relayed.attributes))


def main() -> None:
    if "PUBSUB_EMULATOR_HOST" not in os.environ:
        raise SystemExit("set PUBSUB_EMULATOR_HOST to a running Pub/Sub emulator first")
    publisher = pubsub_v1.PublisherClient(
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
    )
    subscriber = pubsub_v1.SubscriberClient()
    name = f"shipments-{uuid.uuid4().hex[:8]}"
    topic_path = publisher.topic_path(PROJECT, name)
    subscription = subscriber.subscription_path(PROJECT, name)
    publisher.create_topic(name=topic_path)
    subscriber.create_subscription(
        request={"name": subscription, "topic": topic_path, "enable_message_ordering": True}
    )
    try:
        run(publisher, subscriber, topic_path, subscription)
    finally:
        subscriber.delete_subscription(subscription=subscription)
        publisher.delete_topic(topic=topic_path)
        subscriber.close()


if __name__ == "__main__":
    main()
