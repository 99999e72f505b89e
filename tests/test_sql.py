"""The helpers for stores that keep their SQL in ``.sql`` files."""

from __future__ import annotations

import pytest

from outboxbind.sql import numbered
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
