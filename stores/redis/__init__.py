"""The Redis store (redis-py, sync and asyncio; hiredis recommended).

Writers queue outbox entries with :func:`persister` in a transactional pipeline
(``MULTI``/``EXEC``) next to their own commands; relays use :class:`RedisStore` or
:class:`AsyncRedisStore`. Sequences are leased with fencing tokens by Lua scripts, and relays
wake on ``EXEC`` through a Pub/Sub channel. ``docs/redis.md`` says what Redis transactions
promise, how to write data and message all-or-nothing with a Lua script, and which persistence
settings keep committed entries across a crash.
"""

from outboxbind._extras import needs_extra

# checked here, before any module of the package imports it (importing one runs this first)
with needs_extra("redis", __name__):
    import redis  # noqa: F401

from outboxbind.stores.redis._scripts import wakeup_channel
from outboxbind.stores.redis.persister import (
    AsyncRedisPersister,
    RedisPersister,
    append_call_args,
    outbox_append_lua,
    persister,
)
from outboxbind.stores.redis.store import AsyncRedisBatch, AsyncRedisStore, RedisBatch, RedisStore

__all__ = [
    "AsyncRedisBatch",
    "AsyncRedisPersister",
    "AsyncRedisStore",
    "RedisBatch",
    "RedisPersister",
    "RedisStore",
    "append_call_args",
    "outbox_append_lua",
    "persister",
    "wakeup_channel",
]
