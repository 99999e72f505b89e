"""Codecs turn a topic's message type into bytes and back.

A codec is anything with ``encode(message) -> bytes`` and ``decode(data) -> message``. Two are
shipped: :class:`JsonCodec` for attrs classes, dataclasses and dicts, and :class:`BytesCodec`
for payloads that are already bytes.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import uuid
from collections.abc import Mapping
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Generic, Protocol, TypeVar, cast

import attrs

__all__ = ["BytesCodec", "Codec", "JsonCodec"]

T = TypeVar("T")


class Codec(Protocol[T]):
    """Encodes messages of one type to bytes and decodes them back."""

    def encode(self, message: T, /) -> bytes:
        """Return the bytes to store and publish for ``message``; raise on a bad message."""
        ...

    def decode(self, data: bytes, /) -> T:
        """Return the message that ``data`` encodes."""
        ...


class BytesCodec:
    """The identity codec: messages are ``bytes`` and published as they are."""

    def encode(self, message: bytes, /) -> bytes:
        """Return ``message`` itself; anything but bytes is refused."""
        if isinstance(message, bytearray | memoryview):
            return bytes(message)
        if not isinstance(message, bytes):
            raise TypeError(f"BytesCodec encodes bytes, not {type(message).__name__}")
        return message

    def decode(self, data: bytes, /) -> bytes:
        """Return ``data`` itself."""
        return data


def _json_default(value: Any) -> Any:
    if attrs.has(type(value)):
        return attrs.asdict(value, recurse=False)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


class JsonCodec(Generic[T]):
    """Compact UTF-8 JSON for attrs classes, dataclasses and dicts.

    Nested attrs classes and dataclasses, datetimes, dates, UUIDs, Decimals, enums and sets are
    encoded too (datetimes as ISO 8601 strings). ``decode`` builds the message type from the
    top-level object by keyword; nested values come back as plain JSON values.

    Args:
        message_type: the class to decode into; without it, ``decode`` returns the plain JSON
            value (a dict for an object).
    """

    def __init__(self, message_type: type[T] | None = None) -> None:
        self.message_type = message_type
        self._encoder = json.JSONEncoder(
            ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_default
        )

    def encode(self, message: T, /) -> bytes:
        """Return the message as compact UTF-8 JSON."""
        return self._encoder.encode(message).encode("utf-8")

    def decode(self, data: bytes, /) -> T:
        """Return the message type built from JSON ``data``."""
        value = json.loads(data)
        if self.message_type is None or self.message_type is dict or not isinstance(value, Mapping):
            return cast("T", value)
        return self.message_type(**value)

    def __repr__(self) -> str:
        name = self.message_type.__qualname__ if self.message_type else ""
        return f"JsonCodec({name})"
