"""The Redis store: the relay's side of an outbox kept in Redis.

Checkout and close are Lua scripts, so each is atomic: a checkout leases the due sequences it
takes (a fencing token from a counter, and an expiry), and a close applies a batch's marks to
the sequences whose token still matches, and nothing to the others, with what the marks' details
ask (progress, follow-up messages, a published message kept settled). One logic serves both
faces: :class:`_Logic` builds every script's arguments and reads every reply;
:class:`RedisStore` and :class:`AsyncRedisStore` only run them.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from outboxbind.errors import ConfigurationError, LeaseLost, SchemaTooNew
from outboxbind.messages import PersistedMessage
from outboxbind.store import (
    AsyncBufferedBatch,
    BufferedBatch,
    DeadLetter,
    MarkDetails,
    MessageRecord,
    SequenceKey,
    TopicBacklog,
    round_robin,
)
from outboxbind.stores.redis._scripts import (
    DEFAULT_PREFIX,
    SCHEMA_VERSION,
    check_prefix,
    decode_name,
    encode_name,
    schema_key,
    script,
    wakeup_channel,
)
from outboxbind.stores.redis.persister import entry_args
from outboxbind.wakeup import WakeupThread

__all__ = ["AsyncRedisBatch", "AsyncRedisStore", "RedisBatch", "RedisStore"]

log = logging.getLogger("outboxbind.stores.redis")

SCRIPTS = (
    "checkout", "close", "dead_letters", "replay", "purge", "backlog", "find", "purge_settled",
)  # fmt: skip

MAX_ERROR_CHARS = 2000

CLOSE_TEXTS_FROM = 5
"""The ``ARGV`` index (1-based, as Lua counts) of the first text a close's details name: after
the prefix, the time, the marks (JSON) and the wake-up channel."""

PURGE_CHUNK = 1000
"""How many settled messages one run of the ``purge_settled`` script deletes at most, so that a
large purge does not hold the server for long; :meth:`RedisStore.purge_settled` runs it again."""

_STATES: dict[str, Literal["pending", "blocked", "parked", "settled"]] = {
    "": "pending",
    "blocked": "blocked",
    "parked": "parked",
    "settled": "settled",
}


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _seconds(value: bytes | str | None) -> float:
    text = _text(value)
    return float(text) if text else 0.0


def _error_text(detail: str | None) -> str:
    text = (detail or "")[:MAX_ERROR_CHARS]
    return text.encode("utf-8", "replace").decode("utf-8")  # no lone surrogates for cjson


Unreadable = tuple[PersistedMessage, str]  # a stand-in for an entry that cannot be read, and why


class _Logic:
    """The store's logic without I/O: script arguments in, replies out, shared by both faces."""

    def __init__(
        self, prefix: str, lease_duration: float, clock: Callable[[], float] | None
    ) -> None:
        if not isinstance(lease_duration, int | float) or lease_duration <= 0:
            raise ConfigurationError(f"lease_duration must be positive, not {lease_duration!r}")
        self.prefix = check_prefix(prefix)
        self.lease_duration = float(lease_duration)
        self.clock = clock
        self.channel = wakeup_channel(self.prefix)

    def checked_version(self, recorded: bytes | str | None) -> int | None:
        """The layout version recorded under the prefix (``None``: never migrated), after
        checking this code knows it (else :class:`SchemaTooNew`)."""
        text = _text(recorded)
        version = int(text) if text else None
        SchemaTooNew.check(f"Redis outbox under {self.prefix!r}", version, SCHEMA_VERSION)
        return version

    def now_arg(self) -> str:
        """The time the scripts use: the test clock's, or '' for the server's ``TIME``."""
        return "" if self.clock is None else repr(float(self.clock()))

    def checkout_args(self, topic_names: Sequence[str], limit: int) -> list[str]:
        topics = sorted({encode_name(topic) for topic in topic_names})
        nonce = secrets.token_hex(8)  # tokens stay unique even if the counter is ever lost
        return [self.prefix, self.now_arg(), repr(self.lease_duration), str(limit), nonce, *topics]

    def checked_out(
        self, reply: Any, limit: int
    ) -> tuple[list[PersistedMessage], dict[SequenceKey, str], list[Unreadable]] | None:
        """The batch's messages, tokens and unreadable entries from a checkout's reply; None
        when it took nothing."""
        sequences = reply[1:]
        if not sequences:
            return None
        tokens: dict[SequenceKey, str] = {}
        by_sequence: dict[SequenceKey, list[PersistedMessage]] = {}
        unreadable: list[Unreadable] = []
        for th, kh, token, *rows in sequences:
            sequence = (decode_name(th), decode_name(kh))
            tokens[sequence] = _text(token)
            messages = by_sequence.setdefault(sequence, [])
            for row in rows:
                try:
                    messages.append(self.message(row))
                except Exception as exc:  # an entry written or changed by hand
                    unreadable.append(self._unreadable(sequence, row, exc))
                    break  # the rest of the sequence waits until it has been parked
        return round_robin(by_sequence, limit), tokens, unreadable

    def _unreadable(
        self, sequence: SequenceKey, row: Sequence[Any], error: Exception
    ) -> tuple[PersistedMessage, str]:
        id_ = _text(row[0])
        reason = (
            f"unreadable outbox entry {id_} under {self.prefix!r}: {type(error).__name__}: {error}"
        )
        log.error("%s; moved to the dead letters", reason)
        stand_in = PersistedMessage(
            id_, sequence[0], b"", None, sequence[1] or None, datetime.now(UTC), 0
        )
        return stand_in, reason

    @staticmethod
    def park_unreadable(
        batch: BufferedBatch | AsyncBufferedBatch, unreadable: list[Unreadable]
    ) -> None:
        """Mark the entries that could not be read as dead: the batch's close parks them."""
        for stand_in, reason in unreadable:
            batch.outcomes.setdefault(stand_in.sequence, []).append(
                ("dead", stand_in, reason, None)
            )

    @staticmethod
    def message(row: Sequence[Any]) -> PersistedMessage:
        """The message of a script's row: id, topic, key, data, attrs, created, attempts,
        progress (what follows is the script's own)."""
        id_, topic, key, data, attributes, created, attempts, progress = row[:8]
        attrs_text = _text(attributes)
        return PersistedMessage(
            id=_text(id_),
            topic=_text(topic),
            data=bytes(data) if data is not None else b"",
            attributes=json.loads(attrs_text) if attrs_text else None,
            ordering_key=_text(key) or None,
            created_at=datetime.fromtimestamp(_seconds(created), UTC),
            attempts=int(_text(attempts) or 0),
            progress=None if progress is None else _text(progress),
        )

    def _readable(self, row: Sequence[Any]) -> PersistedMessage:
        """:meth:`message`, or for an entry that cannot be read (parked because of it) a
        stand-in with what can be shown."""
        try:
            return self.message(row)
        except Exception:
            return PersistedMessage(
                _text(row[0]), _text(row[1]), b"", None, _text(row[2]) or None,
                datetime.fromtimestamp(0, UTC), 0,
            )  # fmt: skip

    def close_args(self, batch: BufferedBatch | AsyncBufferedBatch) -> list[str | bytes]:
        """The close script's arguments: the marks of each sequence as JSON, and after them the
        texts that the marks' details name (see the script in ``scripts.lua``)."""
        payload = []
        texts: list[str | bytes] = []
        details = batch.details
        for sequence, token in batch.tokens.items():
            topic, key = sequence
            outcomes = []
            for kind, message, detail, retry_after in batch.outcomes.get(sequence, []):
                outcome: list[object] = [
                    kind,
                    message.id,
                    _error_text(detail) if kind != "published" else "",
                    None if retry_after is None else retry_after.total_seconds(),
                ]
                extra = details.get(message.id) if details else None
                if extra is not None:
                    named = self._details(extra, kind, detail, texts)
                    if named:
                        outcome.append(named)
                outcomes.append(outcome)
            payload.append([encode_name(topic), encode_name(key), token, outcomes])
        return [self.prefix, self.now_arg(), json.dumps(payload), self.channel, *texts]

    @staticmethod
    def _details(
        extra: MarkDetails, kind: str, publish_id: str | None, texts: list[str | bytes]
    ) -> dict[str, object]:
        """One mark's details as the close script reads them: the ``ARGV`` index of each text
        it needs, the texts appended to ``texts`` (binary-safe, never through JSON)."""

        def add(*values: str | bytes) -> int:
            at = CLOSE_TEXTS_FROM + len(texts)
            texts.extend(values)
            return at

        named: dict[str, object] = {}
        if extra.progress is not None:
            named["progress"] = add(extra.progress)
        if extra.keep and kind == "published":
            named["keep"] = add(publish_id or "")
        if extra.follow_ups:
            firsts = []
            for entry in extra.follow_ups:
                _, fields = entry_args(entry)  # a new id, as the persister makes them
                firsts.append(add(*fields))
            named["follow_ups"] = firsts
        return named

    def check_lost(self, reply: Any) -> None:
        lost = [(decode_name(th), decode_name(kh)) for th, kh in reply]
        if lost:
            names = ", ".join(f"{t!r}/{k!r}" if k else f"{t!r}" for t, k in sorted(lost))
            raise LeaseLost(
                f"Redis outbox {self.prefix!r}: the lease of {names} was taken over by another "
                "relay; this batch's marks for them were dropped"
            )

    def dead_letters_args(self, topic: str | None, limit: int) -> list[str]:
        return [self.prefix, "" if topic is None else encode_name(topic), str(max(0, limit))]

    def dead_letter(self, row: Sequence[Any]) -> DeadLetter:
        error, failed_at, state = row[8:11]
        state_text: Literal["parked", "blocked"] = (
            "parked" if _text(state) == "parked" else "blocked"
        )
        return DeadLetter(
            message=self._readable(row),
            error=_text(error),
            state=state_text,
            since=datetime.fromtimestamp(_seconds(failed_at), UTC),
        )

    def find_args(self, id_: str) -> list[str]:
        if not isinstance(id_, str):
            raise TypeError(f"an outbox id is a string, not {type(id_).__name__}")
        return [self.prefix, id_]

    def found(self, row: Sequence[Any] | None) -> MessageRecord | None:
        """The record of the ``find`` script's row (``None``: no such message)."""
        if row is None:
            return None
        error, failed_at, state, publish_id, settled_at = row[8:13]
        where = _STATES.get(_text(state), "pending")
        if where == "settled":
            return MessageRecord(
                self._readable(row), "settled", None,
                datetime.fromtimestamp(_seconds(settled_at), UTC), _text(publish_id),
            )  # fmt: skip
        failed = _text(failed_at)
        since = datetime.fromtimestamp(float(failed), UTC) if failed else None
        return MessageRecord(self._readable(row), where, _text(error) or None, since)

    def purge_settled_args(self, topic: str, older_than: timedelta, now: str | None) -> list[str]:
        """The arguments of one run of ``purge_settled``; ``now`` is what the first run
        returned (``None`` for the first), so every run cuts at the same time."""
        return [
            self.prefix,
            self.now_arg() if now is None else now,
            repr(older_than.total_seconds()),
            encode_name(topic),
            str(PURGE_CHUNK),
        ]

    @staticmethod
    def purged(reply: Any) -> tuple[int, str, bool]:
        """How many one run of ``purge_settled`` deleted, the time it cut at, and whether
        there may be more."""
        count, now = int(reply[0]), _text(reply[1])
        return count, now, count >= PURGE_CHUNK

    def ids_args(self, ids: Sequence[str]) -> list[str]:
        if isinstance(ids, str):
            raise TypeError("pass a list of outbox ids, not one string")
        return [self.prefix, self.now_arg(), *(str(id_) for id_ in ids)]

    def backlog_args(self) -> list[str]:
        return [self.prefix, self.now_arg()]

    def backlog(self, reply: Any) -> list[TopicBacklog]:
        now = None if self.clock is None else self.clock()
        rows = []
        for th, pending, oldest, dead in reply:
            oldest_at = _text(oldest)
            if not oldest_at:
                age = 0.0
            else:
                reference = now if now is not None else datetime.now(UTC).timestamp()
                age = max(0.0, reference - float(oldest_at))
            rows.append(TopicBacklog(decode_name(th), int(pending), age, int(dead)))
        return sorted(rows, key=lambda b: b.topic)


def _check_client(client: object, expected: type, face: str) -> None:
    if not isinstance(client, expected):
        other = "AsyncRedisStore" if face == "RedisStore" else "RedisStore"
        raise TypeError(
            f"{face} needs a {expected.__module__}.{expected.__name__}, not "
            f"{type(client).__name__} (for the other kind of client use {other})"
        )
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", {}) or {}
    if kwargs.get("decode_responses"):
        raise ConfigurationError(
            f"{face} needs a client with decode_responses=False: message payloads are bytes"
        )


# -- wake-ups ------------------------------------------------------------------------------------

_SAFE_KWARGS = (
    "host",
    "port",
    "path",
    "db",
    "username",
    "password",
    "socket_connect_timeout",
    "client_name",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_check_hostname",
)


def _listener_client_factory(client: object) -> Callable[[], redis.Redis]:
    """How to open the subscriber's own connection, with the client's connection settings."""
    pool: Any = getattr(client, "connection_pool", None)
    kwargs: dict[str, Any] = dict(getattr(pool, "connection_kwargs", {}) or {})
    class_name = getattr(getattr(pool, "connection_class", None), "__name__", "Connection")
    connection_class: type[redis.connection.AbstractConnection] = {
        "SSLConnection": redis.SSLConnection,
        "UnixDomainSocketConnection": redis.UnixDomainSocketConnection,
    }.get(class_name, redis.Connection)
    settings = {k: v for k, v in kwargs.items() if k in _SAFE_KWARGS}
    if class_name == "UnixDomainSocketConnection":
        settings.pop("host", None)
        settings.pop("port", None)
    else:
        settings.pop("path", None)

    def connect() -> redis.Redis:
        pool = redis.ConnectionPool(
            connection_class=connection_class,
            retry=Retry(NoBackoff(), 0),  # errors surface here: we reconnect and wake ourselves
            socket_keepalive=True,
            **settings,
        )
        return redis.Redis(connection_pool=pool)

    return connect


class _Subscriber(WakeupThread):
    """A thread with its own connection SUBSCRIBEd to the outbox's wake-up channel.

    Reconnects by itself, with backoff, after the server restarts; after a (re)connect it wakes
    the relays once, since wake-ups published meanwhile are lost.
    """

    def __init__(self, connect: Callable[[], redis.Redis], channel: str) -> None:
        super().__init__(f"outboxbind-redis-{channel}")
        self.connect = connect
        self.channel = channel

    def listen(self) -> None:
        backoff = 0.1
        while not self.stopping.is_set():
            client = self.connect()
            pubsub: Any = cast(Any, client).pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.channel)
                self.connected.set()
                if backoff > 0.1:
                    log.warning("outbox wake-up subscription to %r is back", self.channel)
                backoff = 0.1
                self.wake()  # anything committed while we were not subscribed
                while not self.stopping.is_set():
                    if pubsub.get_message(timeout=0.25) is not None:
                        self.wake()
            except (redis.RedisError, OSError) as exc:
                self.connected.clear()
                if self.stopping.is_set():
                    break
                log.warning(
                    "outbox wake-up subscription to %r lost, reconnecting in %.1fs "
                    "(polling goes on): %s",
                    self.channel,
                    backoff,
                    exc,
                )
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                try:
                    pubsub.close()
                    client.close()
                except (redis.RedisError, OSError):
                    pass


# -- the sync face -------------------------------------------------------------------------------


class RedisBatch(BufferedBatch):
    """Messages leased from a :class:`RedisStore`; marks are applied on close (one script)."""


class RedisStore:
    """An outbox in Redis, for relays: leased sequences with fencing tokens, Pub/Sub wake-ups.

    Writers queue entries with :func:`~outboxbind.stores.redis.persister` in their
    ``MULTI``/``EXEC`` transactions; the store's keys all start with ``prefix + ":"`` (see
    ``docs/redis.md`` for the layout). Several relays (threads or processes) may share one
    outbox: each checkout leases the sequences it takes for ``lease_duration`` seconds.

    Args:
        client: a ``redis.Redis`` client with ``decode_responses=False`` (the default).
        prefix: the key prefix; the persisters must use the same one. In Redis Cluster, make it
            a hash tag (``"{outbox}"``) so that every key of the outbox is in one slot.
        lease_duration: seconds a batch holds its sequences; at least twice the relay's publish
            timeout.
        clock: a time source in unix seconds, for tests; by default the server's ``TIME``.
        wakeup_client: a factory of the client the wake-up subscriber uses (by default one with
            the connection settings of ``client``'s pool).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease_duration: float = 60.0,
        clock: Callable[[], float] | None = None,
        wakeup_client: Callable[[], redis.Redis] | None = None,
    ) -> None:
        _check_client(client, redis.Redis, "RedisStore")
        self.client = client
        self._l = _Logic(prefix, lease_duration, clock)
        self._scripts = {name: client.register_script(script(name)) for name in SCRIPTS}
        self._subscriber = _Subscriber(
            wakeup_client or _listener_client_factory(client), self._l.channel
        )
        self._schema_checked = False  # checked by migrate() or the first checkout

    @property
    def prefix(self) -> str:
        """The key prefix of this outbox."""
        return self._l.prefix

    @property
    def lease_duration(self) -> float:
        """Seconds a batch holds its sequences."""
        return self._l.lease_duration

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self._l.prefix!r})"

    def migrate(self) -> list[int]:
        """Record the key layout's version under the prefix; return ``[version]`` if this
        recorded it, ``[]`` if it was there already.

        Redis needs no other set-up: the keys are made as entries are written. The record lets
        an older outboxbind refuse an outbox a newer one has changed.

        Raises:
            SchemaTooNew: a newer outboxbind recorded a newer layout; nothing is changed.
        """
        key = schema_key(self._l.prefix)
        if self.client.set(key, SCHEMA_VERSION, nx=True):
            self._schema_checked = True
            return [SCHEMA_VERSION]
        self.schema_version()
        return []

    def schema_version(self) -> int | None:
        """The layout version recorded under the prefix (``None``: never migrated).

        The first checkout asks it too, so a relay refuses to start on a layout it does not
        know.

        Raises:
            SchemaTooNew: a newer outboxbind recorded a newer layout.
        """
        version = self._l.checked_version(self.client.get(schema_key(self._l.prefix)))
        self._schema_checked = True
        return version

    def _run(self, name: str, args: Sequence[str | bytes]) -> Any:
        return self._scripts[name](keys=[], args=args)

    def checkout_batch(self, topic_names: Sequence[str], limit: int) -> RedisBatch | None:
        """Lease up to ``limit`` due messages of ``topic_names`` in one script.

        The due sequences that have waited longest go first; up to ``limit`` of them share
        ``limit`` evenly, each with a prefix of its due messages.
        """
        if not topic_names or limit <= 0:
            return None
        if not self._schema_checked:
            self.schema_version()
        reply = self._run("checkout", self._l.checkout_args(topic_names, limit))
        taken = self._l.checked_out(reply, limit)
        if taken is None:
            return None
        messages, tokens, unreadable = taken
        batch = RedisBatch(messages, tokens, self._close_batch)
        self._l.park_unreadable(batch, unreadable)
        return batch

    def _close_batch(self, batch: BufferedBatch) -> None:
        self._l.check_lost(self._run("close", self._l.close_args(batch)))

    def subscribe_wakeups(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Wake ``callback`` (from a subscriber thread) when a transaction with an outbox entry
        is executed; the subscriber reconnects by itself after a server restart."""
        return self._subscriber.subscribe(callback)

    def dead_letters(self, topic: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Parked and blocked messages, oldest first, of one topic or all."""
        rows = self._run("dead_letters", self._l.dead_letters_args(topic, limit))
        return [self._l.dead_letter(row) for row in rows]

    def replay_dead_letters(self, ids: Sequence[str]) -> int:
        """Make parked or blocked messages due now with zero attempts, keeping their ids."""
        return int(self._run("replay", self._l.ids_args(ids)))

    def purge_dead_letters(self, ids: Sequence[str]) -> int:
        """Delete parked or blocked messages for good."""
        return int(self._run("purge", self._l.ids_args(ids)))

    def backlog(self) -> list[TopicBacklog]:
        """Pending, oldest pending age and dead letters, per topic."""
        return self._l.backlog(self._run("backlog", self._l.backlog_args()))

    def find_message(self, id: str) -> MessageRecord | None:
        """The message of outbox id ``id``: pending, blocked, parked or settled (kept), with
        its progress; ``None`` when there is no such message (any more)."""
        return self._l.found(self._run("find", self._l.find_args(id)))

    def purge_settled(self, topic: str, older_than: timedelta) -> int:
        """Delete the kept settled messages of ``topic`` settled more than ``older_than`` ago
        (by the store's clock); return how many. Runs a script per thousand."""
        total, more = 0, True
        now: str | None = None  # the first run's time, so that every run cuts at the same one
        while more:
            reply = self._run("purge_settled", self._l.purge_settled_args(topic, older_than, now))
            count, now, more = self._l.purged(reply)
            total += count
        return total


# -- the asyncio face ----------------------------------------------------------------------------


class AsyncRedisBatch(AsyncBufferedBatch):
    """Messages leased from an :class:`AsyncRedisStore`; marks are applied on close."""


class AsyncRedisStore:
    """The asyncio twin of :class:`RedisStore`, over a ``redis.asyncio.Redis`` client.

    Same arguments and behaviour; every method is a coroutine but :meth:`subscribe_wakeups`
    (whose subscriber is a thread with a connection of its own).
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        lease_duration: float = 60.0,
        clock: Callable[[], float] | None = None,
        wakeup_client: Callable[[], redis.Redis] | None = None,
    ) -> None:
        _check_client(client, redis.asyncio.Redis, "AsyncRedisStore")
        self.client = client
        self._l = _Logic(prefix, lease_duration, clock)
        self._scripts = {name: client.register_script(script(name)) for name in SCRIPTS}
        self._subscriber = _Subscriber(
            wakeup_client or _listener_client_factory(client), self._l.channel
        )
        self._schema_checked = False  # checked by migrate() or the first checkout

    @property
    def prefix(self) -> str:
        """The key prefix of this outbox."""
        return self._l.prefix

    @property
    def lease_duration(self) -> float:
        """Seconds a batch holds its sequences."""
        return self._l.lease_duration

    def __repr__(self) -> str:
        return f"AsyncRedisStore(prefix={self._l.prefix!r})"

    async def migrate(self) -> list[int]:
        """See :meth:`RedisStore.migrate`."""
        key = schema_key(self._l.prefix)
        if await self.client.set(key, SCHEMA_VERSION, nx=True):
            self._schema_checked = True
            return [SCHEMA_VERSION]
        await self.schema_version()
        return []

    async def schema_version(self) -> int | None:
        """See :meth:`RedisStore.schema_version`."""
        version = self._l.checked_version(await self.client.get(schema_key(self._l.prefix)))
        self._schema_checked = True
        return version

    async def _run(self, name: str, args: Sequence[str | bytes]) -> Any:
        return await cast(Any, self._scripts[name])(keys=[], args=args)

    async def checkout_batch(
        self, topic_names: Sequence[str], limit: int
    ) -> AsyncRedisBatch | None:
        """See :meth:`RedisStore.checkout_batch`."""
        if not topic_names or limit <= 0:
            return None
        if not self._schema_checked:
            await self.schema_version()
        reply = await self._run("checkout", self._l.checkout_args(topic_names, limit))
        taken = self._l.checked_out(reply, limit)
        if taken is None:
            return None
        messages, tokens, unreadable = taken
        batch = AsyncRedisBatch(messages, tokens, self._close_batch)
        self._l.park_unreadable(batch, unreadable)
        return batch

    async def _close_batch(self, batch: AsyncBufferedBatch) -> None:
        self._l.check_lost(await self._run("close", self._l.close_args(batch)))

    def subscribe_wakeups(self, callback: Callable[[], None]) -> Callable[[], None]:
        """See :meth:`RedisStore.subscribe_wakeups`."""
        return self._subscriber.subscribe(callback)

    async def dead_letters(self, topic: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Parked and blocked messages, oldest first, of one topic or all."""
        rows = await self._run("dead_letters", self._l.dead_letters_args(topic, limit))
        return [self._l.dead_letter(row) for row in rows]

    async def replay_dead_letters(self, ids: Sequence[str]) -> int:
        """Make parked or blocked messages due now with zero attempts, keeping their ids."""
        return int(await self._run("replay", self._l.ids_args(ids)))

    async def purge_dead_letters(self, ids: Sequence[str]) -> int:
        """Delete parked or blocked messages for good."""
        return int(await self._run("purge", self._l.ids_args(ids)))

    async def backlog(self) -> list[TopicBacklog]:
        """Pending, oldest pending age and dead letters, per topic."""
        return self._l.backlog(await self._run("backlog", self._l.backlog_args()))

    async def find_message(self, id: str) -> MessageRecord | None:
        """See :meth:`RedisStore.find_message`."""
        return self._l.found(await self._run("find", self._l.find_args(id)))

    async def purge_settled(self, topic: str, older_than: timedelta) -> int:
        """See :meth:`RedisStore.purge_settled`."""
        total, more = 0, True
        now: str | None = None
        while more:
            args = self._l.purge_settled_args(topic, older_than, now)
            count, now, more = self._l.purged(await self._run("purge_settled", args))
            total += count
        return total
