"""Helpers for stores that keep their SQL in ``.sql`` files.

A queries file holds named statements, each introduced by a ``-- name: <name>`` line and a
one-line ``-- <description>``. Table names appear as ``{placeholders}`` that the store fills
with quoted identifiers; values are always bound parameters, never formatted in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from importlib.resources.abc import Traversable

from outboxbind.errors import InvalidIdentifier

__all__ = [
    "array_literal",
    "check_identifier",
    "load_queries",
    "numbered",
    "quote_identifier",
    "render",
]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_IDENTIFIER_LENGTH = 48  # leaves room for suffixes within PostgreSQL's 63 bytes


def check_identifier(name: str, what: str = "table name") -> str:
    """Return ``name`` if it is a plain identifier (letters, digits, underscores); else raise.

    Names are quoted as well when used, but outboxbind refuses anything a reader would have to
    squint at (quotes, spaces, semicolons, dots, NUL), rather than store it.
    """
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise InvalidIdentifier(
            f"{what} {name!r} is not a plain SQL identifier: use letters, digits and "
            "underscores, starting with a letter or underscore"
        )
    if len(name) > MAX_IDENTIFIER_LENGTH:
        raise InvalidIdentifier(
            f"{what} {name!r} is {len(name)} characters, over the limit of {MAX_IDENTIFIER_LENGTH}"
        )
    return name


def quote_identifier(name: str) -> str:
    """Quote ``name`` as an SQL identifier (double quotes, inner quotes doubled)."""
    return '"' + name.replace('"', '""') + '"'


def load_queries(source: Traversable) -> dict[str, str]:
    """Parse a queries file into ``{name: sql}``; see the module docstring for the format."""
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in source.read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"--\s*name:\s*(\w+)\s*", line)
        if match:
            if name is not None:
                queries[name] = "\n".join(lines).strip()
            name, lines = match.group(1), []
            if name in queries:
                raise ValueError(f"{source}: query {name!r} is defined twice")
        elif name is not None and not line.startswith("--"):
            lines.append(line)
    if name is not None:
        queries[name] = "\n".join(lines).strip()
    return queries


_NAMED_PARAMETER = re.compile(r"%\((\w+)\)s")


def numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """``sql`` with its ``%(name)s`` parameters written ``$1``, ``$2``... (one number per name),
    and the names in number order.

    For a driver's raw cursor (psycopg's ``RawCursor``), which sends the statement as it is
    instead of parsing it for parameters at every execution (psycopg caches that parse only
    for statements under 4 KB). Raises ``ValueError`` if any other ``%`` is left, since a raw
    cursor would send it unchanged.
    """
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in names:
            names.append(name)
        return f"${names.index(name) + 1}"

    converted = _NAMED_PARAMETER.sub(number, sql)
    if "%" in converted:
        raise ValueError(f"a % that is not a %(name)s parameter is left in: {sql[:80]!r}...")
    return converted, tuple(names)


def render(queries: Mapping[str, str], identifiers: Mapping[str, str]) -> dict[str, str]:
    """Fill each query's ``{placeholders}`` with the quoted ``identifiers``."""
    quoted = {key: quote_identifier(value) for key, value in identifiers.items()}
    return {name: sql.format_map(quoted) for name, sql in queries.items()}


def array_literal(values: Iterable[str | int | float | bool | None]) -> str:
    """``values`` written as one PostgreSQL array literal (``{"a","b\\"c",NULL}``, ``{1,2}``,
    ``{t,f}``), for a parameter the statement casts (``$1::text[]``, ``$2::bigint[]``...).

    psycopg adapts a list parameter element by element in Python, at about 20-30 us a list
    however short; a relay batch sends some twenty of them. A string is sent as it is and parsed
    by the server. Strings are quoted with their backslashes and double quotes escaped; ``None``
    is ``NULL``. Raises ``TypeError`` for any other type, and ``ValueError`` for a string
    holding NUL, which PostgreSQL text cannot hold.
    """
    items: list[str] = []
    for value in values:
        if value is None:
            items.append("NULL")
        elif isinstance(value, bool):
            items.append("t" if value else "f")
        elif isinstance(value, int):
            items.append(str(value))
        elif isinstance(value, float):
            items.append(repr(value) if math.isfinite(value) else _FLOAT_WORDS[repr(value)])
        elif isinstance(value, str):
            if "\0" in value:
                raise ValueError(f"a text array element holds NUL: {value[:80]!r}")
            items.append('"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"')
        else:
            raise TypeError(
                f"array_literal takes str, int, float, bool or None, not {type(value).__name__}"
            )
    return "{" + ",".join(items) + "}"


_FLOAT_WORDS = {"inf": "Infinity", "-inf": "-Infinity", "nan": "NaN"}
