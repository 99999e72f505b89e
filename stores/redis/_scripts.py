"""The Redis store's key layout helpers and its Lua scripts (``scripts.lua``)."""

from __future__ import annotations

import os
import re
import time
import uuid
from functools import cache
from importlib.resources import files

from outboxbind.errors import ConfigurationError

__all__ = [
    "DEFAULT_PREFIX",
    "SCHEMA_VERSION",
    "check_prefix",
    "decode_name",
    "encode_name",
    "new_id",
    "schema_key",
    "script",
    "wakeup_channel",
]

DEFAULT_PREFIX = "outboxbind"

SCHEMA_VERSION = 1
"""The version of the key layout and scripts this outboxbind ships (``scripts.lua``). A store's
``migrate()`` records it under :func:`schema_key`; an outbox with a higher one recorded was
written by a newer outboxbind, and the store refuses it."""
# Still 1 with progress and kept settled messages: what they add, older code never reads. The
# message hash's new fields (progress, publish_id, settled_at) are ignored by its scripts, which
# read fields by name; a settled message (state 'settled') is in none of the sets they walk (it
# is only in P:s:<th>, a key they do not know), and its id is never handed out again. Follow-ups
# are ordinary messages. Bump it when a change would make older code misread what it does read.


def schema_key(prefix: str) -> str:
    """The key that records the layout version of the outbox under ``prefix``."""
    return f"{prefix}:schema"


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can start the store's key names; a clear error otherwise."""
    if not isinstance(prefix, str) or not prefix:
        raise ConfigurationError(f"the Redis key prefix must be a non-empty string, not {prefix!r}")
    if any(ord(c) < 0x20 or c == "\x7f" for c in prefix):
        raise ConfigurationError(f"the Redis key prefix {prefix!r} holds a control character")
    return prefix


def encode_name(name: str) -> str:
    """A topic name or ordering key as it appears in key names: its UTF-8 bytes in hex.

    Hex has neither ``:`` nor braces nor glob characters, so no name can break a key name,
    collide with another, or change a key's cluster hash slot.
    """
    return name.encode("utf-8").hex()


def decode_name(encoded: str | bytes) -> str:
    """The inverse of :func:`encode_name`."""
    text = encoded.decode("ascii") if isinstance(encoded, bytes) else encoded
    return bytes.fromhex(text).decode("utf-8")


def wakeup_channel(prefix: str) -> str:
    """The Pub/Sub channel a commit of an outbox entry under ``prefix`` is announced on."""
    return f"{prefix}:wakeup"


def new_id() -> str:
    """A fresh outbox id: a UUID version 7 string (time-ordered, 74 random bits).

    The id is made by the client, because ``publish()`` must return it before ``EXEC``; the
    order of messages is set by the server at ``EXEC`` (a position counter), not by the id.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return str(uuid.UUID(int=value))


_SECTION = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def _sections() -> dict[str, str]:
    text = files("outboxbind.stores.redis").joinpath("scripts.lua").read_text("utf-8")
    parts = _SECTION.split(text)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def script(name: str) -> str:
    """The Lua source of the script ``name`` (with the common helpers in front)."""
    sections = _sections()
    return sections["common"] + sections[name]
