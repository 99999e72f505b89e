"""The topic contract: what a destination must offer to be bound and relayed.

A topic has a name, a codec, an optional ordering key function and a size limit. It validates
and encodes messages (:meth:`Topic.make_entry`, used by both ``bind()`` and direct publishing),
publishes one message directly (:meth:`Topic.publish`) and publishes a relay's batch
(:meth:`Topic.publish_batch`), reporting a publish id or an error for each message.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Generic, TypeVar

from outboxbind.codecs import Codec
from outboxbind.errors import (
    ConfigurationError,
    EncodeError,
    InvalidAttributes,
    InvalidOrderingKey,
    MessageTooLarge,
    NotAttempted,
    PublishError,
)
from outboxbind.messages import OutboxEntry, PersistedMessage
from outboxbind.tracing import CORRELATION_ATTRIBUTE, current_correlation_id, current_traceparent

__all__ = [
    "MAX_TOPIC_NAME_BYTES",
    "RESERVED_ATTRIBUTE_PREFIX",
    "PublishOutcome",
    "Topic",
    "check_topic_name",
    "outbox_attributes",
    "publish_in_key_order",
]

T = TypeVar("T")

PublishOutcome = str | BaseException
"""What a topic reports for one message of a batch: its publish id, or the error."""

DEFAULT_MAX_MESSAGE_BYTES = 10_000_000
DEFAULT_MAX_ORDERING_KEY_BYTES = 1024
DEFAULT_MAX_ATTRIBUTES = 100

MAX_TOPIC_NAME_BYTES = 1024
"""The longest topic name (in UTF-8 bytes) a topic accepts.

Every store keeps the name in each outbox row and the PostgreSQL store sends it as the
``pg_notify`` payload (at most 8,000 bytes) inside the writer's transaction. It also shares the
PostgreSQL sequence index entry (at most 2,704 bytes) with an ordering key of up to 1,024 bytes.
1,024 bytes keeps every store well inside its limits, and far more than any real name needs."""


def check_topic_name(name: object) -> str:
    """Return ``name`` if every store can take it as a topic name; a clear error otherwise.

    A topic name is a non-empty ``str`` without NUL, valid Unicode text (no lone surrogate, so
    it has a UTF-8 form), of at most :data:`MAX_TOPIC_NAME_BYTES` bytes of UTF-8.

    Raises:
        ConfigurationError: naming what is wrong with the name, and the limit it broke.
    """
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"a topic name must be a non-empty string, not {name!r}")
    if problem := unwritable_text(name):
        raise ConfigurationError(
            f"the topic name {name[:80]!r} {problem}, so no store can write it"
        )
    size = len(name.encode("utf-8"))
    if size > MAX_TOPIC_NAME_BYTES:
        raise ConfigurationError(
            f"the topic name {name[:40]!r}... is {size} bytes of UTF-8, over the limit of "
            f"{MAX_TOPIC_NAME_BYTES} bytes"
        )
    return name


RESERVED_ATTRIBUTE_PREFIX = "outbox-"
"""Attributes outboxbind adds when publishing: ``outbox-id`` (the consumer's idempotency key),
``outbox-created-at``."""


class Topic(ABC, Generic[T]):
    """Base class of every topic: validation and encoding here, publishing in subclasses.

    Args:
        name: the name the relay and the outbox know the topic by (see
            :func:`check_topic_name`: non-empty, no NUL, valid Unicode, at most 1,024 bytes).
        codec: turns messages into bytes (see :mod:`outboxbind.codecs`).
        ordering_key: a function of the message giving its ordering key. Messages with the same
            key are published in the order they were written; without it, the whole topic keeps
            one order. The function may return ``None`` for a message that keeps topic order.
        max_message_bytes: the largest encoded message ``publish()`` accepts.
        max_ordering_key_bytes: the longest ordering key (UTF-8 bytes) ``publish()`` accepts.
        max_attributes: the most attributes one message may carry.
        strict_sequence: make each key's publish order equal the order in which the writers'
            transactions commit, even when they interleave (SPEC guarantee 5). Stores whose
            commits are serialized (SQLite, Redis) always give this; the PostgreSQL store takes
            a per-key lock at commit for it, which serializes the commits of one key.
    """

    def __init__(
        self,
        name: str,
        codec: Codec[T],
        *,
        ordering_key: Callable[[T], str | None] | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_ordering_key_bytes: int = DEFAULT_MAX_ORDERING_KEY_BYTES,
        max_attributes: int = DEFAULT_MAX_ATTRIBUTES,
        strict_sequence: bool = False,
    ) -> None:
        check_topic_name(name)
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, not {max_message_bytes}")
        self.name = name
        self.codec = codec
        self.ordering_key = ordering_key
        self.max_message_bytes = max_message_bytes
        self.max_ordering_key_bytes = max_ordering_key_bytes
        self.max_attributes = max_attributes
        self.strict_sequence = strict_sequence

    #: The poison policy a relay applies when ``register_topic`` is not given one.
    default_poison: str = "block"
    #: Whether the relay must save what :meth:`publish_batch` reports with its outcomes (a
    #: handler topic's progress): its store must then be a :class:`~outboxbind.store.ProgressStore`.
    keeps_progress: bool = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # -- validation and encoding -------------------------------------------------------------

    def make_entry(
        self,
        message: T,
        *,
        attributes: Mapping[str, str] | None = None,
        deliver_after: datetime | timedelta | None = None,
        correlation_id: str | None = None,
    ) -> OutboxEntry:
        """Encode and validate ``message`` into the entry a persister writes.

        ``correlation_id`` (or else the one set by :func:`outboxbind.tracing.correlation`) goes
        with the message in the ``outbox-correlation-id`` attribute, as the active trace
        context goes in ``traceparent``.

        Raises:
            EncodeError: the codec refused the message.
            MessageTooLarge: the encoded message is over ``max_message_bytes``.
            InvalidOrderingKey: the ordering key function failed or returned a bad key.
            InvalidAttributes: an attribute is not a string, is empty, or there are too many.
            PublishError: ``deliver_after`` is a naive datetime.
        """
        try:
            data = self.codec.encode(message)
        except Exception as exc:
            raise EncodeError(
                f"topic {self.name!r}: cannot encode {type(message).__name__} "
                f"with {self.codec!r}: {exc}"
            ) from exc
        if not isinstance(data, bytes):
            raise EncodeError(
                f"topic {self.name!r}: codec {self.codec!r} returned "
                f"{type(data).__name__}, not bytes"
            )
        if len(data) > self.max_message_bytes:
            raise MessageTooLarge(
                f"topic {self.name!r}: the encoded message is {len(data)} bytes, over the "
                f"topic's limit of {self.max_message_bytes} bytes"
            )
        key = self._ordering_key_of(message)
        attrs_ = self._checked_attributes(attributes) if attributes else None
        trace = current_traceparent()
        if trace:
            attrs_ = {**trace, **(attrs_ or {})}
        if correlation_id is None:
            correlation_id = current_correlation_id()
        if correlation_id is not None:
            if not isinstance(correlation_id, str) or not correlation_id:
                raise InvalidAttributes(
                    f"topic {self.name!r}: a correlation id must be a non-empty str, "
                    f"not {correlation_id!r}"
                )
            if problem := unwritable_text(correlation_id):
                raise InvalidAttributes(
                    f"topic {self.name!r}: the correlation id {correlation_id[:80]!r} {problem}"
                )
            attrs_ = {**(attrs_ or {}), CORRELATION_ATTRIBUTE: correlation_id}
        entry = OutboxEntry(
            topic=self.name,
            data=data,
            attributes=attrs_,
            ordering_key=key,
            deliver_after=self._deliver_after(deliver_after),
            strict_sequence=self.strict_sequence,
        )
        self.validate_entry(entry)
        return entry

    def validate_entry(self, entry: OutboxEntry) -> None:
        """Destination-specific checks of the whole encoded entry; raise a
        :class:`~outboxbind.errors.PublishError` to refuse it. The base class checks nothing."""

    def _ordering_key_of(self, message: T) -> str | None:
        if self.ordering_key is None:
            return None
        try:
            key = self.ordering_key(message)
        except Exception as exc:
            raise InvalidOrderingKey(
                f"topic {self.name!r}: the ordering key function failed on "
                f"{type(message).__name__}: {exc!r}"
            ) from exc
        if key is None:
            return None
        if not isinstance(key, str):
            raise InvalidOrderingKey(
                f"topic {self.name!r}: an ordering key must be a str, "
                f"not {type(key).__name__} ({key!r})"
            )
        if not key:
            raise InvalidOrderingKey(
                f"topic {self.name!r}: the ordering key is empty; return None for a message "
                "that keeps the topic-wide order"
            )
        if problem := unwritable_text(key):
            raise InvalidOrderingKey(f"topic {self.name!r}: the ordering key {key!r} {problem}")
        size = len(key.encode("utf-8"))
        if size > self.max_ordering_key_bytes:
            raise InvalidOrderingKey(
                f"topic {self.name!r}: the ordering key is {size} bytes, over the limit of "
                f"{self.max_ordering_key_bytes} bytes"
            )
        return key

    def _checked_attributes(self, attributes: Mapping[str, str]) -> dict[str, str]:
        if not isinstance(attributes, Mapping):
            raise InvalidAttributes(
                f"topic {self.name!r}: attributes must be a mapping, "
                f"not {type(attributes).__name__}"
            )
        if len(attributes) > self.max_attributes:
            raise InvalidAttributes(
                f"topic {self.name!r}: {len(attributes)} attributes, over the limit of "
                f"{self.max_attributes}"
            )
        for name, value in attributes.items():
            if isinstance(name, str) and name.startswith(RESERVED_ATTRIBUTE_PREFIX):
                raise InvalidAttributes(
                    f"topic {self.name!r}: attribute names starting with "
                    f"{RESERVED_ATTRIBUTE_PREFIX!r} are reserved for outboxbind ({name!r})"
                )
            if not isinstance(name, str) or not name or "\x00" in name:
                raise InvalidAttributes(
                    f"topic {self.name!r}: attribute name {name!r} must be a non-empty "
                    "string without NUL"
                )
            if not isinstance(value, str) or "\x00" in value:
                raise InvalidAttributes(
                    f"topic {self.name!r}: attribute {name!r} must be a string without NUL, "
                    f"not {value!r}"
                )
            if not (_is_utf8(name) and _is_utf8(value)):
                raise InvalidAttributes(
                    f"topic {self.name!r}: attribute {name!r} is not valid Unicode text "
                    "(it holds a lone surrogate)"
                )
        self.validate_attributes(attributes)
        return dict(attributes)

    def validate_attributes(self, attributes: Mapping[str, str]) -> None:
        """Destination-specific attribute checks; raise :class:`InvalidAttributes` to refuse.

        The base class checks types and count; a subclass adds its destination's limits.
        """

    def _deliver_after(self, value: datetime | timedelta | None) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, timedelta):
            try:
                return datetime.now(UTC) + value
            except OverflowError:
                raise PublishError(
                    f"topic {self.name!r}: deliver_after={value!r} lies beyond the year 9999"
                ) from None
        if isinstance(value, datetime):
            if value.tzinfo is None or value.utcoffset() is None:
                raise PublishError(
                    f"topic {self.name!r}: deliver_after must be timezone-aware "
                    f"(got naive {value.isoformat()})"
                )
            return value
        raise PublishError(
            f"topic {self.name!r}: deliver_after must be a datetime or timedelta, "
            f"not {type(value).__name__}"
        )

    # -- publishing ----------------------------------------------------------------------------

    @abstractmethod
    def publish(self, message: T, *, attributes: Mapping[str, str] | None = None) -> str:
        """Publish ``message`` directly (not transactionally) and return its publish id."""

    @abstractmethod
    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        """Publish a relay's batch; return one outcome per message, in the same order.

        The contract every topic keeps:

        * messages of the same ordering key (``None`` included) are listed in their order and
          must reach the destination in that order;
        * after a message fails, later messages of its key in this batch must not be
          published: report :class:`~outboxbind.errors.NotAttempted` for them;
        * an outcome is the destination's publish id (a string) or the exception; an
          :class:`~outboxbind.errors.UnpublishableError` tells the relay not to retry;
        * the outbox id (``message.id``) goes to the consumer with the message, so it can
          deduplicate;
        * give up after ``timeout`` seconds, reporting :class:`TimeoutError` for what is not
          confirmed.
        """

    def interrupt(self) -> None:
        """Ask a running :meth:`publish_batch` to end now and report what it knows (the relay
        calls it, from any thread, when it stops without waiting). The base class does nothing:
        a publish is left to finish or time out."""

    def given_up(self, message: PersistedMessage, error: BaseException) -> list[OutboxEntry]:
        """Called by the relay when it gives up on ``message`` after its last attempt, before
        the failure is recorded; the entries returned are written in the same transaction that
        records it. The base class writes none (a handler topic runs its max-errors hook)."""
        return []

    async def given_up_async(
        self, message: PersistedMessage, error: BaseException
    ) -> list[OutboxEntry]:
        """The asyncio face of :meth:`given_up`."""
        return self.given_up(message, error)

    @property
    def async_native(self) -> bool:
        """Whether :meth:`publish_batch_async` is natively asynchronous (cancellable).

        When it is not, the asyncio relay runs :meth:`publish_batch` on threads of its own and
        treats a timed-out call as still running until it returns. True when a subclass
        overrides :meth:`publish_batch_async`; a subclass whose override may fall back to a
        thread says so by overriding this property.
        """
        return type(self).publish_batch_async is not Topic.publish_batch_async

    async def publish_batch_async(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        """The asyncio face of :meth:`publish_batch`; by default it runs it in a thread."""
        return await asyncio.to_thread(self.publish_batch, messages, timeout=timeout)


def unwritable_text(text: str) -> str | None:
    """What keeps a store from writing ``text`` as a name or a key (it contains NUL, or it is
    not valid Unicode text: a lone surrogate has no UTF-8 form), said to follow the value;
    ``None`` when it can be written."""
    if "\x00" in text:
        return "contains NUL"
    if not _is_utf8(text):
        return "is not valid Unicode text (it holds a lone surrogate)"
    return None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def publish_in_key_order(
    messages: Sequence[PersistedMessage], send: Callable[[PersistedMessage], str]
) -> list[PublishOutcome]:
    """Publish one message at a time with ``send``, keeping the batch contract.

    A helper for simple topics: when ``send`` raises for a message, the later messages of its
    ordering key are reported as :class:`~outboxbind.errors.NotAttempted` while other keys go on.
    """
    failed: dict[tuple[str, str], BaseException] = {}
    outcomes: list[PublishOutcome] = []
    for message in messages:
        earlier_failure = failed.get(message.sequence)
        if earlier_failure is not None:
            outcomes.append(
                NotAttempted(f"message {message.id}: an earlier message of its key failed")
            )
            continue
        try:
            outcomes.append(send(message))
        except Exception as exc:
            failed[message.sequence] = exc
            outcomes.append(exc)
    return outcomes


def outbox_attributes(message: PersistedMessage) -> dict[str, str]:
    """The attributes to publish with ``message``: its own, plus ``outbox-id`` (the same on every
    redelivery, for consumers to deduplicate on) and ``outbox-created-at`` (ISO 8601)."""
    return {
        **message.attributes,
        "outbox-id": message.id,
        "outbox-created-at": message.created_at.isoformat(),
    }
