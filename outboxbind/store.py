"""The store contract: what a database must offer the relay.

A store has one job: :meth:`Store.checkout_batch` hands out a :class:`MessageBatch` that holds
its messages exclusively until it is closed. Everything the relay learns while publishing is
told to the batch (``mark_published``, ``mark_failed``, ``mark_dead``) and takes effect when
the batch is closed. The conformance kit in :mod:`outboxbind.testing` is this contract in
executable form: a store that passes it works with the relay.

The rules a store keeps:

* **Exclusive.** While a batch is open, no other checkout (in this process or any other) may
  return any message of the batch's sequences. A sequence is a ``(topic, ordering_key)`` pair;
  messages without an ordering key form their topic's sequence.
* **Ordered.** A batch lists each sequence's messages in the order they were written, and only a
  prefix of the sequence's pending messages: never a message while an earlier message of its
  sequence is leased by another batch or waiting for a retry (``mark_failed``).
* **Delayed.** A message written with ``deliver_after`` is not checked out before then; until it
  is due it does not hold back later messages of its sequence.
* **Leased.** A batch holds its sequences through a lease that expires, so a relay killed
  mid-batch does not hold them forever. A batch whose lease expired and was taken by another
  checkout must not change anything of those sequences on close (the fencing rule); it raises
  :class:`~outboxbind.errors.LeaseLost` instead.
* **Fair.** When more sequences are due than fit in ``limit``, no sequence takes the whole batch
  while others wait.

A store may also let a batch read the next one ahead (:class:`ReadAheadBatch`): the relay then
checks out its next batch while this one's messages are being published, so the database works
while the relay does. The next batch may continue this batch's sequences under the same leases.

A store that keeps what the relay saves with a message (:class:`ProgressStore`, its batches
:class:`DetailedBatch`) can also serve handler topics and topics that keep settled messages:

* **Progress.** A mark may carry :class:`MarkDetails`: the message's progress (a handler topic's
  per-handler results) comes back with the message at its next checkout, with its dead letter,
  and with the settled message when it is kept.
* **Follow-ups.** The entries of ``MarkDetails.follow_ups`` are written in the same transaction
  that applies the mark: both are applied, or neither (and neither when the lease was lost).
* **Kept.** A published message whose details say ``keep`` is kept as settled, with its
  progress, until :meth:`ProgressStore.purge_settled` removes it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Literal, Protocol, TypeVar, runtime_checkable

import attrs

from outboxbind.errors import LeaseLost
from outboxbind.messages import OutboxEntry, PersistedMessage
from outboxbind.threads import DaemonThreadPool

T = TypeVar("T")

SequenceKey = tuple[str, str]
"""A sequence as stores key it: ``(topic, ordering_key or "")``."""

__all__ = [
    "AsyncMessageBatch",
    "AsyncStore",
    "DeadLetter",
    "DeadLetterAdmin",
    "DetailedBatch",
    "MarkDetails",
    "MessageRecord",
    "ProgressStore",
    "AsyncProgressStore",
    "MessageBatch",
    "Store",
    "TopicBacklog",
    "AsyncBufferedBatch",
    "BufferedBatch",
    "MarkedOutcome",
    "ReadAheadBatch",
    "AsyncReadAheadBatch",
    "WakeupSource",
    "integer_ids",
    "round_robin",
    "threaded",
]


class MessageBatch(Protocol):
    """Messages checked out by one relay, held exclusively until :meth:`close`."""

    @property
    def messages(self) -> Sequence[PersistedMessage]:
        """The batch's messages, each sequence's in the order they were written."""
        ...

    def mark_published(self, message: PersistedMessage, publish_id: str) -> None:
        """Record that ``message`` was published; it is never checked out again after close."""
        ...

    def mark_failed(
        self, message: PersistedMessage, error: str, retry_after: timedelta | None
    ) -> None:
        """Record a failed attempt: count it, keep ``error``, and make the message due again
        after ``retry_after`` (``None``: hold it, and so its sequence, until it is replayed).
        Later messages of its sequence wait for it."""
        ...

    def mark_dead(self, message: PersistedMessage, error: str) -> None:
        """Move ``message`` to the dead letters with ``error``; its sequence goes on without it."""
        ...

    def close(self) -> None:
        """Apply what was marked, release every message that was not, and end the lease.

        Raises :class:`~outboxbind.errors.LeaseLost` for sequences whose lease was taken over;
        their marks are dropped (another relay now owns them).
        """
        ...

    def __enter__(self) -> MessageBatch: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class ReadAheadBatch(MessageBatch, Protocol):
    """A batch that can check out the next batch while it is still open (optional).

    The relay's poll loop uses it when batches come back full: it calls :meth:`read_ahead` as
    it starts publishing this batch, publishes the next batch in the next round, and closes this
    batch while the next one publishes. This batch is always closed before the next one.
    """

    def read_ahead(
        self,
        topic_names: Sequence[str],
        limit: int,
        continuing: Collection[SequenceKey],
        closing: MessageBatch | None,
    ) -> MessageBatch | None:
        """Check out the next batch, as :meth:`Store.checkout_batch` would, while this one is
        open; called at most once, before :meth:`MessageBatch.close`.

        ``closing`` is the batch before this one, published and marked, which the relay is
        about to close: a store may close it first in the same round trip, exactly as its
        ``close()`` would, and then let its ``close()`` do nothing but raise what closing found
        (``LeaseLost``); :meth:`BufferedBatch.close_within` does that. The relay calls
        ``closing.close()`` after this returns or raises, so a store that leaves it (or fails
        before closing it) loses nothing.

        The next batch may also hold the sequences of ``continuing`` (some of this batch's
        sequences): their messages after this batch's last one of each, under this batch's
        leases, extended. This batch's close then applies its marks under those leases (the
        fencing rule holds as before) and keeps them for the next batch, which ends them. A
        store may leave a sequence out of the next batch (to be fair to sequences nobody
        holds, say); this batch's close then ends its lease as usual.

        The relay does not publish the next batch's messages of a sequence of which this batch
        left a message unpublished; it names only the others in ``continuing`` of the batch
        after that, so a sequence that stopped is never carried further.
        """
        ...


class Store(Protocol):
    """A place the relay checks out outbox messages from."""

    def checkout_batch(self, topic_names: Sequence[str], limit: int) -> MessageBatch | None:
        """Check out up to ``limit`` due messages of ``topic_names``; ``None`` if there are none."""
        ...


class AsyncMessageBatch(Protocol):
    """The asyncio twin of :class:`MessageBatch`."""

    @property
    def messages(self) -> Sequence[PersistedMessage]:
        """The batch's messages, each sequence's in the order they were written."""
        ...

    async def mark_published(self, message: PersistedMessage, publish_id: str) -> None:
        """See :meth:`MessageBatch.mark_published`."""
        ...

    async def mark_failed(
        self, message: PersistedMessage, error: str, retry_after: timedelta | None
    ) -> None:
        """See :meth:`MessageBatch.mark_failed`."""
        ...

    async def mark_dead(self, message: PersistedMessage, error: str) -> None:
        """See :meth:`MessageBatch.mark_dead`."""
        ...

    async def close(self) -> None:
        """See :meth:`MessageBatch.close`."""
        ...


@runtime_checkable
class AsyncReadAheadBatch(AsyncMessageBatch, Protocol):
    """The asyncio twin of :class:`ReadAheadBatch`."""

    async def read_ahead(
        self,
        topic_names: Sequence[str],
        limit: int,
        continuing: Collection[SequenceKey],
        closing: AsyncMessageBatch | None,
    ) -> AsyncMessageBatch | None:
        """See :meth:`ReadAheadBatch.read_ahead`."""
        ...


class AsyncStore(Protocol):
    """The asyncio twin of :class:`Store`."""

    async def checkout_batch(
        self, topic_names: Sequence[str], limit: int
    ) -> AsyncMessageBatch | None:
        """See :meth:`Store.checkout_batch`."""
        ...


@runtime_checkable
class WakeupSource(Protocol):
    """A store that can tell the relay when new messages were committed.

    The relay subscribes while it polls; ``callback`` may be called from any thread, and may be
    called spuriously. Polling stays the fallback, so a lost wake-up costs latency, never a
    message.
    """

    def subscribe_wakeups(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when messages may have been committed; return an unsubscriber."""
        ...


def _entries(entries: Iterable[OutboxEntry]) -> tuple[OutboxEntry, ...]:
    return tuple(entries)


@attrs.frozen
class MarkDetails:
    """What the relay asks a store to save with one message's mark, beyond the mark itself.

    Given to :meth:`DetailedBatch.add_details` for messages the relay then marks; only handler
    topics and topics registered with ``keep_settled`` send any.

    Attributes:
        progress: text (JSON) to keep with the message, replacing what was kept before: it comes
            back as :attr:`PersistedMessage.progress` at the message's next checkout, with its
            dead letter, and with the settled message when it is kept.
        follow_ups: new outbox messages to write in the same transaction that applies the mark:
            both are applied, or neither. Dropped with the mark when the lease was lost.
        keep: for a published message: keep it as settled (with its progress, publish id and
            time) until :meth:`ProgressStore.purge_settled` removes it, rather than delete it.
    """

    progress: str | None = None
    follow_ups: tuple[OutboxEntry, ...] = attrs.field(default=(), converter=_entries)
    keep: bool = False


@runtime_checkable
class DetailedBatch(Protocol):
    """A batch that takes :class:`MarkDetails` for its messages (see :class:`ProgressStore`)."""

    def add_details(self, details: Mapping[str, MarkDetails]) -> None:
        """Record details by message id, to be applied with those messages' marks on close.

        Called before the marks they go with. A message's details without a mark are dropped
        (the message is released as if unmarked). No I/O: a buffered batch keeps them until
        close, also in the asyncio face.

        Raises:
            ValueError: an id is not one of this batch's messages.
            RuntimeError: the batch is closed.
        """
        ...


@attrs.frozen
class MessageRecord:
    """Where one message stands, for operators and the ``show`` command.

    Attributes:
        message: the message, with its attempts and its saved progress.
        state: ``"pending"`` (due now or later, or waiting for a retry), ``"blocked"`` (given up
            on, holding back its sequence), ``"parked"`` (a dead letter) or ``"settled"``
            (published and kept).
        error: the last error, if an attempt failed.
        since: when it last failed, or was settled; ``None`` for a pending message that never
            failed.
        publish_id: the destination's id of a settled message.
    """

    message: PersistedMessage
    state: Literal["pending", "blocked", "parked", "settled"]
    error: str | None = None
    since: datetime | None = None
    publish_id: str | None = None


@runtime_checkable
class ProgressStore(Protocol):
    """A store that keeps what the relay saves with messages (optional; every built-in store
    does). Its batches are :class:`DetailedBatch`. Handler topics and ``keep_settled`` need it.
    """

    def find_message(self, id: str) -> MessageRecord | None:
        """The message of outbox id ``id`` wherever it is (pending, dead or settled and kept),
        or ``None`` when there is no such message (any more)."""
        ...

    def purge_settled(self, topic: str, older_than: timedelta) -> int:
        """Delete the kept settled messages of ``topic`` settled more than ``older_than`` ago;
        return how many."""
        ...


@runtime_checkable
class AsyncProgressStore(Protocol):
    """The asyncio twin of :class:`ProgressStore`."""

    async def find_message(self, id: str) -> MessageRecord | None:
        """See :meth:`ProgressStore.find_message`."""
        ...

    async def purge_settled(self, topic: str, older_than: timedelta) -> int:
        """See :meth:`ProgressStore.purge_settled`."""
        ...


@attrs.frozen
class DeadLetter:
    """A message the relay gave up on.

    Attributes:
        message: the message, with its attempts.
        error: the last error.
        state: ``"parked"`` (moved aside, its sequence went on) or ``"blocked"`` (still at the
            head of its sequence, holding the rest back).
        since: when it was given up on.
    """

    message: PersistedMessage
    error: str
    state: Literal["parked", "blocked"]
    since: datetime


@attrs.frozen
class TopicBacklog:
    """How far behind one topic is.

    Attributes:
        topic: the topic name.
        pending: messages not yet published (blocked ones included).
        oldest_pending_age: seconds since the oldest pending message was written (0 if none).
        dead: dead letters, parked and blocked.
    """

    topic: str
    pending: int
    oldest_pending_age: float
    dead: int


@runtime_checkable
class DeadLetterAdmin(Protocol):
    """Operations on dead letters and the backlog, for the CLI and operators (optional)."""

    def dead_letters(self, topic: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """List dead letters, oldest first, of one topic or all."""
        ...

    def replay_dead_letters(self, ids: Sequence[str]) -> int:
        """Make the given dead letters pending again with zero attempts; return how many."""
        ...

    def purge_dead_letters(self, ids: Sequence[str]) -> int:
        """Delete the given dead letters for good; return how many."""
        ...

    def backlog(self) -> list[TopicBacklog]:
        """Return the backlog of every topic that has pending or dead messages."""
        ...


class _ThreadedBatch:
    def __init__(self, batch: MessageBatch, store: _ThreadedStore) -> None:
        self._batch = batch
        self._store = store

    @property
    def messages(self) -> Sequence[PersistedMessage]:
        return self._batch.messages

    async def mark_published(self, message: PersistedMessage, publish_id: str) -> None:
        self._batch.mark_published(message, publish_id)  # buffered: no I/O until close

    async def mark_failed(
        self, message: PersistedMessage, error: str, retry_after: timedelta | None
    ) -> None:
        self._batch.mark_failed(message, error, retry_after)

    async def mark_dead(self, message: PersistedMessage, error: str) -> None:
        self._batch.mark_dead(message, error)

    async def close(self) -> None:
        await self._store.run(self._batch.close)

    def add_details(self, details: Mapping[str, MarkDetails]) -> None:
        add_details = getattr(self._batch, "add_details", None)
        if add_details is None:
            raise TypeError(f"{type(self._batch).__name__} cannot keep progress (add_details)")
        add_details(details)  # buffered: no I/O until close

    def record(self, marks: Sequence[MarkedOutcome]) -> None:
        record = getattr(self._batch, "record", None)
        if record is not None:
            record(marks)
            return
        for kind, message, detail, retry_after in marks:
            if kind == "published":
                self._batch.mark_published(message, detail or "")
            elif kind == "failed":
                self._batch.mark_failed(message, detail or "", retry_after)
            else:
                self._batch.mark_dead(message, detail or "")


class _ThreadedReadAheadBatch(_ThreadedBatch):
    _batch: ReadAheadBatch

    async def read_ahead(
        self,
        topic_names: Sequence[str],
        limit: int,
        continuing: Collection[SequenceKey],
        closing: AsyncMessageBatch | None,
    ) -> AsyncMessageBatch | None:
        inner = closing._batch if isinstance(closing, _ThreadedBatch) else None
        batch = await self._store.run(
            lambda: self._batch.read_ahead(topic_names, limit, continuing, inner)
        )
        return None if batch is None else self._store.wrap(batch)


class _ThreadedStore:
    def __init__(self, store: Store) -> None:
        self.store = store
        # its own threads: a busy default executor must not stall the relay, nor it the app
        # daemon threads: a store call stuck on a frozen server must not hold up the exit
        self._executor = DaemonThreadPool(2, "outboxbind-store")

    async def run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def checkout_batch(
        self, topic_names: Sequence[str], limit: int
    ) -> AsyncMessageBatch | None:
        batch = await self.run(lambda: self.store.checkout_batch(topic_names, limit))
        return None if batch is None else self.wrap(batch)

    def wrap(self, batch: MessageBatch) -> AsyncMessageBatch:
        if isinstance(batch, ReadAheadBatch):
            return _ThreadedReadAheadBatch(batch, self)
        return _ThreadedBatch(batch, self)

    def subscribe_wakeups(self, callback: Callable[[], None]) -> Callable[[], None]:
        if isinstance(self.store, WakeupSource):
            return self.store.subscribe_wakeups(callback)
        return lambda: None

    async def find_message(self, id: str) -> MessageRecord | None:
        store = self._progress_store()
        return await self.run(lambda: store.find_message(id))

    async def purge_settled(self, topic: str, older_than: timedelta) -> int:
        store = self._progress_store()
        return await self.run(lambda: store.purge_settled(topic, older_than))

    def _progress_store(self) -> ProgressStore:
        if not isinstance(self.store, ProgressStore):
            raise TypeError(f"{type(self.store).__name__} does not keep progress")
        return self.store

    def __repr__(self) -> str:
        return f"threaded({self.store!r})"


def threaded(store: Store) -> AsyncStore:
    """Give a synchronous store an asyncio face by running its I/O in worker threads of its own.

    The store's batches must buffer their marks until ``close()`` (every built-in store does,
    see :class:`BufferedBatch`), because only ``checkout_batch`` and ``close`` run in a thread.
    """
    return _ThreadedStore(store)


# -- helpers for store authors -------------------------------------------------------------------

MarkedOutcome = tuple[Literal["published", "failed", "dead"], PersistedMessage, str | None,
                      timedelta | None]  # fmt: skip
"""What a batch was told about one message: kind, message, detail (the publish id of a published
message, the error of a failed or dead one), and retry_after."""


class _MarkBuffer:
    def __init__(self, messages: list[PersistedMessage], tokens: dict[SequenceKey, str]) -> None:
        self._messages = messages
        self._leased = {message.id: message for message in messages}
        self.tokens = tokens
        self.outcomes: dict[SequenceKey, list[MarkedOutcome]] = {}
        #: What to save with some messages' marks, by message id (see :class:`MarkDetails`).
        self.details: dict[str, MarkDetails] = {}
        #: Sequences whose lease passed to the batch read ahead: close keeps their leases.
        self.passed_on: set[SequenceKey] = set()
        self.closed = False
        self._closed_with: BaseException | None = None

    @property
    def messages(self) -> Sequence[PersistedMessage]:
        """The leased messages; each sequence's in order."""
        return self._messages

    def _mark(
        self,
        kind: Literal["published", "failed", "dead"],
        message: PersistedMessage,
        detail: str | None = None,
        retry_after: timedelta | None = None,
    ) -> None:
        if self.closed:
            raise RuntimeError("this batch is closed")
        leased = self._leased.get(message.id)
        if leased is not message and leased != message:
            raise ValueError(f"message {message.id} is not part of this batch")
        sequence = (message.topic, message.ordering_key or "")
        outcomes = self.outcomes.get(sequence)
        if outcomes is None:
            outcomes = self.outcomes[sequence] = []
        outcomes.append((kind, message, detail, retry_after))

    def record(self, marks: Sequence[MarkedOutcome]) -> None:
        """Record many marks at once, in order, as the ``mark_*`` methods would one by one (the
        relay's way: one call per round rather than one per message)."""
        if self.closed:
            raise RuntimeError("this batch is closed")
        leased, outcomes = self._leased, self.outcomes
        for mark in marks:
            message = mark[1]
            found = leased.get(message.id)
            if found is not message and found != message:
                raise ValueError(f"message {message.id} is not part of this batch")
            sequence = (message.topic, message.ordering_key or "")
            recorded = outcomes.get(sequence)
            if recorded is None:
                recorded = outcomes[sequence] = []
            recorded.append(mark)

    def add_details(self, details: Mapping[str, MarkDetails]) -> None:
        """Keep ``details`` (by message id) to apply with those messages' marks on close."""
        if self.closed:
            raise RuntimeError("this batch is closed")
        for id_ in details:
            if id_ not in self._leased:
                raise ValueError(f"message {id_} is not part of this batch")
        self.details.update(details)

    def close_within(self, close: Callable[[], object]) -> None:
        """For a store that closes this batch within another round trip (while reading the next
        batch ahead): run ``close``, the store's own close of it (or what checks its outcome),
        and mark the batch closed. A ``LeaseLost`` it raises is kept: this batch's ``close()``
        then does nothing but raise it, once. Any other error leaves the batch open."""
        try:
            close()
        except LeaseLost as lost:
            self._closed_with = lost
        self.closed = True

    def _closing(self) -> bool:
        """Mark the batch closed; return False if it already was (raising what a store that
        closed it found, once)."""
        if self.closed:
            error, self._closed_with = self._closed_with, None
            if error is not None:
                raise error
            return False
        self.closed = True
        return True


class BufferedBatch(_MarkBuffer):
    """A :class:`MessageBatch` that buffers its marks and applies them on :meth:`close`.

    A store makes it with the leased messages, the lease token of each sequence, and its
    ``apply`` function, which :meth:`close` calls once with the batch: it reads ``batch.tokens``,
    ``batch.passed_on`` (leases to keep for the batch read ahead, see :class:`ReadAheadBatch`)
    and ``batch.outcomes`` (each sequence's marks in the order they were made). Buffering keeps
    marks free of I/O and lets the store apply one batch in one transaction, with one fencing
    check per sequence.
    """

    def __init__(
        self,
        messages: list[PersistedMessage],
        tokens: dict[SequenceKey, str],
        apply: Callable[[BufferedBatch], None],
    ) -> None:
        super().__init__(messages, tokens)
        self._apply = apply

    def mark_published(self, message: PersistedMessage, publish_id: str) -> None:
        """Acknowledge ``message``; it is removed (or kept as published) on close."""
        self._mark("published", message, publish_id)

    def mark_failed(
        self, message: PersistedMessage, error: str, retry_after: timedelta | None
    ) -> None:
        """Count a failed attempt; due again after ``retry_after`` (``None``: blocked)."""
        self._mark("failed", message, error, retry_after)

    def mark_dead(self, message: PersistedMessage, error: str) -> None:
        """Park ``message`` in the dead letters on close."""
        self._mark("dead", message, error)

    def close(self) -> None:
        """Apply the marks and end the leases (once; later calls do nothing)."""
        if self._closing():
            self._apply(self)

    def __enter__(self) -> BufferedBatch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncBufferedBatch(_MarkBuffer):
    """The asyncio twin of :class:`BufferedBatch`: its ``apply`` is a coroutine function."""

    def __init__(
        self,
        messages: list[PersistedMessage],
        tokens: dict[SequenceKey, str],
        apply: Callable[[AsyncBufferedBatch], Awaitable[None]],
    ) -> None:
        super().__init__(messages, tokens)
        self._apply = apply

    async def mark_published(self, message: PersistedMessage, publish_id: str) -> None:
        """See :meth:`BufferedBatch.mark_published`."""
        self._mark("published", message, publish_id)

    async def mark_failed(
        self, message: PersistedMessage, error: str, retry_after: timedelta | None
    ) -> None:
        """See :meth:`BufferedBatch.mark_failed`."""
        self._mark("failed", message, error, retry_after)

    async def mark_dead(self, message: PersistedMessage, error: str) -> None:
        """See :meth:`BufferedBatch.mark_dead`."""
        self._mark("dead", message, error)

    async def close(self) -> None:
        """Apply the marks and end the leases (once; later calls do nothing)."""
        if self._closing():
            await self._apply(self)

    async def __aenter__(self) -> AsyncBufferedBatch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def integer_ids(ids: Sequence[str]) -> list[int]:
    """``ids`` as integers, for stores whose outbox ids are numbers; a clear error otherwise."""
    numbers = []
    for id_ in ids:
        try:
            numbers.append(int(id_))
        except (TypeError, ValueError):
            raise ValueError(f"outbox ids are whole numbers here; {id_!r} is not one") from None
    return numbers


M = TypeVar("M")


def round_robin(sequences: dict[SequenceKey, list[M]], limit: int) -> list[M]:
    """Interleave the sequences' messages, each keeping its order, and cut at ``limit``.

    Every sequence keeps a prefix of its messages, and none takes the batch while others wait.
    """
    if len(sequences) == 1:  # the common case of one ordered topic: nothing to interleave
        [only] = sequences.values()
        return only[:limit]
    chosen: list[M] = []
    depth = 0
    while len(chosen) < limit:
        layer = [items[depth] for items in sequences.values() if depth < len(items)]
        if not layer:
            break
        chosen.extend(layer[: limit - len(chosen)])
        depth += 1
    return chosen
