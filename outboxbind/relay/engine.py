"""The relay's logic, written once for both faces (threads and asyncio).

The engine does no I/O. Its two generators, :meth:`RelayEngine.process` (one round) and
:meth:`RelayEngine.poll` (rounds until stopped), *yield* the I/O they need as effect values:

* :class:`Call` - call a method of the store or of a batch (awaited by the asyncio face);
* :class:`Marks` - tell a batch what happened to each of its messages;
* :class:`Publish` - publish a batch's messages, one group per topic, concurrently;
* :class:`Sleep` - wait between rounds, ending early on a wake-up or a stop;
* :class:`Meanwhile`, :class:`Collect` - start store calls in the background, then wait for
  them (the poll loop closes the last batch and reads the next one ahead while it publishes);
* :class:`GiveUp` - tell a topic that a message used up its attempts (a handler topic runs its
  max-errors hook); the messages it returns are written with the failure.

A driver (``outboxbind.relay.Relay`` or ``AsyncRelay``) performs each effect and sends its
result back in, or throws its exception in. So every decision (what to ack, when to retry, when
to give up, how long to sleep) is made here, once, and tested once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Generator, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs

from outboxbind.errors import NotAttempted, SchemaTooNew, UnpublishableError
from outboxbind.messages import PersistedMessage
from outboxbind.relay.policy import PoisonPolicy, RetryPolicy
from outboxbind.store import MarkDetails, MarkedOutcome
from outboxbind.topics import Topic

__all__ = [
    "Call",
    "Collect",
    "GiveUp",
    "Marks",
    "Meanwhile",
    "ProcessResult",
    "Publish",
    "RelayEngine",
    "Sleep",
    "StopControl",
    "StoreOutage",
]

log = logging.getLogger("outboxbind.relay")


@attrs.frozen
class Call:
    """Effect: ``getattr(target, method)(*args)``, awaited by the asyncio driver."""

    target: object
    method: str
    args: tuple[Any, ...] = ()


@attrs.frozen
class Publish:
    """Effect: publish each ``(topic, messages)`` group, concurrently across groups.

    The driver answers with one list of outcomes per group; it never raises: an exception or a
    timeout of a group becomes that group's outcome for each of its messages.
    """

    groups: list[tuple[Topic[Any], list[PersistedMessage]]]
    timeout: float


@attrs.frozen
class Marks:
    """Effect: tell ``batch`` each mark, in order: ``(kind, message, detail, retry_after)`` as
    :data:`~outboxbind.store.MarkedOutcome`, for ``mark_published(message, detail)``,
    ``mark_failed(message, detail, retry_after)`` or ``mark_dead(message, detail)``.

    One effect per round rather than one per message: the marks are computed here, performed
    there (all at once when the batch has ``record``, as buffered batches do). ``details``, by
    message id, go to the batch's ``add_details`` first (progress, follow-ups, keep).
    """

    batch: object
    marks: list[MarkedOutcome]
    details: dict[str, MarkDetails] = attrs.field(factory=dict)


@attrs.frozen
class GiveUp:
    """Effect: ``topic.given_up(message, error)`` (``given_up_async``, awaited, by the asyncio
    driver): the entries it returns are written in the transaction that records the failure."""

    topic: Topic[Any]
    message: PersistedMessage
    error: BaseException


@attrs.frozen
class Sleep:
    """Effect: wait up to ``seconds``; the driver answers ``True`` if a wake-up ended it early."""

    seconds: float


@attrs.frozen
class Meanwhile:
    """Effect: start ``calls`` in the background, each on its own (they are independent); the
    driver answers at once with a handle for :class:`Collect`.

    The calls are the store's work for the next round (close the previous batch, read the next
    one ahead), so the database works while this round publishes and records its outcomes.
    """

    calls: tuple[Call, ...]


@attrs.frozen
class Collect:
    """Effect: wait for the calls started by :class:`Meanwhile`; the driver answers with each
    call's return value or the exception it raised."""

    calls: tuple[Call, ...]
    handle: object


Effect = Call | Collect | GiveUp | Marks | Meanwhile | Publish | Sleep


@attrs.frozen
class TopicRegistration:
    """A topic registered with a relay, with its policies.

    Attributes:
        keep_settled: keep published (settled) messages this long, with what the topic reported
            for them; ``None`` deletes them at once.
    """

    topic: Topic[Any]
    retry: RetryPolicy
    poison: PoisonPolicy
    keep_settled: timedelta | None = None

    @property
    def runs_hook(self) -> bool:
        """Whether the topic wants to hear of messages given up on (:meth:`Topic.given_up`)."""
        return type(self.topic).given_up is not Topic.given_up


@attrs.frozen
class ProcessResult:
    """What one round of the relay did.

    Attributes:
        successes: messages published and acknowledged.
        errors: messages whose publish failed this round (they are retried or given up on).
        store_error: the store's error, if checking out or closing the batch failed.
        checked_out: messages the round checked out.
        dead: messages given up on this round (parked or blocked by the poison policy).
    """

    successes: int = 0
    errors: int = 0
    store_error: BaseException | None = None
    checked_out: int = 0
    dead: int = 0


class StopControl:
    """Shared between a running poll loop and ``stop()``: whether and how to stop.

    Attributes:
        requested: ``stop()`` was called.
        drain: publish everything due before stopping (else only finish the round).
        deadline: when a drain ends, drained or not (``time.monotonic()``).
        given_up: ``stop()`` waited its timeout: the driver stops waiting for the topics, the
            round in progress records what is known and releases the rest, and the loop ends.
        drained: set by the poll loop when it ended because a round begun after the request
            found nothing due.
    """

    def __init__(self) -> None:
        self.requested = False
        self.drain = True
        self.deadline = float("inf")
        self.given_up = False
        self.drained = False

    def request(self, *, drain: bool, timeout: float | None) -> None:
        self.requested = True
        self.drain = drain
        self.deadline = time.monotonic() + timeout if timeout is not None else float("inf")

    def give_up(self) -> None:
        self.given_up = True

    def should_stop_now(self) -> bool:
        return self.given_up or (
            self.requested and (not self.drain or time.monotonic() >= self.deadline)
        )


SequenceKey = tuple[str, str]


def _sequence(message: PersistedMessage) -> SequenceKey:
    return (message.topic, message.ordering_key or "")


def _sequences(messages: Iterable[PersistedMessage]) -> frozenset[SequenceKey]:
    return frozenset([(m.topic, m.ordering_key or "") for m in messages])


@attrs.define
class _Pipeline:
    """The poll loop's batches between rounds.

    Attributes:
        previous: the last round's batch, published and marked, not yet closed: the batch read
            ahead continues its sequences, and it is closed while that one publishes.
        troubled: the sequences of ``previous`` with a message that was not published (failed,
            not attempted, held back): their messages in ``ahead`` are held back.
        ahead: the batch read ahead while ``previous`` published; the next round publishes it.
    """

    previous: Any = None
    troubled: frozenset[SequenceKey] = frozenset()
    ahead: Any = None

    def take_ahead(self) -> Any:
        batch, self.ahead = self.ahead, None
        return batch


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _settled(outcome: str) -> MarkDetails:
    """What to keep with a settled message: what its topic reported for it (a handler topic's
    final progress)."""
    progress = getattr(outcome, "progress", None)
    return MarkDetails(progress=progress if isinstance(progress, str) else None, keep=True)


def _verb(registration: TopicRegistration) -> str:
    return "handling" if registration.topic.keeps_progress else "publishing"


def _where(message: PersistedMessage) -> str:
    """A message for the log: its outbox id, topic and ordering key."""
    key = f"key {message.ordering_key!r}" if message.ordering_key is not None else "no key"
    return f"outbox message {message.id} (topic {message.topic!r}, {key})"


class StoreOutage:
    """Logs a run of store failures as one WARNING when it starts and one INFO line when it
    ends, not a traceback per poll: the traceback of the first failure goes to DEBUG, and the
    failures in between to DEBUG without one."""

    def __init__(self) -> None:
        self.since: float | None = None  # time.monotonic() of the first failure
        self.failed_polls = 0

    def failed(self, what: str, error: BaseException) -> None:
        """A store call failed (``what`` says which)."""
        if self.since is not None:
            log.debug("%s failed again: %s", what, _describe(error))
            return
        self.since = time.monotonic()
        log.warning(
            "the outbox store failed (%s): %s; the relay backs off and retries, and logs when "
            "the store recovers", what, _describe(error),
        )  # fmt: skip
        log.debug("the store's error, %s", what, exc_info=error)

    def poll_failed(self) -> None:
        """A round ended with a store error."""
        self.failed_polls += 1

    def poll_succeeded(self) -> None:
        """A round ended without a store error: an outage in progress is over."""
        if self.since is None:
            return
        log.info(
            "the outbox store is reachable again after %.1f s, %d failed polls",
            time.monotonic() - self.since, self.failed_polls,
        )  # fmt: skip
        self.since = None
        self.failed_polls = 0


class RelayEngine:
    """The relay's decisions: what to check out, publish, ack, retry, give up on, and sleep."""

    #: Sleeps after a wake-up that found nothing yet: the writer signals before its commit lands.
    HINT_DELAYS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032)

    def __init__(
        self,
        store: object,
        *,
        publish_timeout: float,
        poll_interval: float,
        poll_jitter: float,
        max_store_backoff: float,
        rng: random.Random,
    ) -> None:
        self.store = store
        self.topics: dict[str, TopicRegistration] = {}
        self.publish_timeout = publish_timeout
        self.poll_interval = poll_interval
        self.poll_jitter = poll_jitter
        self.max_store_backoff = max_store_backoff
        self.rng = rng
        self.totals = {"published": 0, "failed": 0, "dead": 0, "store_errors": 0}
        self.outage = StoreOutage()
        #: Seconds between purges of kept settled messages (topics registered with keep_settled).
        self.purge_interval = 60.0
        self._next_purge = 0.0  # time.monotonic() of the next purge
        #: The batches not yet closed, oldest first, so a driver that is cancelled mid-round
        #: (task cancellation, KeyboardInterrupt) can close them instead of leaving them leased.
        self.open_batches: list[Any] = []

    # -- one round ------------------------------------------------------------------------------

    def process(self, limit: int) -> Generator[Effect, Any, ProcessResult]:
        """One round: check out up to ``limit`` messages, publish them, record the outcomes."""
        return (yield from self._round(limit, None))

    def _round(
        self, limit: int, pipeline: _Pipeline | None
    ) -> Generator[Effect, Any, ProcessResult]:
        """One round (see :meth:`_rounds_work`), and the store's health as it showed."""
        result = yield from self._rounds_work(limit, pipeline)
        if result.store_error is not None:
            self.outage.poll_failed()
        else:
            self.outage.poll_succeeded()
        return result

    def _rounds_work(
        self, limit: int, pipeline: _Pipeline | None
    ) -> Generator[Effect, Any, ProcessResult]:
        """One round. With a ``pipeline`` (the poll loop), the round publishes the batch read
        ahead by the round before if there is one, closes that round's batch and reads the next
        batch ahead while it publishes, and leaves its own batch open for the next round to
        close. Without one, it checks out, publishes and closes, one after another."""
        batch = pipeline.take_ahead() if pipeline is not None else None
        held_back: frozenset[SequenceKey] = frozenset()
        if batch is None:
            if pipeline is not None and pipeline.previous is not None:
                yield from self.flush(pipeline)  # its close is not overlapped with anything
            try:
                batch = yield Call(self.store, "checkout_batch", (list(self.topics), limit))
            except SchemaTooNew:
                raise  # no retry can help: this outboxbind must be upgraded
            except Exception as exc:
                self.outage.failed("checking out a batch", exc)
                self.totals["store_errors"] += 1
                return ProcessResult(store_error=exc)
            if batch is None:
                return ProcessResult()
            self.open_batches.append(batch)
        elif pipeline is not None:
            held_back = pipeline.troubled

        messages: Sequence[PersistedMessage] = batch.messages
        successes = errors = dead = parked = 0
        store_error: BaseException | None = None
        marks: list[MarkedOutcome] = []
        background: Collect | None = None  # the store's calls made while this round publishes
        reads_ahead = False
        try:
            groups = self._group_by_topic(messages, held_back)
            publish = Publish(
                [(self.topics[name].topic, group) for name, group in groups.items()],
                self.publish_timeout,
            )
            calls: list[Call] = []
            previous = pipeline.previous if pipeline is not None else None
            reads_ahead = (
                pipeline is not None
                and len(messages) >= limit  # a full batch: more is probably waiting
                and callable(getattr(batch, "read_ahead", None))
            )
            if reads_ahead:  # the store may close the previous batch in the same round trip
                continuing = _sequences(messages) - held_back
                read = (list(self.topics), limit, continuing, previous)
                calls.append(Call(batch, "read_ahead", read))
            elif previous is not None:
                calls.append(Call(previous, "close", ()))
            if calls:
                background = Collect(tuple(calls), (yield Meanwhile(tuple(calls))))
            outcomes = yield publish
            details: dict[str, MarkDetails] = {}
            given_up: list[tuple[int, TopicRegistration, BaseException]] = []
            for name, group_outcomes in zip(groups, outcomes, strict=True):
                group = groups[name]
                registration = self.topics[name]
                keep = registration.keep_settled is not None
                if all(isinstance(outcome, str) for outcome in group_outcomes):  # all published
                    pairs = zip(group, group_outcomes, strict=True)
                    marks += [("published", message, outcome, None) for message, outcome in pairs]
                    successes += len(group)
                    if keep:
                        for message, outcome in zip(group, group_outcomes, strict=True):
                            details[message.id] = _settled(outcome)
                    continue
                for message, outcome in zip(group, group_outcomes, strict=True):
                    if isinstance(outcome, str):
                        marks.append(("published", message, outcome, None))
                        successes += 1
                        if keep:
                            details[message.id] = _settled(outcome)
                    elif isinstance(outcome, NotAttempted):
                        continue  # released on close, no attempt counted
                    else:
                        errors += 1
                        mark = self._failure(registration, message, outcome)
                        progress = getattr(outcome, "progress", None)
                        if isinstance(progress, str):
                            details[message.id] = MarkDetails(progress=progress)
                        if (mark[0] == "dead" or mark[3] is None) and registration.runs_hook:
                            given_up.append((len(marks), registration, outcome))
                        marks.append(mark)
            for index, registration, outcome in given_up:
                mark = marks[index]
                marks[index] = yield from self._give_up(registration, mark, outcome, details)
            for kind, _, _, retry_after in marks:
                if kind == "dead" or (kind == "failed" and retry_after is None):
                    dead += 1
                    parked += kind == "dead"
            if marks:
                yield Marks(batch, marks, details)
        except Exception as exc:
            store_error = exc
            self.outage.failed("recording publish outcomes", exc)
        if background is not None:
            results = yield background
            store_error = self._after_overlap(pipeline, background.calls, results) or store_error
        if pipeline is not None and pipeline.previous is not None and reads_ahead:
            previous, pipeline.previous = pipeline.previous, None
            try:  # no I/O if the read-ahead closed it; else closed here, after it
                yield Call(previous, "close", ())
            except Exception as exc:
                store_error = store_error or exc
                self.outage.failed("closing the outbox batch", exc)
            self.open_batches.remove(previous)
        if pipeline is not None and pipeline.ahead is not None:
            # the next batch continues this one: it is closed next round, after the messages
            # the next batch holds of a sequence this one did not finish are held back
            pipeline.previous = batch
            pipeline.troubled = frozenset()
            if successes + parked < len(messages):  # a message not published, nor parked
                gone_on = {m.id for kind, m, _, _ in marks if kind != "failed"}
                pipeline.troubled = _sequences(m for m in messages if m.id not in gone_on)
        else:
            try:
                yield Call(batch, "close", ())
            except Exception as exc:
                store_error = store_error or exc
                self.outage.failed("closing the outbox batch", exc)
            self.open_batches.remove(batch)
        if store_error is not None:
            self.totals["store_errors"] += 1
        self.totals["published"] += successes
        self.totals["failed"] += errors
        self.totals["dead"] += dead
        return ProcessResult(successes, errors, store_error, len(messages), dead)

    def _after_overlap(
        self, pipeline: _Pipeline | None, calls: Sequence[Call], results: Sequence[object]
    ) -> BaseException | None:
        """Take in what the store did while the round published; return its first error."""
        assert pipeline is not None
        error: BaseException | None = None
        for call, result in zip(calls, results, strict=True):
            if call.method == "close":
                self.open_batches.remove(call.target)
                pipeline.previous = None
                if isinstance(result, BaseException):
                    self.outage.failed("closing the outbox batch", result)
                    error = error or result
            elif isinstance(result, BaseException):
                self.outage.failed("reading the next outbox batch ahead", result)
                error = error or result
            elif result is not None:
                self.open_batches.append(result)
                pipeline.ahead = result
        return error

    def flush(self, pipeline: _Pipeline) -> Generator[Effect, Any, BaseException | None]:
        """Close the batches the pipeline holds, oldest first: the previous round's (applying
        its marks) and the one read ahead (released unpublished). Returns the first error."""
        error: BaseException | None = None
        for batch in (pipeline.previous, pipeline.take_ahead()):
            if batch is None:
                continue
            try:
                yield Call(batch, "close", ())
            except Exception as exc:
                self.outage.failed("closing the outbox batch", exc)
                error = error or exc
            self.open_batches.remove(batch)
        pipeline.previous = None
        pipeline.troubled = frozenset()
        return error

    def _group_by_topic(
        self, messages: Sequence[PersistedMessage], held_back: frozenset[SequenceKey]
    ) -> dict[str, list[PersistedMessage]]:
        if not held_back:
            names = {message.topic for message in messages}
            if len(names) == 1:  # the common case: one topic's batch
                [name] = names
                return {name: list(messages)} if name in self.topics else {}
        groups: dict[str, list[PersistedMessage]] = {}
        for message in messages:
            if message.topic not in self.topics:
                continue  # released on close
            if held_back and _sequence(message) in held_back:
                continue  # an earlier message of its sequence was not published: released
            groups.setdefault(message.topic, []).append(message)
        return groups

    def _give_up(
        self,
        registration: TopicRegistration,
        mark: MarkedOutcome,
        error: BaseException,
        details: dict[str, MarkDetails],
    ) -> Generator[Effect, Any, MarkedOutcome]:
        """Tell the topic a message is given up on; the messages it writes go with the failure.
        When the topic fails to (its hook raised), the message is not given up on this time:
        it is tried again after the policy's longest delay, and given up on then."""
        _, message, text, _ = mark
        try:
            follow_ups = yield GiveUp(registration.topic, message, error)
        except Exception as exc:
            delay = registration.retry.delay(registration.retry.max_attempts, self.rng.random)
            log.error(
                "the max-errors hook of %r failed for %s, so it is not given up on yet; "
                "retry in %.2fs: %s", registration.topic, _where(message), delay, _describe(exc),
                exc_info=exc,
            )  # fmt: skip
            text = f"{text} (then the max-errors hook failed: {_describe(exc)})"
            return ("failed", message, text, timedelta(seconds=delay))
        if follow_ups:
            saved = details.get(message.id)
            progress = saved.progress if saved is not None else None
            details[message.id] = MarkDetails(progress=progress, follow_ups=follow_ups)
        return mark

    def _failure(
        self, registration: TopicRegistration, message: PersistedMessage, error: BaseException
    ) -> MarkedOutcome:
        """The mark for a failed publish: retried later (``failed`` with a delay), or given up on
        (``dead``: parked; ``failed`` without a delay: blocked until replayed). An error with a
        ``retry_at`` (a handler's :class:`~outboxbind.handlers.RetryAt`) sets the time."""
        attempts = message.attempts + 1
        text = _describe(error)
        unpublishable = isinstance(error, UnpublishableError)
        if not unpublishable and attempts < registration.retry.max_attempts:
            retry_at = getattr(error, "retry_at", None)
            if isinstance(retry_at, datetime):
                delay = max(0.0, (retry_at - datetime.now(UTC)).total_seconds())
            else:
                delay = registration.retry.delay(attempts, self.rng.random)
            log.warning(
                "%s %s failed, attempt %d of %d, retry in %.2fs: %s",
                _verb(registration), _where(message), attempts, registration.retry.max_attempts,
                delay, text,
            )  # fmt: skip
            return ("failed", message, text, timedelta(seconds=delay))
        if unpublishable:
            why = "cannot be handled" if registration.topic.keeps_progress else "is unpublishable"
        else:
            why = f"failed {attempts} attempt(s)"
        if registration.poison == "park":
            log.error("%s %s, parked as a dead letter: %s", _where(message), why, text)
            return ("dead", message, text, None)
        log.error("%s %s, blocking its key until replayed: %s", _where(message), why, text)
        return ("failed", message, text, None)

    # -- the poll loop --------------------------------------------------------------------------

    def poll(self, batch_size: int, control: StopControl) -> Generator[Effect, Any, None]:
        """Rounds until ``control`` says stop: at once while rounds publish something, else
        after a jittered ``poll_interval`` (cut short by a wake-up), backing off on store errors.

        While batches come back full, each round reads the next batch ahead (when the store
        can) as it publishes, so the database's work overlaps the relay's. No batch is held
        across a sleep or past the end."""
        store_failures = 0
        hints_left = 0
        pipeline = _Pipeline()
        while not control.should_stop_now():
            if time.monotonic() >= self._next_purge:
                yield from self.purge_settled()
            # only a round begun after stop() was asked can tell that the outbox is drained:
            # one already running may have looked before the last commit
            stopping = control.requested
            result = yield from self._round(batch_size, pipeline)
            if result.store_error is not None:
                store_failures += 1
                yield from self.flush(pipeline)
                if control.requested:
                    break
                yield Sleep(self._store_backoff(store_failures))
                continue
            store_failures = 0
            progressed = result.successes + result.errors > 0  # not only released messages
            if control.requested:
                if stopping and not progressed:
                    control.drained = True  # nothing is due, or nothing can be published now
                    break
                continue
            if progressed:
                continue  # more may be waiting (a batch is not always full when more is)
            yield from self.flush(pipeline)
            if result.checked_out == 0 and hints_left > 0:
                delay = self.HINT_DELAYS[len(self.HINT_DELAYS) - hints_left]
                hints_left -= 1
            else:
                hints_left = 0
                delay = self._idle_delay()
            woken = yield Sleep(delay)
            if woken:
                hints_left = len(self.HINT_DELAYS)
        yield from self.flush(pipeline)

    def purge_settled(self) -> Generator[Effect, Any, int]:
        """Delete the kept settled messages older than their topic's ``keep_settled``; the poll
        loop calls it every :attr:`purge_interval` seconds. Returns how many; a store error is
        logged and left for the next time."""
        self._next_purge = time.monotonic() + self.purge_interval
        purged = 0
        for name, registration in self.topics.items():
            if registration.keep_settled is None:
                continue
            try:
                count = yield Call(self.store, "purge_settled", (name, registration.keep_settled))
            except Exception as exc:
                log.warning(
                    "purging the settled messages of topic %r failed (tried again in %.0fs): %s",
                    name, self.purge_interval, _describe(exc),
                )  # fmt: skip
                continue
            purged += count
            if count:
                log.info("purged %d settled messages of topic %r", count, name)
        return purged

    def _idle_delay(self) -> float:
        spread = self.poll_jitter * (2.0 * self.rng.random() - 1.0)
        return max(0.0, self.poll_interval * (1.0 + spread))

    def _store_backoff(self, failures: int) -> float:
        base = min(self.max_store_backoff, self.poll_interval * 2.0 ** min(failures - 1, 32))
        return base * (0.5 + 0.5 * self.rng.random())
