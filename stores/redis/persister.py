"""Redis persisters: ``bind(topic, persister(pipe))`` queues the outbox entry in ``pipe``'s
``MULTI``/``EXEC`` transaction, next to the application's own commands.

What a Redis transaction promises, and what it does not:

* **Isolation and all-or-nothing delivery to the server.** The queued commands run one after
  the other at ``EXEC``, with no other client's command in between. If the transaction is
  discarded (``pipe.reset()``, ``DISCARD``, an exception before ``execute()``, a ``WATCH``ed
  key changed), nothing of it runs: neither the application's writes nor the outbox entry,
  nor the wake-up.
* **No rollback.** A command that fails *at* ``EXEC`` (a ``WRONGTYPE`` error, say) fails alone:
  the commands before and after it still take effect. So the application's writes and the
  outbox entry can part ways only when one of the application's own commands fails at run time.
  Use ``WATCH`` for optimistic checks (the transaction is not run at all if a watched key
  changed), and where a business write must be all-or-nothing together with its message, run
  both in one Lua script: :func:`outbox_append_lua` and :func:`append_call_args` show how.
* **Durability** is the server's persistence setting: see ``docs/redis.md`` (AOF with
  ``appendfsync always`` or ``everysec``).

The outbox entry itself is appended by a Lua script queued in the transaction: at ``EXEC`` it
takes the next position of the outbox (so the order of messages is the order of ``EXEC``) and
publishes a wake-up on ``<prefix>:wakeup`` for waiting relays.
"""

from __future__ import annotations

import json
from typing import Any, overload

import redis
import redis.asyncio

from outboxbind.errors import NotInTransaction
from outboxbind.messages import OutboxEntry
from outboxbind.stores.redis._scripts import (
    DEFAULT_PREFIX,
    check_prefix,
    encode_name,
    new_id,
    script,
    wakeup_channel,
)

__all__ = [
    "AsyncRedisPersister",
    "RedisPersister",
    "append_call_args",
    "outbox_append_lua",
    "persister",
]


def entry_args(entry: OutboxEntry) -> tuple[str, list[str | bytes]]:
    """The outbox id of a new message and its eight fields as the Lua ``append_message()`` of
    ``scripts.lua`` reads them: id, topic and key hex-encoded, topic, key, data, attributes (JSON
    or ''), deliver_after ('' or unix seconds).

    The persister's append script takes them after the prefix; a store's close takes them for
    each follow-up message (:class:`~outboxbind.store.MarkDetails`), so both write alike.
    """
    id_ = new_id()
    deliver_after = "" if entry.deliver_after is None else repr(entry.deliver_after.timestamp())
    fields: list[str | bytes] = [
        id_,
        encode_name(entry.topic),
        encode_name(entry.ordering_key or ""),
        entry.topic,
        entry.ordering_key or "",
        entry.data,
        json.dumps(dict(entry.attributes)) if entry.attributes else "",
        deliver_after,
    ]
    return id_, fields


def append_call_args(
    entry: OutboxEntry, *, prefix: str = DEFAULT_PREFIX
) -> tuple[str, list[str | bytes]]:
    """The outbox id of a new message and the ``ARGV`` of the outbox's append script.

    For the Lua path (see :func:`outbox_append_lua`): pass these as the script's first
    arguments; the id is the message's outbox id once the script ran.
    """
    id_, fields = entry_args(entry)
    return id_, [check_prefix(prefix), *fields, wakeup_channel(prefix)]


APPEND_ARGC = 10
"""How many ``ARGV`` entries the append script reads (:func:`append_call_args` gives them)."""


def outbox_append_lua() -> str:
    """Lua source defining ``outbox_append()``, for a script of your own that must write its
    business data and the outbox entry all-or-nothing.

    A Lua script runs atomically, but Redis does not roll back a script either: writes made
    before an error stay. So check everything first, then write. ``outbox_append()`` reads
    ``ARGV[1..10]`` (give it :func:`append_call_args`; your own arguments follow) and returns
    the message's position; it raises nothing after its first write::

        source = outbox_append_lua() + '''
            if redis.call('HGET', KEYS[1], 'status') ~= ARGV[11] then
                return redis.error_reply('stale order')   -- nothing written
            end
            outbox_append()
            redis.call('HSET', KEYS[1], 'status', ARGV[12])
            return 1
        '''
        outbox_id, args = append_call_args(orders.make_entry(OrderShipped(42)))
        client.eval(source, 1, "order:42", *args, "paid", "shipped")

    ``docs/redis.md`` has the worked example.
    """
    body = script("append")
    return f"local function outbox_append()\n{body}\nend\n"


def _check_pipeline(pipe: Any, topic: str) -> None:
    if not getattr(pipe, "transaction", False) and not getattr(pipe, "explicit_transaction", False):
        raise NotInTransaction(
            f"publish to {topic!r}: the redis pipeline is not transactional, so the outbox entry "
            "would not be written atomically with your commands; use "
            "client.pipeline(transaction=True) (the default)"
        )
    if getattr(pipe, "watching", False) and not getattr(pipe, "explicit_transaction", False):
        raise NotInTransaction(
            f"publish to {topic!r}: the pipeline is WATCHing keys and multi() was not called, so "
            "commands run at once instead of being queued; call pipe.multi() before publishing"
        )


class RedisPersister:
    """Queues outbox entries in a redis-py transactional pipeline (``MULTI``/``EXEC``).

    Made by :func:`persister`. Each call queues one ``EVAL`` of the outbox's append script and
    returns the new message's outbox id at once; the entry is written if and only if the
    pipeline's transaction is executed.
    """

    __slots__ = ("_script", "pipeline", "prefix")

    def __init__(self, pipeline: redis.client.Pipeline, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.pipeline = pipeline
        self.prefix = check_prefix(prefix)
        self._script = script("append")

    def __call__(self, entry: OutboxEntry, /) -> str:
        """Queue ``entry`` in the transaction; return its outbox id. Nothing runs before EXEC."""
        _check_pipeline(self.pipeline, entry.topic)
        id_, args = append_call_args(entry, prefix=self.prefix)
        # EVAL rather than EVALSHA: a script cache flushed between load and EXEC cannot fail the
        # outbox's half of the transaction (NOSCRIPT) while the application's half commits.
        self.pipeline.eval(self._script, 0, *args)
        return id_


class AsyncRedisPersister:
    """The asyncio twin of :class:`RedisPersister`, for a ``redis.asyncio`` pipeline."""

    __slots__ = ("_script", "pipeline", "prefix")

    is_async = True

    def __init__(
        self, pipeline: redis.asyncio.client.Pipeline, *, prefix: str = DEFAULT_PREFIX
    ) -> None:
        self.pipeline = pipeline
        self.prefix = check_prefix(prefix)
        self._script = script("append")

    async def __call__(self, entry: OutboxEntry, /) -> str:
        """Queue ``entry`` in the transaction; return its outbox id. Nothing runs before EXEC."""
        _check_pipeline(self.pipeline, entry.topic)
        id_, args = append_call_args(entry, prefix=self.prefix)
        queued: Any = self.pipeline.eval(self._script, 0, *args)  # buffered: returns the pipe
        del queued
        return id_


@overload
def persister(
    pipeline: redis.asyncio.client.Pipeline, *, prefix: str = ...
) -> AsyncRedisPersister: ...


@overload
def persister(pipeline: redis.client.Pipeline, *, prefix: str = ...) -> RedisPersister: ...


def persister(
    pipeline: redis.client.Pipeline | redis.asyncio.client.Pipeline,
    *,
    prefix: str = DEFAULT_PREFIX,
) -> RedisPersister | AsyncRedisPersister:
    """Return a persister that queues outbox entries in ``pipeline``'s transaction.

    ``pipeline`` is a transactional redis-py pipeline, sync or asyncio; queue your own
    commands in it too, then execute it::

        with client.pipeline(transaction=True) as pipe:
            pipe.hset("order:42", mapping={"status": "placed"})
            outbox_id = bind(orders, persister(pipe)).publish(OrderPlaced(...))
            pipe.execute()  # MULTI ... EXEC: the order and its message, or neither

    With ``WATCH``, call ``pipe.multi()`` before publishing. ``prefix`` must be the relay's
    store's (:class:`~outboxbind.stores.redis.RedisStore`).

    Raises:
        TypeError: ``pipeline`` is not a redis-py pipeline.
        NotInTransaction: (at ``publish()``) the pipeline is not transactional, or is WATCHing
            without ``multi()``.
    """
    if isinstance(pipeline, redis.asyncio.client.Pipeline):
        return AsyncRedisPersister(pipeline, prefix=prefix)
    if isinstance(pipeline, redis.client.Pipeline):
        return RedisPersister(pipeline, prefix=prefix)
    hint = ""
    if isinstance(pipeline, redis.Redis | redis.asyncio.Redis):
        hint = "; pass client.pipeline(transaction=True), not the client"
    raise TypeError(
        f"persister() needs a redis-py pipeline (client.pipeline(transaction=True)), "
        f"not {type(pipeline).__name__}{hint}"
    )
