"""Google Cloud Pub/Sub: a real topic, published directly or bound to a transaction.

``PubSubTopic`` wraps a topic path, a message type and a codec, and an optional ordering key
function (the idea of Encore's ``OrderingAttribute``)::

    orders = PubSubTopic(publisher, "projects/p/topics/orders", OrderPlaced,
                         ordering_key=lambda m: m.customer_id)
    orders.publish(OrderPlaced(...))                        # direct: returns the message id
    bind(orders, persister(conn)).publish(OrderPlaced(...))  # transactional: the outbox id

The relay publishes a batch with as few ``Publish`` RPCs as the limits allow (up to 1,000
messages and about 9 MB each), one request after another: a key never has two requests in
flight, and after a failed request the later messages of its keys are left for the retry, so
nothing is reordered. The relay's publish timeout bounds the whole batch, the client's retries
of a request included: what is not confirmed by then is reported as a :class:`TimeoutError`.
Each message carries ``outbox-id`` (the same on every redelivery, for
consumers to deduplicate on), ``outbox-created-at``, the W3C ``traceparent`` captured at
``publish()`` when a span was active, and its own attributes.

Needs the ``pubsub`` extra (``google-cloud-pubsub``). Against the emulator, set
``PUBSUB_EMULATOR_HOST`` before creating the clients.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, TypeVar, cast, overload

from outboxbind._extras import needs_extra

with needs_extra("pubsub", __name__):
    from google.api_core import exceptions as api_exceptions
    from google.api_core import retry as api_retry
    from google.cloud import pubsub_v1
    from google.pubsub_v1.services.publisher import PublisherAsyncClient
    from google.pubsub_v1.services.publisher import PublisherClient as GapicPublisherClient
    from google.pubsub_v1.types import PublishRequest, PubsubMessage

from outboxbind.codecs import BytesCodec, Codec, JsonCodec
from outboxbind.errors import InvalidAttributes, MessageTooLarge, NotAttempted
from outboxbind.messages import OutboxEntry, PersistedMessage
from outboxbind.topics import PublishOutcome, Topic

__all__ = ["PubSubTopic"]

T = TypeVar("T")

#: Pub/Sub's documented limits (https://cloud.google.com/pubsub/quotas#resource_limits).
MAX_MESSAGE_BYTES = 10_000_000  # data, attributes and ordering key together
MAX_ATTRIBUTES = 100
MAX_ATTRIBUTE_KEY_BYTES = 256
MAX_ATTRIBUTE_VALUE_BYTES = 1024
MAX_ORDERING_KEY_BYTES = 1024
MAX_REQUEST_MESSAGES = 1000
MAX_REQUEST_BYTES = 9_000_000  # under the 10 MB request limit, leaving room for framing
RESERVED_ATTRIBUTES = 4  # outbox-id, outbox-created-at, traceparent, tracestate
#: Bytes the relay adds to each message: outbox-id (up to 20 digits), outbox-created-at (ISO
#: 8601), their names, and framing; counted by publish() so the relay never exceeds the limit.
RELAY_OVERHEAD_BYTES = 160

#: The errors on which a request is sent again, while its time lasts: those the client retries
#: by default (the generated ``Publish`` method's policy, whose own deadline is 600 s).
_RETRYABLE = api_retry.if_exception_type(
    api_exceptions.Aborted,
    api_exceptions.Cancelled,
    api_exceptions.DeadlineExceeded,
    api_exceptions.InternalServerError,
    api_exceptions.ResourceExhausted,
    api_exceptions.ServiceUnavailable,
    api_exceptions.Unknown,
)
#: How a request is retried: on those errors, with the client's default backoff between
#: attempts (0.1 s, then four times longer, at most 60 s); the call gives the deadline.
_RETRY_SETTINGS: dict[str, Any] = {
    "predicate": _RETRYABLE, "initial": 0.1, "multiplier": 4.0, "maximum": 60.0
}  # fmt: skip

_MESSAGE_PB = PubsubMessage.pb()
_REQUEST_PB = PublishRequest.pb()


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))  # make_entry has refused lone surrogates already


class PubSubTopic(Topic[T]):
    """A Google Cloud Pub/Sub topic.

    Args:
        client: a ``google.cloud.pubsub_v1.PublisherClient``. For direct publishing with
            ordering keys, create it with
            ``publisher_options=PublisherOptions(enable_message_ordering=True)``.
        topic_path: ``projects/<project>/topics/<topic>``.
        message_type: the messages' class; encoded as JSON unless it is ``bytes``.
        codec: a codec to use instead of the one ``message_type`` implies.
        ordering_key: a function of the message giving its Pub/Sub ordering key.
        name: the name the outbox knows the topic by; by default the topic id (the last part
            of the path), so the same code works across projects.
        async_client: a ``google.pubsub_v1.services.publisher.PublisherAsyncClient`` for the
            asyncio relay (by default it runs the synchronous client in a thread).
        strict_sequence: see :class:`~outboxbind.topics.Topic`.
    """

    @overload
    def __init__(
        self: PubSubTopic[bytes],
        client: pubsub_v1.PublisherClient,
        topic_path: str,
        message_type: type[bytes],
        *,
        codec: None = None,
        ordering_key: Callable[[bytes], str | None] | None = None,
        name: str | None = None,
        async_client: PublisherAsyncClient | None = None,
        strict_sequence: bool = False,
    ) -> None: ...

    @overload
    def __init__(
        self,
        client: pubsub_v1.PublisherClient,
        topic_path: str,
        message_type: type[T],
        *,
        codec: Codec[T] | None = None,
        ordering_key: Callable[[T], str | None] | None = None,
        name: str | None = None,
        async_client: PublisherAsyncClient | None = None,
        strict_sequence: bool = False,
    ) -> None: ...

    def __init__(
        self,
        client: pubsub_v1.PublisherClient,
        topic_path: str,
        message_type: type[Any],
        *,
        codec: Codec[Any] | None = None,
        ordering_key: Callable[[Any], str | None] | None = None,
        name: str | None = None,
        async_client: PublisherAsyncClient | None = None,
        strict_sequence: bool = False,
    ) -> None:
        parts = topic_path.split("/")
        if len(parts) != 4 or parts[0] != "projects" or parts[2] != "topics" or not all(parts):
            raise ValueError(
                f"{topic_path!r} is not a topic path: expected projects/<project>/topics/<topic>"
            )
        if codec is None:
            codec = BytesCodec() if message_type is bytes else JsonCodec(message_type)
        super().__init__(
            name or parts[3],
            cast("Codec[T]", codec),
            ordering_key=ordering_key,
            max_message_bytes=MAX_MESSAGE_BYTES,
            max_ordering_key_bytes=MAX_ORDERING_KEY_BYTES,
            max_attributes=MAX_ATTRIBUTES - RESERVED_ATTRIBUTES,
            strict_sequence=strict_sequence,
        )
        self.client = client
        self.topic_path = topic_path
        self.async_client = async_client

    def __repr__(self) -> str:
        return f"PubSubTopic({self.topic_path!r})"

    # -- validation against Pub/Sub's limits ---------------------------------------------------

    def validate_attributes(self, attributes: Mapping[str, str]) -> None:
        """Pub/Sub's attribute rules: key and value sizes, and no ``goog`` prefix."""
        for key, value in attributes.items():
            if key.startswith("goog"):
                raise InvalidAttributes(
                    f"topic {self.name!r}: attribute {key!r}: names starting with 'goog' are "
                    "reserved by Pub/Sub"
                )
            if _utf8_len(key) > MAX_ATTRIBUTE_KEY_BYTES:
                raise InvalidAttributes(
                    f"topic {self.name!r}: attribute name {key[:40]!r}... is {_utf8_len(key)} "
                    f"bytes, over Pub/Sub's limit of {MAX_ATTRIBUTE_KEY_BYTES}"
                )
            if _utf8_len(value) > MAX_ATTRIBUTE_VALUE_BYTES:
                raise InvalidAttributes(
                    f"topic {self.name!r}: attribute {key!r} is {_utf8_len(value)} bytes, over "
                    f"Pub/Sub's limit of {MAX_ATTRIBUTE_VALUE_BYTES}"
                )

    def validate_entry(self, entry: OutboxEntry) -> None:
        """The whole message (data, attributes, ordering key) must fit Pub/Sub's 10 MB."""
        size = self._size(entry.data, entry.attributes, entry.ordering_key)
        if size > MAX_MESSAGE_BYTES:
            raise MessageTooLarge(
                f"topic {self.name!r}: the message with its attributes and ordering key is "
                f"{size} bytes, over Pub/Sub's limit of {MAX_MESSAGE_BYTES} bytes"
            )

    @staticmethod
    def _size(data: bytes, attributes: Mapping[str, str], key: str | None) -> int:
        attribute_bytes = sum(_utf8_len(k) + _utf8_len(v) for k, v in attributes.items())
        return len(data) + attribute_bytes + (_utf8_len(key) if key else 0) + RELAY_OVERHEAD_BYTES

    # -- direct publishing ---------------------------------------------------------------------

    def publish(self, message: T, *, attributes: Mapping[str, str] | None = None) -> str:
        """Publish ``message`` now (not transactionally) and return its Pub/Sub message id.

        As the client library: with an ordering key, a failure pauses the key in the client;
        it is resumed here (``resume_publish``) before the error is raised, so the next publish
        of the key goes through.
        """
        entry = self.make_entry(message, attributes=attributes)
        key = entry.ordering_key or ""
        future = self.client.publish(
            self.topic_path, entry.data, ordering_key=key, **entry.attributes
        )
        try:
            return str(future.result())
        except Exception:
            if key:
                self.client.resume_publish(self.topic_path, key)
            raise

    # -- relay publishing ----------------------------------------------------------------------

    def _requests(self, messages: Sequence[PersistedMessage]) -> Iterator[list[int]]:
        """Split the batch, in order, into requests within Pub/Sub's count and size limits."""
        request: list[int] = []
        size = 0
        for index, message in enumerate(messages):
            message_size = self._size(message.data, message.attributes, message.ordering_key) + 80
            if request and (
                len(request) >= MAX_REQUEST_MESSAGES or size + message_size > MAX_REQUEST_BYTES
            ):
                yield request
                request, size = [], 0
            request.append(index)
            size += message_size
        if request:
            yield request

    def _request(self, messages: Sequence[PersistedMessage], indexes: list[int]) -> PublishRequest:
        """One Publish request, built as raw protobuf (several times faster than proto-plus),
        each message added in place (half the time of building them apart and copying them in).
        The attributes are those of :func:`~outboxbind.topics.outbox_attributes`."""
        raw = _REQUEST_PB(topic=self.topic_path)
        add = raw.messages.add
        for i in indexes:
            message = messages[i]
            attributes = add(data=message.data, ordering_key=message.ordering_key or "").attributes
            if message.attributes:
                attributes.update(message.attributes)
            attributes["outbox-id"] = message.id
            attributes["outbox-created-at"] = message.created_at.isoformat()
        request: PublishRequest = PublishRequest.wrap(raw)
        return request

    def _publishing(
        self, messages: Sequence[PersistedMessage], timeout: float
    ) -> Generator[tuple[PublishRequest, float], list[str], list[PublishOutcome]]:
        """The batch's requests, in order, each with the time left; one logic for both faces.

        Yields ``(request, timeout)``; the driver sends back the message ids, or throws in the
        request's error, having retried the request for at most ``timeout`` seconds. Returns the
        outcome of every message.
        """
        deadline = time.monotonic() + timeout
        plan = _Plan(messages)
        for request in self._requests(messages):
            sendable = plan.sendable(request)
            if not sendable:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                plan.not_sent(sendable, f"the publish timeout of {timeout}s ran out")
                continue
            try:
                message_ids = yield self._request(messages, sendable), remaining
            except Exception as exc:
                plan.failed(sendable, self._timed_out(exc, timeout))
                continue
            plan.published(sendable, message_ids)
        return plan.outcomes

    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        """Publish with batched ``Publish`` RPCs, one at a time, keeping each key's order."""
        steps = self._publishing(messages, timeout)
        try:
            request, remaining = next(steps)
            while True:
                try:
                    message_ids = self._send(request, remaining)
                except Exception as exc:
                    request, remaining = steps.throw(exc)
                else:
                    request, remaining = steps.send(message_ids)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _send(self, request: PublishRequest, timeout: float) -> list[str]:
        """The Publish RPC of the whole request, retried on transient errors for at most
        ``timeout`` seconds in all; the message ids in request order."""
        deadline = time.monotonic() + timeout

        def attempt() -> list[str]:
            # the GAPIC method itself: the client library's batching publish() would split the
            # request into one future per message. Its default retry is off (``retry=None``):
            # it would go on for 600 s, each attempt given ``timeout`` afresh.
            response = GapicPublisherClient.publish(
                self.client, request=request, retry=None, timeout=_time_left(deadline)
            )
            return list(response.message_ids)

        retry = api_retry.Retry(timeout=timeout, **_RETRY_SETTINGS)
        message_ids: list[str] = retry(attempt)()
        return message_ids

    def _timed_out(self, error: Exception, timeout: float) -> Exception:
        """``error`` as the :class:`TimeoutError` of the batch when the time ran out."""
        if not isinstance(error, api_exceptions.RetryError | api_exceptions.DeadlineExceeded):
            return error
        timed_out = TimeoutError(
            f"topic {self.name!r}: Pub/Sub did not confirm the request within the publish "
            f"timeout of {timeout}s ({error})"
        )
        timed_out.__cause__ = error
        return timed_out

    @property
    def async_native(self) -> bool:
        """Native asyncio publishing only with an ``async_client``; else the relay uses threads."""
        return self.async_client is not None

    async def publish_batch_async(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        """The asyncio face, with ``async_client`` when given (else a worker thread)."""
        client = self.async_client
        if client is None:
            return await super().publish_batch_async(messages, timeout=timeout)
        steps = self._publishing(messages, timeout)
        try:
            request, remaining = next(steps)
            while True:
                try:
                    message_ids = await self._send_async(client, request, remaining)
                except Exception as exc:
                    request, remaining = steps.throw(exc)
                else:
                    request, remaining = steps.send(message_ids)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    @staticmethod
    async def _send_async(
        client: PublisherAsyncClient, request: PublishRequest, timeout: float
    ) -> list[str]:
        """As :meth:`_send`, with the asyncio client."""
        deadline = time.monotonic() + timeout

        async def attempt() -> list[str]:
            response = await client.publish(
                request=request, retry=None, timeout=_time_left(deadline)
            )
            return list(response.message_ids)

        retry = api_retry.AsyncRetry(timeout=timeout, **_RETRY_SETTINGS)
        message_ids: list[str] = await retry(attempt)()
        return message_ids


def _time_left(deadline: float) -> float:
    """The seconds an attempt may take. The retry sleeps only while time is left, so an attempt
    starts before the deadline; at worst it gets 1 ms, and gRPC's DeadlineExceeded ends it."""
    return max(deadline - time.monotonic(), 0.001)


class _Plan:
    """The outcomes of one batch as its requests go out, and which keys may still be sent."""

    def __init__(self, messages: Sequence[PersistedMessage]) -> None:
        self.messages = messages
        self.outcomes: list[PublishOutcome] = [NotAttempted("not sent") for _ in messages]
        self.stopped: set[tuple[str, str]] = set()  # keys with a failed or unsent message

    def sendable(self, request: list[int]) -> list[int]:
        return [i for i in request if self.messages[i].sequence not in self.stopped]

    def published(self, sent: list[int], message_ids: list[str]) -> None:
        if len(message_ids) != len(sent):
            self.failed(
                sent, RuntimeError(f"Pub/Sub returned {len(message_ids)} ids for {len(sent)}")
            )
            return
        for index, message_id in zip(sent, message_ids, strict=True):
            self.outcomes[index] = message_id

    def failed(self, sent: list[int], error: BaseException) -> None:
        for index in sent:
            sequence = self.messages[index].sequence
            if sequence in self.stopped:
                self.outcomes[index] = NotAttempted(
                    f"an earlier message of its key failed: {error}"
                )
            else:
                self.stopped.add(sequence)
                self.outcomes[index] = error

    def not_sent(self, indexes: list[int], reason: str) -> None:
        for index in indexes:
            self.stopped.add(self.messages[index].sequence)
            self.outcomes[index] = NotAttempted(reason)
