"""The relay under misbehaving destinations, cancellation and shutdown (guarantees 2, 3, 10)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Sequence

import pytest

from outboxbind import (
    AsyncRelay,
    ConfigurationError,
    NotAttempted,
    PersistedMessage,
    Relay,
    RetryPolicy,
    UnpublishableError,
    bind,
)
from outboxbind.stores.memory import InMemoryBatch, InMemoryStore
from outboxbind.topics import PublishOutcome
from outboxbind.topics.memory import InMemoryTopic

from support import OrderPlaced, order_topic


def write(store: InMemoryStore, topic: InMemoryTopic[OrderPlaced], *orders: OrderPlaced) -> None:
    with store.transaction() as tx:
        for order in orders:
            bind(topic, tx).publish(order)


def attempts(store: InMemoryStore) -> dict[int, int]:
    """Order id -> failed attempts, for every pending message (by peeking at a checkout)."""
    batch = store.checkout_batch(list({m.topic for m in _all(store)}), 1000)
    assert batch is not None
    found = {
        int(m.data.split(b'"order_id":')[1].split(b",")[0]): m.attempts for m in batch.messages
    }
    batch.close()
    return found


def _all(store: InMemoryStore) -> list[PersistedMessage]:
    batch = store.checkout_batch(["orders", "slow", "fast"], 1000)
    if batch is None:
        return []
    messages = list(batch.messages)
    batch.close()
    return messages


class IgnoresTimeout(InMemoryTopic[OrderPlaced]):
    """A destination that hangs until released, whatever timeout it is given."""

    def __init__(self, name: str) -> None:
        super().__init__(name, order_topic().codec, ordering_key=lambda m: m.customer)
        self.release = threading.Event()
        self.calls = 0

    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        self.calls += 1
        self.release.wait(30)
        return super().publish_batch(messages, timeout=timeout)


def test_a_hung_topic_neither_starves_nor_poisons_a_healthy_one() -> None:
    store = InMemoryStore()
    slow, fast = IgnoresTimeout("slow"), order_topic("fast")
    write(store, slow, OrderPlaced(1, "ann"))
    relay = Relay(store, publish_timeout=0.1, publish_concurrency=2)
    relay.register_topic(
        slow, retry=RetryPolicy(max_attempts=2, initial_delay=0.01), poison="block"
    )
    relay.register_topic(
        fast, retry=RetryPolicy(max_attempts=2, initial_delay=0.01), poison="block"
    )
    try:
        for round_ in range(6):
            write(store, fast, OrderPlaced(100 + round_, "bob"))
            relay.process_messages()
            time.sleep(0.02)
        assert [m.order_id for m in fast.messages()] == [100, 101, 102, 103, 104, 105]
        assert slow.calls == 1  # while its first call hangs it is handed nothing new
        assert store.dead_letters() == []  # one timed-out attempt, not poisoned by re-tries
    finally:
        slow.release.set()


def test_a_group_failure_charges_only_the_head_of_each_key() -> None:
    store = InMemoryStore()

    class Down(InMemoryTopic[OrderPlaced]):
        def publish_batch(
            self, messages: Sequence[PersistedMessage], *, timeout: float
        ) -> list[PublishOutcome]:
            raise ConnectionError("connection refused")

    topic = Down("orders", order_topic().codec, ordering_key=lambda m: m.customer)
    write(store, topic, *[OrderPlaced(i, c) for i in range(3) for c in ("ann", "bob")])
    relay = Relay(store)
    relay.register_topic(topic, retry=RetryPolicy(initial_delay=0.001, jitter=0))
    result = relay.process_messages()
    assert (result.errors, result.successes) == (2, 0)
    time.sleep(0.01)
    assert attempts(store) == {0: 1, 1: 0, 2: 0}  # ann's head and bob's head (both order 0)


def test_publish_ids_of_another_type_count_as_published() -> None:
    store = InMemoryStore()

    class Offsets(InMemoryTopic[OrderPlaced]):
        def publish_batch(  # type: ignore[override]
            self, messages: Sequence[PersistedMessage], *, timeout: float
        ) -> list[object]:
            return list(range(len(messages)))  # a broker that answers with offsets

    topic = Offsets("orders", order_topic().codec)
    write(store, topic, OrderPlaced(1, "ann"))
    relay = Relay(store)
    relay.register_topic(topic)
    assert relay.process_messages().successes == 1
    assert store.backlog() == []


def test_an_unpublishable_message_under_block_is_held_not_parked() -> None:
    store = InMemoryStore()
    topic = order_topic(fail=lambda m: UnpublishableError("schema rejected"))
    write(store, topic, OrderPlaced(1, "ann"))
    relay = Relay(store)
    relay.register_topic(topic, poison="block")
    assert relay.process_messages().dead == 1
    [dead] = store.dead_letters()
    assert (dead.state, dead.message.attempts) == ("blocked", 1)


def test_a_batch_that_makes_no_progress_does_not_spin() -> None:
    class Counting(InMemoryStore):
        checkouts = 0

        def checkout_batch(self, topic_names: Sequence[str], limit: int) -> InMemoryBatch | None:
            self.checkouts += 1
            return super().checkout_batch(topic_names, limit)

    store = Counting()
    topic = order_topic(fail=lambda m: NotAttempted("circuit open"))
    write(store, topic, *[OrderPlaced(i, "ann") for i in range(20)])
    relay = Relay(store, poll_interval=0.1, poll_jitter=0)
    relay.register_topic(topic)
    thread = threading.Thread(target=relay.poll_for_messages, args=(10,))
    thread.start()
    time.sleep(0.35)
    assert relay.stop(timeout=5)
    thread.join(5)
    assert store.checkouts <= 6  # about one per poll interval, not thousands


def test_full_batches_are_followed_at_once_without_waiting_the_interval() -> None:
    store = InMemoryStore()
    topic = order_topic()
    write(store, topic, *[OrderPlaced(i, f"c{i % 3}") for i in range(500)])
    relay = Relay(store, poll_interval=60.0)
    relay.register_topic(topic)
    thread = threading.Thread(target=relay.poll_for_messages, args=(10,))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while len(topic.published) < 500 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(topic.published) == 500
    finally:
        relay.stop(drain=False, timeout=5)
        thread.join(5)


def test_limits_must_be_positive() -> None:
    relay = Relay(InMemoryStore())
    relay.register_topic(order_topic())
    with pytest.raises(ConfigurationError, match="limit must be a positive int, not 0"):
        relay.process_messages(0)


# -- the asyncio face ----------------------------------------------------------------------------


def test_async_a_hung_sync_topic_does_not_freeze_the_relay_or_the_loop() -> None:
    async def scenario() -> None:
        store = InMemoryStore()
        slow, fast = IgnoresTimeout("slow"), order_topic("fast")
        write(store, slow, OrderPlaced(1, "ann"))
        relay = AsyncRelay(store, publish_timeout=0.05)
        relay.register_topic(slow, retry=RetryPolicy(max_attempts=100, initial_delay=0.001))
        relay.register_topic(fast)
        try:
            for round_ in range(12):  # more rounds than the loop's default executor has threads
                write(store, fast, OrderPlaced(100 + round_, "bob"))
                await asyncio.wait_for(relay.process_messages(), 5)
                await asyncio.wait_for(asyncio.to_thread(lambda: None), 5)  # the app's threads
                await asyncio.sleep(0.01)  # the slow message is due for a retry again
            assert len(fast.published) == 12
            assert slow.calls == 1
        finally:
            slow.release.set()

    asyncio.run(scenario())


def test_async_topics_of_one_batch_are_published_concurrently() -> None:
    async def scenario() -> None:
        store = InMemoryStore()
        topics = [order_topic(name, delay=0.2) for name in ("t1", "t2", "t3")]
        for topic in topics:
            write(store, topic, OrderPlaced(1, "ann"))
        relay = AsyncRelay(store)
        for topic in topics:
            relay.register_topic(topic)
        started = time.monotonic()
        assert (await relay.process_messages()).successes == 3
        assert time.monotonic() - started < 0.5  # three 0.2 s publishes side by side

    asyncio.run(scenario())


def test_async_cancelling_the_poll_task_releases_its_batch() -> None:
    class Stuck(InMemoryTopic[OrderPlaced]):
        async def publish_batch_async(
            self, messages: Sequence[PersistedMessage], *, timeout: float
        ) -> list[PublishOutcome]:
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

    async def scenario() -> None:
        store = InMemoryStore(lease_duration=3600)
        topic = Stuck("orders", order_topic().codec)
        write(store, topic, OrderPlaced(1, "ann"))
        relay = AsyncRelay(store, publish_timeout=600)
        relay.register_topic(topic)
        task = asyncio.create_task(relay.poll_for_messages(10))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        batch = store.checkout_batch(["orders"], 10)  # not held for the hour-long lease
        assert batch is not None
        assert [m.attempts for m in batch.messages] == [0]
        batch.close()

    asyncio.run(scenario())


def test_async_stop_right_after_creating_the_task_waits_for_the_drain() -> None:
    async def scenario() -> None:
        store = InMemoryStore()
        topic = order_topic()
        write(store, topic, *[OrderPlaced(i, "ann") for i in range(100)])
        relay = AsyncRelay(store, poll_interval=60)
        relay.register_topic(topic)
        task = asyncio.create_task(relay.poll_for_messages(10))
        assert await relay.stop(drain=True, timeout=10)
        assert len(topic.published) == 100
        await task

    asyncio.run(scenario())


def test_async_a_wake_up_does_not_leave_the_relay_busy_polling() -> None:
    class Counting(InMemoryStore):
        checkouts = 0

        def checkout_batch(self, topic_names: Sequence[str], limit: int) -> InMemoryBatch | None:
            self.checkouts += 1
            return super().checkout_batch(topic_names, limit)

    async def scenario() -> None:
        store = Counting()
        topic = order_topic()
        relay = AsyncRelay(store, poll_interval=60)
        relay.register_topic(topic)
        task = asyncio.create_task(relay.poll_for_messages(10))
        await asyncio.sleep(0.05)
        write(store, topic, OrderPlaced(1, "ann"))
        await asyncio.sleep(0.5)
        assert len(topic.published) == 1
        assert store.checkouts < 15  # the wake-up and its short re-checks, then idle
        await relay.stop(timeout=5)
        await task

    asyncio.run(scenario())


class CommitsDuringAnEmptyCheckout(InMemoryStore):
    """A store whose ``during_checkout`` hook runs once, right after a checkout found nothing:
    what it commits and asks there lands after the round's look at the outbox."""

    during_checkout: list[object]

    def __init__(self) -> None:
        super().__init__()
        self.during_checkout = []

    def checkout_batch(self, topic_names: Sequence[str], limit: int) -> InMemoryBatch | None:
        batch = super().checkout_batch(topic_names, limit)
        if batch is None and self.during_checkout:
            hook = self.during_checkout.pop()
            assert callable(hook)
            hook()
        return batch


def test_stop_with_drain_publishes_what_committed_while_an_empty_checkout_was_running() -> None:
    # The round in flight when stop(drain=True) is asked may have looked at the outbox before
    # the last commit: its finding nothing does not mean the outbox is drained.
    store = CommitsDuringAnEmptyCheckout()
    topic = order_topic()
    relay = Relay(store, poll_interval=60.0)
    relay.register_topic(topic)
    stopped: list[bool] = []
    asker = threading.Thread(target=lambda: stopped.append(relay.stop(drain=True, timeout=10)))

    def commit_then_stop() -> None:
        write(store, topic, *[OrderPlaced(i, f"c{i % 4}") for i in range(40)])
        asker.start()
        time.sleep(0.2)  # the request is made before this round's result is looked at

    store.during_checkout.append(commit_then_stop)
    poller = threading.Thread(target=relay.poll_for_messages, args=(10,))
    poller.start()
    poller.join(15)
    asker.join(15)
    assert not poller.is_alive()
    assert stopped == [True]
    assert sorted(m.order_id for m in topic.messages()) == list(range(40))


def test_async_stop_with_drain_publishes_what_committed_while_an_empty_checkout_was_running() -> (
    None
):
    async def scenario() -> None:
        store = CommitsDuringAnEmptyCheckout()
        topic = order_topic()
        relay = AsyncRelay(store, poll_interval=60.0)  # a sync store: checkouts in a thread
        relay.register_topic(topic)
        loop = asyncio.get_running_loop()
        stopping: list[concurrent.futures.Future[bool]] = []

        def commit_then_stop() -> None:
            write(store, topic, *[OrderPlaced(i, f"c{i % 4}") for i in range(40)])
            stop = relay.stop(drain=True, timeout=10)
            stopping.append(asyncio.run_coroutine_threadsafe(stop, loop))
            time.sleep(0.2)  # the loop runs stop() up to its wait meanwhile

        store.during_checkout.append(commit_then_stop)
        await asyncio.wait_for(relay.poll_for_messages(10), 15)
        [stop] = stopping
        assert await asyncio.wrap_future(stop) is True
        assert sorted(m.order_id for m in topic.messages()) == list(range(40))

    asyncio.run(scenario())
