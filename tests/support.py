"""Message types and topics the tests share."""

from __future__ import annotations

import attrs

from outboxbind.codecs import JsonCodec
from outboxbind.topics.memory import InMemoryTopic


@attrs.frozen
class OrderPlaced:
    """The message type most tests publish."""

    order_id: int
    customer: str
    note: str = ""


def order_topic(name: str = "orders", **kwargs: object) -> InMemoryTopic[OrderPlaced]:
    """An in-memory topic of :class:`OrderPlaced`, ordered by customer."""
    return InMemoryTopic(
        name,
        JsonCodec(OrderPlaced),
        ordering_key=lambda m: m.customer,
        **kwargs,  # type: ignore[arg-type]
    )
