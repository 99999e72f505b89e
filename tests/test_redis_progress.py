"""Progress, follow-up messages and kept settled messages in the Redis store (a real server).

The conformance kit (``ProgressContract`` in ``test_redis_contract.py``) proves the behaviour;
these tests look at the keys: a close applies its marks, their progress and their follow-ups in
one script, all or none of them, and what it writes is an outbox message like any other.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta

import pytest
import redis
import redis.asyncio

from outboxbind.errors import LeaseLost
from outboxbind.messages import OutboxEntry
from outboxbind.store import AsyncProgressStore, DetailedBatch, MarkDetails, ProgressStore
from outboxbind.stores.redis import (
    AsyncRedisStore,
    RedisBatch,
    RedisStore,
    persister,
    wakeup_channel,
)
from outboxbind.stores.redis import store as store_module
from outboxbind.stores.redis._scripts import encode_name
from outboxbind.testing import LONG_AFTER, FakeClock, entry

# the module (the package's name ``persister`` is the function of that name)
persister_module = importlib.import_module("outboxbind.stores.redis.persister")


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


class Writer:
    """Writes entries with the persister, one transaction per call."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def write(self, entries: Sequence[OutboxEntry]) -> list[str]:
        with self.client.pipeline(transaction=True) as pipe:
            write = persister(pipe, prefix=self.prefix)
            ids = [write(e) for e in entries]
            pipe.execute()
        return ids


@pytest.fixture
def harness(client: redis.Redis, redis_prefix: str) -> Writer:
    return Writer(client, redis_prefix)


def open_store(client: redis.Redis, prefix: str, clock: FakeClock) -> RedisStore:
    return RedisStore(client, prefix=prefix, clock=clock, lease_duration=30)


def checkout(store: RedisStore, topic: str = "orders") -> RedisBatch:
    batch = store.checkout_batch([topic], 100)
    assert batch is not None, f"expected messages of {topic!r}"
    assert isinstance(batch, RedisBatch)
    return batch


def snapshot(client: redis.Redis, prefix: str) -> dict[bytes, bytes | None]:
    """Every key of the outbox with its serialized value: equal snapshots, nothing written."""
    return {key: client.dump(key) for key in sorted(client.scan_iter(match=f"{prefix}:*"))}


def woken(subscriber: redis.client.PubSub, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if subscriber.get_message(timeout=0.05) is not None:
            return True
    return False


def test_both_faces_are_progress_stores_and_their_batches_take_details(
    client: redis.Redis, redis_url: str, redis_prefix: str, harness: Writer
) -> None:
    store = open_store(client, redis_prefix, FakeClock())
    assert isinstance(store, ProgressStore)
    harness.write([entry()])
    with checkout(store) as batch:
        assert isinstance(batch, DetailedBatch)

    async def async_face() -> None:
        async_client = redis.asyncio.Redis.from_url(redis_url)
        try:
            async_store = AsyncRedisStore(async_client, prefix=redis_prefix)
            assert isinstance(async_store, AsyncProgressStore)
            batch = await async_store.checkout_batch(["orders"], 10)
            assert isinstance(batch, DetailedBatch)
            await batch.close()
        finally:
            await async_client.aclose()

    asyncio.run(async_face())


def test_a_close_whose_lease_was_lost_writes_nothing_at_all(
    client: redis.Redis, redis_prefix: str, harness: Writer
) -> None:
    clock = FakeClock()
    slow, fast = open_store(client, redis_prefix, clock), open_store(client, redis_prefix, clock)
    ids = harness.write([entry(key="a"), entry(key="b")])
    stale = checkout(slow)
    clock.advance(LONG_AFTER)
    current = checkout(fast)
    stale.add_details(
        {
            ids[0]: MarkDetails(progress='{"late": 1}', follow_ups=[entry("dead-events")]),
            ids[1]: MarkDetails(progress='{"late": 2}', keep=True),
        }
    )
    stale.mark_dead(stale.messages[0], "late")
    stale.mark_published(stale.messages[1], "late ack")
    before = snapshot(client, redis_prefix)
    with pytest.raises(LeaseLost):
        stale.close()
    assert snapshot(client, redis_prefix) == before  # no follow-up, no progress, no position
    current.close()
    assert fast.checkout_batch(["dead-events"], 10) is None
    again = checkout(fast)
    assert [(m.progress, m.attempts) for m in again.messages] == [(None, 0), (None, 0)]
    again.close()


@pytest.mark.parametrize("collision", ["taken by a stored message", "twice in one close"])
def test_a_close_that_fails_its_checks_applies_none_of_its_marks(
    client: redis.Redis,
    redis_prefix: str,
    harness: Writer,
    monkeypatch: pytest.MonkeyPatch,
    collision: str,
) -> None:
    """The script checks every follow-up before its first write: a close whose last follow-up
    cannot be written leaves even the marks of the sequences before it unapplied."""
    store = open_store(client, redis_prefix, FakeClock())
    ids = harness.write([entry(key=key) for key in "abc"])
    batch = checkout(store)
    *first, last = batch.messages  # the close script takes the sequences in this order
    clashing = ids[0] if collision == "taken by a stored message" else "0190-fixed-id"
    monkeypatch.setattr(persister_module, "new_id", lambda: clashing)
    batch.add_details(
        {
            first[0].id: MarkDetails(progress='{"p": 1}', keep=True),
            last.id: MarkDetails(progress='{"p": 3}', follow_ups=[entry("x"), entry("x")]),
        }
    )
    for message in first:
        batch.mark_published(message, "p")
    batch.mark_dead(last, "max errors")
    before = snapshot(client, redis_prefix)
    with pytest.raises(redis.ResponseError, match="is taken"):
        batch.close()
    assert snapshot(client, redis_prefix) == before
    monkeypatch.undo()
    for message in batch.messages:
        record = store.find_message(message.id)
        assert record is not None
        assert (record.state, record.message.progress, record.message.attempts) == (
            "pending",
            None,
            0,
        )


def test_a_follow_up_is_an_outbox_message_like_any_other(
    client: redis.Redis, redis_url: str, redis_prefix: str, harness: Writer
) -> None:
    """Written in the close at the next position, it joins its sequence after the messages
    before it, wakes the relays, keeps its deliver_after, and another relay (another store over
    another connection) checks it out."""
    clock = FakeClock()
    store = open_store(client, redis_prefix, clock)
    [source] = harness.write([entry()])
    [earlier] = harness.write([entry("dead-events", b"earlier", key="k")])
    later = datetime.now(UTC) + timedelta(minutes=5)
    subscriber = client.pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(wakeup_channel(redis_prefix))
    try:
        with checkout(store) as batch:
            batch.add_details(
                {
                    source: MarkDetails(
                        follow_ups=[
                            entry("dead-events", b"now", key="k", attributes={"of": source}),
                            entry("dead-events", b"later", key="k", deliver_after=later),
                        ]
                    )
                }
            )
            batch.mark_dead(batch.messages[0], "max errors")
        assert woken(subscriber, within=1.0)  # the close woke the relays
    finally:
        subscriber.close()
    other_client = redis.Redis.from_url(redis_url)
    try:
        other = open_store(other_client, redis_prefix, clock)
        with checkout(other, "dead-events") as batch:
            assert [m.data for m in batch.messages] == [b"earlier", b"now"]  # in write order
            assert dict(batch.messages[1].attributes) == {"of": source}
            assert batch.messages[1].id not in (source, earlier)
            for message in batch.messages:
                batch.mark_published(message, "p")
        assert other.checkout_batch(["dead-events"], 10) is None  # the delayed one waits
        clock.advance(301)
        with checkout(store, "dead-events") as batch:
            assert [m.data for m in batch.messages] == [b"later"]
            batch.mark_published(batch.messages[0], "p")
    finally:
        other_client.close()
    [backlog] = [b for b in store.backlog() if b.topic == "orders"]
    assert (backlog.pending, backlog.dead) == (0, 1)


def test_a_settled_message_keeps_its_fields_until_purged_in_chunks(
    client: redis.Redis, redis_prefix: str, harness: Writer, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    store = open_store(client, redis_prefix, clock)
    ids = harness.write([entry(key=str(i), data=b"d", attributes={"n": str(i)}) for i in range(5)])
    with checkout(store) as batch:
        batch.add_details({id_: MarkDetails(progress=f'["{id_}"]', keep=True) for id_ in ids})
        for message in batch.messages:
            batch.mark_published(message, f"pub-{message.id}")
    record = store.find_message(ids[3])
    assert record is not None
    assert (record.state, record.publish_id, record.error) == ("settled", f"pub-{ids[3]}", None)
    assert (record.message.data, dict(record.message.attributes)) == (b"d", {"n": "3"})
    assert record.message.progress == f'["{ids[3]}"]'
    assert store.backlog() == []  # settled is neither pending nor dead
    assert store.dead_letters() == []
    monkeypatch.setattr(store_module, "PURGE_CHUNK", 2)  # three runs of the script
    assert store.purge_settled("orders", timedelta(seconds=10)) == 0
    clock.advance(11)
    assert store.purge_settled("orders", timedelta(seconds=10)) == 5
    assert [store.find_message(id_) for id_ in ids] == [None] * 5
    assert list(client.scan_iter(match=f"{redis_prefix}:m:*")) == []
    assert not client.exists(f"{redis_prefix}:s:{encode_name('orders')}")  # the settled index
