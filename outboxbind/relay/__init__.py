"""The relay: moves committed outbox messages to their real topics.

:class:`Relay` runs in a thread (``poll_for_messages`` blocks until ``stop()``); :class:`AsyncRelay`
is the same relay for asyncio. Both drive one :class:`~outboxbind.relay.engine.RelayEngine`, so
their behaviour is the same by construction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import random
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from datetime import timedelta
from typing import Any, TypeVar, cast

from outboxbind.errors import ConfigurationError, NotAttempted, TopicAlreadyRegistered
from outboxbind.messages import PersistedMessage
from outboxbind.relay.engine import (
    Call,
    Collect,
    Effect,
    GiveUp,
    Marks,
    Meanwhile,
    ProcessResult,
    Publish,
    RelayEngine,
    StopControl,
    TopicRegistration,
)
from outboxbind.relay.policy import PoisonPolicy, RetryPolicy
from outboxbind.store import AsyncStore, Store, WakeupSource, threaded
from outboxbind.threads import DaemonThreadPool
from outboxbind.topics import PublishOutcome, Topic

__all__ = ["AsyncRelay", "PoisonPolicy", "ProcessResult", "Relay", "RetryPolicy"]

R = TypeVar("R")

log = logging.getLogger("outboxbind.relay")


def _grace(timeout: float) -> float:
    """How long past ``timeout`` the relay waits for a topic that was asked to honour it."""
    return min(1.0, 0.1 * timeout)


#: How long ``stop()``, once its timeout has passed, waits for the loop to give its batches back.
RELEASE_GRACE = 1.0

#: How long a stopping relay waits for interrupted topics (handler topics) to report what their
#: handlers finished, so that it is saved; within :data:`RELEASE_GRACE`.
INTERRUPT_GRACE = 0.5


def _checked_outcomes(
    messages: list[PersistedMessage], outcomes: object, topic: Topic[Any]
) -> list[PublishOutcome]:
    """Hold a topic to its contract: one outcome per message, a publish id or an exception."""
    if not isinstance(outcomes, list) or len(outcomes) != len(messages):
        count = len(outcomes) if isinstance(outcomes, list) else type(outcomes).__name__
        return _group_failure(
            messages,
            RuntimeError(
                f"{topic!r}.publish_batch returned {count} outcomes for {len(messages)} messages"
            ),
        )
    if all(isinstance(outcome, str) for outcome in outcomes):
        return outcomes  # every message published: nothing to hold the topic to
    checked: list[PublishOutcome] = []
    for message, outcome in zip(messages, outcomes, strict=True):
        if isinstance(outcome, str | BaseException):
            checked.append(outcome)
        elif outcome is None:
            checked.append(
                RuntimeError(
                    f"{topic!r}.publish_batch returned None for message {message.id}: return "
                    "its publish id, or the exception, or NotAttempted"
                )
            )
        else:
            checked.append(str(outcome))  # an id of another type (an offset, say) is still an id
    return checked


def _group_failure(messages: list[PersistedMessage], error: BaseException) -> list[PublishOutcome]:
    """A whole group failed (the topic raised, or timed out): the first message of each sequence
    carries the error and its attempt; the others are released without one."""
    seen: set[tuple[str, str]] = set()
    outcomes: list[PublishOutcome] = []
    for message in messages:
        if message.sequence in seen:
            outcomes.append(NotAttempted(f"an earlier message of its key failed: {error}"))
        else:
            seen.add(message.sequence)
            outcomes.append(error)
    return outcomes


def _busy(topic: Topic[Any], messages: list[PersistedMessage]) -> list[PublishOutcome]:
    error = NotAttempted(f"{topic!r} has not yet returned from an earlier, timed-out batch")
    return [error] * len(messages)


def _cut_short(topic: Topic[Any], messages: list[PersistedMessage]) -> list[PublishOutcome]:
    """The outcomes of a call the relay did not wait for, or did not make, because a stop's
    deadline passed: released without an attempt; published or not, the messages stay in the
    outbox (at least once)."""
    error = NotAttempted(f"the relay stopped before {topic!r} confirmed the message")
    return [error] * len(messages)


def _publish_wait(timeout: float, control: StopControl) -> tuple[float, bool]:
    """Seconds to wait for a round's topics, and whether a stop's deadline is what bounds it:
    ``publish_timeout`` plus its grace, or less when a stop asked to be done sooner."""
    wait_for = timeout + _grace(timeout)
    if control.requested:
        left = control.deadline - time.monotonic()
        if left < wait_for:
            return max(0.0, left), True
    return wait_for, False


class _RelayBase:
    def __init__(
        self,
        store: object,
        *,
        publish_timeout: float = 30.0,
        poll_interval: float = 1.0,
        poll_jitter: float = 0.2,
        max_store_backoff: float = 30.0,
        purge_interval: float = 60.0,
        seed: int | None = None,
    ) -> None:
        if publish_timeout <= 0:
            raise ConfigurationError(f"publish_timeout must be positive, not {publish_timeout!r}")
        if poll_interval < 0:
            raise ConfigurationError(f"poll_interval must be >= 0, not {poll_interval!r}")
        if not 0 <= poll_jitter < 1:
            raise ConfigurationError(f"poll_jitter must be in [0, 1), not {poll_jitter!r}")
        inner = getattr(store, "store", store)  # see through the threaded() adapter
        lease_duration = getattr(inner, "lease_duration", None)
        if isinstance(lease_duration, int | float) and publish_timeout > lease_duration / 2:
            raise ConfigurationError(
                f"publish_timeout ({publish_timeout}s) must be at most half the store's "
                f"lease_duration ({lease_duration}s): a publish that outlived its lease would "
                "let another relay publish the same sequences concurrently"
            )
        self._engine = RelayEngine(
            store,
            publish_timeout=publish_timeout,
            poll_interval=poll_interval,
            poll_jitter=poll_jitter,
            max_store_backoff=max_store_backoff,
            rng=random.Random(seed),
        )
        if not purge_interval > 0:
            raise ConfigurationError(f"purge_interval must be positive, not {purge_interval!r}")
        self._engine.purge_interval = purge_interval
        self._control = StopControl()
        self._busy_topics: set[str] = set()  # timed out, and their call has not returned yet

    def _not_busy(self, name: str, _call: object) -> None:
        self._busy_topics.discard(name)

    def register_topic(
        self,
        topic: Topic[Any],
        *,
        retry: RetryPolicy | None = None,
        poison: PoisonPolicy | None = None,
        keep_settled: timedelta | None = None,
    ) -> None:
        """Let this relay publish the outbox messages of ``topic``.

        Args:
            topic: the real topic (or a handler topic); its name selects its messages.
            retry: how failed publishes are retried (default :class:`RetryPolicy()`).
            poison: what happens after the last attempt: ``"block"`` keeps the message at the
                head of its key until replayed, ``"park"`` moves it to the dead letters. By
                default the topic's ``default_poison``: ``"block"``, ``"park"`` for a handler
                topic.
            keep_settled: keep each published (settled) message this long, with what the topic
                reported for it (a handler topic's results), instead of deleting it at once;
                the relay purges older ones every ``purge_interval`` seconds. The store must be
                a :class:`~outboxbind.store.ProgressStore`.

        Raises:
            TopicAlreadyRegistered: a topic of that name is already registered.
            ConfigurationError: a bad policy, or the store cannot keep what the topic needs.
        """
        if not isinstance(topic, Topic):
            raise TypeError(f"register_topic() needs an outboxbind Topic, not {topic!r}")
        if poison is None:
            poison = cast("PoisonPolicy", topic.default_poison)
        if poison not in ("block", "park"):
            raise ConfigurationError(f"poison must be 'block' or 'park', not {poison!r}")
        if keep_settled is not None and (
            not isinstance(keep_settled, timedelta) or keep_settled <= timedelta(0)
        ):
            raise ConfigurationError(
                f"keep_settled must be a positive timedelta (or None), not {keep_settled!r}"
            )
        if topic.name in self._engine.topics:
            raise TopicAlreadyRegistered(
                f"a topic named {topic.name!r} is already registered with this relay "
                f"({self._engine.topics[topic.name].topic!r})"
            )
        if topic.keeps_progress or keep_settled is not None:
            store = getattr(self._engine.store, "store", self._engine.store)  # see threaded()
            if not callable(getattr(store, "purge_settled", None)):
                needs = "keep_settled" if keep_settled is not None else f"{topic!r}"
                raise ConfigurationError(
                    f"{needs} needs a store that keeps progress and settled messages (a "
                    f"ProgressStore, see outboxbind.store); {type(store).__name__} is not one"
                )
        self._engine.topics[topic.name] = TopicRegistration(
            topic, retry or RetryPolicy(), poison, keep_settled
        )

    def _interrupt_topics(self) -> None:
        """Ask every topic to end a running publish now and report what it knows (a handler
        topic cancels its handlers); from any thread."""
        for registration in list(self._engine.topics.values()):
            try:
                registration.topic.interrupt()
            except Exception as exc:
                log.warning("interrupting %r failed: %s", registration.topic, exc)

    @property
    def topics(self) -> dict[str, Topic[Any]]:
        """The registered topics by name."""
        return {name: reg.topic for name, reg in self._engine.topics.items()}

    @property
    def totals(self) -> dict[str, int]:
        """Counts since start: published, failed, dead, store_errors."""
        return dict(self._engine.totals)

    def _check_ready(self, size: int, what: str) -> None:
        if not self._engine.topics:
            raise ConfigurationError("register at least one topic before relaying messages")
        if not isinstance(size, int) or size <= 0:
            raise ConfigurationError(f"{what} must be a positive int, not {size!r}")


class Relay(_RelayBase):
    """Publishes committed outbox messages of the registered topics, from a synchronous store.

    Args:
        store: where the outbox lives (for example ``SQLiteStore``).
        publish_timeout: seconds a topic may take to confirm a batch; at most half the store's
            lease duration, so that a batch never outlives its lease.
        poll_interval: seconds between polls when idle (wake-ups cut it short).
        poll_jitter: fraction by which each idle sleep is randomly spread.
        max_store_backoff: the longest pause after repeated store errors, in seconds.
        publish_concurrency: how many topics of one batch are published at once.
        purge_interval: seconds between purges of settled messages kept longer than their
            topic's ``keep_settled``.
        seed: seed for the jitter's random numbers (tests).
    """

    def __init__(
        self,
        store: Store,
        *,
        publish_timeout: float = 30.0,
        poll_interval: float = 1.0,
        poll_jitter: float = 0.2,
        max_store_backoff: float = 30.0,
        publish_concurrency: int = 8,
        purge_interval: float = 60.0,
        seed: int | None = None,
    ) -> None:
        super().__init__(
            store,
            publish_timeout=publish_timeout,
            poll_interval=poll_interval,
            poll_jitter=poll_jitter,
            max_store_backoff=max_store_backoff,
            purge_interval=purge_interval,
            seed=seed,
        )
        self.store = store
        self._publish_concurrency = max(1, publish_concurrency)
        self._executor: DaemonThreadPool | None = None
        self._store_threads: DaemonThreadPool | None = None  # the poll loop's background calls
        self._in_flight: list[Future[object]] = []
        self._give_up: Future[None] = Future()  # done: stop() stopped waiting for this loop
        self._wakeup = threading.Event()
        self._running = threading.Lock()
        self._stopped = threading.Event()
        self._stopped.set()

    @property
    def is_polling(self) -> bool:
        """Whether :meth:`poll_for_messages` is running."""
        return not self._stopped.is_set()

    def process_messages(self, limit: int = 100) -> ProcessResult:
        """Run one round now: publish up to ``limit`` due messages and return what happened."""
        self._check_ready(limit, "limit")
        return self._drive(self._engine.process(limit))

    def purge_settled(self) -> int:
        """Delete now the kept settled messages older than their topic's ``keep_settled`` (the
        poll loop does it every ``purge_interval`` seconds); return how many."""
        return self._drive(self._engine.purge_settled())

    def poll_for_messages(self, batch_size: int = 100) -> None:
        """Publish messages as they are committed, until :meth:`stop` is called.

        Blocks; run it in a thread. Only one poll loop may run per relay at a time.
        """
        self._check_ready(batch_size, "batch_size")
        if not self._running.acquire(blocking=False):
            raise RuntimeError("this relay is already polling")
        self._stopped.clear()
        unsubscribe: Callable[[], None] | None = None
        try:
            if isinstance(self.store, WakeupSource):
                unsubscribe = self.store.subscribe_wakeups(self.wake)
            self._drive(self._engine.poll(batch_size, self._control))
        finally:
            if unsubscribe is not None:
                unsubscribe()
            if self._executor is not None:
                self._executor.shutdown(wait=False)
                self._executor = None
            if self._store_threads is not None:
                self._store_threads.shutdown(wait=False)
                self._store_threads = None
            self._control = StopControl()
            self._give_up = Future()
            self._stopped.set()
            self._running.release()

    def wake(self) -> None:
        """End the current idle sleep now (thread-safe); for commit hooks and tests."""
        self._wakeup.set()

    def stop(self, *, drain: bool = True, timeout: float | None = 30.0) -> bool:
        """Ask the poll loop to stop, and wait for it; return whether it stopped in time (having
        drained, with ``drain=True``).

        When ``timeout`` passes first, the loop stops waiting for its topics: the round in
        progress records the outcomes known so far and gives its batches back, so that their
        leases are released at once, and the loop ends. ``stop`` waits for that up to
        :data:`RELEASE_GRACE` more seconds, then returns ``False``. A message whose publish was
        still in flight stays in the outbox and is published again later (at least once).

        A request made while no loop runs is kept: the next :meth:`poll_for_messages` drains
        (or not) and returns at once. Then ``stop`` returns ``True`` without waiting.

        Args:
            drain: first publish everything that is due (bounded by ``timeout``); with
                ``False`` only the round in progress is finished.
            timeout: seconds to wait; ``None`` waits as long as it takes.
        """
        control, give_up = self._control, self._give_up
        control.request(drain=drain, timeout=timeout)
        self._wakeup.set()
        if self._stopped.is_set():
            return True  # kept for the next loop
        if not drain:
            self._interrupt_topics()
        if self._stopped.wait(timeout):
            return control.drained or not drain
        self._interrupt_topics()
        control.give_up()
        if not give_up.done():
            give_up.set_result(None)
        self._wakeup.set()
        self._stopped.wait(RELEASE_GRACE)
        return False

    # -- the driver -----------------------------------------------------------------------------

    def _drive(self, steps: Generator[Effect, Any, R]) -> R:
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    effect = steps.send(value) if error is None else steps.throw(error)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                value, error = None, None
                try:
                    value = self._perform(effect)
                except Exception as exc:
                    error = exc
        except BaseException:
            self._release_open_batches()
            raise

    def _release_open_batches(self) -> None:
        batches, self._engine.open_batches = self._engine.open_batches, []
        in_flight, self._in_flight = self._in_flight, []
        for future in in_flight:  # the store's background calls: let them end, keep a batch
            try:
                result = future.result(timeout=30)
            except Exception as exc:
                log.warning("a store call of an interrupted round failed: %s", exc)
                continue
            if hasattr(result, "close"):
                batches.append(result)
        for batch in batches:  # oldest first: a batch read ahead continues the one before
            try:
                batch.close()
            except Exception as exc:
                log.warning("releasing the outbox batch of an interrupted round failed: %s", exc)

    def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Call):
            return getattr(effect.target, effect.method)(*effect.args)
        if isinstance(effect, Marks):
            batch: Any = effect.batch
            if effect.details:
                batch.add_details(effect.details)
            record = getattr(batch, "record", None)
            if record is not None:  # a buffered batch takes them all at once
                record(effect.marks)
                return None
            for kind, message, detail, retry_after in effect.marks:
                if kind == "published":
                    batch.mark_published(message, detail)
                elif kind == "failed":
                    batch.mark_failed(message, detail, retry_after)
                else:
                    batch.mark_dead(message, detail)
            return None
        if isinstance(effect, Publish):
            return self._publish(effect)
        if isinstance(effect, GiveUp):
            return effect.topic.given_up(effect.message, effect.error)
        if isinstance(effect, Meanwhile):
            if self._store_threads is None:
                self._store_threads = DaemonThreadPool(2, "outboxbind-store")
            self._in_flight = [self._store_threads.submit(self._perform, c) for c in effect.calls]
            return self._in_flight
        if isinstance(effect, Collect):
            futures: list[Future[object]] = effect.handle  # type: ignore[assignment]
            results = [_result_or_error(future) for future in futures]
            self._in_flight = []  # only now: interrupted while waiting, they are waited for
            return results
        return self._sleep(effect.seconds)

    def _sleep(self, seconds: float) -> bool:
        if not self._wakeup.wait(seconds):
            return False
        self._wakeup.clear()
        return not self._control.requested

    def _publish(self, effect: Publish) -> list[list[PublishOutcome]]:
        if self._executor is None:
            self._executor = DaemonThreadPool(self._publish_concurrency, "outboxbind-publish")
        # one deadline for the whole round: waits on successive topics must not add up
        wait_for, stop_bounds = _publish_wait(effect.timeout, self._control)
        if stop_bounds and wait_for <= 0:  # the stop's deadline has passed: start nothing more
            return [_cut_short(topic, msgs) for topic, msgs in effect.groups]
        deadline = time.monotonic() + wait_for
        futures = {
            index: self._executor.submit(_publish_group, topic, msgs, effect.timeout)
            for index, (topic, msgs) in enumerate(effect.groups)
            if topic.name not in self._busy_topics
        }
        waiting: set[Future[Any]] = set(futures.values())
        give_up = self._give_up
        while waiting and not give_up.done():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            done, _ = wait([*waiting, give_up], timeout=left, return_when=FIRST_COMPLETED)
            waiting -= done
        if waiting and give_up.done():  # the topics were interrupted: take what they report
            done, _ = wait(waiting, timeout=INTERRUPT_GRACE)
            waiting -= done
        cut_short = stop_bounds or give_up.done()
        results: list[list[PublishOutcome]] = []
        for index, (topic, msgs) in enumerate(effect.groups):
            future = futures.get(index)
            if future is None:
                results.append(_busy(topic, msgs))
            elif future.done():
                results.append(future.result())
            elif future.cancel():  # never started: the pool was full
                results.append([NotAttempted("not started before the deadline")] * len(msgs))
            else:
                if cut_short:  # stop() gave up: release them, published or not
                    results.append(_cut_short(topic, msgs))
                else:
                    timed_out = TimeoutError(f"{topic!r} did not answer within {effect.timeout}s")
                    results.append(_group_failure(msgs, timed_out))
                # until that call returns, the topic gets no new batch (and holds one thread)
                self._busy_topics.add(topic.name)
                future.add_done_callback(functools.partial(self._not_busy, topic.name))
        return results


def _result_or_error(future: Future[object]) -> object:
    try:
        return future.result()
    except Exception as exc:
        return exc


def _publish_group(
    topic: Topic[Any], messages: list[PersistedMessage], timeout: float
) -> list[PublishOutcome]:
    try:
        outcomes = topic.publish_batch(messages, timeout=timeout)
    except Exception as exc:
        return _group_failure(messages, exc)
    return _checked_outcomes(messages, outcomes, topic)


class AsyncRelay(_RelayBase):
    """The asyncio face of :class:`Relay`: the same logic, awaited.

    Takes an :class:`~outboxbind.store.AsyncStore`, or a synchronous store, which it runs in
    worker threads (see :func:`outboxbind.store.threaded`). Arguments as for :class:`Relay`.
    """

    def __init__(
        self,
        store: AsyncStore | Store,
        *,
        publish_timeout: float = 30.0,
        poll_interval: float = 1.0,
        poll_jitter: float = 0.2,
        max_store_backoff: float = 30.0,
        publish_concurrency: int = 8,
        purge_interval: float = 60.0,
        seed: int | None = None,
    ) -> None:
        # sync topics and a sync store run on the relay's own threads, never the loop's default
        # executor: a hung destination must not starve the application's to_thread() calls
        self._executor = DaemonThreadPool(max(1, publish_concurrency), "outboxbind-async-publish")
        if not inspect.iscoroutinefunction(store.checkout_batch):
            store = threaded(store)  # type: ignore[arg-type]
        super().__init__(
            store,
            publish_timeout=publish_timeout,
            poll_interval=poll_interval,
            poll_jitter=poll_jitter,
            max_store_backoff=max_store_backoff,
            purge_interval=purge_interval,
            seed=seed,
        )
        self.store: AsyncStore = store  # type: ignore[assignment]
        self._wakeup: asyncio.Event | None = None
        self._in_flight: list[asyncio.Future[object]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._give_up: asyncio.Future[None] | None = None  # done: stop() stopped waiting

    @property
    def is_polling(self) -> bool:
        """Whether :meth:`poll_for_messages` is running."""
        return self._stopped is not None and not self._stopped.is_set()

    async def process_messages(self, limit: int = 100) -> ProcessResult:
        """Run one round now: publish up to ``limit`` due messages and return what happened."""
        self._check_ready(limit, "limit")
        return await self._drive(self._engine.process(limit))

    async def purge_settled(self) -> int:
        """See :meth:`Relay.purge_settled`."""
        return await self._drive(self._engine.purge_settled())

    async def poll_for_messages(self, batch_size: int = 100) -> None:
        """Publish messages as they are committed until :meth:`stop`; run it as a task."""
        self._check_ready(batch_size, "batch_size")
        if self.is_polling:
            raise RuntimeError("this relay is already polling")
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._stopped = asyncio.Event()
        self._give_up = self._loop.create_future()
        unsubscribe: Callable[[], None] | None = None
        try:
            if isinstance(self.store, WakeupSource):
                unsubscribe = self.store.subscribe_wakeups(self.wake)
            await self._drive(self._engine.poll(batch_size, self._control))
        finally:
            if unsubscribe is not None:
                unsubscribe()
            self._control = StopControl()
            self._give_up = None
            self._stopped.set()

    def wake(self) -> None:
        """End the current idle sleep now; safe to call from any thread."""
        loop, event = self._loop, self._wakeup
        if loop is None or event is None or loop.is_closed():
            return
        try:
            if asyncio.get_running_loop() is loop:
                event.set()
                return
        except RuntimeError:
            pass
        loop.call_soon_threadsafe(event.set)

    async def stop(self, *, drain: bool = True, timeout: float | None = 30.0) -> bool:
        """Ask the poll loop to stop, and wait for it; return whether it stopped in time (having
        drained, with ``drain=True``).

        As :meth:`Relay.stop`: when ``timeout`` passes first, the loop stops waiting for its
        topics (an async topic's call is cancelled), gives its batches back and ends; ``stop``
        waits for that up to :data:`RELEASE_GRACE` more seconds and returns ``False``.

        A request made while no loop runs is kept for the next :meth:`poll_for_messages`; a
        poll task created just before is given the chance to start first.
        """
        control = self._control
        control.request(drain=drain, timeout=timeout)
        if not self.is_polling:
            await asyncio.sleep(0)  # let a just-created poll task start
        if self._wakeup is not None:
            self._wakeup.set()
        if not self.is_polling:
            return True
        stopped, give_up = self._stopped, self._give_up
        assert stopped is not None
        if not drain:
            self._interrupt_topics()
        try:
            await asyncio.wait_for(stopped.wait(), timeout)
        except TimeoutError:
            pass
        else:
            return control.drained or not drain
        self._interrupt_topics()
        control.give_up()
        if give_up is not None and not give_up.done():
            give_up.set_result(None)
        if self._wakeup is not None:
            self._wakeup.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopped.wait(), RELEASE_GRACE)
        return False

    async def _drive(self, steps: Generator[Effect, Any, R]) -> R:
        value: Any = None
        error: BaseException | None = None
        try:
            while True:
                try:
                    effect = steps.send(value) if error is None else steps.throw(error)
                except StopIteration as done:
                    return done.value  # type: ignore[no-any-return]
                value, error = None, None
                try:
                    value = await self._perform(effect)
                except Exception as exc:
                    error = exc
        except BaseException:  # cancelled mid-round: give the batches back rather than hold them
            batches, self._engine.open_batches = self._engine.open_batches, []
            in_flight, self._in_flight = self._in_flight, []
            if in_flight:  # the store's background calls: let them end, keep a batch
                gathered = asyncio.gather(*in_flight, return_exceptions=True)
                try:
                    results = await asyncio.wait_for(asyncio.shield(gathered), 30)
                    batches += [r for r in results if hasattr(r, "close")]
                except Exception as exc:
                    log.warning("the store calls of a cancelled round did not end: %s", exc)
            for batch in batches:  # oldest first: a batch read ahead continues the one before
                try:
                    await asyncio.shield(batch.close())
                except Exception as exc:
                    log.warning("releasing the batch of a cancelled round failed: %s", exc)
            raise

    async def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Call):
            return await getattr(effect.target, effect.method)(*effect.args)
        if isinstance(effect, Marks):
            batch: Any = effect.batch
            if effect.details:
                if inspect.iscoroutinefunction(batch.add_details):
                    await batch.add_details(effect.details)
                else:
                    batch.add_details(effect.details)  # buffered: no I/O
            record = getattr(batch, "record", None)
            if record is not None and not inspect.iscoroutinefunction(record):
                record(effect.marks)  # a buffered batch takes them all at once, without I/O
                return None
            for kind, message, detail, retry_after in effect.marks:
                if kind == "published":
                    await batch.mark_published(message, detail)
                elif kind == "failed":
                    await batch.mark_failed(message, detail, retry_after)
                else:
                    await batch.mark_dead(message, detail)
            return None
        if isinstance(effect, Publish):
            return await asyncio.gather(
                *(self._publish_group(topic, msgs, effect.timeout) for topic, msgs in effect.groups)
            )
        if isinstance(effect, GiveUp):
            return await effect.topic.given_up_async(effect.message, effect.error)
        if isinstance(effect, Meanwhile):
            self._in_flight = [asyncio.ensure_future(self._perform(c)) for c in effect.calls]
            return self._in_flight
        if isinstance(effect, Collect):
            tasks: list[asyncio.Future[object]] = effect.handle  # type: ignore[assignment]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            self._in_flight = []
            return results
        return await self._sleep(effect.seconds)

    async def _sleep(self, seconds: float) -> bool:
        assert self._wakeup is not None
        try:
            await asyncio.wait_for(self._wakeup.wait(), seconds)
        except TimeoutError:
            return False
        self._wakeup.clear()
        return not self._control.requested

    async def _publish_group(
        self, topic: Topic[Any], messages: list[PersistedMessage], timeout: float
    ) -> list[PublishOutcome]:
        if topic.name in self._busy_topics:
            return _busy(topic, messages)
        wait_for, stop_bounds = _publish_wait(timeout, self._control)
        if stop_bounds and wait_for <= 0:  # the stop's deadline has passed: start nothing more
            return _cut_short(topic, messages)
        native = topic.async_native
        if native:
            call: asyncio.Future[Any] = asyncio.ensure_future(
                topic.publish_batch_async(messages, timeout=timeout)
            )
        else:
            call = asyncio.get_running_loop().run_in_executor(
                self._executor, functools.partial(_publish_group, topic, messages, timeout)
            )
        give_up = self._give_up
        waits: set[asyncio.Future[Any]] = {call} if give_up is None else {call, give_up}
        await asyncio.wait(waits, timeout=wait_for, return_when=asyncio.FIRST_COMPLETED)
        if not call.done() and give_up is not None and give_up.done():
            # the topics were interrupted: take what they report
            await asyncio.wait({call}, timeout=INTERRUPT_GRACE)
        if not call.done():
            if native:
                call.cancel()
            else:  # the thread runs on: no new batch for this topic until it returns
                self._busy_topics.add(topic.name)
                call.add_done_callback(functools.partial(self._not_busy, topic.name))
            if stop_bounds or (give_up is not None and give_up.done()):
                return _cut_short(topic, messages)  # stop() gave up: released, published or not
            return _group_failure(
                messages, TimeoutError(f"{topic!r} did not answer within {timeout}s")
            )
        try:
            outcomes = call.result()
        except Exception as exc:
            return _group_failure(messages, exc)
        return _checked_outcomes(messages, outcomes, topic)
