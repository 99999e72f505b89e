"""The relay: moves committed outbox messages to their real topics.

:class:`Relay` runs in a thread (``poll_for_messages`` blocks until ``stop()``); :class:`AsyncRelay`
is the same relay for asyncio. Both drive one :class:`~outboxbind.relay.engine.RelayEngine`, so
their behaviour is the same by construction.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from outboxbind.errors import ConfigurationError, TopicAlreadyRegistered
from outboxbind.messages import PersistedMessage
from outboxbind.relay.engine import (
    Call,
    Effect,
    ProcessResult,
    Publish,
    RelayEngine,
    StopControl,
    TopicRegistration,
)
from outboxbind.relay.policy import PoisonPolicy, RetryPolicy
from outboxbind.store import AsyncStore, Store, WakeupSource, threaded
from outboxbind.topics import PublishOutcome, Topic

__all__ = ["AsyncRelay", "PoisonPolicy", "ProcessResult", "Relay", "RetryPolicy"]

R = TypeVar("R")


def _grace(timeout: float) -> float:
    """How long past ``timeout`` the relay waits for a topic that was asked to honour it."""
    return min(1.0, 0.1 * timeout)


def _checked_outcomes(
    messages: list[PersistedMessage], outcomes: object, topic: Topic[Any]
) -> list[PublishOutcome]:
    if not isinstance(outcomes, list) or len(outcomes) != len(messages):
        count = len(outcomes) if isinstance(outcomes, list) else type(outcomes).__name__
        error = RuntimeError(
            f"{topic!r}.publish_batch returned {count} outcomes for {len(messages)} messages"
        )
        return [error] * len(messages)
    return outcomes


class _RelayBase:
    def __init__(
        self,
        store: object,
        *,
        publish_timeout: float = 30.0,
        poll_interval: float = 1.0,
        poll_jitter: float = 0.2,
        max_store_backoff: float = 30.0,
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
        self._control = StopControl()

    def register_topic(
        self,
        topic: Topic[Any],
        *,
        retry: RetryPolicy | None = None,
        poison: PoisonPolicy = "block",
    ) -> None:
        """Let this relay publish the outbox messages of ``topic``.

        Args:
            topic: the real topic; its name selects its messages in the outbox.
            retry: how failed publishes are retried (default :class:`RetryPolicy()`).
            poison: what happens after the last attempt: ``"block"`` keeps the message at the
                head of its key until replayed, ``"park"`` moves it to the dead letters.

        Raises:
            TopicAlreadyRegistered: a topic of that name is already registered.
        """
        if not isinstance(topic, Topic):
            raise TypeError(f"register_topic() needs an outboxbind Topic, not {topic!r}")
        if poison not in ("block", "park"):
            raise ConfigurationError(f"poison must be 'block' or 'park', not {poison!r}")
        if topic.name in self._engine.topics:
            raise TopicAlreadyRegistered(
                f"a topic named {topic.name!r} is already registered with this relay "
                f"({self._engine.topics[topic.name].topic!r})"
            )
        self._engine.topics[topic.name] = TopicRegistration(topic, retry or RetryPolicy(), poison)

    @property
    def topics(self) -> dict[str, Topic[Any]]:
        """The registered topics by name."""
        return {name: reg.topic for name, reg in self._engine.topics.items()}

    @property
    def totals(self) -> dict[str, int]:
        """Counts since start: published, failed, dead, store_errors."""
        return dict(self._engine.totals)

    def _check_can_poll(self, batch_size: int) -> None:
        if not self._engine.topics:
            raise ConfigurationError("register at least one topic before polling")
        if batch_size <= 0:
            raise ConfigurationError(f"batch_size must be positive, not {batch_size!r}")


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
        seed: int | None = None,
    ) -> None:
        super().__init__(
            store,
            publish_timeout=publish_timeout,
            poll_interval=poll_interval,
            poll_jitter=poll_jitter,
            max_store_backoff=max_store_backoff,
            seed=seed,
        )
        self.store = store
        self._publish_concurrency = max(1, publish_concurrency)
        self._executor: ThreadPoolExecutor | None = None
        self._wakeup = threading.Event()
        self._running = threading.Lock()
        self._stopped = threading.Event()
        self._stopped.set()

    def process_messages(self, limit: int = 100) -> ProcessResult:
        """Run one round now: publish up to ``limit`` due messages and return what happened."""
        if not self._engine.topics:
            raise ConfigurationError("register at least one topic before processing messages")
        return self._drive(self._engine.process(limit))

    def poll_for_messages(self, batch_size: int = 100) -> None:
        """Publish messages as they are committed, until :meth:`stop` is called.

        Blocks; run it in a thread. Only one poll loop may run per relay at a time.
        """
        self._check_can_poll(batch_size)
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
            self._control = StopControl()
            self._stopped.set()
            self._running.release()

    def wake(self) -> None:
        """End the current idle sleep now (thread-safe); for commit hooks and tests."""
        self._wakeup.set()

    def stop(self, *, drain: bool = True, timeout: float | None = 30.0) -> bool:
        """Ask the poll loop to stop, and wait for it; return whether it stopped in time.

        Args:
            drain: first publish everything that is due (bounded by ``timeout``); with
                ``False`` only the round in progress is finished.
            timeout: seconds to wait; ``None`` waits as long as it takes.
        """
        self._control.request(drain=drain, timeout=timeout)
        self._wakeup.set()
        return self._stopped.wait(timeout)

    # -- the driver -----------------------------------------------------------------------------

    def _drive(self, steps: Generator[Effect, Any, R]) -> R:
        value: Any = None
        error: BaseException | None = None
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

    def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Call):
            return getattr(effect.target, effect.method)(*effect.args)
        if isinstance(effect, Publish):
            return self._publish(effect)
        return self._sleep(effect.seconds)

    def _sleep(self, seconds: float) -> bool:
        woken = self._wakeup.wait(seconds)
        self._wakeup.clear()
        return woken and not self._control.requested

    def _publish(self, effect: Publish) -> list[list[PublishOutcome]]:
        def one(topic: Topic[Any], messages: list[PersistedMessage]) -> list[PublishOutcome]:
            try:
                outcomes = topic.publish_batch(messages, timeout=effect.timeout)
            except Exception as exc:
                return [exc] * len(messages)
            return _checked_outcomes(messages, outcomes, topic)

        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                self._publish_concurrency, thread_name_prefix="outboxbind-publish"
            )
        # one deadline for the whole round: waits on successive topics must not add up
        deadline = time.monotonic() + effect.timeout + _grace(effect.timeout)
        futures = [self._executor.submit(one, topic, msgs) for topic, msgs in effect.groups]
        results: list[list[PublishOutcome]] = []
        for future, (topic, msgs) in zip(futures, effect.groups, strict=True):
            try:
                results.append(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except FutureTimeout:
                message = f"{topic!r} did not answer within {effect.timeout}s"
                results.append([TimeoutError(message)] * len(msgs))
        return results


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
        seed: int | None = None,
    ) -> None:
        import inspect

        if not inspect.iscoroutinefunction(store.checkout_batch):
            store = threaded(store)  # type: ignore[arg-type]
        super().__init__(
            store,
            publish_timeout=publish_timeout,
            poll_interval=poll_interval,
            poll_jitter=poll_jitter,
            max_store_backoff=max_store_backoff,
            seed=seed,
        )
        self.store: AsyncStore = store  # type: ignore[assignment]
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None

    async def process_messages(self, limit: int = 100) -> ProcessResult:
        """Run one round now: publish up to ``limit`` due messages and return what happened."""
        if not self._engine.topics:
            raise ConfigurationError("register at least one topic before processing messages")
        return await self._drive(self._engine.process(limit))

    async def poll_for_messages(self, batch_size: int = 100) -> None:
        """Publish messages as they are committed until :meth:`stop`; run it as a task."""
        self._check_can_poll(batch_size)
        if self._stopped is not None and not self._stopped.is_set():
            raise RuntimeError("this relay is already polling")
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._stopped = asyncio.Event()
        unsubscribe: Callable[[], None] | None = None
        try:
            if isinstance(self.store, WakeupSource):
                unsubscribe = self.store.subscribe_wakeups(self.wake)
            await self._drive(self._engine.poll(batch_size, self._control))
        finally:
            if unsubscribe is not None:
                unsubscribe()
            self._control = StopControl()
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
        """Ask the poll loop to stop, and wait for it; return whether it stopped in time."""
        self._control.request(drain=drain, timeout=timeout)
        if self._wakeup is not None:
            self._wakeup.set()
        if self._stopped is None:
            return True
        try:
            await asyncio.wait_for(self._stopped.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def _drive(self, steps: Generator[Effect, Any, R]) -> R:
        value: Any = None
        error: BaseException | None = None
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

    async def _perform(self, effect: Effect) -> Any:
        if isinstance(effect, Call):
            return await getattr(effect.target, effect.method)(*effect.args)
        if isinstance(effect, Publish):
            return await asyncio.gather(
                *(self._publish_group(topic, msgs, effect.timeout) for topic, msgs in effect.groups)
            )
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
        try:
            outcomes = await asyncio.wait_for(
                topic.publish_batch_async(messages, timeout=timeout), timeout + _grace(timeout)
            )
        except TimeoutError:
            return [TimeoutError(f"{topic!r} did not answer within {timeout}s")] * len(messages)
        except Exception as exc:
            return [exc] * len(messages)
        return _checked_outcomes(messages, outcomes, topic)
