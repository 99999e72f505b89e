"""Google Cloud Pub/Sub, against the real emulator, with a real subscription pulling."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from psycopg_pool import ConnectionPool

from outboxbind import (
    AsyncRelay,
    InvalidAttributes,
    InvalidOrderingKey,
    MessageTooLarge,
    Relay,
    RetryPolicy,
    bind,
)
from outboxbind.stores.postgres import PostgresStore, persister
from outboxbind.topics.pubsub import PubSubTopic

pubsub_v1 = pytest.importorskip("google.cloud.pubsub_v1")


@attrs.frozen
class OrderPlaced:
    order_id: int
    customer: str
    note: str = ""


@attrs.frozen
class Channel:
    """A topic and an ordered subscription on it, with clients bound to one emulator."""

    publisher: Any
    subscriber: Any
    topic_path: str
    subscription_path: str

    def topic(self, **kwargs: Any) -> PubSubTopic[OrderPlaced]:
        return PubSubTopic(
            self.publisher,
            self.topic_path,
            OrderPlaced,
            ordering_key=lambda m: m.customer,
            **kwargs,
        )

    def pull(self, expected: int, timeout: float = 30.0) -> list[Any]:
        """Pull (and ack) until ``expected`` messages came, then a little more for extras."""
        received: list[Any] = []
        deadline = time.monotonic() + timeout
        quiet_until: float | None = None
        while time.monotonic() < deadline:
            if len(received) >= expected:
                quiet_until = quiet_until or time.monotonic() + 1.0
                if time.monotonic() > quiet_until:
                    break
            response = self.subscriber.pull(
                subscription=self.subscription_path,
                max_messages=1000,
                timeout=1,
            )
            if response.received_messages:
                received += [r.message for r in response.received_messages]
                self.subscriber.acknowledge(
                    subscription=self.subscription_path,
                    ack_ids=[r.ack_id for r in response.received_messages],
                )
        return received


def open_channel(host: str) -> Channel:
    os.environ["PUBSUB_EMULATOR_HOST"] = host  # the clients bind to it when created
    publisher = pubsub_v1.PublisherClient(
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
    )
    subscriber = pubsub_v1.SubscriberClient()
    name = f"orders-{uuid.uuid4().hex[:8]}"
    topic_path = publisher.topic_path("test", name)
    subscription_path = subscriber.subscription_path("test", f"{name}-sub")
    publisher.create_topic(name=topic_path)
    subscriber.create_subscription(
        request={
            "name": subscription_path,
            "topic": topic_path,
            "enable_message_ordering": True,
            "ack_deadline_seconds": 60,
        }
    )
    return Channel(publisher, subscriber, topic_path, subscription_path)


@pytest.fixture
def channel(pubsub_host: str) -> Iterator[Channel]:
    channel = open_channel(pubsub_host)
    yield channel
    channel.subscriber.close()


def by_key(messages: list[Any]) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for message in messages:
        seen.setdefault(message.ordering_key, []).append(message.attributes["outbox-id"])
    return seen


def test_direct_publish_returns_the_pubsub_message_id(channel: Channel) -> None:
    topic = channel.topic()
    message_id = topic.publish(OrderPlaced(1, "ann"), attributes={"source": "test"})
    [received] = channel.pull(1)
    assert received.message_id == message_id
    assert received.ordering_key == "ann"
    assert received.attributes["source"] == "test"
    assert topic.codec.decode(received.data) == OrderPlaced(1, "ann")


def test_end_to_end_exactly_the_committed_messages_arrive_in_order_per_key(
    channel: Channel, pg_pool: ConnectionPool[Any], pg_schema: str
) -> None:
    topic = channel.topic()
    store = PostgresStore(pg_pool, schema=pg_schema)
    store.migrate()
    with pg_pool.connection() as conn:
        conn.execute(f'CREATE TABLE "{pg_schema}".orders (id int PRIMARY KEY, customer text)')
        conn.commit()
    relay = Relay(store, poll_interval=0.5)
    relay.register_topic(topic)
    relay_thread = threading.Thread(target=relay.poll_for_messages, args=(200,))
    relay_thread.start()
    committed: dict[str, list[str]] = {}
    rolled_back: set[str] = set()
    try:
        for tx in range(60):
            with pg_pool.connection() as conn:
                ids = []
                for n in range(5):
                    order = OrderPlaced(tx * 10 + n, f"customer-{(tx + n) % 7}")
                    conn.execute(
                        f'INSERT INTO "{pg_schema}".orders VALUES (%s, %s)',
                        (order.order_id, order.customer),
                    )
                    ids.append(
                        (
                            order.customer,
                            bind(topic, persister(conn, schema=pg_schema)).publish(order),
                        )
                    )
                if tx % 6 == 5:
                    conn.rollback()
                    rolled_back.update(i for _, i in ids)
                else:
                    conn.commit()
                    for customer, outbox_id in ids:
                        committed.setdefault(customer, []).append(outbox_id)
        expected = sum(len(v) for v in committed.values())
        received = channel.pull(expected)
    finally:
        relay.stop(timeout=10)
        relay_thread.join(10)
    ids = [m.attributes["outbox-id"] for m in received]
    assert len(ids) == len(set(ids)) == expected  # each committed message, once
    assert not rolled_back & set(ids)
    assert by_key(received) == committed  # per key, in commit order
    assert all("outbox-created-at" in m.attributes for m in received)


def test_bad_input_is_refused_in_publish_before_commit(
    channel: Channel, pg_pool: ConnectionPool[Any], pg_schema: str
) -> None:
    topic = channel.topic()
    PostgresStore(pg_pool, schema=pg_schema).migrate()
    with pg_pool.connection() as conn:
        bound = bind(topic, persister(conn, schema=pg_schema))
        with pytest.raises(MessageTooLarge, match=r"over the topic's limit of 10000000 bytes"):
            bound.publish(OrderPlaced(1, "ann", note="x" * 10_000_000))
        with pytest.raises(InvalidOrderingKey, match="over the limit of 1024 bytes"):
            bound.publish(OrderPlaced(2, "k" * 1025))
        with pytest.raises(InvalidAttributes, match="reserved by Pub/Sub"):
            bound.publish(OrderPlaced(3, "ann"), attributes={"googly": "eyes"})
        with pytest.raises(InvalidAttributes, match="over Pub/Sub's limit of 1024"):
            bound.publish(OrderPlaced(4, "ann"), attributes={"big": "v" * 1025})
        with pytest.raises(InvalidAttributes, match="reserved for outboxbind"):
            bound.publish(OrderPlaced(5, "ann"), attributes={"outbox-id": "forged"})
        with pytest.raises(InvalidAttributes, match="97 attributes, over the limit of 96"):
            bound.publish(OrderPlaced(6, "ann"), attributes={f"a{i}": "" for i in range(97)})
        good = bound.publish(OrderPlaced(7, "ann"))  # the transaction is still usable
        conn.commit()
    relay = Relay(PostgresStore(pg_pool, schema=pg_schema))
    relay.register_topic(topic)
    assert relay.process_messages().successes == 1
    [received] = channel.pull(1)
    assert received.attributes["outbox-id"] == good


def test_trace_context_captured_at_publish_travels_with_the_message(
    channel: Channel, pg_pool: ConnectionPool[Any], pg_schema: str
) -> None:
    from opentelemetry import context, trace

    span_context = trace.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=trace.TraceFlags(0x01),
    )
    topic = channel.topic()
    store = PostgresStore(pg_pool, schema=pg_schema)
    store.migrate()
    token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(span_context)))
    try:
        with pg_pool.connection() as conn, conn.transaction():
            bind(topic, persister(conn, schema=pg_schema)).publish(OrderPlaced(1, "ann"))
    finally:
        context.detach(token)
    relay = Relay(store)
    relay.register_topic(topic)
    relay.process_messages()
    [received] = channel.pull(1)
    assert (
        received.attributes["traceparent"]
        == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    )


def test_async_relay_with_the_async_client(
    channel: Channel, pg_pool: ConnectionPool[Any], pg_schema: str
) -> None:
    import asyncio

    from google.pubsub_v1.services.publisher import PublisherAsyncClient

    store = PostgresStore(pg_pool, schema=pg_schema)
    store.migrate()

    async def scenario() -> None:
        topic = channel.topic(async_client=PublisherAsyncClient())
        with pg_pool.connection() as conn, conn.transaction():
            for n in range(20):
                bind(topic, persister(conn, schema=pg_schema)).publish(OrderPlaced(n, f"c{n % 3}"))
        relay = AsyncRelay(store)
        relay.register_topic(topic)
        assert (await relay.process_messages(100)).successes == 20

    asyncio.run(scenario())
    received = channel.pull(20)
    assert len(received) == 20
    assert all(ids == sorted(ids, key=int) for ids in by_key(received).values())


@pytest.mark.slow
def test_an_emulator_outage_of_30s_loses_nothing_and_keeps_order(
    pg_pool: ConnectionPool[Any], pg_schema: str
) -> None:
    from outboxbind.testing.emulator import PubSubEmulator

    emulator = PubSubEmulator().start()
    previous_host = os.environ.get("PUBSUB_EMULATOR_HOST")
    try:
        channel = open_channel(emulator.host)
        topic = channel.topic()
        store = PostgresStore(pg_pool, schema=pg_schema, lease_duration=10)
        store.migrate()
        committed: dict[str, list[str]] = {}
        with pg_pool.connection() as conn:
            for tx in range(40):
                with conn.transaction():
                    for n in range(50):
                        order = OrderPlaced(tx * 100 + n, f"c{n % 10}")
                        outbox_id = bind(topic, persister(conn, schema=pg_schema)).publish(order)
                        committed.setdefault(order.customer, []).append(outbox_id)
        relay = Relay(store, poll_interval=0.2, publish_timeout=2, max_store_backoff=2)
        relay.register_topic(
            topic, retry=RetryPolicy(initial_delay=0.5, max_delay=4, max_attempts=1000)
        )
        relay_thread = threading.Thread(target=relay.poll_for_messages, args=(10,))
        relay_thread.start()
        try:
            deadline = time.monotonic() + 30
            while relay.totals["published"] < 200 and time.monotonic() < deadline:
                time.sleep(0.01)
            emulator.pause()  # the drain is under way when the emulator stops answering
            published_before = relay.totals["published"]
            time.sleep(30)
            failed_during_outage = relay.totals["failed"]
            emulator.resume()
            received = channel.pull(2000, timeout=120)
        finally:
            relay.stop(timeout=10)
            relay_thread.join(10)
        assert 200 <= published_before < 2000
        assert failed_during_outage > 0  # the relay saw the outage, backed off, and went on
        first_seen: dict[str, list[str]] = {}
        for message in received:
            ids = first_seen.setdefault(message.ordering_key, [])
            if message.attributes["outbox-id"] not in ids:
                ids.append(message.attributes["outbox-id"])
        assert first_seen == committed  # nothing lost, per-key order of first arrivals intact
        channel.subscriber.close()
    finally:
        emulator.stop()
        if previous_host is not None:
            os.environ["PUBSUB_EMULATOR_HOST"] = previous_host


def test_direct_publish_resumes_an_ordering_key_after_a_failure(channel: Channel) -> None:
    topic = channel.topic()
    channel.publisher.delete_topic(topic=channel.topic_path)
    with pytest.raises(Exception, match=r"(?i)not.?found"):
        topic.publish(OrderPlaced(1, "ann"))
    channel.publisher.create_topic(name=channel.topic_path)
    # without resume_publish the client would refuse every later message of "ann"
    assert topic.publish(OrderPlaced(2, "ann"))


class FailingFirstRequest(PubSubTopic[OrderPlaced]):
    """The real topic, whose first Publish request fails (as on a broken connection)."""

    requests: list[list[str]]

    def _send(self, request: Any, timeout: float) -> list[str]:
        self.requests.append([m.attributes["outbox-id"] for m in request.messages])
        if len(self.requests) == 1:
            raise ConnectionError("the first request failed")
        return super()._send(request, timeout)


def test_a_failed_request_stops_its_keys_and_later_requests_carry_the_others(
    channel: Channel,
) -> None:
    from datetime import UTC, datetime

    from outboxbind import NotAttempted, PersistedMessage

    topic = FailingFirstRequest(
        channel.publisher, channel.topic_path, OrderPlaced, ordering_key=lambda m: m.customer
    )
    topic.requests = []
    now = datetime.now(UTC)
    # 1,000 messages of "ann" fill the first request; "bob" follows in the second
    messages = [
        PersistedMessage(str(i), topic.name, b"{}", None, "ann" if i < 1000 else "bob", now)
        for i in range(1100)
    ]
    messages.insert(1000, PersistedMessage("9999", topic.name, b"{}", None, "ann", now))
    outcomes = topic.publish_batch(messages, timeout=10)
    assert len(topic.requests) == 2
    assert isinstance(outcomes[0], ConnectionError)  # ann's head carries the failure
    assert all(isinstance(o, NotAttempted) for o in outcomes[1:1001])  # the rest of ann waits
    assert "9999" not in topic.requests[1]  # even the ann message that fell into request two
    assert all(isinstance(o, str) for o in outcomes[1001:])  # bob went through
    assert len(channel.pull(100)) == 100


def test_without_an_async_client_the_asyncio_relay_runs_the_topic_on_its_threads(
    channel: Channel,
) -> None:
    import asyncio

    from google.pubsub_v1.services.publisher import PublisherAsyncClient

    async def with_async_client() -> bool:
        return channel.topic(async_client=PublisherAsyncClient()).async_native

    assert not channel.topic().async_native  # timeouts are then tracked as busy, not cancelled
    assert asyncio.run(with_async_client())


def test_each_message_arrives_with_exactly_the_outbox_attributes(channel: Channel) -> None:
    from datetime import UTC, datetime, timedelta

    from outboxbind import PersistedMessage
    from outboxbind.topics import outbox_attributes

    topic = channel.topic()
    start = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    messages = [
        PersistedMessage(
            str(100 + i),
            topic.name,
            f"payload {i}".encode(),
            {"tenant": f"t{i}", "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}
            if i % 2
            else None,
            f"key-{i % 3}",
            start + timedelta(microseconds=i * 7),  # one on a whole second, the rest not
        )
        for i in range(6)
    ]
    outcomes = topic.publish_batch(messages, timeout=10)
    assert all(isinstance(outcome, str) for outcome in outcomes)
    received = {m.attributes["outbox-id"]: m for m in channel.pull(len(messages))}
    assert sorted(received) == sorted(m.id for m in messages)
    for message in messages:
        arrived = received[message.id]
        assert dict(arrived.attributes) == outbox_attributes(message)
        assert arrived.data == message.data
        assert arrived.ordering_key == message.ordering_key


# -- the publish timeout bounds the whole call (issue 14) ----------------------------------------

FREEZE_SECONDS = 8.0  # the frozen emulator thaws by itself then, so an unbounded call ends too
TIMEOUT = 2.0
GRACE = 1.5  # the bound a test allows past the timeout: far less than the freeze


@pytest.fixture(scope="module")
def private_emulator() -> Iterator[Any]:
    """An emulator of this module's own, which its tests freeze (never the session's)."""
    from outboxbind.testing.emulator import PubSubEmulator

    previous_host = os.environ.get("PUBSUB_EMULATOR_HOST")
    emulator = PubSubEmulator().start()
    try:
        yield emulator
    finally:
        emulator.stop()
        if previous_host is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = previous_host


def two_keys(topic: PubSubTopic[Any], count: int) -> list[Any]:
    from datetime import UTC, datetime

    from outboxbind import PersistedMessage

    now = datetime.now(UTC)
    return [
        PersistedMessage(str(i), topic.name, b"{}", None, "ann" if i % 2 else "bob", now)
        for i in range(1, count + 1)
    ]


def assert_timed_out(outcomes: list[Any], topic: PubSubTopic[Any]) -> None:
    """Each key's head carries a TimeoutError naming the topic and the seconds; the rest wait."""
    from outboxbind import NotAttempted

    heads, rest = outcomes[:2], outcomes[2:]
    assert all(isinstance(o, TimeoutError) for o in heads), heads
    assert all(topic.name in str(o) and f"{TIMEOUT}s" in str(o) for o in heads), heads
    assert all(isinstance(o, NotAttempted) for o in rest), rest


@pytest.mark.slow
def test_publish_batch_ends_within_its_timeout_while_the_emulator_is_frozen(
    private_emulator: Any,
) -> None:
    channel = open_channel(private_emulator.host)
    topic = channel.topic()
    messages = two_keys(topic, 10)
    assert all(isinstance(o, str) for o in topic.publish_batch(messages[:2], timeout=10))
    private_emulator.pause()
    thaw = threading.Timer(FREEZE_SECONDS, private_emulator.resume)
    thaw.start()
    try:
        started = time.monotonic()
        outcomes = topic.publish_batch(messages, timeout=TIMEOUT)
        elapsed = time.monotonic() - started
    finally:
        thaw.cancel()
        private_emulator.resume()
    # before the fix the client's own retry (600 s deadline) ran on until the thaw
    assert elapsed < TIMEOUT + GRACE, f"publish_batch(timeout={TIMEOUT}) took {elapsed:.1f}s"
    assert_timed_out(outcomes, topic)
    # the emulator thawed: the same topic publishes again at once
    assert all(isinstance(o, str) for o in topic.publish_batch(messages[2:4], timeout=10))
    channel.subscriber.close()


@pytest.mark.slow
def test_async_publish_batch_ends_within_its_timeout_while_the_emulator_is_frozen(
    private_emulator: Any,
) -> None:
    import asyncio

    from google.pubsub_v1.services.publisher import PublisherAsyncClient

    channel = open_channel(private_emulator.host)

    async def scenario() -> tuple[float, list[Any], list[Any], PubSubTopic[Any]]:
        topic = channel.topic(async_client=PublisherAsyncClient())
        assert topic.async_native  # cancelled by the relay, not left on a thread
        messages = two_keys(topic, 10)
        warm = await topic.publish_batch_async(messages[:2], timeout=10)
        assert all(isinstance(o, str) for o in warm)
        private_emulator.pause()
        thaw = asyncio.get_running_loop().call_later(FREEZE_SECONDS, private_emulator.resume)
        try:
            started = time.monotonic()
            outcomes = await topic.publish_batch_async(messages, timeout=TIMEOUT)
            elapsed = time.monotonic() - started
        finally:
            thaw.cancel()
            private_emulator.resume()
        after = await topic.publish_batch_async(messages[2:4], timeout=10)
        return elapsed, outcomes, after, topic

    elapsed, outcomes, after, topic = asyncio.run(scenario())
    assert elapsed < TIMEOUT + GRACE, f"publish_batch_async(timeout={TIMEOUT}) took {elapsed:.1f}s"
    assert_timed_out(outcomes, topic)
    assert all(isinstance(o, str) for o in after)
    channel.subscriber.close()
