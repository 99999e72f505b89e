"""The Redis store passes the conformance kit (against a real server), sync and asyncio."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import cast

import pytest
import redis
import redis.asyncio

from outboxbind.messages import OutboxEntry
from outboxbind.store import Store
from outboxbind.stores.redis import AsyncRedisStore, RedisStore, persister
from outboxbind.testing import ProgressContract, StoreContract, StoreHarness


class RedisHarness:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def open_store(self, clock: Callable[[], float]) -> Store:
        return RedisStore(self.client, prefix=self.prefix, clock=clock, lease_duration=30)

    def write(self, entries: Sequence[OutboxEntry], *, commit: bool = True) -> list[str]:
        with self.client.pipeline(transaction=True) as pipe:
            write = persister(pipe, prefix=self.prefix)
            ids = [write(e) for e in entries]
            if commit:
                pipe.execute()
            else:
                pipe.reset()  # DISCARD: nothing queued runs
            return ids


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


class TestRedisStore(StoreContract, ProgressContract):
    @pytest.fixture
    def harness(self, redis_client: redis.Redis, redis_prefix: str) -> StoreHarness:
        return RedisHarness(redis_client, redis_prefix)


class TestRedisStoreWithAHostilePrefixAndTopics(StoreContract, ProgressContract):
    """The same contract under a prefix full of separators, braces and glob characters."""

    @pytest.fixture
    def harness(self, redis_client: redis.Redis, redis_prefix: str) -> StoreHarness:
        return RedisHarness(redis_client, redis_prefix + ":{x} *?[a]")


class _SyncOverAsync:
    """The asyncio store driven from the sync kit: every call runs on one event loop."""

    def __init__(self, store: object, loop: asyncio.AbstractEventLoop) -> None:
        self.store = store
        self.loop = loop

    def __getattr__(self, name: str) -> object:
        attribute = getattr(self.store, name)
        if not callable(attribute):
            return attribute

        def call(*args: object, **kwargs: object) -> object:
            result = self.loop.run_until_complete(attribute(*args, **kwargs))
            if result is not None and hasattr(result, "messages"):
                return _SyncBatch(result, self.loop)
            return result

        return call


class _SyncBatch:
    def __init__(self, batch: object, loop: asyncio.AbstractEventLoop) -> None:
        self.batch = batch
        self.loop = loop

    @property
    def messages(self) -> object:
        return getattr(self.batch, "messages")  # noqa: B009

    def __getattr__(self, name: str) -> object:
        attribute = getattr(self.batch, name)

        def call(*args: object) -> object:
            result = attribute(*args)
            if inspect.isawaitable(result):  # add_details() is not a coroutine: no I/O
                return self.loop.run_until_complete(result)
            return result

        return call

    def __enter__(self) -> _SyncBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.run_until_complete(getattr(self.batch, "close")())  # noqa: B009


class AsyncRedisHarness(RedisHarness):
    """Writes with the sync persister; relays with :class:`AsyncRedisStore` on one loop."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        async_client: redis.asyncio.Redis,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(client, prefix)
        self.async_client = async_client
        self.loop = loop

    def open_store(self, clock: Callable[[], float]) -> Store:
        store = AsyncRedisStore(
            self.async_client, prefix=self.prefix, clock=clock, lease_duration=30
        )
        return cast(Store, _SyncOverAsync(store, self.loop))


class TestAsyncRedisStore(StoreContract, ProgressContract):
    @pytest.fixture
    def harness(
        self, redis_client: redis.Redis, redis_prefix: str, redis_url: str
    ) -> Iterator[StoreHarness]:
        loop = asyncio.new_event_loop()
        async_client = redis.asyncio.Redis.from_url(redis_url)
        yield AsyncRedisHarness(redis_client, redis_prefix, async_client, loop)
        loop.run_until_complete(async_client.aclose())
        loop.close()
