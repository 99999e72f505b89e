"""The PostgreSQL store's statements and migrations, read from the ``.sql`` files beside this."""

from __future__ import annotations

import functools
import re
from importlib.resources import files
from typing import Any

import psycopg

from outboxbind.errors import SchemaTooNew
from outboxbind.sql import check_identifier, load_queries, quote_identifier

__all__ = [
    "Names",
    "check_version",
    "migrate",
    "migration_scripts",
    "names_for",
    "newest_version",
    "queries_for",
    "recorded_version",
]

_HERE = files(__package__)


@functools.lru_cache(maxsize=64)
def names_for(schema: str, table: str) -> dict[str, str]:
    """The SQL text of every name the outbox ``schema.table`` uses, quoted and checked.

    Relations (tables, sequences, functions) are schema-qualified; indexes and triggers are not
    (PostgreSQL puts them beside their table). ``*_literal`` entries are the same names as SQL
    string literals, for ``nextval()`` and advisory lock keys.
    """
    check_identifier(schema, "schema name")
    check_identifier(table, "table name")

    def relation(name: str) -> str:
        return f"{quote_identifier(schema)}.{quote_identifier(name)}"

    names = {
        "outbox": relation(table),
        "dead_letters": relation(f"{table}_dead_letters"),
        "published": relation(f"{table}_published"),
        "leases": relation(f"{table}_leases"),
        "migrations": relation(f"{table}_migrations"),
        "message_ids": relation(f"{table}_message_ids"),
        "lease_tokens": relation(f"{table}_lease_tokens"),
        "draw_position": relation(f"{table}_draw_position"),
        "outbox_sequence_index": quote_identifier(f"{table}_sequence_index"),
        "outbox_waiting_index": quote_identifier(f"{table}_waiting_index"),
        "outbox_unpositioned_index": quote_identifier(f"{table}_unpositioned_index"),
        "published_at_index": quote_identifier(f"{table}_published_at_index"),
        "settled_index": quote_identifier(f"{table}_settled_index"),
        "draw_position_trigger": quote_identifier(f"{table}_draw_position"),
        "schema": quote_identifier(schema),
    }
    for key in ("outbox", "leases", "migrations", "message_ids", "lease_tokens"):
        names[f"{key}_literal"] = "'" + names[key].replace("'", "''") + "'"
    return names


Names = dict[str, str]


@functools.lru_cache(maxsize=64)
def queries_for(schema: str, table: str) -> dict[str, str]:
    """The store's statements for the outbox ``schema.table``, by name."""
    names = names_for(schema, table)
    return {name: sql.format_map(names) for name, sql in _queries().items()}


@functools.cache
def _queries() -> dict[str, str]:
    return load_queries(_HERE / "queries.sql")


def migration_scripts(schema: str, table: str) -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` of every shipped migration, rendered for ``schema.table``."""
    names = names_for(schema, table)
    found = []
    for entry in (_HERE / "migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            script = entry.read_text(encoding="utf-8").format_map(names)
            found.append((int(match.group(1)), match.group(2), script))
    return sorted(found)


@functools.cache
def newest_version() -> int:
    """The newest schema version this outboxbind ships (its last migration's number)."""
    return max(version for version, _name, _sql in migration_scripts("public", "outbox"))


def _where(schema: str, table: str) -> str:
    return f"PostgreSQL outbox {schema}.{table}"


def recorded_version(
    conn: psycopg.Connection[Any], *, schema: str = "public", table: str = "outbox"
) -> int | None:
    """The newest schema version applied to the outbox ``schema.table`` (``None``: never
    migrated)."""
    queries = queries_for(schema, table)
    exists = conn.execute(queries["migrations_table_exists"]).fetchone()
    if exists is None or not exists[0]:
        return None
    row = conn.execute(queries["schema_version"]).fetchone()
    return None if row is None else row[0]


def check_version(
    conn: psycopg.Connection[Any], *, schema: str = "public", table: str = "outbox"
) -> int | None:
    """The recorded schema version of ``schema.table``, after checking this code knows it.

    Raises:
        SchemaTooNew: a newer outboxbind migrated the outbox.
    """
    found = recorded_version(conn, schema=schema, table=table)
    SchemaTooNew.check(_where(schema, table), found, newest_version())
    return found


def migrate(
    conn: psycopg.Connection[Any], *, schema: str = "public", table: str = "outbox"
) -> list[int]:
    """Bring the outbox schema of ``schema.table`` up to date; return the versions applied.

    Runs in one transaction under an advisory lock, so concurrent callers apply each version
    once. Creates the schema if it does not exist.

    Raises:
        SchemaTooNew: a newer outboxbind migrated the outbox; nothing is changed.
    """
    queries = queries_for(schema, table)
    applied: list[int] = []
    with conn.transaction():
        conn.execute(queries["lock_migrations"])
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {names_for(schema, table)['schema']}")
        conn.execute(queries["create_migrations_table"])
        done = {row[0] for row in conn.execute(queries["applied_migrations"])}
        SchemaTooNew.check(_where(schema, table), max(done, default=None), newest_version())
        for version, name, script in migration_scripts(schema, table):
            if version in done:
                continue
            conn.execute(script)  # several statements: sent as one simple query
            conn.execute(queries["record_migration"], {"version": version, "name": name})
            applied.append(version)
    return applied
