"""An in-memory topic: records what it is given, for tests and the demo."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import attrs

from outboxbind.codecs import Codec
from outboxbind.messages import PersistedMessage
from outboxbind.topics import PublishOutcome, Topic, outbox_attributes, publish_in_key_order

__all__ = ["InMemoryTopic", "Published"]

T = TypeVar("T")


@attrs.frozen
class Published:
    """One message as the in-memory topic received it.

    Attributes:
        publish_id: the id the topic gave it.
        outbox_id: the outbox id, or ``None`` for a direct publish.
        data: the bytes received.
        attributes: the attributes received.
        ordering_key: the ordering key, if any.
    """

    publish_id: str
    outbox_id: str | None
    data: bytes
    attributes: Mapping[str, str]
    ordering_key: str | None


class InMemoryTopic(Topic[T]):
    """A topic that keeps every published message in :attr:`published`, in arrival order.

    Args:
        name: the topic name.
        codec: the message codec.
        ordering_key: optional ordering key function.
        fail: optional failure injection: called for each message the relay hands over; when it
            returns an exception, that message fails with it.
        delay: seconds to sleep per batch, to stand in for a slow destination.
        strict_sequence: see :class:`~outboxbind.topics.Topic`.
        **limits: ``max_message_bytes``, ``max_ordering_key_bytes``, ``max_attributes``.
    """

    def __init__(
        self,
        name: str,
        codec: Codec[T],
        *,
        ordering_key: Callable[[T], str | None] | None = None,
        fail: Callable[[PersistedMessage], BaseException | None] | None = None,
        delay: float = 0.0,
        strict_sequence: bool = False,
        **limits: int,
    ) -> None:
        super().__init__(
            name, codec, ordering_key=ordering_key, strict_sequence=strict_sequence, **limits
        )
        self.fail = fail
        self.delay = delay
        self.published: list[Published] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def messages(self) -> list[T]:
        """Decode and return every message received, in arrival order."""
        with self._lock:
            return [self.codec.decode(p.data) for p in self.published]

    def outbox_ids(self) -> list[str]:
        """Return the outbox ids received, in arrival order (direct publishes excluded)."""
        with self._lock:
            return [p.outbox_id for p in self.published if p.outbox_id is not None]

    def publish(self, message: T, *, attributes: Mapping[str, str] | None = None) -> str:
        """Validate, encode and record ``message``; return its publish id."""
        entry = self.make_entry(message, attributes=attributes)
        with self._lock:
            publish_id = f"{self.name}-{next(self._ids)}"
            self.published.append(
                Published(publish_id, None, entry.data, entry.attributes, entry.ordering_key)
            )
        return publish_id

    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        """Record the batch, key by key in order, honouring ``fail`` and ``delay``."""
        if self.delay:
            if self.delay > timeout:
                time.sleep(timeout)
                return [TimeoutError(f"publish timed out after {timeout}s") for _ in messages]
            time.sleep(self.delay)
        return publish_in_key_order(messages, self._record)

    def _record(self, message: PersistedMessage) -> str:
        if self.fail is not None:
            error = self.fail(message)
            if error is not None:
                raise error
        with self._lock:
            publish_id = f"{self.name}-{next(self._ids)}"
            self.published.append(
                Published(
                    publish_id,
                    message.id,
                    message.data,
                    outbox_attributes(message),
                    message.ordering_key,
                )
            )
        return publish_id
