"""Guarantee 9: bad input fails early and clearly, writes nothing, leaves the transaction usable."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import pytest

from outboxbind import (
    ConfigurationError,
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
        ({"n": "\udfff"}, "attribute 'n' is not valid Unicode text"),
        ({"\ud800": "x"}, "is not valid Unicode text"),
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


def test_a_lone_surrogate_ordering_key_is_refused(
    conn: sqlite3.Connection, store: SQLiteStore
) -> None:
    topic: InMemoryTopic[dict[str, Any]] = InMemoryTopic(
        "events", JsonCodec(), ordering_key=lambda m: "\ud800" if m["key"] == "bad" else m["key"]
    )
    with pytest.raises(InvalidOrderingKey, match=r"not valid Unicode text \(it holds a lone"):
        bind(topic, persister(conn)).publish({"key": "bad"})
    assert_transaction_still_usable(conn, topic, store, {"key": "fine"})


def _topic_of_every_kind(name: str) -> None:
    """Make a topic named ``name`` with each built-in topic class (none connects on creation)."""
    import redis

    from outboxbind.topics.pubsub import PubSubTopic
    from outboxbind.topics.redis_streams import RedisStreamTopic

    makers: list[Callable[[], object]] = [
        lambda: InMemoryTopic(name, JsonCodec()),
        lambda: RedisStreamTopic(redis.Redis(), "stream", bytes, name=name),
        lambda: PubSubTopic(cast(Any, object()), "projects/p/topics/t", bytes, name=name),
    ]
    errors = []
    for make in makers:
        with pytest.raises(ConfigurationError) as caught:
            make()
        errors.append(str(caught.value))
    assert len(set(errors)) == 1, errors  # one rule, one message, whatever the topic
    raise ConfigurationError(errors[0])


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("a\x00b", "the topic name .* contains NUL"),
        ("orders\ud800", r"is not valid Unicode text \(it holds a lone surrogate\)"),
        ("é" * 513, "is 1026 bytes of UTF-8, over the limit of 1024 bytes"),
        ("x" * 8001, "is 8001 bytes of UTF-8, over the limit of 1024 bytes"),
    ],
)
def test_a_bad_topic_name_is_refused_when_the_topic_is_made(name: str, reason: str) -> None:
    """Guarantee 9, at the earliest point: a name no store could take never reaches publish()
    (over 8,000 bytes it used to abort the caller's transaction in pg_notify; a lone surrogate
    raised a bare UnicodeEncodeError on every store)."""
    with pytest.raises(ConfigurationError, match=reason):
        _topic_of_every_kind(name)


def test_an_empty_topic_name_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="a topic name must be a non-empty string, not ''"):
        InMemoryTopic("", JsonCodec())


def test_a_topic_name_at_the_limit_is_accepted(conn: sqlite3.Connection) -> None:
    name = "é" * 512  # 1024 bytes
    topic: InMemoryTopic[dict[str, Any]] = InMemoryTopic(name, JsonCodec())
    bind(topic, persister(conn)).publish({"id": 1})
    conn.commit()
    assert conn.execute("SELECT topic FROM outbox").fetchall() == [(name,)]
