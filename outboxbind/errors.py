"""The errors outboxbind raises.

Every error derives from :class:`OutboxError`. Errors raised by ``publish()`` are raised
before anything is written, so the caller's transaction stays usable.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "EncodeError",
    "InvalidAttributes",
    "InvalidIdentifier",
    "InvalidOrderingKey",
    "LeaseLost",
    "MessageTooLarge",
    "MissingExtra",
    "NotAttempted",
    "NotInTransaction",
    "OutboxError",
    "PublishError",
    "SchemaTooNew",
    "TopicAlreadyRegistered",
    "UnpublishableError",
]


class OutboxError(Exception):
    """Base class of every error raised by outboxbind."""

    __module__ = "outboxbind"


class PublishError(OutboxError, ValueError):
    """A message was refused by ``publish()``; nothing was written."""

    __module__ = "outboxbind"


class EncodeError(PublishError):
    """The topic's codec could not encode the message."""

    __module__ = "outboxbind"


class MessageTooLarge(PublishError):
    """The encoded message is larger than the topic's size limit."""

    __module__ = "outboxbind"


class InvalidOrderingKey(PublishError):
    """The topic's ordering key function returned an unusable key."""

    __module__ = "outboxbind"


class InvalidAttributes(PublishError):
    """Message attributes are not a mapping of non-empty strings to strings, or exceed a limit."""

    __module__ = "outboxbind"


class NotInTransaction(OutboxError):
    """A persister was called on a connection that is not inside a transaction.

    The insert would be committed on its own, outside the business transaction, which is
    exactly what the outbox exists to prevent.
    """

    __module__ = "outboxbind"


class InvalidIdentifier(OutboxError, ValueError):
    """A configured table or schema name is not a plain SQL identifier."""

    __module__ = "outboxbind"


class ConfigurationError(OutboxError, ValueError):
    """The relay, a topic or a store was configured with an invalid value."""

    __module__ = "outboxbind"


class TopicAlreadyRegistered(ConfigurationError):
    """A topic of the same name is already registered with this relay."""

    __module__ = "outboxbind"


class SchemaTooNew(OutboxError):
    """The outbox was migrated by a newer outboxbind than this one: upgrade outboxbind.

    Its recorded schema version is above the newest this code ships, so this code does not know
    how that schema must be read or written. Nothing was changed. Raised by a store's
    ``migrate()``, by a store that migrates when it is made, and by the relay's first checkout.

    Attributes:
        where: the outbox it is about (a file, a schema and table, a key prefix).
        found: the schema version recorded there.
        newest: the newest schema version this outboxbind knows.
    """

    __module__ = "outboxbind"

    def __init__(self, where: str, found: int, newest: int) -> None:
        super().__init__(
            f"{where}: the outbox schema is at version {found}, newer than this outboxbind "
            f"knows (up to version {newest}); it was migrated by a newer outboxbind: upgrade "
            "outboxbind (pip install --upgrade outboxbind) to use it"
        )
        self.where = where
        self.found = found
        self.newest = newest

    def __reduce__(self) -> tuple[type[SchemaTooNew], tuple[str, int, int]]:
        return (type(self), (self.where, self.found, self.newest))

    @classmethod
    def check(cls, where: str, found: int | None, newest: int) -> None:
        """Raise :class:`SchemaTooNew` when the recorded version ``found`` is above ``newest``
        (``None``: nothing recorded yet, a fresh outbox)."""
        if found is not None and found > newest:
            raise cls(where, found, newest)


class MissingExtra(OutboxError, ImportError):
    """An optional dependency of the module being imported (or used) is not installed.

    The message names the extra that installs it, as in ``pip install 'outboxbind[postgres]'``;
    :attr:`name` is the module that could not be imported, as for any ``ImportError``.
    """

    __module__ = "outboxbind"

    @classmethod
    def of(cls, module: str, extra: str, error: ImportError) -> MissingExtra:
        """The error for ``module``, which needs ``extra``, when importing failed with
        ``error``."""
        return cls(
            f"{module} needs the {extra!r} extra: pip install 'outboxbind[{extra}]' ({error})",
            name=error.name,
        )


class LeaseLost(OutboxError):
    """A batch's lease expired and another relay took its messages over.

    Nothing was acknowledged, failed or released for the groups named in the message: the relay
    that now holds them publishes them again (at least once).
    """

    __module__ = "outboxbind"


class UnpublishableError(OutboxError):
    """Raised (or returned) by a topic for a message that can never be published.

    The relay does not retry it: it goes straight to the topic's poison policy.
    """

    __module__ = "outboxbind"


class NotAttempted(OutboxError):
    """Returned by a topic for a message it did not try to publish.

    A topic returns it for the messages that follow a failed message of the same ordering key
    in a batch, because publishing them would break the order. The relay releases them without
    counting an attempt.
    """

    __module__ = "outboxbind"
