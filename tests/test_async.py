"""The asyncio face: the same relay logic, awaited; async persisters give awaitable publish."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence

import pytest

from outboxbind import AsyncBoundTopic, AsyncRelay, OutboxEntry, PersistedMessage, RetryPolicy, bind
from outboxbind.stores.memory import InMemoryStore, InMemoryTransaction
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.testing import FakeClock
from outboxbind.topics import PublishOutcome
from outboxbind.topics.memory import InMemoryTopic

from support import OrderPlaced, order_topic


class AsyncMemoryPersister:
    """An async persister, as a driver with an async API would have."""

    def __init__(self, tx: InMemoryTransaction) -> None:
        self.tx = tx

    async def __call__(self, entry: OutboxEntry, /) -> str:
        await asyncio.sleep(0)
        return self.tx(entry)


def test_an_async_persister_gives_an_awaitable_publish() -> None:
    async def scenario() -> None:
        store = InMemoryStore()
        topic = order_topic()
        with store.transaction() as tx:
            bound = bind(topic, AsyncMemoryPersister(tx))
            assert isinstance(bound, AsyncBoundTopic)
            outbox_id = await bound.publish(OrderPlaced(1, "ann"))
        relay = AsyncRelay(store)
        relay.register_topic(topic)
        result = await relay.process_messages()
        assert result.successes == 1
        assert topic.outbox_ids() == [outbox_id]

    asyncio.run(scenario())


def test_async_relay_keeps_order_across_a_failure(db_path: object, clock: FakeClock) -> None:
    failures = {2: 1}

    def fail(message: PersistedMessage) -> Exception | None:
        order_id = topic.codec.decode(message.data).order_id
        if failures.get(order_id):
            failures[order_id] -= 1
            return ConnectionError("broker hiccup")
        return None

    topic = order_topic(fail=fail)
    store = SQLiteStore(str(db_path), clock=clock)
    conn = sqlite3.connect(str(db_path))
    with conn:
        for order_id in range(1, 5):
            bind(topic, persister(conn)).publish(OrderPlaced(order_id, "ann"))

    async def scenario() -> None:
        relay = AsyncRelay(store)  # a sync store: run in worker threads
        relay.register_topic(topic, retry=RetryPolicy(initial_delay=1, jitter=0))
        first = await relay.process_messages()
        assert (first.successes, first.errors) == (1, 1)
        clock.advance(2)
        second = await relay.process_messages()
        assert second.successes == 3

    asyncio.run(scenario())
    assert [m.order_id for m in topic.messages()] == [1, 2, 3, 4]


class NativeAsyncTopic(InMemoryTopic[OrderPlaced]):
    """A topic with a native asyncio publish path that can hang."""

    hang = False

    async def publish_batch_async(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        if self.hang:
            await asyncio.sleep(3600)
        return self.publish_batch(messages, timeout=timeout)


def test_async_publish_timeout_cancels_a_hung_topic() -> None:
    async def scenario() -> None:
        store = InMemoryStore()
        topic = NativeAsyncTopic("orders", order_topic().codec)
        topic.hang = True
        with store.transaction() as tx:
            bind(topic, tx).publish(OrderPlaced(1, "ann"))
        relay = AsyncRelay(store, publish_timeout=0.05)
        relay.register_topic(topic)
        result = await asyncio.wait_for(relay.process_messages(), 5)
        assert (result.errors, result.successes) == (1, 0)
        [message] = store.backlog()
        assert message.pending == 1

    asyncio.run(scenario())


def test_async_poll_runs_as_a_task_and_wakes_on_commit() -> None:
    async def scenario() -> None:
        store = InMemoryStore()
        topic = order_topic()
        relay = AsyncRelay(store, poll_interval=60.0)
        relay.register_topic(topic)
        task = asyncio.create_task(relay.poll_for_messages(100))
        await asyncio.sleep(0.05)
        with store.transaction() as tx:
            bind(topic, tx).publish(OrderPlaced(1, "ann"))
        for _ in range(200):
            if topic.published:
                break
            await asyncio.sleep(0.01)
        assert [m.order_id for m in topic.messages()] == [1]
        assert await relay.stop(timeout=5)
        await asyncio.wait_for(task, 5)

    asyncio.run(scenario())


def test_async_stop_with_drain_publishes_the_backlog() -> None:
    async def scenario() -> None:
        store = InMemoryStore()
        topic = order_topic()
        with store.transaction() as tx:
            for order_id in range(300):
                bind(topic, tx).publish(OrderPlaced(order_id, f"c{order_id % 5}"))
        relay = AsyncRelay(store, poll_interval=60.0)
        relay.register_topic(topic)
        task = asyncio.create_task(relay.poll_for_messages(7))
        assert await relay.stop(drain=True, timeout=10)
        await task
        assert len(topic.published) == 300

    asyncio.run(scenario())


def test_async_relay_refuses_a_second_poll_loop() -> None:
    async def scenario() -> None:
        relay = AsyncRelay(InMemoryStore(), poll_interval=60.0)
        relay.register_topic(order_topic())
        task = asyncio.create_task(relay.poll_for_messages(10))
        await asyncio.sleep(0.01)
        with pytest.raises(RuntimeError, match="already polling"):
            await relay.poll_for_messages(10)
        await relay.stop(timeout=5)
        await task

    asyncio.run(scenario())
