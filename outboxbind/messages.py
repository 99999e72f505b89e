"""The two value types that cross the seam between the core and a store."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType

import attrs

__all__ = ["OutboxEntry", "PersistedMessage"]


def _frozen_mapping(value: Mapping[str, str] | None) -> Mapping[str, str]:
    if not value:
        return _EMPTY
    return MappingProxyType(dict(value))


_EMPTY: Mapping[str, str] = MappingProxyType({})


@attrs.frozen
class OutboxEntry:
    """A message encoded and validated by ``publish()``, handed to a persister to insert.

    Attributes:
        topic: the name of the topic it is for.
        data: the bytes the topic's codec produced; stored and published unchanged.
        attributes: string attributes published alongside the data.
        ordering_key: the key whose order the message keeps, or ``None`` when it keeps the
            order of its whole topic.
        deliver_after: do not publish before this instant (timezone-aware), or ``None``.
        strict_sequence: the topic asks that its per-key publish order equal the writers' commit
            order even when concurrent writers interleave (see ``Topic(strict_sequence=...)``).
    """

    topic: str
    data: bytes
    attributes: Mapping[str, str] = attrs.field(default=_EMPTY, converter=_frozen_mapping)
    ordering_key: str | None = None
    deliver_after: datetime | None = None
    strict_sequence: bool = False


@attrs.frozen
class PersistedMessage:
    """A message checked out of a store for publishing.

    Attributes:
        id: the outbox id, unique in its store and never reused; sent to consumers so they
            can deduplicate redeliveries.
        topic: the name of the topic it is for.
        data: the stored bytes, exactly as the codec produced them.
        attributes: the string attributes given at publish time.
        ordering_key: the ordering key, or ``None`` for the topic-wide sequence.
        created_at: when the message was written (timezone-aware, UTC).
        attempts: how many publish attempts of it have failed so far.
        progress: what the relay saved with the message's last failure (a handler topic's
            per-handler results, as JSON text), or ``None``. Opaque to stores: they keep it as
            given (see :class:`~outboxbind.store.MarkDetails`) and hand it back.
    """

    id: str
    topic: str
    data: bytes
    attributes: Mapping[str, str] = attrs.field(converter=_frozen_mapping)
    ordering_key: str | None
    created_at: datetime
    attempts: int = 0
    progress: str | None = None

    @property
    def sequence(self) -> tuple[str, str]:
        """The sequence the message keeps its order in: ``(topic, ordering_key or "")``."""
        return (self.topic, self.ordering_key or "")
