"""Handler topics: local side effects for outbox messages, each handler tracked on its own.

A :class:`HandlerTopic` is bound and published to like any topic, and registered on a relay like
any topic; but where another topic sends its messages to a broker, a handler topic runs
*handlers* for them: functions of yours (send an email, call a payment API, publish to a queue),
chosen by the message's type. This is txob's event processor, on outboxbind's relay and stores::

    events = HandlerTopic(
        "user-events",
        JsonCodec(),
        handlers={"UserInvited": {"send_email": send_email, "publish": publish_invite}},
    )
    with conn.transaction():
        conn.execute("insert into users ...")
        bind(events, persister(conn)).publish({"type": "UserInvited", "user_id": 42})

    relay.register_topic(events, retry=RetryPolicy(max_attempts=5))

What each handler did is kept with the message in the store (its *progress*): when one handler
fails, the message is retried later and only the handlers that have not succeeded run again. A
message is settled when all its handlers succeeded. The rest is txob's error model:

* a handler raises :class:`Unprocessable`: it is never retried for this message; the others go
  on, and once they are done the message is settled as unprocessable (a parked dead letter);
* a handler raises :class:`RetryAt`: the message is retried no earlier than the time it names
  (the latest of several handlers' times wins) instead of after the retry policy's delay;
* the message fails ``RetryPolicy.max_attempts`` times: the ``on_max_errors`` hook runs, and
  the messages it writes (a dead-letter event to another topic, say) are written in the same
  transaction that records the failure: both are committed, or neither.

Delivery is at least once: a handler that succeeded but whose result was not saved (the relay
was killed, the store was unreachable) runs again. Make handlers idempotent, keyed on
``context.message.id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import json
import logging
import threading
import time
import types
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Generic, NamedTuple, TypeVar

import attrs

from outboxbind.codecs import Codec
from outboxbind.errors import (
    ConfigurationError,
    NotAttempted,
    PublishError,
    UnpublishableError,
)
from outboxbind.messages import OutboxEntry, PersistedMessage
from outboxbind.store import MessageRecord
from outboxbind.threads import DaemonThreadPool
from outboxbind.topics import PublishOutcome, Topic
from outboxbind.tracing import CORRELATION_ATTRIBUTE, enter_message_context, message_context

__all__ = [
    "CancellationToken",
    "FollowUps",
    "Handled",
    "HandlerCancelled",
    "HandlerContext",
    "HandlerFailure",
    "HandlerResult",
    "HandlerTopic",
    "MaxErrorsReached",
    "RetryAt",
    "Unprocessable",
    "UnprocessableMessage",
    "handler_results",
]

T = TypeVar("T")

log = logging.getLogger("outboxbind.handlers")

Handler = Callable[[Any, "HandlerContext"], Awaitable[None] | None]
"""A handler: ``handler(event, context)``, a plain or an ``async`` function."""

MaxErrorsHook = Callable[["MaxErrorsReached"], Awaitable[None] | None]
"""The ``on_max_errors`` hook: ``hook(reached)``, a plain or an ``async`` function."""

#: The longest error text kept per handler.
MAX_ERROR_CHARS = 2000


# -- what handlers raise ---------------------------------------------------------------------------


class Unprocessable(Exception):
    """Raise from a handler that can never succeed on this message (bad data, say).

    The handler is not run for this message again; the message's other handlers go on, and
    once they are done the message is settled as unprocessable: parked as a dead letter with
    this error, visible in ``dead-letters`` and in its handler results. A replay runs the
    unprocessable handlers again (after you fixed what was wrong).
    """


class RetryAt(Exception):
    """Raise from a handler to retry the message no earlier than ``at`` (a rate limit's reset,
    say) instead of after the retry policy's delay. When several handlers name a time, the
    latest wins. The failure counts as an attempt, as any other.

    Args:
        at: a timezone-aware instant, or a delay from now.
        reason: what went wrong, kept as the handler's last error.
    """

    def __init__(self, at: datetime | timedelta, reason: str = "") -> None:
        if isinstance(at, timedelta):
            at = datetime.now(UTC) + at
        elif not isinstance(at, datetime) or at.tzinfo is None or at.utcoffset() is None:
            raise ConfigurationError(
                f"RetryAt needs a timezone-aware datetime or a timedelta, not {at!r}"
            )
        self.at = at
        super().__init__(reason or f"retry at {at.isoformat()}")


class HandlerCancelled(Exception):
    """The relay asked the running handlers to stop (it is stopping, or the batch ran out of
    time). Raised by :meth:`CancellationToken.raise_if_cancelled`; a sync handler may raise it
    to end early. Recorded as the handler's error; the handler runs again on the next try."""


# -- what the topic reports to the relay ---------------------------------------------------------


class Handled(str):
    """The outcome of a message whose handlers all succeeded: a publish id (``"handled"``)
    whose ``progress`` is the message's final results (made only when read: a relay reads it
    for a topic that keeps settled messages)."""

    _event_type: str
    _results: Mapping[str, HandlerResult] | None
    _ran: Sequence[str]
    _at: datetime | None

    def __new__(
        cls,
        event_type: str,
        results: Mapping[str, HandlerResult] | None,
        ran: Sequence[str] = (),
        at: datetime | None = None,
    ) -> Handled:
        handled = super().__new__(cls, "handled")
        handled._event_type = event_type
        handled._results = results  # or, on a first try: the handlers that ran, and when
        handled._ran = ran
        handled._at = at
        return handled

    @property
    def progress(self) -> str:
        """The final results, as the store keeps them."""
        results = self._results
        if results is None:
            results = dict.fromkeys(self._ran, HandlerResult(self._at))
        return _dump_results(self._event_type, results)


class HandlerFailure(PublishError):
    """The outcome of a message of which a handler failed: retried later; carries the progress
    to save (which handlers succeeded) and the time a :class:`RetryAt` asked for."""

    def __init__(self, text: str, *, progress: str, retry_at: datetime | None = None) -> None:
        super().__init__(text)
        self.progress = progress
        self.retry_at = retry_at


class UnprocessableMessage(UnpublishableError):
    """The outcome of a message that can never be handled: its handlers are done or
    unprocessable, or it cannot be decoded, typed, or has no handlers. Settled: not retried."""

    def __init__(self, text: str, *, progress: str | None = None) -> None:
        super().__init__(text)
        self.progress = progress


# -- what handlers get -----------------------------------------------------------------------------


class CancellationToken:
    """Tells a running handler that the relay wants it to stop: txob's ``AbortSignal``.

    An ``async`` handler is cancelled outright (``asyncio.CancelledError`` at its ``await``);
    a plain one cannot be, so it checks this token between steps, or waits on it instead of
    sleeping, and ends early. What it finished is saved; it runs again on the next try.
    """

    def __init__(self) -> None:
        self._event = threading.Event()

    @property
    def cancelled(self) -> bool:
        """Whether the relay asked the handlers to stop."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until cancelled or ``timeout`` seconds passed; return whether cancelled."""
        return self._event.wait(timeout)

    def raise_if_cancelled(self) -> None:
        """Raise :class:`HandlerCancelled` if the relay asked the handlers to stop."""
        if self._event.is_set():
            raise HandlerCancelled("the relay asked the handlers to stop")

    def cancel(self) -> None:
        """Ask the handlers to stop (the relay does; tests may)."""
        self._event.set()


@attrs.frozen
class HandlerResult:
    """What one handler did for one message so far (txob's ``handler_results`` entry).

    Attributes:
        processed_at: when it succeeded, or ``None``.
        unprocessable_at: when it raised :class:`Unprocessable`, or ``None``.
        errors: how many times it failed.
        last_error: its last error, or ``None``.
        last_error_at: when it last failed, or ``None``.
    """

    processed_at: datetime | None = None
    unprocessable_at: datetime | None = None
    errors: int = 0
    last_error: str | None = None
    last_error_at: datetime | None = None

    @property
    def succeeded(self) -> bool:
        """Whether the handler succeeded (it will not run again for this message)."""
        return self.processed_at is not None


class HandlerContext(NamedTuple):
    """What a handler gets beside the event (read-only; a named tuple, made once per handler
    and try, so that the cheapest handlers stay cheap).

    Attributes:
        message: the outbox message (its ``id`` is the idempotency key to use).
        event_type: the message's type, which chose the handlers.
        handler: this handler's name.
        correlation_id: the correlation id given at publish time, or ``None``. While the
            handler runs, it and the trace context captured at publish time are the current
            ones (see :func:`outboxbind.tracing.message_context`): spans the handler starts
            continue the publisher's trace, and messages it writes carry both on.
        cancellation: set when the relay asks the handlers to stop (see
            :class:`CancellationToken`).
        results: what every handler of the message did before this try.
    """

    message: PersistedMessage
    event_type: str
    handler: str
    correlation_id: str | None
    cancellation: CancellationToken
    results: Mapping[str, HandlerResult]

    @property
    def attempt(self) -> int:
        """Which try of the message this is (1 the first time)."""
        return self.message.attempts + 1


class FollowUps:
    """A persister that collects entries instead of writing them: the store writes them with
    the message's failure, in the same transaction. Bind topics to it as to any persister::

        bind(dead_events, reached.outbox).publish({"failed": reached.message.id})

    ``publish()`` returns ``""``: the outbox id is assigned when the failure is recorded.
    """

    def __init__(self) -> None:
        self.entries: list[OutboxEntry] = []

    def __call__(self, entry: OutboxEntry, /) -> str:
        """Collect ``entry`` to be written with the failure."""
        if not isinstance(entry, OutboxEntry):
            raise TypeError(f"a persister takes an OutboxEntry, not {type(entry).__name__}")
        self.entries.append(entry)
        return ""


@attrs.frozen
class MaxErrorsReached:
    """What the ``on_max_errors`` hook gets: the message that used up its attempts.

    Attributes:
        message: the outbox message, with its attempts.
        event: the decoded event.
        event_type: its type.
        results: what each of its handlers did, this last try included.
        error: the last failure, as the relay records it.
        correlation_id: its correlation id, or ``None``.
        outbox: a persister whose messages are written in the same transaction that records the
            failure (``bind(topic, reached.outbox).publish(...)``): both commit or neither does.
    """

    message: PersistedMessage
    event: Any
    event_type: str
    results: Mapping[str, HandlerResult]
    error: str
    correlation_id: str | None
    outbox: FollowUps


# -- handler results in the store ----------------------------------------------------------------


def _when(text: object) -> datetime | None:
    return datetime.fromisoformat(text) if isinstance(text, str) else None


def _load_results(progress: str | None) -> dict[str, HandlerResult]:
    if not progress:
        return {}
    try:
        saved = json.loads(progress)
        handlers = saved["handlers"]
        return {
            name: HandlerResult(
                processed_at=_when(entry.get("processed_at")),
                unprocessable_at=_when(entry.get("unprocessable_at")),
                errors=int(entry.get("errors", 0)),
                last_error=entry.get("last_error"),
                last_error_at=_when(entry.get("last_error_at")),
            )
            for name, entry in handlers.items()
        }
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(
            f"saved handler results are not readable: {exc}: {progress[:200]!r}"
        ) from exc


def _dump_results(event_type: str, results: Mapping[str, HandlerResult]) -> str:
    handlers = {}
    for name, result in results.items():
        entry: dict[str, object] = {"errors": result.errors}
        for field in ("processed_at", "unprocessable_at", "last_error_at"):
            value = getattr(result, field)
            if value is not None:
                entry[field] = value.isoformat()
        if result.last_error is not None:
            entry["last_error"] = result.last_error
        handlers[name] = entry
    return json.dumps({"type": event_type, "handlers": handlers}, separators=(",", ":"))


def handler_results(message: PersistedMessage | MessageRecord) -> dict[str, HandlerResult]:
    """The per-handler results saved with a message of a handler topic (txob's
    ``handler_results``): from a checked-out message, a dead letter's message, or a
    :class:`~outboxbind.store.MessageRecord` of ``store.find_message(id)``. Empty when no try of
    the message has been recorded yet."""
    if isinstance(message, MessageRecord):
        message = message.message
    return _load_results(message.progress)


def _describe(error: BaseException) -> str:
    text = str(error)
    return (f"{type(error).__name__}: {text}" if text else type(error).__name__)[:MAX_ERROR_CHARS]


# -- the topic -------------------------------------------------------------------------------------


class _Run:
    """One ``publish_batch`` call in progress: what :meth:`HandlerTopic.interrupt` reaches."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.cancellation = CancellationToken()
        self.tasks: set[asyncio.Future[Any]] = set()
        self.interrupted = False

    def interrupt(self) -> None:
        """Cancel the async handlers and set the token the sync ones check (any thread)."""
        self.interrupted = True
        self.cancellation.cancel()
        if not self.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: nothing runs any more
                self.loop.call_soon_threadsafe(self._cancel_tasks)

    def _cancel_tasks(self) -> None:
        for task in list(self.tasks):
            task.cancel()


def _type_field(field: str) -> Callable[[Any], object]:
    def type_of(event: Any) -> object:
        if type(event) is dict or isinstance(event, Mapping):
            return event[field]
        return getattr(event, field)

    return type_of


class HandlerTopic(Topic[T], Generic[T]):
    """A topic whose messages run local handlers, chosen by type, each tracked on its own.

    Args:
        name: the topic name (see :class:`~outboxbind.topics.Topic`).
        codec: encodes the events when they are published, decodes them for the handlers.
        handlers: for each event type, its handlers by name: ``{"UserInvited": {"send_email":
            send_email}}``. A handler is ``handler(event, context)``, plain or ``async``; the
            names are what the results are kept under, so keep them stable.
        type_of: how to find an event's type: the name of a field (a key of a dict event, or an
            attribute), or a function of the event returning a ``str``.
        ordering_key: as for any topic: events of one key are handled in order, one at a time
            (an event never starts while an earlier event of its key has unfinished handlers).
        max_handler_concurrency: how many handlers of one event run at once.
        max_event_concurrency: how many events of different keys a batch handles at once.
        on_max_errors: a hook run when an event has failed ``RetryPolicy.max_attempts``
            times, before it is given up on (see :class:`MaxErrorsReached`); the messages it
            writes to ``reached.outbox`` commit with the failure, or neither does. If the hook
            raises, the event is not given up on this time; it is tried again later.
        max_message_bytes, max_ordering_key_bytes, max_attributes, strict_sequence: as for any
            topic.

    Registered on a relay, its default poison policy is ``"park"``: an event given up on is
    settled as a dead letter (txob marks it processed), and the events after it go on.
    """

    default_poison = "park"
    keeps_progress = True

    def __init__(
        self,
        name: str,
        codec: Codec[T],
        handlers: Mapping[str, Mapping[str, Handler]],
        *,
        type_of: str | Callable[[T], str] = "type",
        ordering_key: Callable[[T], str | None] | None = None,
        max_handler_concurrency: int = 10,
        max_event_concurrency: int = 8,
        on_max_errors: MaxErrorsHook | None = None,
        max_message_bytes: int = 10_000_000,
        max_ordering_key_bytes: int = 1024,
        max_attributes: int = 100,
        strict_sequence: bool = False,
    ) -> None:
        super().__init__(
            name,
            codec,
            ordering_key=ordering_key,
            max_message_bytes=max_message_bytes,
            max_ordering_key_bytes=max_ordering_key_bytes,
            max_attributes=max_attributes,
            strict_sequence=strict_sequence,
        )
        self.handlers = _checked_handlers(name, handlers)
        self._is_async = {
            handler: inspect.iscoroutinefunction(handler)
            for named in self.handlers.values()
            for handler in named.values()
        }
        if isinstance(type_of, str):
            if not type_of:
                raise ConfigurationError(f"topic {name!r}: type_of must name a field")
            self.type_of: Callable[[Any], object] = _type_field(type_of)
        elif callable(type_of):
            self.type_of = type_of
        else:
            raise ConfigurationError(
                f"topic {name!r}: type_of must be a field name or a function, not {type_of!r}"
            )
        for option, value in (
            ("max_handler_concurrency", max_handler_concurrency),
            ("max_event_concurrency", max_event_concurrency),
        ):
            if not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"topic {name!r}: {option} must be >= 1, not {value!r}")
        if on_max_errors is not None and not callable(on_max_errors):
            raise ConfigurationError(f"topic {name!r}: on_max_errors must be callable")
        self.max_handler_concurrency = max_handler_concurrency
        self.max_event_concurrency = max_event_concurrency
        self.on_max_errors = on_max_errors
        self._runs: set[_Run] = set()
        #: (message id, handler name) of sync handlers still running in a thread, perhaps past
        #: the batch that started them: the message is not handled again until they return.
        self._running: set[tuple[str, str]] = set()
        self._threads: DaemonThreadPool | None = None
        self._threads_lock = threading.Lock()

    # -- publishing: handling ----------------------------------------------------------------

    def publish(self, message: T, *, attributes: Mapping[str, str] | None = None) -> str:
        """Run the event's handlers now, outside any transaction and without saving results
        (for scripts and tests); return ``"handled"``.

        Raises:
            HandlerFailure: a handler failed (the others ran).
            UnprocessableMessage: the event has no handlers, or a handler found it unprocessable.
        """
        entry = self.make_entry(message, attributes=attributes)
        direct = PersistedMessage(
            f"direct-{time.time_ns()}", self.name, entry.data, entry.attributes,
            entry.ordering_key, datetime.now(UTC),
        )  # fmt: skip
        [outcome] = self.publish_batch([direct], timeout=float("inf"))
        if isinstance(outcome, BaseException):
            raise outcome
        return "handled"

    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        """Handle a relay's batch (see :meth:`publish_batch_async`), on an event loop of this
        call's own; plain handlers run on the topic's threads."""
        return asyncio.run(self.publish_batch_async(messages, timeout=timeout))

    async def publish_batch_async(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        """Handle a relay's batch: for each message, the handlers of its type that have not
        succeeded yet, keys concurrently, each key's messages one after another.

        Outcomes: :class:`Handled` when every handler succeeded; :class:`HandlerFailure` with
        the progress to save; :class:`UnprocessableMessage` when no handler can succeed;
        :class:`~outboxbind.errors.NotAttempted` for the messages after a failure of their key,
        and for those not started when the time ran out or the relay stopped. After
        ``timeout`` the running handlers are cancelled (see :class:`CancellationToken`)."""
        run = _Run(asyncio.get_running_loop())
        self._runs.add(run)
        outcomes: dict[int, PublishOutcome] = {}
        keys: dict[tuple[str, str], list[int]] = {}
        for index, message in enumerate(messages):
            keys.setdefault(message.sequence, []).append(index)
        queue = deque(keys.values())

        async def work() -> None:
            while queue:
                indexes = queue.popleft()
                for position, index in enumerate(indexes):
                    if run.interrupted:
                        outcome: PublishOutcome = NotAttempted("the relay stopped the handlers")
                    else:
                        begun = self._begin(messages[index], run)
                        if isinstance(begun, types.CoroutineType):
                            outcome = await begun
                        else:
                            outcome = begun  # type: ignore[assignment]
                    outcomes[index] = outcome
                    if not isinstance(outcome, Handled):
                        for later in indexes[position + 1 :]:
                            outcomes[later] = NotAttempted(
                                f"an earlier message of its key was not handled: {outcome}"
                            )
                        break

        workers = [
            asyncio.ensure_future(work()) for _ in range(min(len(keys), self.max_event_concurrency))
        ]
        try:
            _, late = await asyncio.wait(workers, timeout=_finite(timeout))
            if late:  # out of time: stop the handlers, and wait a moment for what they saved
                log.warning(
                    "%r: handlers still running after %.1fs; asking them to stop", self, timeout
                )
                run.interrupt()
                _, late = await asyncio.wait(late, timeout=_grace(timeout))
                for worker in late:  # a sync handler ignoring its token: stop waiting for it
                    worker.cancel()
                if late:
                    await asyncio.wait(late)
        finally:
            self._runs.discard(run)
            for worker in workers:
                worker.cancel()
        return [
            outcomes.get(i) or TimeoutError(f"not handled within {timeout}s")
            for i in range(len(messages))
        ]

    def interrupt(self) -> None:
        """Ask the running handlers to stop now (the relay calls it when it stops): async ones
        are cancelled, sync ones see their :class:`CancellationToken` set; what they finished is
        reported and saved."""
        for run in list(self._runs):
            run.interrupt()

    def _begin(
        self, message: PersistedMessage, run: _Run
    ) -> PublishOutcome | Coroutine[Any, Any, PublishOutcome]:
        """Start the handlers of one message that have not succeeded: its outcome when they
        are done at once (no-op and cached handlers, refusals), else a coroutine that waits
        for them and gives it. Not a coroutine itself: the common message costs no task and no
        coroutine frame."""
        try:
            event = self.codec.decode(message.data)
        except Exception as exc:
            return UnprocessableMessage(f"cannot decode the event: {_describe(exc)}")
        try:
            event_type = self.type_of(event)
        except Exception as exc:
            return UnprocessableMessage(f"cannot tell the event's type: {_describe(exc)}")
        if not isinstance(event_type, str):
            return UnprocessableMessage(f"the event's type is not a str: {event_type!r}")
        handlers = self.handlers.get(event_type)
        if not handlers:
            return UnprocessableMessage(
                f"no handlers for events of type {event_type!r} (known: "
                f"{', '.join(sorted(self.handlers)) or 'none'})"
            )
        if message.progress is None:  # the first try: every handler runs
            results: dict[str, HandlerResult] = {}
            to_run = list(handlers)
        else:
            try:
                results = _load_results(message.progress)
            except ValueError as exc:
                return UnprocessableMessage(str(exc))
            replayed = message.attempts == 0
            to_run = []
            for name in handlers:
                result = results.get(name)
                if result is None or (
                    not result.succeeded and (replayed or result.unprocessable_at is None)
                ):
                    to_run.append(name)
        if self._running and any((message.id, name) in self._running for name in to_run):
            return NotAttempted("a handler of this message still runs from an earlier try")
        if not to_run:
            return self._outcome(event_type, handlers, to_run, results, [])
        scope = contextvars.copy_context()
        attributes = message.attributes
        correlation_id = None
        if attributes:
            scope.run(enter_message_context, attributes)
            correlation_id = attributes.get(CORRELATION_ATTRIBUTE)
        before = dict(results) if results else _NO_RESULTS
        cancellation = run.cancellation
        contexts = [
            HandlerContext(message, event_type, name, correlation_id, cancellation, before)
            for name in to_run
        ]
        if len(to_run) > self.max_handler_concurrency:
            return self._bounded(event_type, handlers, to_run, results, contexts, event, scope, run)
        started = [
            self._start(handlers[context.handler], event, context, scope, run)
            for context in contexts
        ]
        for outcome in started:
            if type(outcome) is types.CoroutineType:
                return self._finish(event_type, handlers, to_run, results, started)
        return self._outcome(event_type, handlers, to_run, results, started)  # type: ignore[arg-type]

    async def _finish(
        self,
        event_type: str,
        handlers: Mapping[str, Handler],
        to_run: list[str],
        results: dict[str, HandlerResult],
        started: list[Any],
    ) -> PublishOutcome:
        """Wait for the handlers :meth:`_begin` left running; the message's outcome."""
        running = [(i, out) for i, out in enumerate(started) if type(out) is types.CoroutineType]
        if len(running) == 1:
            [(index, waiting)] = running
            started[index] = await waiting
        else:
            ended = await asyncio.gather(*(waiting for _, waiting in running))
            for (index, _), outcome in zip(running, ended, strict=True):
                started[index] = outcome
        return self._outcome(event_type, handlers, to_run, results, started)

    async def _bounded(
        self,
        event_type: str,
        handlers: Mapping[str, Handler],
        to_run: list[str],
        results: dict[str, HandlerResult],
        contexts: list[HandlerContext],
        event: Any,
        scope: contextvars.Context,
        run: _Run,
    ) -> PublishOutcome:
        """More handlers to run than ``max_handler_concurrency``: at most that many at once."""
        limit = asyncio.Semaphore(self.max_handler_concurrency)

        async def bounded(context: HandlerContext) -> BaseException | None:
            async with limit:
                started = self._start(handlers[context.handler], event, context, scope, run)
                if started is None or isinstance(started, BaseException):
                    return started
                return await started

        ended = await asyncio.gather(*(bounded(context) for context in contexts))
        return self._outcome(event_type, handlers, to_run, results, list(ended))

    def _outcome(
        self,
        event_type: str,
        handlers: Mapping[str, Handler],
        to_run: list[str],
        results: dict[str, HandlerResult],
        errors_in_order: list[BaseException | None],
    ) -> PublishOutcome:
        """The message's outcome from what its handlers did this try (``errors_in_order``,
        one per name of ``to_run``) and before (``results``)."""
        now = datetime.now(UTC)
        if not results and not any(errors_in_order):  # the common case: all ran, all succeeded
            return Handled(event_type, None, to_run, now)
        errors: dict[str, BaseException] = {}
        for name, error in zip(to_run, errors_in_order, strict=True):
            result = results.get(name, _NOT_RUN)
            if error is None:
                results[name] = HandlerResult(
                    now, None, result.errors, result.last_error, result.last_error_at
                )
                continue
            errors[name] = error
            unprocessable = now if isinstance(error, Unprocessable) else None
            results[name] = HandlerResult(
                None, unprocessable, result.errors + 1, _describe(error), now
            )
        unfinished = [name for name in handlers if not results[name].succeeded]
        if not unfinished:
            return Handled(event_type, results)
        progress = _dump_results(event_type, results)
        failing = [name for name in unfinished if results[name].unprocessable_at is None]
        text = "; ".join(
            f"handler {name!r}: {results[name].last_error}" for name in (failing or unfinished)
        )
        if not failing:
            return UnprocessableMessage(f"unprocessable: {text}", progress=progress)
        retry_times = [e.at for e in errors.values() if isinstance(e, RetryAt)]
        return HandlerFailure(
            f"{len(failing)} of {len(handlers)} handlers failed: {text}",
            progress=progress,
            retry_at=max(retry_times) if retry_times else None,
        )

    def _start(
        self,
        handler: Handler,
        event: Any,
        context: HandlerContext,
        scope: contextvars.Context,
        run: _Run,
    ) -> BaseException | Coroutine[Any, Any, BaseException | None] | None:
        """Start one handler: its error, ``None`` if it already succeeded, or an awaitable of
        either while it runs."""
        if run.interrupted:  # asked to stop before this handler began: it does not begin
            return HandlerCancelled("not started: the relay asked the handlers to stop")
        own = scope.copy()  # as a task's: what the handler sets stays its own
        if self._is_async[handler]:
            coroutine: Coroutine[Any, Any, Any] = handler(event, context)  # type: ignore[assignment]
            try:
                first = own.run(coroutine.send, None)
            except StopIteration:
                return None
            except Exception as exc:
                return self._failed(context, exc)
            task = run.loop.create_task(_resume(coroutine, first), context=own)
            run.tasks.add(task)
            task.add_done_callback(run.tasks.discard)
            return self._awaited(task, context, run)
        key = (context.message.id, context.handler)
        self._running.add(key)
        future = self._thread_pool().submit(own.run, handler, event, context)
        future.add_done_callback(lambda _: self._running.discard(key))
        return self._awaited(asyncio.wrap_future(future), context, run)

    async def _awaited(
        self, running: asyncio.Future[Any], context: HandlerContext, run: _Run
    ) -> BaseException | None:
        """Wait for a started handler; its error, or ``None`` when it succeeded."""
        try:
            result = await running
            if inspect.isawaitable(result):  # a plain function that returned a coroutine
                await result
            return None
        except asyncio.CancelledError:
            if not run.interrupted:
                raise  # the caller itself is being cancelled
            return HandlerCancelled("cancelled: the relay asked the handlers to stop")
        except Exception as exc:
            return self._failed(context, exc)

    def _failed(self, context: HandlerContext, error: Exception) -> Exception:
        log.debug(
            "handler %r of outbox message %s (topic %r) failed",
            context.handler, context.message.id, self.name, exc_info=error,
        )  # fmt: skip
        return error

    def _thread_pool(self) -> DaemonThreadPool:
        with self._threads_lock:
            if self._threads is None:
                size = min(64, self.max_event_concurrency * self.max_handler_concurrency)
                self._threads = DaemonThreadPool(size, f"outboxbind-handlers-{self.name[:20]}")
            return self._threads

    # -- the max-errors hook -------------------------------------------------------------------

    def given_up(self, message: PersistedMessage, error: BaseException) -> list[OutboxEntry]:
        """Run the ``on_max_errors`` hook for ``message`` (the relay calls it when the message
        used up its attempts); return the messages it wrote, to be written with the failure."""
        return asyncio.run(self.given_up_async(message, error))

    async def given_up_async(
        self, message: PersistedMessage, error: BaseException
    ) -> list[OutboxEntry]:
        """The asyncio face of :meth:`given_up`."""
        if self.on_max_errors is None or isinstance(error, UnprocessableMessage):
            return []  # settled as unprocessable: txob runs no hook for it
        event = self.codec.decode(message.data)
        event_type = self.type_of(event)  # as the try computed it: it decoded the same event
        results = _load_results(getattr(error, "progress", None) or message.progress)
        correlation_id = message.attributes.get(CORRELATION_ATTRIBUTE)
        reached = MaxErrorsReached(
            message,
            event,
            str(event_type),
            results,
            _describe(error),
            correlation_id,
            FollowUps(),
        )
        with message_context(message.attributes):
            if inspect.iscoroutinefunction(self.on_max_errors):
                await self.on_max_errors(reached)
            else:
                loop = asyncio.get_running_loop()
                call = contextvars.copy_context().run
                result = await loop.run_in_executor(
                    self._thread_pool(), functools.partial(call, self.on_max_errors, reached)
                )
                if inspect.isawaitable(result):
                    await result
        return reached.outbox.entries


_NOT_RUN = HandlerResult()
_NO_RESULTS: Mapping[str, HandlerResult] = MappingProxyType({})


@types.coroutine
def _resume(coroutine: Coroutine[Any, Any, Any], pending: Any) -> Generator[Any, Any, Any]:
    """Go on with a coroutine that was started by hand and suspended on ``pending`` (what it
    yielded: a future, or ``None``), exactly as a task would have: each value sent or error
    thrown in by the task running this goes to the coroutine."""
    while True:
        try:
            sent = yield pending
        except BaseException as error:
            try:
                pending = coroutine.throw(error)
            except StopIteration as stop:
                return stop.value
        else:
            try:
                pending = coroutine.send(sent)
            except StopIteration as stop:
                return stop.value


def _finite(timeout: float) -> float | None:
    return None if timeout == float("inf") else max(0.0, timeout)


def _grace(timeout: float) -> float:
    """How long stopped handlers get to return what they finished, within the relay's grace."""
    return min(0.5, 0.05 * timeout)


def _checked_handlers(
    topic: str, handlers: Mapping[str, Mapping[str, Handler]]
) -> dict[str, dict[str, Handler]]:
    if not isinstance(handlers, Mapping) or not handlers:
        raise ConfigurationError(
            f"topic {topic!r}: handlers must be a non-empty mapping of event type to "
            "{handler name: handler}"
        )
    checked: dict[str, dict[str, Handler]] = {}
    for event_type, named in handlers.items():
        if not isinstance(event_type, str) or not event_type:
            raise ConfigurationError(f"topic {topic!r}: event type {event_type!r} is not a str")
        if not isinstance(named, Mapping) or not named:
            raise ConfigurationError(
                f"topic {topic!r}: the handlers of {event_type!r} must be a non-empty mapping "
                f"of name to handler, not {named!r}"
            )
        for name, handler in named.items():
            if not isinstance(name, str) or not name:
                raise ConfigurationError(
                    f"topic {topic!r}: a handler name of {event_type!r} is not a str: {name!r}"
                )
            if not callable(handler):
                raise ConfigurationError(
                    f"topic {topic!r}: handler {name!r} of {event_type!r} is not callable"
                )
        checked[event_type] = dict(named)
    return checked
