"""Guarantee 9: bad input fails early and clearly, writes nothing, leaves the transaction usable."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from outboxbind import (
    EncodeError,
    InvalidAttributes,
    InvalidIdentifier,
    InvalidOrderingKey,
    JsonCodec,
    MessageTooLarge,
    NotInTransaction,
    PublishError,
    Relay,
    bind,
)
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.topics.memory import InMemoryTopic

from support import OrderPlaced, order_topic


def outbox_rows(db_path: Path) -> int:
    with sqlite3.connect(db_path) as reader:
        count: int = reader.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        return count


def assert_transaction_still_usable(
    conn: sqlite3.Connection, topic: InMemoryTopic[Any], store: SQLiteStore, good: Any
) -> None:
    """After the refused publish, the same transaction goes on and commits what it should."""
    conn.execute("INSERT INTO orders (id, customer) VALUES (42, 'ann')")
    bind(topic, persister(conn)).publish(good)
    conn.commit()
    relay = Relay(store)
    relay.register_topic(topic)
    assert relay.process_messages().successes == 1
    assert topic.messages() == [good]
    assert conn.execute("SELECT id FROM orders").fetchall() == [(42,)]


def test_an_unencodable_message_is_refused_with_the_reason(
    conn: sqlite3.Connection, store: SQLiteStore, db_path: Path
) -> None:
    topic: InMemoryTopic[dict[str, Any]] = InMemoryTopic("events", JsonCodec())
    conn.execute("INSERT INTO orders (id, customer) VALUES (1, 'ann')")
    with pytest.raises(EncodeError) as refused:
        bind(topic, persister(conn)).publish({"when": object()})
    assert "topic 'events': cannot encode dict" in str(refused.value)
    assert "object is not JSON serializable" in str(refused.value)
    assert conn.in_transaction  # the caller's transaction is untouched
    conn.execute("DELETE FROM orders")
    assert_transaction_still_usable(conn, topic, store, {"ok": True})
    assert outbox_rows(db_path) == 0


def test_nan_is_refused_rather_than_written_as_invalid_json(conn: sqlite3.Connection) -> None:
    topic: InMemoryTopic[dict[str, Any]] = InMemoryTopic("events", JsonCodec())
    with pytest.raises(EncodeError, match="Out of range float"):
        bind(topic, persister(conn)).publish({"price": float("nan")})


def test_an_oversize_message_is_refused_with_its_size_and_the_limit(
    conn: sqlite3.Connection, store: SQLiteStore, db_path: Path
) -> None:
    topic = order_topic(max_message_bytes=100)
    with pytest.raises(MessageTooLarge, match=r"is 1\d\d bytes, over the topic's limit of 100"):
        bind(topic, persister(conn)).publish(OrderPlaced(1, "ann", note="x" * 100))
    assert_transaction_still_usable(conn, topic, store, OrderPlaced(2, "ann"))
    assert outbox_rows(db_path) == 0


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("", "the ordering key is empty"),
        ("a\x00b", "contains NUL"),
        ("k" * 1025, "is 1025 bytes, over the limit of 1024"),
        (42, "must be a str, not int"),
    ],
)
def test_a_bad_ordering_key_is_refused(
    conn: sqlite3.Connection, store: SQLiteStore, key: object, reason: str
) -> None:
    topic: InMemoryTopic[dict[str, Any]] = InMemoryTopic(
        "events",
        JsonCodec(),
        ordering_key=lambda m: m["key"],
    )
    with pytest.raises(InvalidOrderingKey, match=reason):
        bind(topic, persister(conn)).publish({"key": key})
    assert_transaction_still_usable(conn, topic, store, {"key": "fine"})


def test_an_ordering_key_function_that_fails_is_reported(conn: sqlite3.Connection) -> None:
    topic: InMemoryTopic[dict[str, Any]] = InMemoryTopic(
        "events", JsonCodec(), ordering_key=lambda m: m["customer"]
    )
    with pytest.raises(InvalidOrderingKey, match="ordering key function failed on dict: KeyError"):
        bind(topic, persister(conn)).publish({"id": 1})


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ({"": "x"}, "attribute name '' must be a non-empty string"),
        ({"n": 1}, "attribute 'n' must be a string without NUL, not 1"),
        ({"n": "a\x00"}, "must be a string without NUL"),
        ({f"a{i}": "" for i in range(101)}, "101 attributes, over the limit of 100"),
    ],
)
def test_bad_attributes_are_refused(
    conn: sqlite3.Connection, attributes: dict[str, Any], reason: str
) -> None:
    topic = order_topic()
    with pytest.raises(InvalidAttributes, match=reason):
        bind(topic, persister(conn)).publish(OrderPlaced(1, "ann"), attributes=attributes)


def test_a_naive_deliver_after_is_refused(conn: sqlite3.Connection) -> None:
    topic = order_topic()
    with pytest.raises(PublishError, match="deliver_after must be timezone-aware"):
        bind(topic, persister(conn)).publish(
            OrderPlaced(1, "ann"), deliver_after=datetime(2030, 1, 1)
        )


@pytest.mark.parametrize(
    "table",
    ['outbox"; DROP TABLE orders; --', "out box", "1outbox", "", "a" * 49, "main.outbox", "é"],
)
def test_a_hostile_table_name_is_refused_by_persister_and_store(
    conn: sqlite3.Connection, db_path: Path, table: str
) -> None:
    with pytest.raises(InvalidIdentifier, match=r"is not a plain SQL identifier|over the limit"):
        persister(conn, table=table)
    with pytest.raises(InvalidIdentifier):
        SQLiteStore(db_path, table=table)
    assert conn.execute("SELECT COUNT(*) FROM orders").fetchone() == (0,)


def test_publishing_on_an_autocommit_connection_is_refused(
    db_path: Path, store: SQLiteStore
) -> None:
    conn = sqlite3.connect(db_path, isolation_level=None)
    topic = order_topic()
    with pytest.raises(NotInTransaction, match="autocommit mode and no transaction is open"):
        bind(topic, persister(conn)).publish(OrderPlaced(1, "ann"))
    conn.execute("BEGIN")
    bind(topic, persister(conn)).publish(OrderPlaced(1, "ann"))
    conn.execute("ROLLBACK")
    assert outbox_rows(db_path) == 0


def test_bind_refuses_what_is_not_a_topic_or_persister(conn: sqlite3.Connection) -> None:
    with pytest.raises(TypeError, match="needs an outboxbind Topic"):
        bind("orders", persister(conn))  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="needs a persister callable"):
        bind(order_topic(), "conn")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match=r"needs a sqlite3\.Connection"):
        persister("app.db")  # type: ignore[arg-type]


def test_a_deliver_after_beyond_the_calendar_is_a_publish_error(conn: sqlite3.Connection) -> None:
    from datetime import timedelta

    with pytest.raises(PublishError, match="lies beyond the year 9999"):
        bind(order_topic(), persister(conn)).publish(
            OrderPlaced(1, "ann"), deliver_after=timedelta(days=999_999_999)
        )
