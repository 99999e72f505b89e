"""Redis store cases, each measured beside a bound taken in the same run.

* ``drain_redis_b500``: 1 KB messages of one topic, no ordering key, written with the Redis
  persister (transactions of 1,000), drained by ``Relay.process_messages(500)`` into a null
  topic. The bound, ``raw drain``, is written by hand on the same keys the store keeps (see
  ``stores/redis/scripts.lua``): one Lua script per round trip pops the sequence's first 500
  ids from ``P:q:<th>:<kh>`` (``ZPOPMIN``), reads each one's ``data`` from ``P:m:<id>`` (not
  parsed), deletes the hashes (one ``DEL``), removes the ids from the topic's backlog index
  ``P:p:<th>`` (one ``ZREM``) and drops the sequence from ``P:i:<th>`` once it is empty; it
  returns ``{id, data}`` per message, and the loop runs until a script returns nothing. It
  leaves the keys as the relay does once everything is published (``P:pos`` and
  ``P:topics``); it takes no lease, as the PostgreSQL raw drain takes none.

No target is set: the spec asks for the Redis drain to be measured, without a ratio (as for
SQLite). Each measurement uses a key prefix of its own, whose keys are deleted afterwards.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from benchmarks.cases import Case
from benchmarks.common import PAYLOAD, Figure, NullTopic, PollingRelay, taking_turns, timed
from outboxbind import OutboxEntry
from outboxbind.stores.redis import RedisStore, persister

REDIS_URL = os.environ.get("OUTBOXBIND_REDIS_URL", "redis://127.0.0.1:6379/0")
TOPIC = "topic"

#: The bound: read and delete up to ARGV[4] messages of one sequence in one script.
#: ARGV: prefix, topic (hex), ordering key (hex), count. Returns {id, data} per message.
RAW_DRAIN = """
local P, th, kh, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local q = P .. ':q:' .. th .. ':' .. kh
local popped = redis.call('ZPOPMIN', q, n)
if #popped == 0 then
    return {}
end
local ids, keys, out = {}, {}, {}
for i = 1, #popped, 2 do
    local id = popped[i]
    local mk = P .. ':m:' .. id
    ids[#ids + 1] = id
    keys[#keys + 1] = mk
    out[#out + 1] = {id, redis.call('HGET', mk, 'data')}
end
redis.call('DEL', unpack(keys))
redis.call('ZREM', P .. ':p:' .. th, unpack(ids))
if redis.call('EXISTS', q) == 0 then
    redis.call('ZREM', P .. ':i:' .. th, kh)
end
return out
"""


@contextmanager
def redis_outbox() -> Iterator[tuple[redis.Redis, str]]:
    """A client and a fresh key prefix; every key under the prefix is deleted afterwards."""
    client = redis.Redis.from_url(REDIS_URL)
    prefix = f"bench-{uuid.uuid4().hex[:10]}"
    try:
        yield client, prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
        client.close()


def _fill(client: redis.Redis, prefix: str, count: int) -> None:
    """Write ``count`` 1 KB messages to one topic with the persister, 1,000 per transaction."""
    for start in range(0, count, 1000):
        with client.pipeline(transaction=True) as pipe:
            write = persister(pipe, prefix=prefix)
            for _ in range(start, min(count, start + 1000)):
                write(OutboxEntry(TOPIC, PAYLOAD))
            pipe.execute()


def _raw_drain(client: redis.Redis, prefix: str, batch: int, count: int) -> int:
    """The bound: :data:`RAW_DRAIN` until the sequence is empty; how many it took."""
    drain = client.register_script(RAW_DRAIN)
    args: list[str | int] = [prefix, TOPIC.encode("utf-8").hex(), "", batch]
    drained = 0
    while True:
        taken = drain(keys=[], args=args)
        if not taken:
            break
        drained += len(taken)
    if drained != count:
        raise RuntimeError(f"the raw drain took {drained} of {count} messages")
    return drained


def drain_redis(batch: int) -> Case:
    """The Redis store drained by the relay to a null topic, against the raw drain script."""

    def case(quick: bool) -> Figure:
        count = 20_000 if quick else 100_000

        def bound() -> float:
            with redis_outbox() as (client, prefix):
                _fill(client, prefix, count)
                return timed(functools.partial(_raw_drain, client, prefix, batch, count))

        def relayed() -> float:
            with redis_outbox() as (client, prefix):
                store = RedisStore(client, prefix=prefix)
                with PollingRelay(store, [NullTopic(TOPIC)], batch) as relay:
                    _fill(client, prefix, count)
                    return relay.drain(count)

        # each side on a fresh prefix
        case_values, bound_values = taking_turns(bound, relayed, 3 if quick else 5)
        return Figure(
            f"drain Redis -> null, batch {batch}, 1 topic", "raw drain", "msgs/s",
            case_values, bound_values, higher_is_better=True, target=None,
        )  # fmt: skip

    case.__name__ = f"drain_redis_b{batch}"
    return case


ALL: list[Case] = [drain_redis(500)]
