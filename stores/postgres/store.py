"""The PostgreSQL store: the relay's side of an outbox table, over a psycopg_pool pool.

One logic serves both faces: :class:`_Statements` builds every statement's parameters and reads
every result; :class:`PostgresStore` and :class:`AsyncPostgresStore` only run them.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import os
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import attrs
import psycopg
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from outboxbind.errors import ConfigurationError, LeaseLost
from outboxbind.messages import OutboxEntry, PersistedMessage
from outboxbind.sql import array_literal, numbered, quote_identifier
from outboxbind.store import (
    AsyncBufferedBatch,
    AsyncMessageBatch,
    BufferedBatch,
    DeadLetter,
    MessageBatch,
    MessageRecord,
    SequenceKey,
    TopicBacklog,
    integer_ids,
    round_robin,
)
from outboxbind.stores.postgres.persister import insert_params, notify_channel
from outboxbind.stores.postgres.schema import check_version, migrate, queries_for
from outboxbind.wakeup import WakeupThread

__all__ = ["AsyncPostgresBatch", "AsyncPostgresStore", "PostgresBatch", "PostgresStore"]

log = logging.getLogger("outboxbind.stores.postgres")

AnyPostgresBatch = TypeVar("AnyPostgresBatch", "PostgresBatch", "AsyncPostgresBatch")

#: The settings of the relay's own transactions (claims, reads, acks, failures):
#: - they need not wait for their WAL flush: if the server crashes before the flush, a lost claim
#:   or lost ack only means the messages are published again (at least once); the writers'
#:   transactions keep their own setting;
#: - no JIT compilation: the claim's estimated cost passes the default ``jit_above_cost`` once
#:   the outbox holds ~100,000 rows, and compiling it took 50-800 ms per execution for a
#:   statement that runs in about one;
#: - their statements always have the same shape, so each is prepared at its first use on a
#:   connection (``prepare=True``, not after psycopg's default five uses) and planned once (a
#:   generic plan) rather than at every execution.
#: A read-ahead continues a sequence after its batch's last position only while no row of it
#: can have been committed late below that position: the read counts the sequence's due rows up
#: to it, which must be the two batches' own, whenever a transaction that was running at the
#: batch's claim has committed since (the late row's, perhaps), and otherwise every this many
#: batches in a row (for a delayed message fallen due there). If one more is found, the
#: sequence is let go and read again from its head, the late row first (guarantees 3 and 4).
MOST_CONTINUATIONS = 16

#: How many free sequences a claim looks at, at least: enough for the four a batch spans when
#: each can fill a quarter of it, with room for some that cannot.
MOST_SEQUENCES_WALKED = 16

#: The statements the relay runs at every batch: executed through a raw cursor.
RELAY_STATEMENTS = ("claim_sequences", "claimed_messages", "close_batch")

#: The relay's transactions are begun and ended by statements of their own pipeline: psycopg's
#: implicit BEGIN (a connection without autocommit) waits for a round trip of its own there, and
#: ``commit()`` would wait for another. See :func:`_relay_pipeline`.
BEGIN = "BEGIN"
COMMIT = "COMMIT"

RELAY_TRANSACTION = (
    "SELECT set_config('synchronous_commit', 'off', true), set_config('jit', 'off', true),"
    " set_config('plan_cache_mode', 'force_generic_plan', true)"
)


@attrs.frozen
class _Claim:
    """The snapshot a claim ran in and its transaction's id: the batch read ahead of the
    claim's batch asks which transactions have committed since, to know whether a row can have
    been committed late below the batch's last positions."""

    snapshot: str
    xid: str


@attrs.frozen
class _Found:
    """What a claim and its read found: the batch's messages, the leases (sequence -> token),
    which of them were carried on from the batch that read ahead, the position of each
    sequence's last message and how many messages each has in the batch, the rows that cannot
    be read as messages (id -> why), and the claim's snapshot."""

    messages: list[PersistedMessage]
    tokens: dict[SequenceKey, str]
    continued: set[SequenceKey]
    last_positions: dict[SequenceKey, int]
    sizes: dict[SequenceKey, int]
    unreadable: dict[int, str]
    claim: _Claim


class _Statements:
    """The store's logic without I/O: parameters in, results out, shared by both faces."""

    def __init__(
        self,
        *,
        schema: str,
        table: str,
        lease_duration: float,
        clock: Callable[[], float] | None,
        owner: str | None,
        keep_published: bool,
    ) -> None:
        if lease_duration <= 0:
            raise ConfigurationError(f"lease_duration must be positive, not {lease_duration!r}")
        self.schema = schema
        self.table = table
        self.sql = queries_for(schema, table)
        #: The relay's statements with numbered parameters, for a raw cursor (no parse per run)
        self.numbered = {name: numbered(self.sql[name]) for name in RELAY_STATEMENTS}
        self.lease_duration = lease_duration
        self.clock = clock
        self.owner = owner or f"{os.uname().nodename}:{os.getpid()}:{secrets.token_hex(3)}"
        self.channel = notify_channel(schema, table)
        self.keep_published = keep_published
        self._cursors: dict[str, str] = {}  # per topic: the lowest ordering key leased last
        self._last_topic = ""  # the topic the walk leased last; the next walk starts after it
        self._claims = itertools.count(1)
        #: How many free sequences a claim's walk looks at: widened while claims take that many
        #: and still count too few messages to fill the batch, narrowed back when they fill it
        #: with much fewer. Walking every key of a topic at each claim cost ~4 ms at 100 keys.
        self._walk = MOST_SEQUENCES_WALKED

    def statement(self, name: str, params: dict[str, Any]) -> tuple[str, list[Any]]:
        """The relay's statement ``name`` and its parameters, for a raw cursor; a list goes as
        one array literal, which the statement casts (psycopg would adapt it item by item)."""
        sql, names = self.numbered[name]
        values = [params[parameter] for parameter in names]
        return sql, [array_literal(v) if isinstance(v, list) else v for v in values]

    def now(self) -> datetime | None:
        return None if self.clock is None else datetime.fromtimestamp(self.clock(), UTC)

    def checkout_params(
        self,
        topics: Sequence[str],
        limit: int,
        parent: PostgresBatch | AsyncPostgresBatch | None = None,
        continuing: Collection[SequenceKey] = (),
        closing: PostgresBatch | AsyncPostgresBatch | None = None,
    ) -> dict[str, Any]:
        """The parameters of the claim and of the read that follows it in the same round trip;
        for a read-ahead, also the ``parent`` batch's sequences it may continue (``closing``,
        the batch before it, is closed in the same transaction, after the claim)."""
        wanted = sorted(set(topics))
        start = bisect.bisect_right(wanted, self._last_topic)  # just after the last one leased
        wanted = wanted[start:] + wanted[:start]
        going_on: list[tuple[SequenceKey, str, int]] = []
        in_flight: Counter[SequenceKey] = Counter()
        if parent is not None:
            for sequence in continuing:
                token = parent.tokens.get(sequence)
                after = parent.last_positions.get(sequence)
                if token is not None and after is not None:  # this batch's, with messages
                    going_on.append((sequence, token, after))
            # should the read look for a row committed late: up to ``after`` the sequence must
            # hold only the rows of this batch and of the one before it, not yet deleted
            in_flight.update(parent.sizes)
            if closing is not None:
                in_flight.update(closing.sizes)
        claim = parent.claim if parent is not None and going_on else None
        return {
            "topics": wanted,
            "after": [self._cursors.get(topic, "") for topic in wanted],
            "limit": limit,
            "most_per_sequence": -(-limit // 4),  # a quarter of the batch, rounded up
            "most_sequences": min(limit, self._walk),
            "claim": f"{self.owner} #{next(self._claims)}",  # the name of this claim's leases
            "lease_seconds": self.lease_duration,
            "now": self.now(),
            "continue_topics": [sequence[0] for sequence, _, _ in going_on],
            "continue_keys": [sequence[1] for sequence, _, _ in going_on],
            "continue_tokens": [int(token) for _, token, _ in going_on],
            "continue_after": [after for _, _, after in going_on],
            "continue_in_flight": [in_flight[sequence] for sequence, _, _ in going_on],
            "continue_look": [
                parent is not None and parent.continuations.get(sequence, 0) >= MOST_CONTINUATIONS
                for sequence, _, _ in going_on
            ],
            "previous_snapshot": None if claim is None else claim.snapshot,
            "previous_xid": None if claim is None else claim.xid,
        }

    def continuations(
        self, parent: PostgresBatch | AsyncPostgresBatch, continued: set[SequenceKey]
    ) -> dict[SequenceKey, int]:
        """Per sequence continued from ``parent``, the batches in a row since it was surely
        looked at for rows committed late (one continued at :data:`MOST_CONTINUATIONS` was)."""
        done = parent.continuations
        return {s: 1 if done.get(s, 0) >= MOST_CONTINUATIONS else done.get(s, 0) + 1
                for s in continued}  # fmt: skip

    def claimed(
        self, rows: Sequence[tuple[Any, ...]], params: dict[str, Any]
    ) -> tuple[dict[SequenceKey, str], set[SequenceKey]]:
        """The leases a claim statement returned (sequence -> token), and which of them were
        continued from the batch that read ahead; moves the cursors past the others."""
        tokens: dict[SequenceKey, str] = {}
        continued: set[SequenceKey] = set()
        furthest: dict[str, str] = {}
        counted = 0
        for topic, key, token, was_continued, total, _, _ in rows:
            tokens[(topic, key)] = str(token)
            if was_continued:
                continued.add((topic, key))
            else:  # the walk goes downwards: the next one starts just below the lowest
                furthest[topic] = min(key, furthest.get(topic, key))
                counted = total
        taken = len(tokens) - len(continued)  # free sequences the claim took
        if taken >= params["most_sequences"] and counted < params["limit"]:
            self._walk = min(self._walk * 2, 1 << 16)  # more sequences would have fit
        elif counted >= params["limit"] and taken * 4 <= params["most_sequences"]:
            self._walk = max(self._walk // 2, MOST_SEQUENCES_WALKED)
        self._cursors.update(furthest)  # the next claim starts just below them
        if furthest:  # and with the topic after the furthest one leased, in the walk's order
            walked = params["topics"]
            self._last_topic = max(furthest, key=walked.index)
        return tokens, continued

    def found(
        self,
        claims: Sequence[tuple[Any, ...]],
        params: dict[str, Any],
        rows: Sequence[tuple[Any, ...]],
        limit: int,
    ) -> _Found | None:
        """The batch a claim (``claims``, its rows) and its read (``rows``) found, if any."""
        if not claims:
            return None
        tokens, continued = self.claimed(claims, params)
        messages, unreadable, last_positions, sizes = self.batch_messages(rows, limit)
        claim = _Claim(snapshot=claims[0][5], xid=claims[0][6])
        return _Found(messages, tokens, continued, last_positions, sizes, unreadable, claim)

    def batch_from(
        self,
        found: _Found | None,
        parent: PostgresBatch | AsyncPostgresBatch | None,
    ) -> tuple[_Found, dict[SequenceKey, int]] | None:
        """Whether a checkout gives a batch, and how deep each continued sequence is in its
        chain. A read-ahead whose read found nothing gives none, when it holds only the
        sequences it continued (the read left them out, for a row committed late): their
        leases end with ``parent``, as if not continued, and the relay checks out afresh."""
        if found is None:
            return None
        if parent is None:
            return found, {}
        if not found.messages and found.tokens.keys() <= found.continued:
            return None
        parent.passed_on = found.continued
        return found, self.continuations(parent, found.continued)

    def batch_messages(
        self, rows: Sequence[tuple[Any, ...]], limit: int
    ) -> tuple[
        list[PersistedMessage], dict[int, str], dict[SequenceKey, int], dict[SequenceKey, int]
    ]:
        """The batch's messages, the rows that cannot be read as messages (with why), the
        position of each sequence's last message in the batch, and how many it has there.

        The rows come sequence after sequence, each in order. A sequence is cut at an unreadable
        row: the rows after it wait for the next batch, after the unreadable one has been parked.
        """
        by_sequence: dict[SequenceKey, list[PersistedMessage]] = {}
        positions: dict[SequenceKey, list[int]] = {}  # each message's, beside it
        unreadable: dict[int, str] = {}
        cut: set[SequenceKey] = set()
        sequence: SequenceKey | None = None
        messages: list[PersistedMessage] = []
        at: list[int] = []
        for topic, key, id_, position, data, attributes, created_at, attempts, progress in rows:
            if sequence is None or topic != sequence[0] or key != sequence[1]:
                sequence = (topic, key)
                messages = by_sequence.setdefault(sequence, [])
                at = positions.setdefault(sequence, [])
            if cut and sequence in cut:
                continue
            if attributes is not None and not (
                isinstance(attributes, dict)
                and all(isinstance(v, str) for v in attributes.values())
            ):
                unreadable[id_] = (
                    f"unreadable outbox row {id_} in {self.schema}.{self.table}: attributes are "
                    f"not an object of strings: {attributes!r}"
                )[:2000]
                cut.add(sequence)
                continue
            messages.append(
                PersistedMessage(
                    str(id_), topic, data, attributes, key or None, created_at, attempts, progress
                )
            )
            at.append(position)
        batch = round_robin(by_sequence, limit)
        # round_robin keeps a prefix of each sequence: its last position is at the prefix's end
        taken = dict.fromkeys(by_sequence, 0)
        if len(by_sequence) == 1:
            taken[next(iter(by_sequence))] = len(batch)
        else:
            for message in batch:
                taken[(message.topic, message.ordering_key or "")] += 1
        sizes = {s: n for s, n in taken.items() if n}
        last_positions = {s: positions[s][n - 1] for s, n in sizes.items()}
        return batch, unreadable, last_positions, sizes

    def unreadable_params(self, unreadable: dict[int, str]) -> dict[str, Any]:
        for reason in unreadable.values():
            log.error("%s; moved to the dead letters", reason)
        return {"ids": list(unreadable), "errors": list(unreadable.values()), "now": self.now()}

    def close_params(self, batch: BufferedBatch | AsyncBufferedBatch) -> dict[str, Any]:
        """The parameters of ``close_batch``: the leases, the marks, and what the marks' details
        save (progress, messages to keep); the follow-ups are :meth:`follow_ups`."""
        published: list[str] = []
        kept: list[str] = []  # the published messages to keep: all of them with keep_published
        kept_publish_ids: list[str | None] = []
        kept_progress: list[str | None] = []
        failed: list[int] = []
        failed_errors: list[str | None] = []
        retry_seconds: list[float | None] = []
        failed_progress: list[str | None] = []
        dead: list[int] = []
        dead_errors: list[str | None] = []
        dead_progress: list[str | None] = []
        keep_all, details = self.keep_published, batch.details
        for outcomes in batch.outcomes.values():
            for kind, message, detail, retry_after in outcomes:
                extra = details.get(message.id) if details else None
                if kind == "published":
                    published.append(message.id)
                    if keep_all or (extra is not None and extra.keep):
                        kept.append(message.id)
                        kept_publish_ids.append(detail)
                        kept_progress.append(None if extra is None else extra.progress)
                elif kind == "failed":
                    failed.append(int(message.id))
                    failed_errors.append(detail)
                    retry_seconds.append(
                        None if retry_after is None else retry_after.total_seconds()
                    )
                    failed_progress.append(None if extra is None else extra.progress)
                else:
                    dead.append(int(message.id))
                    dead_errors.append(detail)
                    dead_progress.append(None if extra is None else extra.progress)
        if not details:  # nothing to save: the arrays stay empty (unnest pads them with NULL)
            failed_progress, dead_progress = [], []
        sequences = list(batch.tokens)
        return {
            "lease_topics": [topic for topic, _ in sequences],
            "lease_keys": [key for _, key in sequences],
            "lease_tokens": [int(batch.tokens[s]) for s in sequences],
            "lease_kept": [s in batch.passed_on for s in sequences],
            # the ids came from this store's bigint column: sent as one array literal, which
            # the server parses, rather than adapted one by one
            "published": "{" + ",".join(published) + "}",
            "kept": "{" + ",".join(kept) + "}",
            "kept_publish_ids": kept_publish_ids,
            "kept_progress": kept_progress,
            "keeping": bool(kept),
            "failed": failed,
            "failed_errors": failed_errors,
            "retry_seconds": retry_seconds,
            "failed_progress": failed_progress,
            "dead": dead,
            "dead_errors": dead_errors,
            "dead_progress": dead_progress,
            "now": self.now(),
        }

    def follow_ups(
        self, batch: BufferedBatch | AsyncBufferedBatch
    ) -> list[tuple[SequenceKey, OutboxEntry]]:
        """The follow-ups of the batch's marked messages, each with the sequence of the message
        it follows: written in the close's transaction, for the sequences it held."""
        if not batch.details:
            return []
        return [
            (sequence, entry)
            for sequence, outcomes in batch.outcomes.items()
            for _, message, _, _ in outcomes
            if (extra := batch.details.get(message.id)) is not None
            for entry in extra.follow_ups
        ]

    def follow_up_params(
        self,
        follow_ups: Sequence[tuple[SequenceKey, OutboxEntry]],
        held: Sequence[tuple[Any, ...]],
    ) -> list[dict[str, Any]]:
        """The ``insert_message`` parameters of the follow-ups whose sequence the close held
        (``held``, its rows): a lost lease writes none."""
        holding = {(topic, key) for topic, key in held}
        return [insert_params(entry, self.channel) for sequence, entry in follow_ups
                if sequence in holding]  # fmt: skip

    def closable_within(self, closing: AnyPostgresBatch | None) -> AnyPostgresBatch | None:
        """``closing`` if a read-ahead may close it in its own round trip: not closed yet, and
        without follow-ups, which are written once the close knows the sequences it held (the
        relay then closes it on its own, as any batch)."""
        if closing is None or closing.closed or self.follow_ups(closing):
            return None
        return closing

    def check_held(
        self, batch: BufferedBatch | AsyncBufferedBatch, held: Sequence[tuple[Any, ...]]
    ) -> None:
        lost = set(batch.tokens) - {(topic, key) for topic, key in held}
        if lost:
            names = ", ".join(f"{t}/{k or '*'}" for t, k in sorted(lost))
            raise LeaseLost(
                f"outbox {self.schema}.{self.table}: the lease of {names} was taken over by "
                "another relay; this batch's marks for them were dropped"
            )

    def dead_letter(self, row: tuple[Any, ...]) -> DeadLetter:
        (id_, topic, key, data, attributes, created_at, attempts, progress,
         error, failed_at, state) = row  # fmt: skip
        message = _message(id_, topic, key, data, attributes, created_at, attempts, progress)
        return DeadLetter(message, error or "", state, failed_at or created_at)

    def message_record(self, row: tuple[Any, ...]) -> MessageRecord:
        (state, id_, topic, key, data, attributes, created_at, attempts, progress,
         error, since, publish_id) = row  # fmt: skip
        message = _message(id_, topic, key, data, attributes, created_at, attempts, progress)
        return MessageRecord(message, state, error, since, publish_id)

    def backlog_row(self, row: tuple[Any, ...]) -> TopicBacklog:
        topic, pending, oldest_age, dead = row
        return TopicBacklog(topic, int(pending), max(0.0, float(oldest_age)), int(dead))


def _message(
    id_: int,
    topic: str,
    key: str,
    data: bytes,
    attributes: Any,
    created_at: datetime,
    attempts: int,
    progress: str | None,
) -> PersistedMessage:
    """A message as an operator sees it (dead letters, :meth:`PostgresStore.find_message`)."""
    if not isinstance(attributes, dict):  # a row parked as unreadable: shown without them
        attributes = None
    return PersistedMessage(
        str(id_), topic, data, attributes, key or None, created_at, attempts, progress
    )


@contextmanager
def _relay_pipeline(conn: psycopg.Connection[Any]) -> Iterator[psycopg.Pipeline]:
    """A pipeline on ``conn`` whose first statements begin the relay's transaction (:data:`BEGIN`
    and :data:`RELAY_TRANSACTION`); the block sends its statements and :data:`COMMIT`.

    ``conn`` is in autocommit mode meanwhile, then given back in its own mode, after rolling
    back a transaction an error left open. In pipeline mode psycopg syncs after the BEGIN it
    sends for a connection without autocommit: a round trip before the first statement goes
    out. A pool of autocommit connections gets one transaction per batch all the same."""
    autocommit = conn.autocommit
    conn.autocommit = True
    try:
        with conn.pipeline() as pipeline:
            conn.execute(BEGIN)
            conn.execute(RELAY_TRANSACTION, prepare=True)
            yield pipeline
    finally:
        status = conn.info.transaction_status
        if status != TransactionStatus.UNKNOWN:  # else the connection is lost: the pool drops it
            if status != TransactionStatus.IDLE:
                conn.rollback()
            conn.autocommit = autocommit


@asynccontextmanager
async def _async_relay_pipeline(
    conn: psycopg.AsyncConnection[Any],
) -> AsyncIterator[psycopg.AsyncPipeline]:
    """:func:`_relay_pipeline` for an asyncio connection."""
    autocommit = conn.autocommit
    await conn.set_autocommit(True)
    try:
        async with conn.pipeline() as pipeline:
            await conn.execute(BEGIN)
            await conn.execute(RELAY_TRANSACTION, prepare=True)
            yield pipeline
    finally:
        status = conn.info.transaction_status
        if status != TransactionStatus.UNKNOWN:
            if status != TransactionStatus.IDLE:
                await conn.rollback()
            await conn.set_autocommit(autocommit)


class _Listener(WakeupThread):
    """A dedicated LISTEN connection (outside the pool) that wakes relays on commit.

    Reconnects by itself, with backoff, after the server restarts; after a reconnect it wakes
    the relays once, since notifications sent meanwhile are lost.
    """

    def __init__(self, conninfo: str, kwargs: dict[str, Any], channel: str) -> None:
        super().__init__(f"outboxbind-listen-{channel}")
        self.conninfo = conninfo
        self.kwargs = {k: v for k, v in kwargs.items() if k not in ("autocommit", "row_factory")}
        self.channel = channel

    def listen(self) -> None:
        backoff = 0.1
        while not self.stopping.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, **self.kwargs) as conn:
                    conn.execute(f"LISTEN {quote_identifier(self.channel)}")
                    self.connected.set()
                    backoff = 0.1
                    self.wake()  # anything committed while we were not listening
                    while not self.stopping.is_set():
                        for _ in conn.notifies(timeout=0.25):
                            self.wake()
            except psycopg.Error as exc:
                self.connected.clear()
                if self.stopping.is_set():
                    break
                log.warning(
                    "outbox LISTEN connection lost, reconnecting in %.1fs: %s", backoff, exc
                )
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 5.0)


def _conninfo_of(
    pool: ConnectionPool[Any] | AsyncConnectionPool[Any],
) -> tuple[str, dict[str, Any]]:
    """The pool's connection string and arguments, for connections kept outside it."""
    conninfo, kwargs = pool.conninfo, pool.kwargs
    if not isinstance(conninfo, str) or not isinstance(kwargs, dict | None):
        raise ConfigurationError(
            "this pool computes its connection settings at connect time; pass the store a "
            "connection string for its LISTEN connection as listen_conninfo="
        )
    return conninfo, dict(kwargs or {})


class PostgresBatch(BufferedBatch):
    """Messages leased from a :class:`PostgresStore`; marks are applied on close.

    It can read the next batch ahead (:class:`~outboxbind.store.ReadAheadBatch`).
    """

    def __init__(
        self, found: _Found, store: PostgresStore, continuations: dict[SequenceKey, int]
    ) -> None:
        super().__init__(found.messages, found.tokens, store._close_batch)
        self._store = store
        #: per sequence, the position of its last message in this batch
        self.last_positions = found.last_positions
        #: per sequence, how many of its messages this batch holds
        self.sizes = found.sizes
        #: per sequence continued from the batch before, how many batches in a row it has been
        self.continuations = continuations
        #: the claim's snapshot and transaction, for the batch read ahead of this one
        self.claim = found.claim

    def read_ahead(
        self,
        topic_names: Sequence[str],
        limit: int,
        continuing: Collection[SequenceKey],
        closing: MessageBatch | None = None,
    ) -> PostgresBatch | None:
        """Check out the next batch while this one publishes; see
        :meth:`outboxbind.store.ReadAheadBatch.read_ahead`. The sequences of ``continuing``
        are carried on only when the sequences nobody holds cannot fill the batch, and only
        while no row of theirs can have been committed late below this batch's last message
        (see :data:`MOST_CONTINUATIONS`). ``closing``, a batch of the same store, is closed in
        the claim's transaction, once the rows are read."""
        if self.closed:
            raise RuntimeError("this batch is closed")
        previous = closing if isinstance(closing, PostgresBatch) else None
        return self._store._checkout(topic_names, limit, self, continuing, previous)


class PostgresStore:
    """An outbox in PostgreSQL, for relays: leases per sequence, fencing tokens, NOTIFY wake-up.

    Args:
        pool: a ``psycopg_pool.ConnectionPool`` to the database.
        schema: the schema of the outbox tables (created by :meth:`migrate` if missing).
        table: the outbox table name; its companions are ``<table>_dead_letters``,
            ``<table>_leases`` and friends.
        lease_duration: seconds a batch holds its sequences; at least twice the relay's
            publish timeout.
        clock: a time source in unix seconds for tests; by default the database's ``now()``.
        owner: the name recorded on leases, followed by " #<claim number>" (default: host,
            pid and a random suffix).
        listen_conninfo: the connection string of the LISTEN connection, when the pool's
            settings are computed at connect time (by default the pool's own are used).
        keep_published: keep each published message (with its publish id and time) in
            ``<table>_published`` instead of deleting it; :meth:`purge_published` is the
            retention.

    It keeps what the relay saves with messages
    (:class:`~outboxbind.store.ProgressStore`; its batches are
    :class:`~outboxbind.store.DetailedBatch`): a mark's progress is saved on the message (and
    goes with it to the dead letters and back), its follow-ups are written in the transaction
    that applies it, and a published message whose details say ``keep`` is kept in
    ``<table>_published`` as with ``keep_published``, until :meth:`purge_settled` (one topic's)
    or :meth:`purge_published` (all) removes it.
    """

    def __init__(
        self,
        pool: ConnectionPool[Any],
        *,
        schema: str = "public",
        table: str = "outbox",
        lease_duration: float = 60.0,
        clock: Callable[[], float] | None = None,
        owner: str | None = None,
        listen_conninfo: str | None = None,
        keep_published: bool = False,
    ) -> None:
        if not isinstance(pool, ConnectionPool):
            raise TypeError(
                f"PostgresStore needs a psycopg_pool.ConnectionPool, not {type(pool).__name__}"
                + ("; use AsyncPostgresStore" if isinstance(pool, AsyncConnectionPool) else "")
            )
        self.pool = pool
        self._s = _Statements(
            schema=schema,
            table=table,
            lease_duration=lease_duration,
            clock=clock,
            owner=owner,
            keep_published=keep_published,
        )
        conninfo, kwargs = (listen_conninfo, {}) if listen_conninfo else _conninfo_of(pool)
        self._listener = _Listener(conninfo, kwargs, self._s.channel)
        self._schema_checked = False  # checked by migrate() or the first checkout

    @property
    def lease_duration(self) -> float:
        """Seconds a batch holds its sequences."""
        return self._s.lease_duration

    def __repr__(self) -> str:
        return f"PostgresStore(schema={self._s.schema!r}, table={self._s.table!r})"

    def migrate(self) -> list[int]:
        """Create or upgrade the outbox schema; return the versions applied.

        Raises:
            SchemaTooNew: a newer outboxbind migrated the outbox; nothing is changed.
        """
        with self.pool.connection() as conn:
            applied = migrate(conn, schema=self._s.schema, table=self._s.table)
        self._schema_checked = True
        return applied

    def schema_version(self) -> int | None:
        """The outbox schema version recorded in the database (``None``: never migrated).

        The first checkout asks it too, so a relay refuses to start on a schema it does not know.

        Raises:
            SchemaTooNew: a newer outboxbind migrated the outbox.
        """
        with self.pool.connection() as conn:
            version = check_version(conn, schema=self._s.schema, table=self._s.table)
        self._schema_checked = True
        return version

    def _run(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        with self.pool.connection() as conn:
            rows: list[tuple[Any, ...]] = conn.execute(self._s.sql[name], params).fetchall()
            return rows

    def checkout_batch(self, topic_names: Sequence[str], limit: int) -> PostgresBatch | None:
        """Lease up to ``limit`` due messages of ``topic_names``.

        Two statements in one round trip and one transaction, committed before anything is
        published: the claim leases the sequences, then the read takes their messages with a
        fresh snapshot (each statement has its own under ``READ COMMITTED``).

        Raises:
            SchemaTooNew: at the store's first checkout, when a newer outboxbind migrated the
                outbox.
        """
        if not self._schema_checked:
            self.schema_version()
        return self._checkout(topic_names, limit)

    def _checkout(
        self,
        topic_names: Sequence[str],
        limit: int,
        parent: PostgresBatch | None = None,
        continuing: Collection[SequenceKey] = (),
        closing: PostgresBatch | None = None,
    ) -> PostgresBatch | None:
        if not topic_names or limit <= 0:
            return None
        closing = self._s.closable_within(closing)
        params = self._s.checkout_params(topic_names, limit, parent, continuing, closing)
        found: _Found | None = None
        with self.pool.connection() as conn:
            with _relay_pipeline(conn) as pipeline:
                claiming = psycopg.RawCursor(conn).execute(
                    *self._s.statement("claim_sequences", params), prepare=True
                )
                reading = psycopg.RawCursor(conn).execute(
                    *self._s.statement("claimed_messages", params),
                    binary=True,  # bytea as bytes on the wire: no hex to decode
                    prepare=True,
                )
                if closing is not None:
                    pipeline.sync()  # the leases and the rows are in; the transaction stays open
                    # the batch before: the server closes it while the rows are decoded
                    ending = psycopg.RawCursor(conn).execute(
                        *self._s.statement("close_batch", self._s.close_params(closing)),
                        prepare=True,
                    )
                    found = self._s.found(claiming.fetchall(), params, reading.fetchall(), limit)
                conn.execute(COMMIT)  # the end of the pipeline waits for it: one round trip
            if closing is None:  # decoded after the commit: nothing to overlap it with
                found = self._s.found(claiming.fetchall(), params, reading.fetchall(), limit)
            else:
                held = ending.fetchall()
                closing.close_within(lambda: self._s.check_held(closing, held))
            if found is not None and found.unreadable:
                conn.execute(
                    self._s.sql["park_unreadable"], self._s.unreadable_params(found.unreadable)
                )
                conn.commit()
        if (batch := self._s.batch_from(found, parent)) is None:
            return None
        found, depth = batch
        return PostgresBatch(found, self, depth)

    def _close_batch(self, batch: BufferedBatch) -> None:
        follow_ups = self._s.follow_ups(batch)
        held: list[tuple[Any, ...]] | None = None
        with self.pool.connection() as conn, _relay_pipeline(conn) as pipeline:
            closing = psycopg.RawCursor(conn).execute(
                *self._s.statement("close_batch", self._s.close_params(batch)), prepare=True
            )
            if follow_ups:  # one more round trip, in the same transaction: the sequences held
                pipeline.sync()
                held = closing.fetchall()
                if writes := self._s.follow_up_params(follow_ups, held):
                    conn.cursor().executemany(self._s.sql["insert_message"], writes)
            conn.execute(COMMIT)  # waited for by the pipeline's end
        self._s.check_held(batch, closing.fetchall() if held is None else held)

    def subscribe_wakeups(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Wake ``callback`` when a transaction that wrote to this outbox commits."""
        return self._listener.subscribe(callback)

    def dead_letters(self, topic: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Parked and blocked messages, oldest first."""
        rows = self._run("list_dead_letters", {"topic": topic, "limit": limit})
        return [self._s.dead_letter(row) for row in rows]

    def replay_dead_letters(self, ids: Sequence[str]) -> int:
        """Make parked or blocked messages due now with zero attempts, keeping their ids."""
        rows = self._run("replay_dead_letters", {"ids": integer_ids(ids), "now": self._s.now()})
        return int(rows[0][0])

    def purge_dead_letters(self, ids: Sequence[str]) -> int:
        """Delete parked or blocked messages for good."""
        return int(self._run("purge_dead_letters", {"ids": integer_ids(ids)})[0][0])

    def backlog(self) -> list[TopicBacklog]:
        """Pending, oldest pending age and dead letters, per topic."""
        return [self._s.backlog_row(row) for row in self._run("backlog", {"now": self._s.now()})]

    def purge_published(self, older_than: timedelta) -> int:
        """Delete kept published messages older than ``older_than``; return how many."""
        params = {"older_than": older_than.total_seconds(), "now": self._s.now()}
        return int(self._run("purge_published", params)[0][0])

    def find_message(self, id: str) -> MessageRecord | None:
        """The message of outbox id ``id``: pending, blocked, parked, or settled and kept
        (``keep_published``, or its mark's details said ``keep``); ``None`` if there is none."""
        [number] = integer_ids([id])
        rows = self._run("find_message", {"id": number})
        return self._s.message_record(rows[0]) if rows else None

    def purge_settled(self, topic: str, older_than: timedelta) -> int:
        """Delete the kept messages of ``topic`` settled more than ``older_than`` ago; return
        how many."""
        params = {"topic": topic, "older_than": older_than.total_seconds(), "now": self._s.now()}
        return int(self._run("purge_settled", params)[0][0])


class AsyncPostgresBatch(AsyncBufferedBatch):
    """Messages leased from an :class:`AsyncPostgresStore`; marks are applied on close.

    It can read the next batch ahead (:class:`~outboxbind.store.AsyncReadAheadBatch`).
    """

    def __init__(
        self, found: _Found, store: AsyncPostgresStore, continuations: dict[SequenceKey, int]
    ) -> None:
        super().__init__(found.messages, found.tokens, store._close_batch)
        self._store = store
        self.last_positions = found.last_positions
        self.sizes = found.sizes
        self.continuations = continuations
        self.claim = found.claim

    async def read_ahead(
        self,
        topic_names: Sequence[str],
        limit: int,
        continuing: Collection[SequenceKey],
        closing: AsyncMessageBatch | None = None,
    ) -> AsyncPostgresBatch | None:
        """See :meth:`PostgresBatch.read_ahead`."""
        if self.closed:
            raise RuntimeError("this batch is closed")
        previous = closing if isinstance(closing, AsyncPostgresBatch) else None
        return await self._store._checkout(topic_names, limit, self, continuing, previous)


class AsyncPostgresStore:
    """The asyncio twin of :class:`PostgresStore`, over a ``psycopg_pool.AsyncConnectionPool``.

    Same arguments and behaviour; every method is a coroutine but :meth:`subscribe_wakeups`.
    """

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        schema: str = "public",
        table: str = "outbox",
        lease_duration: float = 60.0,
        clock: Callable[[], float] | None = None,
        owner: str | None = None,
        listen_conninfo: str | None = None,
        keep_published: bool = False,
    ) -> None:
        if not isinstance(pool, AsyncConnectionPool):
            raise TypeError(
                f"AsyncPostgresStore needs a psycopg_pool.AsyncConnectionPool, "
                f"not {type(pool).__name__}"
            )
        self.pool = pool
        self._s = _Statements(
            schema=schema,
            table=table,
            lease_duration=lease_duration,
            clock=clock,
            owner=owner,
            keep_published=keep_published,
        )
        conninfo, kwargs = (listen_conninfo, {}) if listen_conninfo else _conninfo_of(pool)
        self._listener = _Listener(conninfo, kwargs, self._s.channel)
        self._schema_checked = False  # checked by migrate() or the first checkout

    @property
    def lease_duration(self) -> float:
        """Seconds a batch holds its sequences."""
        return self._s.lease_duration

    def __repr__(self) -> str:
        return f"AsyncPostgresStore(schema={self._s.schema!r}, table={self._s.table!r})"

    async def migrate(self) -> list[int]:
        """See :meth:`PostgresStore.migrate`."""
        conninfo, kwargs = self._listener.conninfo, self._listener.kwargs

        def run() -> list[int]:
            with psycopg.connect(conninfo, **kwargs) as conn:
                return migrate(conn, schema=self._s.schema, table=self._s.table)

        applied = await asyncio.to_thread(run)
        self._schema_checked = True
        return applied

    async def schema_version(self) -> int | None:
        """See :meth:`PostgresStore.schema_version`."""
        conninfo, kwargs = self._listener.conninfo, self._listener.kwargs

        def run() -> int | None:  # one connection of its own, as migrate() has
            with psycopg.connect(conninfo, **kwargs) as conn:
                return check_version(conn, schema=self._s.schema, table=self._s.table)

        version = await asyncio.to_thread(run)
        self._schema_checked = True
        return version

    async def _run(self, name: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        async with self.pool.connection() as conn:
            cursor = await conn.execute(self._s.sql[name], params)
            rows: list[tuple[Any, ...]] = await cursor.fetchall()
            return rows

    async def checkout_batch(
        self, topic_names: Sequence[str], limit: int
    ) -> AsyncPostgresBatch | None:
        """See :meth:`PostgresStore.checkout_batch`."""
        if not self._schema_checked:
            await self.schema_version()
        return await self._checkout(topic_names, limit)

    async def _checkout(
        self,
        topic_names: Sequence[str],
        limit: int,
        parent: AsyncPostgresBatch | None = None,
        continuing: Collection[SequenceKey] = (),
        closing: AsyncPostgresBatch | None = None,
    ) -> AsyncPostgresBatch | None:
        if not topic_names or limit <= 0:
            return None
        closing = self._s.closable_within(closing)
        params = self._s.checkout_params(topic_names, limit, parent, continuing, closing)
        found: _Found | None = None
        async with self.pool.connection() as conn:
            async with _async_relay_pipeline(conn) as pipeline:
                claiming = await psycopg.AsyncRawCursor(conn).execute(
                    *self._s.statement("claim_sequences", params), prepare=True
                )
                reading = await psycopg.AsyncRawCursor(conn).execute(
                    *self._s.statement("claimed_messages", params),
                    binary=True,  # bytea as bytes on the wire: no hex to decode
                    prepare=True,
                )
                if closing is not None:
                    # the leases and the rows are in; the transaction stays open
                    await pipeline.sync()
                    # the batch before: the server closes it while the rows are decoded
                    ending = await psycopg.AsyncRawCursor(conn).execute(
                        *self._s.statement("close_batch", self._s.close_params(closing)),
                        prepare=True,
                    )
                    found = self._s.found(
                        await claiming.fetchall(), params, await reading.fetchall(), limit
                    )
                await conn.execute(COMMIT)  # the end of the pipeline waits for it: one round trip
            if closing is None:  # decoded after the commit: nothing to overlap it with
                found = self._s.found(
                    await claiming.fetchall(), params, await reading.fetchall(), limit
                )
            else:
                held = await ending.fetchall()
                closing.close_within(lambda: self._s.check_held(closing, held))
            if found is not None and found.unreadable:
                await conn.execute(
                    self._s.sql["park_unreadable"], self._s.unreadable_params(found.unreadable)
                )
                await conn.commit()
        if (batch := self._s.batch_from(found, parent)) is None:
            return None
        found, depth = batch
        return AsyncPostgresBatch(found, self, depth)

    async def _close_batch(self, batch: AsyncBufferedBatch) -> None:
        follow_ups = self._s.follow_ups(batch)
        held: list[tuple[Any, ...]] | None = None
        async with self.pool.connection() as conn, _async_relay_pipeline(conn) as pipeline:
            closing = await psycopg.AsyncRawCursor(conn).execute(
                *self._s.statement("close_batch", self._s.close_params(batch)), prepare=True
            )
            if follow_ups:  # one more round trip, in the same transaction: the sequences held
                await pipeline.sync()
                held = await closing.fetchall()
                if writes := self._s.follow_up_params(follow_ups, held):
                    await conn.cursor().executemany(self._s.sql["insert_message"], writes)
            await conn.execute(COMMIT)  # waited for by the pipeline's end
        self._s.check_held(batch, await closing.fetchall() if held is None else held)

    def subscribe_wakeups(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Wake ``callback`` (from a listener thread) when a writing transaction commits."""
        return self._listener.subscribe(callback)

    async def dead_letters(self, topic: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Parked and blocked messages, oldest first."""
        rows = await self._run("list_dead_letters", {"topic": topic, "limit": limit})
        return [self._s.dead_letter(row) for row in rows]

    async def replay_dead_letters(self, ids: Sequence[str]) -> int:
        """Make parked or blocked messages due now with zero attempts, keeping their ids."""
        params = {"ids": integer_ids(ids), "now": self._s.now()}
        return int((await self._run("replay_dead_letters", params))[0][0])

    async def purge_dead_letters(self, ids: Sequence[str]) -> int:
        """Delete parked or blocked messages for good."""
        return int((await self._run("purge_dead_letters", {"ids": integer_ids(ids)}))[0][0])

    async def backlog(self) -> list[TopicBacklog]:
        """Pending, oldest pending age and dead letters, per topic."""
        rows = await self._run("backlog", {"now": self._s.now()})
        return [self._s.backlog_row(row) for row in rows]

    async def purge_published(self, older_than: timedelta) -> int:
        """Delete kept published messages older than ``older_than``; return how many."""
        params = {"older_than": older_than.total_seconds(), "now": self._s.now()}
        return int((await self._run("purge_published", params))[0][0])

    async def find_message(self, id: str) -> MessageRecord | None:
        """See :meth:`PostgresStore.find_message`."""
        [number] = integer_ids([id])
        rows = await self._run("find_message", {"id": number})
        return self._s.message_record(rows[0]) if rows else None

    async def purge_settled(self, topic: str, older_than: timedelta) -> int:
        """See :meth:`PostgresStore.purge_settled`."""
        params = {"topic": topic, "older_than": older_than.total_seconds(), "now": self._s.now()}
        return int((await self._run("purge_settled", params))[0][0])
