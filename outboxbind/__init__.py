"""outboxbind: the transactional outbox for Python, one line at the call site.

Inside your transaction, ``bind(topic, persister(conn))`` gives a publisher with the topic's
own ``publish()``; its calls become inserts into the outbox. A :class:`Relay` with the real
topics registered moves committed messages to them, in order, at least once.
"""

from outboxbind.binding import AsyncBoundTopic, AsyncPersister, BoundTopic, Persister, bind
from outboxbind.codecs import BytesCodec, Codec, JsonCodec
from outboxbind.errors import (
    ConfigurationError,
    EncodeError,
    InvalidAttributes,
    InvalidIdentifier,
    InvalidOrderingKey,
    LeaseLost,
    MessageTooLarge,
    MissingExtra,
    NotAttempted,
    NotInTransaction,
    OutboxError,
    PublishError,
    SchemaTooNew,
    TopicAlreadyRegistered,
    UnpublishableError,
)
from outboxbind.messages import OutboxEntry, PersistedMessage
from outboxbind.relay import AsyncRelay, ProcessResult, Relay, RetryPolicy
from outboxbind.relay.policy import PoisonPolicy
from outboxbind.store import (
    AsyncMessageBatch,
    AsyncStore,
    DeadLetter,
    DeadLetterAdmin,
    MessageBatch,
    Store,
    TopicBacklog,
)
from outboxbind.topics import Topic

__version__ = "0.1.0"

__all__ = [
    "AsyncBoundTopic",
    "AsyncMessageBatch",
    "AsyncPersister",
    "AsyncRelay",
    "AsyncStore",
    "BoundTopic",
    "BytesCodec",
    "Codec",
    "ConfigurationError",
    "DeadLetter",
    "DeadLetterAdmin",
    "EncodeError",
    "InvalidAttributes",
    "InvalidIdentifier",
    "InvalidOrderingKey",
    "JsonCodec",
    "LeaseLost",
    "MessageBatch",
    "MessageTooLarge",
    "MissingExtra",
    "NotAttempted",
    "NotInTransaction",
    "OutboxEntry",
    "OutboxError",
    "PersistedMessage",
    "Persister",
    "PoisonPolicy",
    "ProcessResult",
    "PublishError",
    "Relay",
    "RetryPolicy",
    "SchemaTooNew",
    "Store",
    "Topic",
    "TopicAlreadyRegistered",
    "TopicBacklog",
    "UnpublishableError",
    "bind",
]
