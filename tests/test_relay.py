"""The relay's guarantees, on the SQLite store (real database file) and in memory.

Each test name says which guarantee of SPEC.md section 3 it holds up.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import pytest

from outboxbind import (
    BytesCodec,
    ConfigurationError,
    LeaseLost,
    MessageBatch,
    PersistedMessage,
    Relay,
    RetryPolicy,
    TopicAlreadyRegistered,
    UnpublishableError,
    bind,
)
from outboxbind.stores.memory import InMemoryStore
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.testing import FakeClock
from outboxbind.topics.memory import InMemoryTopic

from support import OrderPlaced, order_topic

FAST_RETRY = RetryPolicy(max_attempts=3, initial_delay=1.0, jitter=0.0)


def place(
    conn: sqlite3.Connection, topic: InMemoryTopic[OrderPlaced], *orders: OrderPlaced
) -> list[str]:
    """Insert the orders and publish their events in one committed transaction."""
    with conn:
        ids = []
        for order in orders:
            conn.execute(
                "INSERT INTO orders (id, customer) VALUES (?, ?)", (order.order_id, order.customer)
            )
            ids.append(bind(topic, persister(conn)).publish(order))
        return ids


def orders(*spec: tuple[int, str]) -> list[OrderPlaced]:
    return [OrderPlaced(order_id, customer) for order_id, customer in spec]


def drain(relay: Relay, clock: FakeClock | None = None, rounds: int = 50) -> None:
    """Run rounds (moving the clock past retry delays) until nothing is left to do."""
    for _ in range(rounds):
        result = relay.process_messages(100)
        if result.checked_out == 0:
            if clock is None:
                return
            clock.advance(10)
            if relay.process_messages(100).checked_out == 0:
                return


def per_key(topic: InMemoryTopic[OrderPlaced]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for message in topic.messages():
        seen.setdefault(message.customer, []).append(message.order_id)
    return seen


class FailOn:
    """Failure injection: fail the given order ids, ``times`` times each."""

    def __init__(
        self, order_ids: Sequence[int], times: int = 1, error: type[Exception] = ConnectionError
    ) -> None:
        self.remaining = dict.fromkeys(order_ids, times)
        self.error = error

    def __call__(self, message: PersistedMessage) -> Exception | None:
        order_id = OrderPlaced(**__import__("json").loads(message.data)).order_id
        if self.remaining.get(order_id, 0) > 0:
            self.remaining[order_id] -= 1
            return self.error(f"destination refused order {order_id}")
        return None


# -- guarantee 1: atomic ----------------------------------------------------------------------


def test_atomic_a_rolled_back_transaction_publishes_nothing(
    conn: sqlite3.Connection, store: SQLiteStore
) -> None:
    topic = order_topic()

    def checkout_that_fails() -> None:
        with conn:
            conn.execute("INSERT INTO orders (id, customer) VALUES (1, 'ann')")
            bind(topic, persister(conn)).publish(OrderPlaced(1, "ann"))
            raise RuntimeError("payment declined")

    with pytest.raises(RuntimeError, match="payment declined"):
        checkout_that_fails()
    place(conn, topic, OrderPlaced(2, "bob"))
    relay = Relay(store)
    relay.register_topic(topic)
    drain(relay)
    assert [m.order_id for m in topic.messages()] == [2]
    assert conn.execute("SELECT id FROM orders").fetchall() == [(2,)]


def test_atomic_nothing_is_published_before_commit(
    conn: sqlite3.Connection, store: SQLiteStore
) -> None:
    topic = order_topic()
    relay = Relay(store)
    relay.register_topic(topic)
    conn.execute("INSERT INTO orders (id, customer) VALUES (1, 'ann')")
    bind(topic, persister(conn)).publish(OrderPlaced(1, "ann"))
    before_commit = relay.process_messages()  # written, not committed
    assert (before_commit.checked_out, before_commit.store_error) == (0, None)
    conn.commit()
    assert relay.process_messages().successes == 1


# -- guarantee 3: order -----------------------------------------------------------------------


def test_order_per_topic_holds_across_a_failure_mid_batch(
    conn: sqlite3.Connection, store: SQLiteStore, clock: FakeClock
) -> None:
    topic: InMemoryTopic[bytes] = InMemoryTopic("audit", BytesCodec(), fail=None)
    failures = {b"3": 1}

    def fail(message: PersistedMessage) -> Exception | None:
        if failures.get(message.data, 0):
            failures[message.data] -= 1
            return ConnectionError("broker hiccup")
        return None

    topic.fail = fail
    with conn:
        for i in range(1, 7):
            bind(topic, persister(conn)).publish(str(i).encode())
    relay = Relay(store)
    relay.register_topic(topic, retry=FAST_RETRY)
    first = relay.process_messages(100)
    assert (first.successes, first.errors, first.checked_out) == (2, 1, 6)
    assert relay.process_messages(100).checked_out == 0  # 3 waits, and 4..6 wait behind it
    clock.advance(2)
    assert relay.process_messages(100).successes == 4
    assert topic.messages() == [b"1", b"2", b"3", b"4", b"5", b"6"]


def test_order_per_ordering_key_with_other_keys_unaffected_by_a_failure(
    conn: sqlite3.Connection, store: SQLiteStore, clock: FakeClock
) -> None:
    topic = order_topic(fail=FailOn([2], times=2))
    place(conn, topic, *orders((1, "ann"), (2, "ann"), (3, "bob"), (4, "ann"), (5, "bob")))
    relay = Relay(store)
    relay.register_topic(topic, retry=FAST_RETRY)
    relay.process_messages()
    assert per_key(topic) == {"ann": [1], "bob": [3, 5]}
    drain(relay, clock)
    assert per_key(topic) == {"ann": [1, 2, 4], "bob": [3, 5]}


def test_order_messages_of_one_transaction_keep_their_write_order(
    conn: sqlite3.Connection, store: SQLiteStore
) -> None:
    topic = order_topic()
    place(conn, topic, *orders(*[(i, "ann") for i in range(1, 21)]))
    relay = Relay(store)
    relay.register_topic(topic)
    relay.process_messages(7)
    relay.process_messages(7)
    relay.process_messages(7)
    assert per_key(topic) == {"ann": list(range(1, 21))}


def test_order_a_blocked_poison_message_holds_only_its_key(
    conn: sqlite3.Connection, store: SQLiteStore, clock: FakeClock
) -> None:
    topic = order_topic(fail=FailOn([2], times=99))
    place(conn, topic, *orders((1, "ann"), (2, "ann"), (3, "ann"), (4, "bob")))
    relay = Relay(store)
    relay.register_topic(topic, retry=FAST_RETRY, poison="block")
    drain(relay, clock)
    place(conn, topic, OrderPlaced(5, "bob"), OrderPlaced(6, "ann"))
    drain(relay, clock)
    assert per_key(topic) == {"ann": [1], "bob": [4, 5]}
    [dead] = store.dead_letters()
    assert (dead.state, dead.message.attempts) == ("blocked", 3)
    assert "destination refused order 2" in dead.error
    assert relay.totals["dead"] == 1

    topic.fail = None  # the destination is fixed; the operator replays
    assert store.replay_dead_letters([dead.message.id]) == 1
    drain(relay, clock)
    assert per_key(topic) == {"ann": [1, 2, 3, 6], "bob": [4, 5]}


def test_order_a_parked_poison_message_lets_its_key_go_on(
    conn: sqlite3.Connection, store: SQLiteStore, clock: FakeClock
) -> None:
    topic = order_topic(fail=FailOn([2], times=99))
    place(conn, topic, *orders((1, "ann"), (2, "ann"), (3, "ann"), (4, "bob")))
    relay = Relay(store)
    relay.register_topic(topic, retry=FAST_RETRY, poison="park")
    drain(relay, clock)
    assert per_key(topic) == {"ann": [1, 3], "bob": [4]}
    [dead] = store.dead_letters("orders")
    assert (dead.state, dead.message.attempts, dead.message.ordering_key) == ("parked", 3, "ann")
    assert store.backlog()[0].dead == 1


def test_unpublishable_messages_skip_the_retries(
    conn: sqlite3.Connection, store: SQLiteStore
) -> None:
    topic = order_topic(fail=FailOn([1], times=99, error=UnpublishableError))
    place(conn, topic, OrderPlaced(1, "ann"), OrderPlaced(2, "ann"))
    relay = Relay(store)
    relay.register_topic(topic, retry=RetryPolicy(max_attempts=10), poison="park")
    result = relay.process_messages()
    assert (result.errors, result.dead) == (1, 1)
    relay.process_messages()
    assert per_key(topic) == {"ann": [2]}
    assert store.dead_letters()[0].message.attempts == 1


def test_retries_back_off_exponentially(
    conn: sqlite3.Connection, store: SQLiteStore, clock: FakeClock
) -> None:
    topic = order_topic(fail=FailOn([1], times=3))
    place(conn, topic, OrderPlaced(1, "ann"))
    relay = Relay(store)
    relay.register_topic(topic, retry=RetryPolicy(max_attempts=5, initial_delay=10, jitter=0.0))
    attempted_at = []
    for second in range(100):
        result = relay.process_messages()
        if result.checked_out:
            attempted_at.append(second)
        if result.successes:
            break
        clock.advance(1)
    assert attempted_at == [0, 10, 30, 70]  # waits of 10 s, 20 s, 40 s after attempts 1, 2, 3
    assert [m.order_id for m in topic.messages()] == [1]


def test_jitter_spreads_retry_delays() -> None:
    policy = RetryPolicy(initial_delay=10, multiplier=2, max_delay=60, jitter=0.5)
    assert policy.delay(1, lambda: 0.0) == 5.0
    assert policy.delay(1, lambda: 0.999) == pytest.approx(14.99)
    assert policy.delay(3, lambda: 0.5) == 40.0
    assert policy.delay(30, lambda: 0.5) == 60.0
    with pytest.raises(ConfigurationError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ConfigurationError, match="jitter"):
        RetryPolicy(jitter=1.5)


# -- delayed delivery --------------------------------------------------------------------------


def test_deliver_after_holds_a_message_back_until_due(
    conn: sqlite3.Connection, store: SQLiteStore, clock: FakeClock
) -> None:
    topic = order_topic()
    with conn:
        bind(topic, persister(conn)).publish(
            OrderPlaced(1, "ann"), deliver_after=timedelta(minutes=5)
        )
        bind(topic, persister(conn)).publish(OrderPlaced(2, "bob"))
    relay = Relay(store)
    relay.register_topic(topic)
    drain(relay)
    assert [m.order_id for m in topic.messages()] == [2]
    clock.advance(299)
    drain(relay)
    assert [m.order_id for m in topic.messages()] == [2]
    clock.advance(2)
    drain(relay)
    assert [m.order_id for m in topic.messages()] == [2, 1]


# -- guarantee 7: stable identity, guarantee 8: payload fidelity ------------------------------


class AckLostBatch:
    """A batch whose acks never reach the database: the relay crashed before closing it."""

    def __init__(self, batch: MessageBatch) -> None:
        self.batch = batch

    @property
    def messages(self) -> Sequence[PersistedMessage]:
        return self.batch.messages

    def mark_published(self, message: PersistedMessage, publish_id: str) -> None:
        pass

    def mark_failed(
        self, message: PersistedMessage, error: str, retry_after: timedelta | None
    ) -> None:
        pass

    def mark_dead(self, message: PersistedMessage, error: str) -> None:
        pass

    def close(self) -> None:
        self.batch.close()  # releases the messages, unacknowledged
        raise OSError("connection lost while acknowledging")

    def __enter__(self) -> AckLostBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FlakyClose:
    """A store whose first ``failures`` batches lose their acks."""

    def __init__(self, store: SQLiteStore, failures: int) -> None:
        self.store = store
        self.failures = failures

    def checkout_batch(self, topic_names: Sequence[str], limit: int) -> MessageBatch | None:
        batch = self.store.checkout_batch(topic_names, limit)
        if batch is None or self.failures == 0:
            return batch
        self.failures -= 1
        return AckLostBatch(batch)


def test_identity_a_redelivered_message_carries_the_same_outbox_id(
    conn: sqlite3.Connection, store: SQLiteStore
) -> None:
    topic = order_topic()
    ids = place(conn, topic, OrderPlaced(1, "ann"), OrderPlaced(2, "ann"))
    relay = Relay(FlakyClose(store, failures=1))
    relay.register_topic(topic)
    first = relay.process_messages()
    assert isinstance(first.store_error, OSError)
    relay.process_messages()
    received = [(p.outbox_id, p.attributes["outbox-id"]) for p in topic.published]
    assert received == [(ids[0], ids[0]), (ids[1], ids[1])] * 2
    assert relay.process_messages().checked_out == 0


def test_fidelity_the_codecs_bytes_are_the_bytes_published(
    conn: sqlite3.Connection, store: SQLiteStore
) -> None:
    topic: InMemoryTopic[bytes] = InMemoryTopic("blobs", BytesCodec())
    payload = b"\x00\xff NUL \x00 and invalid UTF-8 \xc3\x28" + bytes(range(256))
    with conn:
        bind(topic, persister(conn)).publish(payload, attributes={"kind": "binary"})
    relay = Relay(store)
    relay.register_topic(topic)
    relay.process_messages()
    [received] = topic.published
    assert received.data == payload
    assert received.attributes["kind"] == "binary"


# -- guarantee 10: no starvation, and the publish timeout --------------------------------------


def test_a_slow_topic_times_out_and_others_still_flow(
    conn: sqlite3.Connection, store: SQLiteStore, clock: FakeClock
) -> None:
    slow = order_topic("slow", delay=5.0)
    fast = order_topic("fast")
    with conn:
        bind(slow, persister(conn)).publish(OrderPlaced(1, "ann"))
        bind(fast, persister(conn)).publish(OrderPlaced(2, "bob"))
    relay = Relay(store, publish_timeout=0.2)
    relay.register_topic(slow, retry=FAST_RETRY)
    relay.register_topic(fast)
    started = time.monotonic()
    result = relay.process_messages()
    assert time.monotonic() - started < 2.0
    assert (result.successes, result.errors) == (1, 1)
    assert [m.order_id for m in fast.messages()] == [2]
    assert [(b.topic, b.pending) for b in store.backlog()] == [("slow", 1)]
    assert store.dead_letters() == []


class HungTopic(InMemoryTopic[OrderPlaced]):
    """A destination that never answers and ignores the timeout it is given."""

    def __init__(self, name: str, release: threading.Event) -> None:
        super().__init__(name, order_topic().codec)
        self.release = release

    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[str | BaseException]:
        self.release.wait(30)
        return [TimeoutError("gave up")] * len(messages)


def test_hung_topics_share_one_publish_deadline(
    conn: sqlite3.Connection, store: SQLiteStore
) -> None:
    release = threading.Event()
    topics = [HungTopic(name, release) for name in ("t1", "t2", "t3", "t4")]
    with conn:
        for topic in topics:
            bind(topic, persister(conn)).publish(OrderPlaced(1, "ann"))
    relay = Relay(store, publish_timeout=0.3)
    for topic in topics:
        relay.register_topic(topic)
    try:
        started = time.monotonic()
        result = relay.process_messages()
        elapsed = time.monotonic() - started
    finally:
        release.set()
    assert result.errors == 4
    assert elapsed < 0.3 + 0.03 + 0.5  # one deadline, not four in a row


def test_many_keys_share_a_batch_fairly(conn: sqlite3.Connection, store: SQLiteStore) -> None:
    topic = order_topic()
    place(conn, topic, *orders(*[(i, "whale") for i in range(1, 201)]))
    place(conn, topic, OrderPlaced(1000, "minnow"))
    relay = Relay(store)
    relay.register_topic(topic)
    relay.process_messages(50)
    relay.process_messages(50)
    assert per_key(topic)["minnow"] == [1000]


# -- registration and configuration ----------------------------------------------------------


def test_registering_a_topic_name_twice_is_a_clear_error(store: SQLiteStore) -> None:
    relay = Relay(store)
    relay.register_topic(order_topic("orders"))
    with pytest.raises(TopicAlreadyRegistered, match="'orders' is already registered"):
        relay.register_topic(order_topic("orders"))


def test_bad_relay_settings_are_refused(store: SQLiteStore) -> None:
    with pytest.raises(ConfigurationError, match="publish_timeout"):
        Relay(store, publish_timeout=0)
    with pytest.raises(
        ConfigurationError, match=r"must be at most half the store's lease_duration"
    ):
        Relay(store, publish_timeout=store.lease_duration)
    relay = Relay(store)
    with pytest.raises(ConfigurationError, match="register at least one topic"):
        relay.process_messages()
    relay.register_topic(order_topic())
    with pytest.raises(ConfigurationError, match="batch_size"):
        relay.poll_for_messages(0)
    with pytest.raises(ConfigurationError, match="poison"):
        relay.register_topic(order_topic("x"), poison="drop")  # type: ignore[arg-type]


# -- the poll loop -----------------------------------------------------------------------------


def run_in_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.005)


def test_poll_wakes_up_on_commit_instead_of_waiting_the_interval(
    conn: sqlite3.Connection, store: SQLiteStore
) -> None:
    topic = order_topic()
    relay = Relay(store, poll_interval=60.0)
    relay.register_topic(topic)
    thread = run_in_thread(lambda: relay.poll_for_messages(100))
    try:
        time.sleep(0.1)  # the relay has polled once and sleeps for a minute
        place(conn, topic, OrderPlaced(1, "ann"))
        wait_for(lambda: len(topic.published) == 1, timeout=5.0)
    finally:
        assert relay.stop(timeout=5)
        thread.join(5)


def test_stop_with_drain_publishes_everything_due_first(
    conn: sqlite3.Connection, store: SQLiteStore
) -> None:
    topic = order_topic()
    place(conn, topic, *orders(*[(i, f"c{i % 7}") for i in range(1, 501)]))
    relay = Relay(store, poll_interval=60.0)
    relay.register_topic(topic)
    relay.stop(drain=True, timeout=10)  # asked before the loop started: it drains and returns
    relay.poll_for_messages(10)
    assert len(topic.published) == 500
    assert all(ids == sorted(ids) for ids in per_key(topic).values())


def test_stop_without_drain_returns_promptly(conn: sqlite3.Connection, store: SQLiteStore) -> None:
    topic = order_topic(delay=0.05)
    place(conn, topic, *orders(*[(i, "ann") for i in range(1, 101)]))
    relay = Relay(store, poll_interval=60.0)
    relay.register_topic(topic)
    thread = run_in_thread(lambda: relay.poll_for_messages(5))
    wait_for(lambda: len(topic.published) >= 5)
    assert relay.stop(drain=False, timeout=5)
    thread.join(5)
    assert not thread.is_alive()
    assert 5 <= len(topic.published) < 100


def test_a_relay_polls_once_at_a_time(store: SQLiteStore) -> None:
    relay = Relay(store, poll_interval=60.0)
    relay.register_topic(order_topic())
    thread = run_in_thread(lambda: relay.poll_for_messages(10))
    try:
        time.sleep(0.05)
        with pytest.raises(RuntimeError, match="already polling"):
            relay.poll_for_messages(10)
    finally:
        relay.stop(timeout=5)
        thread.join(5)


class BrokenStore:
    """A store that is down: every checkout fails."""

    def __init__(self) -> None:
        self.calls = 0

    def checkout_batch(self, topic_names: Sequence[str], limit: int) -> MessageBatch | None:
        self.calls += 1
        raise sqlite3.OperationalError("database is locked")


def test_store_errors_are_reported_and_backed_off() -> None:
    store = BrokenStore()
    relay = Relay(store, poll_interval=0.01, max_store_backoff=0.05)
    relay.register_topic(order_topic())
    result = relay.process_messages()
    assert isinstance(result.store_error, sqlite3.OperationalError)
    thread = run_in_thread(lambda: relay.poll_for_messages(10))
    time.sleep(0.3)
    relay.stop(timeout=5)
    thread.join(5)
    assert 3 <= store.calls < 100  # backs off instead of spinning
    assert relay.totals["store_errors"] == store.calls


def test_a_lease_lost_mid_batch_is_reported_and_nothing_is_acked(
    conn: sqlite3.Connection, db_path: Any, clock: FakeClock
) -> None:
    topic = order_topic()
    place(conn, topic, OrderPlaced(1, "ann"))
    slow_store = SQLiteStore(db_path, clock=clock, lease_duration=1)
    other = SQLiteStore(db_path, clock=clock, lease_duration=1)

    class TakeOverDuringPublish(InMemoryTopic[OrderPlaced]):
        def publish_batch(
            self, messages: Sequence[PersistedMessage], *, timeout: float
        ) -> list[str | BaseException]:
            clock.advance(5)  # the lease expires while publishing ...
            assert other.checkout_batch(["orders"], 10) is not None  # ... and is taken over
            return super().publish_batch(messages, timeout=timeout)

    relay = Relay(slow_store, publish_timeout=0.5)
    relay.register_topic(TakeOverDuringPublish("orders", topic.codec))
    result = relay.process_messages()
    assert isinstance(result.store_error, LeaseLost)
    assert slow_store.backlog()[0].pending == 1  # still there for the new owner


# -- the in-memory store drives the same relay -------------------------------------------------


def test_the_in_memory_store_runs_the_same_relay() -> None:
    store = InMemoryStore()
    topic = order_topic()
    with store.transaction() as tx:
        bind(topic, tx).publish(OrderPlaced(1, "ann"))

    def rolled_back() -> None:
        with store.transaction() as tx:
            bind(topic, tx).publish(OrderPlaced(2, "ann"))
            raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        rolled_back()
    relay = Relay(store)
    relay.register_topic(topic)
    assert relay.process_messages().successes == 1
    assert [m.order_id for m in topic.messages()] == [1]


def test_poll_wakes_up_when_a_long_transaction_commits(
    conn: sqlite3.Connection, store: SQLiteStore
) -> None:
    topic = order_topic()
    relay = Relay(store, poll_interval=60.0)
    relay.register_topic(topic)
    thread = run_in_thread(lambda: relay.poll_for_messages(100))
    try:
        time.sleep(0.1)
        conn.execute("INSERT INTO orders (id, customer) VALUES (1, 'ann')")
        bind(topic, persister(conn)).publish(OrderPlaced(1, "ann"))  # signals, not yet committed
        time.sleep(0.5)  # the transaction goes on well past the relay's short re-checks
        assert topic.published == []
        conn.commit()
        committed = time.monotonic()
        wait_for(lambda: len(topic.published) == 1, timeout=5.0)
        assert time.monotonic() - committed < 1.0  # woken by the commit, not the 60 s poll
    finally:
        assert relay.stop(timeout=5)
        thread.join(5)


def test_an_unreadable_row_is_parked_and_blocks_nothing(
    conn: sqlite3.Connection, store: SQLiteStore
) -> None:
    topic = order_topic()
    with conn:  # a row written by hand, with its payload as TEXT instead of a BLOB
        conn.execute(
            "INSERT INTO outbox (topic, data, created_at, available_at) VALUES (?, ?, ?, ?)",
            ("orders", "not bytes", time.time(), time.time()),
        )
    place(conn, topic, OrderPlaced(1, "ann"), OrderPlaced(2, "bob"))
    relay = Relay(store)
    relay.register_topic(topic)
    drain(relay)
    assert sorted(m.order_id for m in topic.messages()) == [1, 2]
    [dead] = store.dead_letters()
    assert dead.state == "parked"
    assert f"unreadable outbox row {dead.message.id} in 'outbox'" in dead.error
    assert "data is str, not a BLOB" in dead.error
