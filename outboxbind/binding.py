"""``bind()``: a topic whose ``publish()`` writes to the outbox in the caller's transaction."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Mapping
from datetime import datetime, timedelta
from typing import Generic, Protocol, TypeVar, overload

from outboxbind.messages import OutboxEntry
from outboxbind.topics import Topic

__all__ = ["AsyncBoundTopic", "AsyncPersister", "BoundTopic", "Persister", "bind"]

T = TypeVar("T")


class Persister(Protocol):
    """Writes an entry into the outbox inside the caller's open transaction.

    Returns the new message's outbox id. It must not commit: the caller's transaction decides.
    Each store ships a ``persister(conn)`` factory; writing one for another driver is a plain
    function of an :class:`~outboxbind.messages.OutboxEntry` (see ``docs/persisters.md``).
    """

    def __call__(self, entry: OutboxEntry, /) -> str: ...


class AsyncPersister(Protocol):
    """The asyncio twin of :class:`Persister`: an ``async`` callable returning the outbox id."""

    def __call__(self, entry: OutboxEntry, /) -> Awaitable[str]: ...


class BoundTopic(Generic[T]):
    """A topic bound to a transaction: :meth:`publish` inserts into the outbox.

    Made by :func:`bind`; use it inside the transaction whose connection the persister wraps.
    """

    __slots__ = ("persister", "topic")

    def __init__(self, topic: Topic[T], persister: Persister) -> None:
        self.topic = topic
        self.persister = persister

    def publish(
        self,
        message: T,
        *,
        attributes: Mapping[str, str] | None = None,
        deliver_after: datetime | timedelta | None = None,
        correlation_id: str | None = None,
    ) -> str:
        """Validate and encode ``message`` and write it to the outbox; return its outbox id.

        The message is published by a relay once (and only if) the transaction commits. Bad
        input raises a :class:`~outboxbind.errors.PublishError` before anything is written.

        Args:
            message: the message, of the topic's type.
            attributes: string attributes to publish with it.
            deliver_after: publish no earlier than this instant or after this delay.
            correlation_id: an id to trace the message by (a request id, say); by default the
                one set by :func:`outboxbind.tracing.correlation`, if any.
        """
        entry = self.topic.make_entry(
            message,
            attributes=attributes,
            deliver_after=deliver_after,
            correlation_id=correlation_id,
        )
        return self.persister(entry)

    def __repr__(self) -> str:
        return f"BoundTopic({self.topic!r})"


class AsyncBoundTopic(Generic[T]):
    """The asyncio twin of :class:`BoundTopic`; :meth:`publish` is awaitable."""

    __slots__ = ("persister", "topic")

    def __init__(self, topic: Topic[T], persister: AsyncPersister) -> None:
        self.topic = topic
        self.persister = persister

    async def publish(
        self,
        message: T,
        *,
        attributes: Mapping[str, str] | None = None,
        deliver_after: datetime | timedelta | None = None,
        correlation_id: str | None = None,
    ) -> str:
        """See :meth:`BoundTopic.publish`."""
        entry = self.topic.make_entry(
            message,
            attributes=attributes,
            deliver_after=deliver_after,
            correlation_id=correlation_id,
        )
        return await self.persister(entry)

    def __repr__(self) -> str:
        return f"AsyncBoundTopic({self.topic!r})"


def _is_async(persister: object) -> bool:
    if getattr(persister, "is_async", False) is True:
        return True
    call = getattr(type(persister), "__call__", None)  # noqa: B004
    return inspect.iscoroutinefunction(persister) or inspect.iscoroutinefunction(call)


@overload
def bind(topic: Topic[T], persister: AsyncPersister) -> AsyncBoundTopic[T]: ...


@overload
def bind(topic: Topic[T], persister: Persister) -> BoundTopic[T]: ...


def bind(
    topic: Topic[T], persister: Persister | AsyncPersister
) -> BoundTopic[T] | AsyncBoundTopic[T]:
    """Bind ``topic`` to a transaction through ``persister``.

    The result has the topic's ``publish()`` signature, but each call inserts the encoded
    message into the outbox within the persister's transaction and returns the outbox id::

        with conn.transaction():
            conn.execute("insert into orders ...")
            bind(orders, persister(conn)).publish(OrderPlaced(...))

    An async persister (``async def __call__``) gives an :class:`AsyncBoundTopic` whose
    ``publish`` is awaited.
    """
    if not isinstance(topic, Topic):
        raise TypeError(f"bind() needs an outboxbind Topic, not {type(topic).__name__}")
    if not callable(persister):
        raise TypeError(f"bind() needs a persister callable, not {type(persister).__name__}")
    if _is_async(persister):
        return AsyncBoundTopic(topic, persister)  # type: ignore[arg-type]
    return BoundTopic(topic, persister)  # type: ignore[arg-type]
