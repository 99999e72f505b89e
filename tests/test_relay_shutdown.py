"""Stopping a relay whose destination hangs: ``stop()`` gives up in time and gives the leases back,
and the ``outboxbind relay`` process exits within its drain timeout (guarantee 10, shutdown).

The hanging topic is the destination being simulated (an ``InMemoryTopic`` that never answers
until the test lets it go); the stores are real.
"""

from __future__ import annotations

import asyncio
import operator
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

from outboxbind import AsyncRelay, PersistedMessage, Relay, bind
from outboxbind.store import Store
from outboxbind.stores.postgres import PostgresStore
from outboxbind.stores.postgres import persister as pg_persister
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.threads import DaemonThreadPool
from outboxbind.topics import PublishOutcome
from outboxbind.topics.memory import InMemoryTopic

from support import OrderPlaced, order_topic


class Hangs(InMemoryTopic[OrderPlaced]):
    """A destination that takes no notice of its timeout and answers only once released."""

    def __init__(self) -> None:
        topic = order_topic()
        super().__init__(topic.name, topic.codec, ordering_key=lambda m: m.customer)
        self.called = threading.Event()
        self.release = threading.Event()

    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        self.called.set()
        self.release.wait(60)
        return super().publish_batch(messages, timeout=timeout)


@pytest.fixture
def hangs() -> Iterator[Hangs]:
    topic = Hangs()
    yield topic
    topic.release.set()  # let the relay's thread end with the test


StoreFactory = Callable[[], Store]


@pytest.fixture(params=["sqlite", "postgres"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[StoreFactory, Any]]:
    """Open stores on one outbox (a relay's, another relay's) and write orders to it."""
    if request.param == "sqlite":
        db = tmp_path / "app.db"
        opened: list[SQLiteStore] = []

        def open_sqlite() -> Store:
            store = SQLiteStore(db, lease_duration=60)
            opened.append(store)
            return store

        open_sqlite()

        def write_sqlite(orders: list[OrderPlaced]) -> list[str]:
            conn = sqlite3.connect(db)
            with conn:
                ids = [bind(order_topic(), persister(conn)).publish(o) for o in orders]
            conn.close()
            return ids

        yield open_sqlite, write_sqlite
        for store in opened:
            store.close()
        return
    pg_pool: ConnectionPool[Any] = request.getfixturevalue("pg_pool")
    schema: str = request.getfixturevalue("pg_schema")

    def open_pg() -> Store:
        return PostgresStore(pg_pool, schema=schema, lease_duration=60)

    PostgresStore(pg_pool, schema=schema).migrate()

    def write_pg(orders: list[OrderPlaced]) -> list[str]:
        with pg_pool.connection() as conn, conn.transaction():
            topic = order_topic()
            return [bind(topic, pg_persister(conn, schema=schema)).publish(o) for o in orders]

    yield open_pg, write_pg


def test_shutdown_stop_that_gives_up_releases_the_leases_at_once(
    stores: tuple[StoreFactory, Callable[[list[OrderPlaced]], list[str]]], hangs: Hangs
) -> None:
    open_store, write = stores
    ids = write([OrderPlaced(1, "ann"), OrderPlaced(2, "bob")])
    relay = Relay(open_store(), publish_timeout=20, poll_interval=0.05)
    relay.register_topic(hangs)
    thread = threading.Thread(target=relay.poll_for_messages, daemon=True)
    thread.start()
    assert hangs.called.wait(10)
    started = time.monotonic()
    stopped = relay.stop(drain=True, timeout=1)
    elapsed = time.monotonic() - started
    batch = open_store().checkout_batch(["orders"], 10)  # another relay, right away
    print(f"stop returned {stopped} after {elapsed:.2f}s; other relay got {batch!r}")
    assert not stopped
    assert elapsed < 2.5
    assert batch is not None, "the stopped relay still holds the leases"
    assert sorted(m.id for m in batch.messages) == sorted(ids)
    assert all(m.attempts == 0 for m in batch.messages)  # cut short, not charged an attempt
    batch.close()
    thread.join(2)
    assert not thread.is_alive()


def test_shutdown_async_stop_that_gives_up_releases_the_leases_at_once(
    tmp_path: Path, hangs: Hangs
) -> None:
    db = tmp_path / "app.db"
    relay_store, other = SQLiteStore(db, lease_duration=60), SQLiteStore(db, lease_duration=60)
    conn = sqlite3.connect(db)
    with conn:
        ids = [bind(order_topic(), persister(conn)).publish(OrderPlaced(i, "ann")) for i in (1, 2)]
    conn.close()

    async def scenario() -> tuple[bool, float]:
        relay = AsyncRelay(relay_store, publish_timeout=20, poll_interval=0.05)
        relay.register_topic(hangs)
        task = asyncio.create_task(relay.poll_for_messages())
        while not hangs.called.is_set():
            await asyncio.sleep(0.01)
        started = time.monotonic()
        stopped = await relay.stop(drain=True, timeout=1)
        elapsed = time.monotonic() - started
        await asyncio.wait_for(task, 2)
        return stopped, elapsed

    stopped, elapsed = asyncio.run(scenario())
    batch = other.checkout_batch(["orders"], 10)
    print(f"stop returned {stopped} after {elapsed:.2f}s; other relay got {batch!r}")
    assert not stopped
    assert elapsed < 2.5
    assert batch is not None
    assert [m.id for m in batch.messages] == ids
    batch.close()
    relay_store.close()
    other.close()


# -- the outboxbind relay process ------------------------------------------------------------


def _start_hung_relay(tmp_path: Path, drain_timeout: float) -> tuple[subprocess.Popen[str], Path]:
    """``outboxbind relay`` on an SQLite outbox whose only topic hangs; returns once it hangs."""
    db = tmp_path / "app.db"
    SQLiteStore(db).close()
    marker = tmp_path / "hanging"
    (tmp_path / "hung_outbox.py").write_text(
        textwrap.dedent(
            f"""
            import pathlib, threading
            from outboxbind import JsonCodec, Relay
            from outboxbind.stores.sqlite import SQLiteStore
            from outboxbind.topics.memory import InMemoryTopic

            class Hangs(InMemoryTopic):
                def publish_batch(self, messages, *, timeout):
                    pathlib.Path({str(marker)!r}).write_text("hanging")
                    threading.Event().wait()  # a destination that never answers

            def make_relay() -> Relay:
                relay = Relay(SQLiteStore({str(db)!r}), poll_interval=0.05, publish_timeout=25)
                relay.register_topic(Hangs("orders", JsonCodec()))
                return relay
            """
        )
    )
    conn = sqlite3.connect(db)
    with conn:
        bind(order_topic(), persister(conn)).publish(OrderPlaced(1, "ann"))
    conn.close()
    command = [sys.executable, "-m", "outboxbind.cli", "relay", "hung_outbox:make_relay"]
    process = subprocess.Popen(
        [*command, "--drain-timeout", str(drain_timeout)],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not marker.exists():
        assert process.poll() is None, "the relay exited before publishing"
        assert time.monotonic() < deadline, "the relay never published"
        time.sleep(0.02)
    return process, db


def _wait_for_exit(process: subprocess.Popen[Any], limit: float) -> tuple[int | None, float, str]:
    """Wait up to ``limit`` seconds; return the exit code (None: still alive), time and stderr."""
    started = time.monotonic()
    try:
        _, err = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        elapsed = time.monotonic() - started
        process.kill()
        _, err = process.communicate()
        return None, elapsed, err or ""
    return process.returncode, time.monotonic() - started, err or ""


@pytest.mark.slow
def test_shutdown_relay_command_exits_within_the_drain_timeout(tmp_path: Path) -> None:
    process, db = _start_hung_relay(tmp_path, drain_timeout=1)
    try:
        process.send_signal(signal.SIGTERM)
        code, elapsed, err = _wait_for_exit(process, 15)
    finally:
        process.kill()
    print(f"exit code {code} after {elapsed:.2f}s\n{err}")
    assert code == 3, err  # stopped, but the drain timed out
    assert elapsed < 1 + 2.5
    assert "drain timed out" in err
    store = SQLiteStore(db)
    try:  # the message is still there, and not leased: the next relay takes it at once
        batch = store.checkout_batch(["orders"], 10)
        assert batch is not None
        assert len(batch.messages) == 1
        batch.close()
    finally:
        store.close()


@pytest.mark.slow
def test_shutdown_relay_command_exits_at_once_on_a_second_signal(tmp_path: Path) -> None:
    process, _ = _start_hung_relay(tmp_path, drain_timeout=30)
    try:
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert process.poll() is None  # draining, for up to 30 s
        process.send_signal(signal.SIGINT)
        code, elapsed, err = _wait_for_exit(process, 10)
    finally:
        process.kill()
    print(f"exit code {code} {elapsed:.2f}s after the second signal\n{err}")
    assert code == 4, err  # forced
    assert elapsed < 1.0
    assert "exiting at once" in err


@pytest.mark.slow
def test_shutdown_relay_command_exits_within_the_drain_timeout_when_the_store_stalls(
    tmp_path: Path,
) -> None:
    """The relay is stuck in a store call (SQLite waits up to ``busy_timeout`` for a lock that
    another connection holds): the signal is still handled and the process still exits."""
    db = tmp_path / "app.db"
    SQLiteStore(db).close()
    (tmp_path / "stalled_outbox.py").write_text(
        textwrap.dedent(
            f"""
            from outboxbind import JsonCodec, Relay
            from outboxbind.stores.sqlite import SQLiteStore
            from outboxbind.topics.memory import InMemoryTopic

            def make_relay() -> Relay:
                relay = Relay(SQLiteStore({str(db)!r}, busy_timeout=30), poll_interval=0.05)
                relay.register_topic(InMemoryTopic("orders", JsonCodec()))
                return relay
            """
        )
    )
    err_path = tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "outboxbind.cli", "relay", "stalled_outbox:make_relay"]
    with err_path.open("w") as err_file:
        process = subprocess.Popen(
            [*command, "--drain-timeout", "1"], cwd=tmp_path, stderr=err_file
        )
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        deadline = time.monotonic() + 20
        while "relaying topics" not in err_path.read_text():
            assert time.monotonic() < deadline, "the relay did not start"
            time.sleep(0.02)
        conn.execute("BEGIN")
        due = datetime.now(UTC) + timedelta(seconds=1)
        bind(order_topic(), persister(conn)).publish(OrderPlaced(1, "ann"), deliver_after=due)
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")  # the write lock, held: the checkout at 1 s waits for it
        time.sleep(2)
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        code, elapsed, _ = _wait_for_exit(process, 15)
    finally:
        process.kill()
        conn.close()
    err = err_path.read_text()
    print(f"exit code {code} after {elapsed:.2f}s\n{err}")
    assert code == 3, err
    assert elapsed < 1 + 2.5


def test_shutdown_publish_threads_are_daemons_that_report_results_and_errors() -> None:
    """The pool behind the relay's publish calls: a stuck call must not hold up the exit."""
    pool = DaemonThreadPool(2, "test-pool")
    release = threading.Event()
    stuck = pool.submit(release.wait, 30)
    assert pool.submit(lambda: 41 + 1).result(5) == 42
    failing = pool.submit(operator.truediv, 1, 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(5)
    busy = [thread for thread in threading.enumerate() if thread.name.startswith("test-pool")]
    assert len(busy) == 2  # no more than max_workers
    assert all(thread.daemon for thread in busy)
    queued = pool.submit(lambda: 0)
    assert not stuck.done()
    pool.shutdown(wait=False, cancel_futures=True)
    release.set()
    assert stuck.result(5) is True
    assert queued.cancelled() or queued.result(5) == 0
