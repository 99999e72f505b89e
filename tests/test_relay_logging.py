"""What the relay logs: a failed attempt is a WARNING, a give-up an ERROR, and a store outage is
one line when it starts and one when it ends, however many polls fail in between."""

from __future__ import annotations

import logging
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from outboxbind import Relay, RetryPolicy, bind
from outboxbind.stores.memory import InMemoryBatch, InMemoryStore
from outboxbind.stores.sqlite import SQLiteStore, persister

from support import OrderPlaced, order_topic

RELAY_LOGGER = "outboxbind.relay"


def relay_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(RELAY_LOGGER)]


def test_a_failed_attempt_is_a_warning_naming_topic_key_id_and_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = InMemoryStore()
    topic = order_topic(fail=lambda m: ConnectionError("broker down"))
    with store.transaction() as tx:
        outbox_id = bind(topic, tx).publish(OrderPlaced(1, "ann"))
    relay = Relay(store)
    relay.register_topic(topic, retry=RetryPolicy(max_attempts=3))
    with caplog.at_level(logging.INFO, logger=RELAY_LOGGER):
        assert relay.process_messages().errors == 1
    [record] = relay_records(caplog)
    assert record.levelno == logging.WARNING
    text = record.getMessage()
    for part in ("orders", "'ann'", outbox_id, "ConnectionError: broker down", "attempt 1 of 3"):
        assert part in text, (part, text)


def test_a_dead_letter_is_an_error_naming_topic_key_id_and_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = InMemoryStore()
    topic = order_topic(fail=lambda m: ConnectionError("broker down"))
    with store.transaction() as tx:
        outbox_id = bind(topic, tx).publish(OrderPlaced(1, "ann"))
    relay = Relay(store)
    relay.register_topic(topic, retry=RetryPolicy(max_attempts=1), poison="park")
    with caplog.at_level(logging.INFO, logger=RELAY_LOGGER):
        assert relay.process_messages().dead == 1
    [record] = relay_records(caplog)
    assert record.levelno == logging.ERROR
    text = record.getMessage()
    for part in ("orders", "'ann'", outbox_id, "ConnectionError: broker down", "parked"):
        assert part in text, (part, text)


class FlakyStore(InMemoryStore):
    """An in-memory outbox whose checkouts fail while ``down`` is set, as a database that is
    unreachable for a while."""

    def __init__(self) -> None:
        super().__init__()
        self.down = threading.Event()
        self.failed_checkouts = 0

    def checkout_batch(self, topic_names: Sequence[str], limit: int) -> InMemoryBatch | None:
        if self.down.is_set():
            self.failed_checkouts += 1
            raise sqlite3.OperationalError("unable to open database file")
        return super().checkout_batch(topic_names, limit)


def test_a_store_outage_logs_one_line_when_it_starts_and_one_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlakyStore()
    topic = order_topic()
    relay = Relay(store, poll_interval=0.01, max_store_backoff=0.02)
    relay.register_topic(topic)
    store.down.set()
    with caplog.at_level(logging.DEBUG, logger=RELAY_LOGGER):
        thread = threading.Thread(target=relay.poll_for_messages, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while store.failed_checkouts < 8 and time.monotonic() < deadline:
            time.sleep(0.01)
        store.down.clear()
        with store.transaction() as tx:
            bind(topic, tx).publish(OrderPlaced(1, "ann"))
        while not topic.messages() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.stop(timeout=5)
        thread.join(5)
    failures = store.failed_checkouts
    assert failures >= 8
    assert [m.order_id for m in topic.messages()] == [1]
    records = relay_records(caplog)
    loud = [r for r in records if r.levelno >= logging.WARNING]
    print(f"{failures} failed polls, {len(records)} records, {len(loud)} at WARNING or above")
    for record in records:
        print(f"  {record.levelname} {record.getMessage()} traceback={record.exc_info is not None}")
    [started] = loud
    assert "unable to open database file" in started.getMessage()
    assert started.exc_info is None  # no traceback at WARNING
    with_traceback = [r for r in records if r.exc_info is not None]
    assert len(with_traceback) <= 1  # at most once, at DEBUG
    assert all(r.levelno == logging.DEBUG for r in with_traceback)
    [ended] = [r for r in records if "reachable again" in r.getMessage()]
    assert ended.levelno == logging.INFO
    assert f"{failures} failed polls" in ended.getMessage()
    assert ended.created > started.created


@pytest.mark.slow
@pytest.mark.parametrize("level_option", [[], ["--log-level", "warning"]])
def test_the_relay_command_logs_failed_attempts_to_stderr(
    tmp_path: Path, level_option: list[str]
) -> None:
    db = tmp_path / "app.db"
    SQLiteStore(db).close()
    (tmp_path / "failing_outbox.py").write_text(
        textwrap.dedent(
            f"""
            from outboxbind import JsonCodec, Relay, RetryPolicy
            from outboxbind.stores.sqlite import SQLiteStore
            from outboxbind.topics.memory import InMemoryTopic

            def make_relay() -> Relay:
                relay = Relay(SQLiteStore({str(db)!r}), poll_interval=0.05)
                topic = InMemoryTopic(
                    "orders",
                    JsonCodec(),
                    ordering_key=lambda m: m["customer"],
                    fail=lambda m: ConnectionError("broker down"),
                )
                relay.register_topic(topic, retry=RetryPolicy(initial_delay=0.05))
                return relay
            """
        )
    )
    conn = sqlite3.connect(db)
    with conn:
        outbox_id = bind(order_topic(), persister(conn)).publish(OrderPlaced(1, "ann"))
    conn.close()
    err_path = tmp_path / "stderr.txt"
    with err_path.open("w") as err_file:
        command = [sys.executable, "-m", "outboxbind.cli", "relay", "failing_outbox:make_relay"]
        process = subprocess.Popen([*command, *level_option], cwd=tmp_path, stderr=err_file)
        try:
            deadline = time.monotonic() + 20
            while "WARNING" not in err_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            process.wait(20)
        finally:
            process.kill()
    err = err_path.read_text()
    print(err)
    warnings = [line for line in err.splitlines() if " WARNING outboxbind.relay: " in line]
    assert warnings, err
    expected = f"publishing outbox message {outbox_id} (topic 'orders', key 'ann') failed"
    assert expected in warnings[0]
    assert "ConnectionError: broker down" in warnings[0]
