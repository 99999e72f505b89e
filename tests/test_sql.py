"""The helpers for stores that keep their SQL in ``.sql`` files."""

from __future__ import annotations

import math
from typing import Any

import psycopg
import pytest

from outboxbind.sql import array_literal, numbered
from outboxbind.stores.postgres.schema import queries_for
from outboxbind.stores.postgres.store import RELAY_STATEMENTS


def test_numbered_gives_each_name_one_number_in_order_of_first_use() -> None:
    sql, names = numbered(
        "SELECT %(b)s::int + %(a)s::int WHERE %(b)s::int > 0 AND x = coalesce(%(now)s, now())"
    )
    assert sql == "SELECT $1::int + $2::int WHERE $1::int > 0 AND x = coalesce($3, now())"
    assert names == ("b", "a", "now")


def test_numbered_refuses_a_percent_sign_it_would_send_unchanged() -> None:
    with pytest.raises(ValueError, match="a % that is not a %\\(name\\)s parameter"):
        numbered("SELECT %(a)s % 2")
    with pytest.raises(ValueError, match="SELECT %s"):
        numbered("SELECT %s")


def test_the_relay_statements_of_the_postgres_store_number_every_parameter() -> None:
    for name in RELAY_STATEMENTS:
        sql, names = numbered(queries_for("public", "outbox")[name])
        assert "%(" not in sql
        assert names
        assert len(set(names)) == len(names)
        assert f"${len(names)}" in sql
        assert f"${len(names) + 1}" not in sql


TRICKY_TEXT = ["plain", "", "NULL", 'a "quoted" word', "back\\slash", "{braces},commas", " spaced ",
               "tab\tnew\nline", "ünïcödé ✓", "\\\"", "'single'"]  # fmt: skip


@pytest.mark.parametrize(
    ("values", "cast"),
    [
        (TRICKY_TEXT, "text[]"),
        ([*TRICKY_TEXT, None], "text[]"),
        ([0, 1, -9223372036854775808, 9223372036854775807, None], "bigint[]"),
        ([True, False, None], "boolean[]"),
        ([0.5, -1e-05, 1.7976931348623157e308, None], "float8[]"),
        ([], "text[]"),
        ([], "bigint[]"),
        ([None, None], "bigint[]"),
    ],
    ids=["text", "text-null", "bigint", "boolean", "float8", "empty-text", "empty-bigint", "nulls"],
)
def test_array_literal_reads_back_as_the_same_values(
    pg_dsn: str, values: list[Any], cast: str
) -> None:
    with psycopg.connect(pg_dsn) as conn:
        [(read,)] = (
            psycopg.RawCursor(conn)
            .execute(f"SELECT $1::{cast}", [array_literal(values)])
            .fetchall()
        )
    assert read == values


def test_array_literal_writes_the_float_words_postgres_reads(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        [(read,)] = (
            psycopg.RawCursor(conn)
            .execute("SELECT $1::float8[]", [array_literal([math.inf, -math.inf, math.nan])])
            .fetchall()
        )
    assert read[:2] == [math.inf, -math.inf]
    assert math.isnan(read[2])


def test_array_literal_refuses_what_it_cannot_write() -> None:
    with pytest.raises(TypeError, match="not bytes"):
        array_literal([b"raw"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not list"):
        array_literal([[1, 2]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="holds NUL"):
        array_literal(["nul\0inside"])
