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
