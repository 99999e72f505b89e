"""The SQLite store's statements and migrations, read from the ``.sql`` files beside this one."""

from __future__ import annotations

import functools
import re
import sqlite3
import time
from importlib.resources import files

from outboxbind.errors import SchemaTooNew
from outboxbind.sql import check_identifier, load_queries, quote_identifier, render

__all__ = [
    "Queries",
    "check_version",
    "migrate",
    "newest_version",
    "queries_for",
    "recorded_version",
]

_HERE = files(__package__)


class Queries(dict[str, str]):
    """The rendered statements for one outbox table, by name."""


@functools.lru_cache(maxsize=64)
def queries_for(table: str) -> Queries:
    """Statements for the outbox table named ``table`` (refused unless a plain identifier)."""
    return Queries(render(load_queries(_HERE / "queries.sql"), _identifiers(table)))


def _identifiers(table: str) -> dict[str, str]:
    check_identifier(table)
    return {
        "outbox": table,
        "outbox_sequence_index": f"{table}_sequence_index",
        "outbox_waiting_index": f"{table}_waiting_index",
        "dead_letters": f"{table}_dead_letters",
        "leases": f"{table}_leases",
        "settled": f"{table}_settled",
        "settled_topic_index": f"{table}_settled_topic_index",
        "migrations": f"{table}_migrations",
    }


def _migration_files() -> list[tuple[int, str, str]]:
    found = []
    for entry in (_HERE / "migrations").iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if match:
            found.append((int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found)


def newest_version() -> int:
    """The newest schema version this outboxbind ships (its last migration's number)."""
    return _migration_files()[-1][0]


def recorded_version(conn: sqlite3.Connection, table: str = "outbox") -> int | None:
    """The newest schema version applied to the outbox ``table`` (``None``: never migrated)."""
    queries = queries_for(table)
    if not conn.execute(
        queries["has_table"], {"name": _identifiers(table)["migrations"]}
    ).fetchone()[0]:
        return None
    version: int | None = conn.execute(queries["schema_version"]).fetchone()[0]
    return version


def check_version(conn: sqlite3.Connection, table: str = "outbox") -> int | None:
    """The recorded schema version of the outbox ``table``, after checking this code knows it.

    Raises:
        SchemaTooNew: a newer outboxbind migrated the outbox.
    """
    found = recorded_version(conn, table)
    SchemaTooNew.check(_where(conn, table), found, newest_version())
    return found


def _where(conn: sqlite3.Connection, table: str) -> str:
    files_ = [row[2] for row in conn.execute("PRAGMA database_list") if row[1] == "main"]
    return f"SQLite database {files_[0] if files_ else ''!r}, table {table!r}"


def _statements(script: str) -> list[str]:
    statements, current = [], ""
    for line in script.splitlines(keepends=True):
        if not current and (not line.strip() or line.lstrip().startswith("--")):
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    if current.strip():
        raise ValueError(f"incomplete SQL statement in a migration: {current.strip()[:80]!r}")
    return statements


def migrate(conn: sqlite3.Connection, table: str = "outbox") -> list[int]:
    """Bring the outbox schema of ``table`` up to date; return the versions applied.

    Runs in one ``BEGIN IMMEDIATE`` transaction, so concurrent callers (two relays starting at
    once) apply each version once. ``conn`` must not be inside a transaction.

    Raises:
        SchemaTooNew: a newer outboxbind migrated the outbox; nothing is changed.
    """
    queries = queries_for(table)
    identifiers = {k: quote_identifier(v) for k, v in _identifiers(table).items()}
    if conn.in_transaction:
        raise RuntimeError("migrate() needs a connection outside any transaction")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(queries["create_migrations_table"])
        done = {row[0] for row in conn.execute(queries["applied_migrations"])}
        SchemaTooNew.check(_where(conn, table), max(done, default=None), newest_version())
        applied = []
        for version, name, script in _migration_files():
            if version in done:
                continue
            for statement in _statements(script.format_map(identifiers)):
                conn.execute(statement)
            conn.execute(
                queries["record_migration"], {"version": version, "name": name, "now": time.time()}
            )
            applied.append(version)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return applied
