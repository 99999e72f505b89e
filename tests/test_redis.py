"""The Redis store, persister and Streams topic against a real Redis (nothing mocked)."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any, cast

import pytest
import redis
import redis.asyncio

from outboxbind import AsyncBoundTopic, AsyncRelay, PersistedMessage, Relay, bind
from outboxbind.codecs import JsonCodec
from outboxbind.errors import (
    EncodeError,
    InvalidOrderingKey,
    MessageTooLarge,
    NotAttempted,
    NotInTransaction,
)
from outboxbind.stores.redis import (
    AsyncRedisStore,
    RedisStore,
    append_call_args,
    outbox_append_lua,
    persister,
    wakeup_channel,
)
from outboxbind.topics.memory import InMemoryTopic
from outboxbind.topics.redis_streams import RedisStreamTopic

from support import OrderPlaced, order_topic

HOSTILE_TOPICS = ["a:b", "{orders}", "*", "with space", "q:x:y", "é/ü\n\t", "]\\[?", "a:b:"]
HOSTILE_KEYS = [None, ":", "{k}", "*?", "key with spaces", "a:b", "", "ü:{}"]


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def store(client: redis.Redis, redis_prefix: str) -> RedisStore:
    return RedisStore(client, prefix=redis_prefix, lease_duration=10)


def outbox_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    return sorted(client.scan_iter(match=f"{prefix}:*", count=1000))


class Wakeups:
    """A Pub/Sub subscriber of the outbox's wake-up channel."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(wakeup_channel(prefix))

    def received(self, wait: float) -> int:
        count = 0
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.pubsub.get_message(timeout=0.05) is not None:
                count += 1
        return count

    def close(self) -> None:
        self.pubsub.close()


# -- the persister in MULTI/EXEC -----------------------------------------------------------------


def test_an_executed_transaction_writes_both_and_wakes_relays(
    client: redis.Redis, redis_prefix: str, store: RedisStore
) -> None:
    topic = order_topic()
    wakeups = Wakeups(client, redis_prefix)
    try:
        with client.pipeline(transaction=True) as pipe:
            pipe.hset(f"{redis_prefix}:app:order:1", mapping={"customer": "ann"})
            outbox_id = bind(topic, persister(pipe, prefix=redis_prefix)).publish(
                OrderPlaced(1, "ann")
            )
            assert store.checkout_batch(["orders"], 10) is None  # queued, not yet run
            pipe.execute()
        assert wakeups.received(0.3) == 1
    finally:
        wakeups.close()
    assert client.hget(f"{redis_prefix}:app:order:1", "customer") == b"ann"
    batch = store.checkout_batch(["orders"], 10)
    assert batch is not None
    [message] = batch.messages
    assert (message.id, message.ordering_key) == (outbox_id, "ann")
    assert topic.codec.decode(message.data) == OrderPlaced(1, "ann")
    batch.close()


def test_a_discarded_transaction_writes_nothing_and_wakes_nothing(
    client: redis.Redis, redis_prefix: str, store: RedisStore
) -> None:
    topic = order_topic()
    wakeups = Wakeups(client, redis_prefix)
    try:
        with client.pipeline(transaction=True) as pipe:
            pipe.set(f"{redis_prefix}:app:order:2", "placed")
            bind(topic, persister(pipe, prefix=redis_prefix)).publish(OrderPlaced(2, "bob"))
            pipe.reset()  # DISCARD

        def give_up() -> None:
            with client.pipeline(transaction=True) as pipe:
                bind(topic, persister(pipe, prefix=redis_prefix)).publish(OrderPlaced(3, "bob"))
                raise RuntimeError("the application gives up before execute()")

        with pytest.raises(RuntimeError):
            give_up()
        assert wakeups.received(0.3) == 0
    finally:
        wakeups.close()
    assert outbox_keys(client, redis_prefix) == []
    assert store.checkout_batch(["orders"], 10) is None


def test_a_watched_key_that_changed_aborts_the_message_too(
    client: redis.Redis, redis_prefix: str, store: RedisStore
) -> None:
    topic = order_topic()
    stock = f"{redis_prefix}:app:stock"
    client.set(stock, 5)
    with client.pipeline(transaction=True) as pipe:
        cast(Any, pipe).watch(stock)
        assert int(pipe.get(stock) or 0) == 5
        with pytest.raises(NotInTransaction, match=r"multi\(\)"):
            bind(topic, persister(pipe, prefix=redis_prefix)).publish(OrderPlaced(4, "cy"))
        pipe.multi()
        pipe.decr(stock)
        bind(topic, persister(pipe, prefix=redis_prefix)).publish(OrderPlaced(4, "cy"))
        client.set(stock, 4)  # another client changes the watched key
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert client.get(stock) == b"4"
    assert store.checkout_batch(["orders"], 10) is None


def test_a_pipeline_that_is_not_a_transaction_is_refused(
    client: redis.Redis, redis_prefix: str
) -> None:
    topic = order_topic()
    with client.pipeline(transaction=False) as pipe:
        with pytest.raises(NotInTransaction, match=r"pipeline\(transaction=True\)"):
            bind(topic, persister(pipe, prefix=redis_prefix)).publish(OrderPlaced(5, "di"))
        assert len(pipe) == 0
    with pytest.raises(TypeError, match="not the client"):
        persister(client)  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="redis-py pipeline"):
        persister(object())  # type: ignore[call-overload]


def test_bad_input_gets_a_clear_error_and_leaves_the_pipeline_usable(
    client: redis.Redis, redis_prefix: str, store: RedisStore
) -> None:
    topic = InMemoryTopic(
        "orders",
        JsonCodec(OrderPlaced),
        ordering_key=lambda m: m.customer if m.customer != "bad" else "\x00",
        max_message_bytes=200,
    )
    with client.pipeline(transaction=True) as pipe:
        pipe.set(f"{redis_prefix}:app:order:7", "placed")
        bound = bind(topic, persister(pipe, prefix=redis_prefix))
        with pytest.raises(EncodeError, match="cannot encode"):
            bound.publish(object())  # type: ignore[arg-type]
        with pytest.raises(MessageTooLarge, match="over the topic's limit of 200 bytes"):
            bound.publish(OrderPlaced(7, "ann", note="x" * 500))
        with pytest.raises(InvalidOrderingKey, match="contains NUL"):
            bound.publish(OrderPlaced(7, "bad"))
        assert len(pipe) == 1  # only the application's own command is queued
        good = bound.publish(OrderPlaced(7, "ann"))
        results = pipe.execute()
    assert results[0] is True
    assert client.get(f"{redis_prefix}:app:order:7") == b"placed"
    with store.checkout_batch(["orders"], 10) as batch:  # type: ignore[union-attr]
        assert [m.id for m in batch.messages] == [good]


def test_the_lua_path_writes_data_and_message_all_or_nothing(
    client: redis.Redis, redis_prefix: str, store: RedisStore
) -> None:
    topic = order_topic()
    order = f"{redis_prefix}:app:order:8"
    client.hset(order, "status", "paid")
    source = (
        outbox_append_lua()
        + """
        if redis.call('HGET', KEYS[1], 'status') ~= ARGV[11] then
            return redis.error_reply('stale order')
        end
        outbox_append()
        redis.call('HSET', KEYS[1], 'status', ARGV[12])
        return 1
        """
    )
    stale_id, args = append_call_args(topic.make_entry(OrderPlaced(8, "ann")), prefix=redis_prefix)
    with pytest.raises(redis.ResponseError, match="stale order"):
        client.eval(source, 1, order, *args, "placed", "shipped")
    assert store.checkout_batch(["orders"], 10) is None
    outbox_id, args = append_call_args(topic.make_entry(OrderPlaced(8, "ann")), prefix=redis_prefix)
    assert client.eval(source, 1, order, *args, "paid", "shipped") == 1
    assert client.hget(order, "status") == b"shipped"
    with store.checkout_batch(["orders"], 10) as batch:  # type: ignore[union-attr]
        assert [m.id for m in batch.messages] == [outbox_id]
    assert stale_id != outbox_id


def test_outbox_ids_are_unique_and_time_ordered(client: redis.Redis, redis_prefix: str) -> None:
    topic = order_topic()
    with client.pipeline(transaction=True) as pipe:
        bound = bind(topic, persister(pipe, prefix=redis_prefix))
        ids = [bound.publish(OrderPlaced(i, "ann")) for i in range(500)]
        pipe.execute()
    assert len(set(ids)) == 500
    assert ids == sorted(ids) or ids[0][:13] <= ids[-1][:13]  # ms prefix never goes back


# -- the store -----------------------------------------------------------------------------------


def test_the_store_refuses_unusable_clients(redis_url: str) -> None:
    decoding = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses=False"):
            RedisStore(decoding)
    finally:
        decoding.close()
    with pytest.raises(TypeError, match="AsyncRedisStore"):
        RedisStore(redis.asyncio.Redis.from_url(redis_url))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lease_duration"):
        RedisStore(redis.Redis.from_url(redis_url), lease_duration=0)
    with pytest.raises(ValueError, match="prefix"):
        RedisStore(redis.Redis.from_url(redis_url), prefix="")


def test_hostile_topic_names_and_keys_break_nothing(
    client: redis.Redis, redis_prefix: str, store: RedisStore
) -> None:
    topics = {
        name: InMemoryTopic(name, JsonCodec(OrderPlaced), ordering_key=lambda m: m.note or None)
        for name in HOSTILE_TOPICS
    }
    expected: dict[tuple[str, str | None], list[int]] = {}
    with client.pipeline(transaction=True) as pipe:
        n = 0
        for round_ in range(3):
            for name, topic in topics.items():
                for key in HOSTILE_KEYS:
                    n += 1
                    note = key or ""
                    bind(topic, persister(pipe, prefix=redis_prefix)).publish(
                        OrderPlaced(n, f"r{round_}", note=note)
                    )
                    expected.setdefault((name, key or None), []).append(n)
        pipe.execute()
    # every key name is the prefix, then only fixed words and hex
    for key_name in outbox_keys(client, redis_prefix):
        rest = key_name.decode()[len(redis_prefix) + 1 :]
        assert re.fullmatch(r"[a-z]+(:[0-9a-f-]*)*", rest), key_name
    backlog = {b.topic: b.pending for b in store.backlog()}
    assert backlog == {name: 3 * len(HOSTILE_KEYS) for name in HOSTILE_TOPICS}

    relay = Relay(store, publish_timeout=2)
    for topic in topics.values():
        relay.register_topic(topic)
    while relay.process_messages(limit=50).checked_out:
        pass
    for name, topic in topics.items():
        got: dict[str | None, list[int]] = {}
        for message in topic.messages():
            got.setdefault(message.note or None, []).append(message.order_id)
        assert got == {key: ids for (t, key), ids in expected.items() if t == name}
    assert store.backlog() == []

    # dead letters of a hostile topic round-trip its name
    name = "{x}:*"
    hostile = InMemoryTopic(name, JsonCodec(OrderPlaced))
    with client.pipeline(transaction=True) as pipe:
        [dead_id] = [
            bind(hostile, persister(pipe, prefix=redis_prefix)).publish(OrderPlaced(0, "z"))
        ]
        pipe.execute()
    with store.checkout_batch([name], 10) as batch:  # type: ignore[union-attr]
        batch.mark_dead(batch.messages[0], "poison:{x}")
    [dead] = store.dead_letters(name)
    assert (dead.message.id, dead.message.topic, dead.error) == (dead_id, name, "poison:{x}")
    assert store.dead_letters("{x}") == []


# -- relaying end to end -------------------------------------------------------------------------


def test_the_relay_publishes_to_an_in_memory_topic_in_order(
    client: redis.Redis, redis_prefix: str, store: RedisStore
) -> None:
    topic = order_topic()
    ids = []
    for tx in range(20):
        with client.pipeline(transaction=True) as pipe:
            bound = bind(topic, persister(pipe, prefix=redis_prefix))
            ids += [bound.publish(OrderPlaced(tx * 5 + i, f"c{i % 3}")) for i in range(5)]
            pipe.execute()
    relay = Relay(store, publish_timeout=2)
    relay.register_topic(topic)
    published = 0
    while (result := relay.process_messages(limit=17)).checked_out:
        assert result.store_error is None
        published += result.successes
    assert published == 100
    assert sorted(topic.outbox_ids()) == sorted(ids)
    for customer in ("c0", "c1", "c2"):
        got = [m.order_id for m in topic.messages() if m.customer == customer]
        assert got == sorted(got)
    [first] = [p for p in topic.published if p.outbox_id == ids[0]]
    assert first.attributes["outbox-id"] == ids[0]


def test_an_unreadable_entry_is_parked_and_blocks_nothing(
    client: redis.Redis, redis_prefix: str, store: RedisStore
) -> None:
    topic = order_topic()
    with client.pipeline(transaction=True) as pipe:
        bound = bind(topic, persister(pipe, prefix=redis_prefix))
        broken = bound.publish(OrderPlaced(1, "ann"))
        later = bound.publish(OrderPlaced(2, "ann"))
        other = bound.publish(OrderPlaced(3, "bob"))
        pipe.execute()
    client.hset(f"{redis_prefix}:m:{broken}", "attrs", "{not json")  # changed by hand
    relay = Relay(store, publish_timeout=2)
    relay.register_topic(topic)
    for _ in range(5):
        if relay.process_messages().checked_out == 0:
            break
    assert sorted(topic.outbox_ids()) == sorted([later, other])
    [dead] = store.dead_letters()
    assert (dead.message.id, dead.state) == (broken, "parked")
    assert f"unreadable outbox entry {broken} under {redis_prefix!r}: JSONDecodeError" in dead.error


def test_the_relay_publishes_to_a_redis_stream(
    client: redis.Redis, redis_prefix: str, store: RedisStore
) -> None:
    stream = f"{redis_prefix}:app:stream:{{orders}} *"
    topic = RedisStreamTopic(
        client, stream, OrderPlaced, ordering_key=lambda m: m.customer, name="orders"
    )
    payloads = []
    with client.pipeline(transaction=True) as pipe:
        bound = bind(topic, persister(pipe, prefix=redis_prefix))
        for i in range(30):
            message = OrderPlaced(i, f"c{i % 4}", note="NUL \x00 é")
            payloads.append(topic.codec.encode(message))
            attributes = {"tenant": "t-1"} if i % 2 else None
            bound.publish(message, attributes=attributes)
        pipe.execute()
    relay = Relay(store, publish_timeout=2)
    relay.register_topic(topic)
    while relay.process_messages(limit=7).checked_out:
        pass
    entries = cast(Any, client).xrange(stream)
    assert len(entries) == 30
    seen = []
    for entry_id, fields in entries:
        assert entry_id.count(b"-") == 1
        event = topic.codec.decode(fields[b"data"])
        seen.append(event.order_id)
        assert fields[b"ordering-key"].decode() == event.customer
        assert fields[b"outbox-id"]
        assert fields[b"outbox-created-at"]
        if event.order_id % 2:
            assert json.loads(fields[b"attributes"]) == {"tenant": "t-1"}
        else:
            assert b"attributes" not in fields
    assert sorted(fields[b"data"] for _, fields in entries) == sorted(payloads)
    for customer in range(4):
        per_key = [i for i in seen if i % 4 == customer]
        assert per_key == sorted(per_key)
    assert store.backlog() == []

    direct = topic.publish(OrderPlaced(99, "c0"))
    assert cast(Any, client).xrange(stream)[-1][0].decode() == direct


def test_a_stream_topic_trims_and_stops_a_key_after_a_failure(
    client: redis.Redis, redis_prefix: str, store: RedisStore
) -> None:
    capped = f"{redis_prefix}:app:capped"
    topic = RedisStreamTopic(client, capped, bytes, maxlen=5, approximate=False)
    for i in range(12):
        topic.publish(str(i).encode())
    assert client.xlen(capped) == 5

    broken = f"{redis_prefix}:app:not-a-stream"
    client.set(broken, "a string, not a stream")
    keyed = RedisStreamTopic(client, broken, bytes, ordering_key=lambda b: b.decode()[0])
    with client.pipeline(transaction=True) as pipe:
        bound = bind(keyed, persister(pipe, prefix=redis_prefix))
        for data in (b"a1", b"a2", b"b1"):
            bound.publish(data)
        pipe.execute()
    batch = store.checkout_batch([keyed.name], 10)
    assert batch is not None
    outcomes = keyed.publish_batch(batch.messages, timeout=2)
    batch.close()
    by_data = {m.data: o for m, o in zip(batch.messages, outcomes, strict=True)}
    assert isinstance(by_data[b"a1"], redis.ResponseError)
    assert "WRONGTYPE" in str(by_data[b"a1"])
    assert isinstance(by_data[b"a2"], NotAttempted)
    assert isinstance(by_data[b"b1"], redis.ResponseError)


def test_a_commit_wakes_a_relay_that_polls_every_30_seconds(
    client: redis.Redis, redis_prefix: str, store: RedisStore
) -> None:
    topic = order_topic()
    relay = Relay(store, poll_interval=30, publish_timeout=2)
    relay.register_topic(topic)
    thread = threading.Thread(target=relay.poll_for_messages, daemon=True)
    thread.start()
    latencies = []
    try:
        time.sleep(0.3)  # the relay subscribes and goes idle
        for n in range(5):
            with client.pipeline(transaction=True) as pipe:
                bind(topic, persister(pipe, prefix=redis_prefix)).publish(OrderPlaced(n, "ann"))
                pipe.execute()
            committed = time.monotonic()
            while len(topic.published) <= n:
                assert time.monotonic() - committed < 5, "the relay was not woken"
                time.sleep(0.001)
            latencies.append(time.monotonic() - committed)
            time.sleep(0.1)
    finally:
        assert relay.stop(timeout=5)
        thread.join(5)
    print(f"commit-to-publish latencies: {[round(x * 1000, 1) for x in latencies]} ms")
    assert max(latencies) < 1.0


def test_async_persister_and_async_relay(redis_url: str, redis_prefix: str) -> None:
    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            topic = order_topic()
            store = AsyncRedisStore(client, prefix=redis_prefix, lease_duration=10)
            ids = []
            async with client.pipeline(transaction=True) as pipe:
                pipe.set(f"{redis_prefix}:app:async", "1")
                bound = bind(topic, persister(pipe, prefix=redis_prefix))
                assert isinstance(bound, AsyncBoundTopic)
                for i in range(6):
                    ids.append(await bound.publish(OrderPlaced(i, f"c{i % 2}")))
                await pipe.execute()
            async with client.pipeline(transaction=True) as pipe:
                bound = bind(topic, persister(pipe, prefix=redis_prefix))
                await bound.publish(OrderPlaced(100, "never"))
                await cast(Any, pipe).reset()
            relay = AsyncRelay(store, poll_interval=30, publish_timeout=2)
            relay.register_topic(topic)
            result = await relay.process_messages(limit=100)
            assert (result.successes, result.store_error) == (6, None)
            assert sorted(topic.outbox_ids()) == sorted(ids)

            poller = asyncio.create_task(relay.poll_for_messages(10))
            await asyncio.sleep(0.3)
            async with client.pipeline(transaction=True) as pipe:
                late = await bind(topic, persister(pipe, prefix=redis_prefix)).publish(
                    OrderPlaced(7, "c1")
                )
                await pipe.execute()
            committed = time.monotonic()
            while late not in topic.outbox_ids():
                assert time.monotonic() - committed < 2, "the async relay was not woken"
                await asyncio.sleep(0.005)
            assert await relay.stop(timeout=5)
            await poller
            assert await store.backlog() == []
        finally:
            await client.aclose()

    asyncio.run(scenario())


# -- the publish timeout bounds the whole call (issue 14) ----------------------------------------

FREEZE_SECONDS = 8.0  # the frozen server thaws by itself then, so an unbounded call ends too
TIMEOUT = 2.0
GRACE = 1.5  # the bound a test allows past the timeout: far less than the freeze


@pytest.fixture
def private_server(tmp_path: Any) -> Iterator[Any]:
    """A ``redis-server`` of the test's own (never the machine's), to freeze or to disconnect."""
    from test_redis_processes import PrivateRedis

    server = PrivateRedis(tmp_path, aof=False)
    server.start()
    try:
        yield server
    finally:
        assert server.process is not None
        server.process.send_signal(signal.SIGCONT)
        server.process.kill()
        server.process.wait(10)


def stream_messages(topic: RedisStreamTopic[bytes], count: int) -> list[PersistedMessage]:
    now = datetime.now(UTC)
    return [
        PersistedMessage(str(i), topic.name, b"x", None, "ann" if i % 2 else "bob", now)
        for i in range(1, count + 1)
    ]


def assert_timed_out(outcomes: list[Any], topic: RedisStreamTopic[bytes]) -> None:
    """Each key's head carries a TimeoutError naming the stream and the seconds."""
    heads, rest = outcomes[:2], outcomes[2:]
    assert all(isinstance(o, TimeoutError) for o in heads), heads
    assert all(repr(topic.stream) in str(o) and f"{TIMEOUT}s" in str(o) for o in heads), heads
    assert all(isinstance(o, NotAttempted) for o in rest), rest


def frozen_for(server: Any, seconds: float) -> threading.Timer:
    server.process.send_signal(signal.SIGSTOP)
    thaw = threading.Timer(seconds, server.process.send_signal, (signal.SIGCONT,))
    thaw.start()
    return thaw


@pytest.mark.slow
def test_stream_publish_batch_ends_within_its_timeout_while_redis_is_frozen(
    private_server: Any,
) -> None:
    # no socket_timeout (redis-py's default is 5 s): alone, it would wait for the thaw
    client = redis.Redis.from_url(private_server.url, socket_timeout=None)
    topic = RedisStreamTopic(client, "orders", bytes)
    messages = stream_messages(topic, 10)
    assert all(isinstance(o, str) for o in topic.publish_batch(messages[:2], timeout=10))
    thaw = frozen_for(private_server, FREEZE_SECONDS)
    try:
        timings = []
        for _ in range(2):  # the second call on a new connection: connecting is bounded too
            started = time.monotonic()
            outcomes = topic.publish_batch(messages, timeout=TIMEOUT)
            timings.append(time.monotonic() - started)
            assert timings[-1] < TIMEOUT + GRACE, (
                f"publish_batch(timeout={TIMEOUT}) took {timings[-1]:.1f}s"
            )
            assert_timed_out(outcomes, topic)
    finally:
        thaw.cancel()
        private_server.process.send_signal(signal.SIGCONT)
    # the user's client keeps its configuration, and the topic publishes again at once
    assert client.connection_pool.connection_kwargs.get("socket_timeout") is None
    assert all(
        c.socket_timeout is None for c in cast(Any, client.connection_pool)._available_connections
    )
    assert client.ping()
    assert all(isinstance(o, str) for o in topic.publish_batch(messages[2:4], timeout=10))
    client.close()


@pytest.mark.slow
def test_stream_publish_batch_async_ends_within_its_timeout_and_leaves_no_thread(
    private_server: Any,
) -> None:
    client = redis.Redis.from_url(private_server.url, socket_timeout=None)
    topic = RedisStreamTopic(client, "orders", bytes)
    messages = stream_messages(topic, 10)

    async def publish(timeout: float) -> list[Any]:
        return await topic.publish_batch_async(messages, timeout=timeout)

    assert all(isinstance(o, str) for o in asyncio.run(publish(10)))
    thaw = frozen_for(private_server, FREEZE_SECONDS)
    try:
        started = time.monotonic()
        # asyncio.run also joins the worker thread: a call left hanging would hold it here
        outcomes = asyncio.run(publish(TIMEOUT))
        elapsed = time.monotonic() - started
    finally:
        thaw.cancel()
        private_server.process.send_signal(signal.SIGCONT)
    assert elapsed < TIMEOUT + GRACE, f"publish_batch_async(timeout={TIMEOUT}) took {elapsed:.1f}s"
    assert_timed_out(outcomes, topic)
    client.close()


def test_a_stream_topic_reconnects_when_redis_closed_its_idle_connection(
    private_server: Any,
) -> None:
    client = redis.Redis.from_url(private_server.url)
    topic = RedisStreamTopic(client, "orders", bytes)
    messages = stream_messages(topic, 4)
    assert all(isinstance(o, str) for o in topic.publish_batch(messages[:2], timeout=5))
    assert client.client_kill_filter(_type="normal", skipme=True) >= 1  # the topic's connection
    time.sleep(0.1)
    assert all(isinstance(o, str) for o in topic.publish_batch(messages[2:], timeout=5))
    assert client.xlen("orders") == 4
    client.close()
