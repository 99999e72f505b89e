"""The relay's logic, written once for both faces (threads and asyncio).

The engine does no I/O. Its two generators, :meth:`RelayEngine.process` (one round) and
:meth:`RelayEngine.poll` (rounds until stopped), *yield* the I/O they need as effect values:

* :class:`Call` - call a method of the store or of a batch (awaited by the asyncio face);
* :class:`Marks` - tell a batch what happened to each of its messages;
* :class:`Publish` - publish a batch's messages, one group per topic, concurrently;
* :class:`Sleep` - wait between rounds, ending early on a wake-up or a stop.

A driver (``outboxbind.relay.Relay`` or ``AsyncRelay``) performs each effect and sends its
result back in, or throws its exception in. So every decision (what to ack, when to retry, when
to give up, how long to sleep) is made here, once, and tested once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Generator, Sequence
from datetime import timedelta
from typing import Any

import attrs

from outboxbind.errors import NotAttempted, UnpublishableError
from outboxbind.messages import PersistedMessage
from outboxbind.relay.policy import PoisonPolicy, RetryPolicy
from outboxbind.topics import Topic

__all__ = ["Call", "Marks", "ProcessResult", "Publish", "RelayEngine", "Sleep", "StopControl"]

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


Mark = tuple[str, tuple[Any, ...]]
"""A batch method (``mark_published``, ``mark_failed``, ``mark_dead``) and its arguments."""


@attrs.frozen
class Marks:
    """Effect: call each mark on ``batch`` in order (awaited one by one by the asyncio driver).

    One effect per round rather than one per message: the marks are computed here, performed
    there, without a round trip through the generator for each message.
    """

    batch: object
    marks: list[Mark]


@attrs.frozen
class Sleep:
    """Effect: wait up to ``seconds``; the driver answers ``True`` if a wake-up ended it early."""

    seconds: float


Effect = Call | Marks | Publish | Sleep


@attrs.frozen
class TopicRegistration:
    """A topic registered with a relay, with its policies."""

    topic: Topic[Any]
    retry: RetryPolicy
    poison: PoisonPolicy


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
    """Shared between a running poll loop and ``stop()``: whether and how to stop."""

    def __init__(self) -> None:
        self.requested = False
        self.drain = True
        self.deadline = float("inf")

    def request(self, *, drain: bool, timeout: float | None) -> None:
        self.requested = True
        self.drain = drain
        self.deadline = time.monotonic() + timeout if timeout is not None else float("inf")

    def should_stop_now(self) -> bool:
        return self.requested and (not self.drain or time.monotonic() >= self.deadline)


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


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
        #: The batch of the round in progress, so a driver that is cancelled mid-round (task
        #: cancellation, KeyboardInterrupt) can release it instead of leaving it leased.
        self.open_batch: object | None = None

    # -- one round ------------------------------------------------------------------------------

    def process(self, limit: int) -> Generator[Effect, Any, ProcessResult]:
        """One round: check out up to ``limit`` messages, publish them, record the outcomes."""
        try:
            batch = yield Call(self.store, "checkout_batch", (list(self.topics), limit))
        except Exception as exc:
            log.warning("outbox checkout failed: %s", _describe(exc), exc_info=exc)
            self.totals["store_errors"] += 1
            return ProcessResult(store_error=exc)
        if batch is None:
            return ProcessResult()
        self.open_batch = batch

        messages: Sequence[PersistedMessage] = batch.messages
        successes = errors = dead = 0
        store_error: BaseException | None = None
        try:
            groups = self._group_by_topic(messages)
            outcomes = yield Publish(
                [(self.topics[name].topic, group) for name, group in groups.items()],
                self.publish_timeout,
            )
            marks: list[Mark] = []
            for name, group_outcomes in zip(groups, outcomes, strict=True):
                registration = self.topics[name]
                for message, outcome in zip(groups[name], group_outcomes, strict=True):
                    if isinstance(outcome, str):
                        marks.append(("mark_published", (message, outcome)))
                        successes += 1
                    elif isinstance(outcome, NotAttempted):
                        continue  # released on close, no attempt counted
                    else:
                        errors += 1
                        mark, gave_up = self._failure(registration, message, outcome)
                        marks.append(mark)
                        dead += gave_up
            if marks:
                yield Marks(batch, marks)
        except Exception as exc:
            store_error = exc
            log.warning("recording publish outcomes failed: %s", _describe(exc), exc_info=exc)
        try:
            yield Call(batch, "close", ())
        except Exception as exc:
            store_error = store_error or exc
            log.warning("closing the outbox batch failed: %s", _describe(exc), exc_info=exc)
        self.open_batch = None
        if store_error is not None:
            self.totals["store_errors"] += 1
        self.totals["published"] += successes
        self.totals["failed"] += errors
        self.totals["dead"] += dead
        return ProcessResult(successes, errors, store_error, len(messages), dead)

    def _group_by_topic(
        self, messages: Sequence[PersistedMessage]
    ) -> dict[str, list[PersistedMessage]]:
        groups: dict[str, list[PersistedMessage]] = {}
        for message in messages:
            if message.topic in self.topics:  # anything else is released on close
                groups.setdefault(message.topic, []).append(message)
        return groups

    def _failure(
        self, registration: TopicRegistration, message: PersistedMessage, error: BaseException
    ) -> tuple[Mark, int]:
        """The mark for a failed publish, and 1 if the message was given up on (else 0)."""
        attempts = message.attempts + 1
        text = _describe(error)
        unpublishable = isinstance(error, UnpublishableError)
        if not unpublishable and attempts < registration.retry.max_attempts:
            delay = registration.retry.delay(attempts, self.rng.random)
            log.info(
                "publishing outbox message %s to %s failed (attempt %d of %d), retry in %.2fs: %s",
                message.id, message.topic, attempts, registration.retry.max_attempts, delay, text,
            )  # fmt: skip
            return ("mark_failed", (message, text, timedelta(seconds=delay))), 0
        why = "is unpublishable" if unpublishable else f"failed {attempts} attempt(s)"
        if registration.poison == "park":
            log.error(
                "outbox message %s to %s %s, parked: %s", message.id, message.topic, why, text
            )
            return ("mark_dead", (message, text)), 1
        log.error(
            "outbox message %s to %s %s, blocking its key until replayed: %s",
            message.id, message.topic, why, text,
        )  # fmt: skip
        return ("mark_failed", (message, text, None)), 1

    # -- the poll loop --------------------------------------------------------------------------

    def poll(self, batch_size: int, control: StopControl) -> Generator[Effect, Any, None]:
        """Rounds until ``control`` says stop: at once while batches come back full, else after
        a jittered ``poll_interval`` (cut short by a wake-up), backing off on store errors."""
        store_failures = 0
        hints_left = 0
        while not control.should_stop_now():
            result = yield from self.process(batch_size)
            if result.store_error is not None:
                store_failures += 1
                if control.requested:
                    return
                yield Sleep(self._store_backoff(store_failures))
                continue
            store_failures = 0
            progressed = result.successes + result.errors > 0  # not only released messages
            if control.requested:
                if not progressed:
                    return  # drained: nothing is due, or nothing can be published now
                continue
            if progressed and result.checked_out >= batch_size:
                continue  # a full batch: more is probably waiting
            if result.checked_out == 0 and hints_left > 0:
                delay = self.HINT_DELAYS[len(self.HINT_DELAYS) - hints_left]
                hints_left -= 1
            else:
                hints_left = 0
                delay = self._idle_delay()
            woken = yield Sleep(delay)
            if woken:
                hints_left = len(self.HINT_DELAYS)

    def _idle_delay(self) -> float:
        spread = self.poll_jitter * (2.0 * self.rng.random() - 1.0)
        return max(0.0, self.poll_interval * (1.0 + spread))

    def _store_backoff(self, failures: int) -> float:
        base = min(self.max_store_backoff, self.poll_interval * 2.0 ** min(failures - 1, 32))
        return base * (0.5 + 0.5 * self.rng.random())
