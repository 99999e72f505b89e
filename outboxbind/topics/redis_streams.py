"""A Redis Streams topic: each message is an ``XADD`` entry of a stream.

An entry's fields: ``data`` (the codec's bytes, unchanged), ``outbox-id`` and
``outbox-created-at`` (for a relayed message; consumers deduplicate on ``outbox-id``),
``ordering-key`` (when the message has one) and ``attributes`` (a JSON object, when there are
any). The publish id is the entry id Redis gave (``1712345678901-0``).

A stream is one totally ordered log, so every ordering key keeps its order in it. A relay's
batch goes out as one Lua script of ``XADD`` commands in the batch's order; when one fails, the
later messages of its key are not sent (they are reported as
:class:`~outboxbind.errors.NotAttempted` and retried), while other keys go on.

The relay's publish timeout bounds the whole call, however the client is configured: the batch
goes out on a connection of the topic's own (made with the client's settings, without its
retries), whose socket waits at most the time left at each step (connecting, sending, reading).
"""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast, overload

from outboxbind._extras import needs_extra

with needs_extra("redis", __name__):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

from outboxbind.codecs import BytesCodec, Codec, JsonCodec
from outboxbind.errors import ConfigurationError, NotAttempted
from outboxbind.messages import PersistedMessage
from outboxbind.topics import PublishOutcome, Topic, outbox_attributes

__all__ = ["RedisStreamTopic"]

T = TypeVar("T")

#: Redis's own limit on a string value (``proto-max-bulk-len`` defaults to 512 MB); the topic's
#: default stays far below it.
DEFAULT_MAX_MESSAGE_BYTES = 10_000_000


class RedisStreamTopic(Topic[T]):
    """A topic that appends each message to a Redis stream with ``XADD``.

    Args:
        client: a ``redis.Redis`` client (``decode_responses`` either way).
        stream: the stream's key.
        message_type: the message class (``bytes`` publishes raw bytes; anything else goes
            through :class:`~outboxbind.codecs.JsonCodec` unless ``codec`` is given).
        codec: the codec, instead of the default one.
        ordering_key: the ordering key function (see :class:`~outboxbind.topics.Topic`).
        name: the topic's name in the outbox and the relay (default: ``stream``).
        maxlen: cap the stream's length (``XADD ... MAXLEN``); ``None`` keeps every entry.
        approximate: trim with ``MAXLEN ~`` (cheaper; the stream may be a little longer).
        strict_sequence: see :class:`~outboxbind.topics.Topic`.
        max_message_bytes: the largest encoded message ``publish()`` accepts.
    """

    @overload
    def __init__(
        self: RedisStreamTopic[bytes],
        client: redis.Redis,
        stream: str,
        message_type: type[bytes],
        *,
        codec: None = None,
        ordering_key: Callable[[bytes], str | None] | None = None,
        name: str | None = None,
        maxlen: int | None = None,
        approximate: bool = True,
        strict_sequence: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None: ...

    @overload
    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        message_type: type[T],
        *,
        codec: Codec[T] | None = None,
        ordering_key: Callable[[T], str | None] | None = None,
        name: str | None = None,
        maxlen: int | None = None,
        approximate: bool = True,
        strict_sequence: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None: ...

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        message_type: type[Any],
        *,
        codec: Codec[Any] | None = None,
        ordering_key: Callable[[Any], str | None] | None = None,
        name: str | None = None,
        maxlen: int | None = None,
        approximate: bool = True,
        strict_sequence: bool = False,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if not isinstance(client, redis.Redis):
            raise TypeError(f"RedisStreamTopic needs a redis.Redis, not {type(client).__name__}")
        if not isinstance(stream, str) or not stream:
            raise ConfigurationError(f"a stream key must be a non-empty string, not {stream!r}")
        if maxlen is not None and (not isinstance(maxlen, int) or maxlen <= 0):
            raise ConfigurationError(f"maxlen must be a positive integer or None, not {maxlen!r}")
        if codec is None:
            codec = BytesCodec() if message_type is bytes else JsonCodec(message_type)
        super().__init__(
            name or stream,
            cast("Codec[T]", codec),
            ordering_key=ordering_key,
            max_message_bytes=max_message_bytes,
            strict_sequence=strict_sequence,
        )
        self.client = client
        self.stream = stream
        self.maxlen = maxlen
        self.approximate = approximate
        self._batch_script = client.register_script(_BATCH_SCRIPT)
        self._connections: list[Any] = []  # idle connections of publish_batch, see _connection
        self._connections_pid = os.getpid()
        self._connections_lock = threading.Lock()
        # a topic dropped without close() still closes its sockets (no ResourceWarning)
        weakref.finalize(self, _disconnect_all, self._connections, self._connections_lock)

    def close(self) -> None:
        """Close the connections :meth:`publish_batch` keeps (the client is left open: it is
        the caller's). The topic stays usable: a later call connects again."""
        _disconnect_all(self._connections, self._connections_lock)

    def __repr__(self) -> str:
        return f"RedisStreamTopic({self.stream!r})"

    def _fields(
        self, data: bytes, attributes: Mapping[str, str], ordering_key: str | None
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {"data": data}
        for name in ("outbox-id", "outbox-created-at"):
            if name in attributes:
                fields[name] = attributes[name]
        if ordering_key is not None:
            fields["ordering-key"] = ordering_key
        own = {k: v for k, v in attributes.items() if k not in fields}
        if own:
            fields["attributes"] = json.dumps(own, ensure_ascii=False)
        return fields

    def _xadd(self, target: Any, fields: dict[str, Any]) -> Any:
        return target.xadd(self.stream, fields, maxlen=self.maxlen, approximate=self.approximate)

    @staticmethod
    def _entry_id(value: Any) -> str:
        return value.decode("ascii") if isinstance(value, bytes) else str(value)

    def publish(self, message: T, *, attributes: Mapping[str, str] | None = None) -> str:
        """``XADD`` ``message`` now (not transactionally); return the stream entry id."""
        entry = self.make_entry(message, attributes=attributes)
        fields = self._fields(entry.data, entry.attributes, entry.ordering_key)
        return self._entry_id(self._xadd(self.client, fields))

    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        """``XADD`` the batch in order, in one Lua script (one round trip, nothing interleaved).

        When an ``XADD`` fails, the script sends no later message of its key (they are reported
        as :class:`~outboxbind.errors.NotAttempted`) and goes on with the other keys. When the
        call itself fails (connection lost, script refused), the first message of each key
        carries the error and the rest are not attempted, a :class:`TimeoutError` when the
        ``timeout`` ran out. The whole call ends within ``timeout``: it runs on a connection of
        the topic's own, whose socket waits at most the time left (the client's
        ``socket_timeout`` and retries do not apply to it, and the client is left unchanged).
        """
        if not messages:
            return []
        args: list[Any] = [
            "" if self.maxlen is None else str(self.maxlen),
            "1" if self.approximate else "0",
            str(len(messages)),
        ]
        for message in messages:
            fields = self._fields(message.data, outbox_attributes(message), message.ordering_key)
            args.append(f"{message.topic}\x00{message.ordering_key or ''}")
            args.append(str(len(fields)))
            for field, value in fields.items():
                args.extend((field, value))
        deadline = time.monotonic() + timeout
        try:
            replies = self._run_script(args, deadline)
        except (redis.TimeoutError, TimeoutError) as exc:
            timed_out = TimeoutError(
                f"stream {self.stream!r}: Redis did not answer within the publish timeout of "
                f"{timeout}s ({exc})"
            )
            timed_out.__cause__ = exc
            return _group_failure(messages, timed_out)
        except (redis.RedisError, OSError) as exc:
            return _group_failure(messages, exc)
        outcomes: list[PublishOutcome] = []
        for message, reply in zip(messages, replies, strict=True):
            kind = self._entry_id(reply[0])
            if kind == "ok":
                outcomes.append(self._entry_id(reply[1]))
            elif kind == "err":
                outcomes.append(
                    redis.ResponseError(
                        f"XADD of message {message.id} to stream {self.stream!r} failed: "
                        f"{self._entry_id(reply[1])}"
                    )
                )
            else:
                outcomes.append(
                    NotAttempted(f"message {message.id}: an earlier message of its key failed")
                )
        return outcomes

    # -- a call bounded by its deadline ---------------------------------------------------------

    def _run_script(self, args: list[Any], deadline: float) -> Any:
        """Run the batch script once on a connection of our own, each socket wait bounded by
        the time left; the script is sent whole when the server does not have it cached."""
        connection = self._connection()
        try:
            if connection._sock and _stale(connection):
                connection.disconnect()  # the server closed it while idle (its `timeout`)
            if not connection._sock:  # connect and handshake (AUTH, SELECT...) in the time left
                connection.socket_connect_timeout = _time_left(deadline)
                connection.socket_timeout = _time_left(deadline)
                connection.connect()
            try:
                reply = self._command(
                    connection, deadline, "EVALSHA", self._batch_script.sha, 1, self.stream, *args
                )
            except redis.exceptions.NoScriptError:
                reply = self._command(
                    connection, deadline, "EVAL", _BATCH_SCRIPT, 1, self.stream, *args
                )
        except BaseException:
            connection.disconnect()  # its state is unknown: the next call connects afresh
            raise
        finally:
            with self._connections_lock:
                self._connections.append(connection)
        return reply

    @staticmethod
    def _command(connection: Any, deadline: float, *command: Any) -> Any:
        connection._sock.settimeout(_time_left(deadline))  # what sendall waits at most
        connection.send_command(*command, check_health=False)
        connection._sock.settimeout(_time_left(deadline))  # what each read waits at most
        return connection.read_response()

    def _connection(self) -> Any:
        """An idle connection of the topic's, or a new one made with the client's settings but
        no retries (a retry would start the wait again). Never the client's own connections:
        their timeouts are the user's to set."""
        with self._connections_lock:
            if self._connections_pid != os.getpid():  # forked: the parent's sockets are not ours
                for connection in self._connections:
                    connection.disconnect()  # closes this process's copy only
                self._connections.clear()
                self._connections_pid = os.getpid()
            if self._connections:
                return self._connections.pop()
        pool = self.client.connection_pool
        return pool.connection_class(**{**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)})


def _disconnect_all(connections: list[Any], lock: threading.Lock) -> None:
    with lock:
        idle = connections[:]
        connections.clear()
    for connection in idle:
        connection.disconnect()


def _stale(connection: Any) -> bool:
    """Whether an idle connection has something to read: the server closed it, or it is out
    of step; either way it is dropped (as redis-py's pool does before lending one)."""
    try:
        return bool(connection.can_read())
    except (redis.RedisError, OSError):
        return True


def _time_left(deadline: float) -> float:
    """The seconds a socket may wait; with none left, the call has timed out."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the time ran out")
    return left


_BATCH_SCRIPT = """
-- KEYS[1]: the stream; ARGV: maxlen ('' for none), approximate ('1'/'0'), count, then per
-- message: its sequence, its field count, its fields and values.
local out, failed = {}, {}
local i = 4
for m = 1, tonumber(ARGV[3]) do
    local sequence, nfields = ARGV[i], tonumber(ARGV[i + 1])
    i = i + 2
    if failed[sequence] then
        out[m] = {'skipped'}
    else
        local command = {'XADD', KEYS[1]}
        if ARGV[1] ~= '' then
            command[#command + 1] = 'MAXLEN'
            if ARGV[2] == '1' then command[#command + 1] = '~' end
            command[#command + 1] = ARGV[1]
        end
        command[#command + 1] = '*'
        for f = 0, nfields * 2 - 1 do command[#command + 1] = ARGV[i + f] end
        local reply = redis.pcall(unpack(command))
        if type(reply) == 'table' and reply.err then
            failed[sequence] = true
            out[m] = {'err', reply.err}
        else
            out[m] = {'ok', reply}
        end
    end
    i = i + nfields * 2
end
return out
"""


def _group_failure(
    messages: Sequence[PersistedMessage], error: BaseException
) -> list[PublishOutcome]:
    seen: set[tuple[str, str]] = set()
    outcomes: list[PublishOutcome] = []
    for message in messages:
        if message.sequence in seen:
            outcomes.append(NotAttempted(f"an earlier message of its key failed: {error}"))
        else:
            seen.add(message.sequence)
            outcomes.append(error)
    return outcomes
