"""In-process wake-ups: a writer signals a channel, relays subscribed to it wake up.

Stores whose database cannot notify (SQLite, Redis without keyspace events) use this so that a
relay in the same process does not wait a whole poll interval after a commit. Signals may come
early (before the commit lands) or spuriously; the relay re-checks briefly after a wake-up, and
polling stays the fallback.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

__all__ = ["signal", "subscribe"]

log = logging.getLogger("outboxbind.wakeup")
_lock = threading.Lock()
_subscribers: dict[str, list[Callable[[], None]]] = {}


def subscribe(channel: str, callback: Callable[[], None]) -> Callable[[], None]:
    """Call ``callback`` on every :func:`signal` of ``channel``; return the unsubscriber."""
    with _lock:
        _subscribers.setdefault(channel, []).append(callback)

    def unsubscribe() -> None:
        with _lock:
            callbacks = _subscribers.get(channel, [])
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks:
                _subscribers.pop(channel, None)

    return unsubscribe


def signal(channel: str) -> None:
    """Wake every subscriber of ``channel``; cheap when there is none."""
    callbacks = _subscribers.get(channel)
    if not callbacks:
        return
    for callback in list(callbacks):
        try:
            callback()
        except Exception:  # a wake-up is a hint: never let it fail the writer's publish()
            log.exception("an outbox wake-up callback of %r failed", channel)


class WakeupThread:
    """A background thread that wakes the relays subscribed to it, for stores to build on.

    The first :meth:`subscribe` starts the thread, the last unsubscribe stops it. A subclass
    implements :meth:`listen`, which runs in the thread until :attr:`stopping` is set and calls
    :meth:`wake` whenever messages may have been committed (a LISTEN notification, a pub/sub
    message, a changed ``data_version``); :meth:`started` and :meth:`stopped` are hooks around
    the thread's life, run under the lock.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.callbacks: list[Callable[[], None]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.connected = threading.Event()
        self.thread: threading.Thread | None = None

    def subscribe(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` on every wake-up; return the unsubscriber."""
        with self.lock:
            self.callbacks.append(callback)
            if self.thread is None:
                self.stopping.clear()
                self.started()
                self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self.thread.start()

        def unsubscribe() -> None:
            with self.lock:
                if callback in self.callbacks:
                    self.callbacks.remove(callback)
                if self.callbacks or self.thread is None:
                    return
                self.stopping.set()
                self.stopped()
                thread, self.thread = self.thread, None
            thread.join(5)

        return unsubscribe

    def wake(self) -> None:
        """Wake every subscriber; a failing callback is logged, never raised."""
        with self.lock:
            callbacks = list(self.callbacks)
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("an outbox wake-up callback failed (%s)", self.name)

    def _run(self) -> None:
        try:
            self.listen()
        finally:
            self.connected.clear()

    def listen(self) -> None:
        """Run until :attr:`stopping` is set, calling :meth:`wake`; see the class docstring."""
        raise NotImplementedError

    def started(self) -> None:
        """Called (under the lock) just before the thread starts."""

    def stopped(self) -> None:
        """Called (under the lock) when the last subscriber left, before the thread is joined."""
