"""The guarantees of SPEC.md section 3 against a real PostgreSQL server: no mocks, no fakes.

Each test name says which guarantee (g1 .. g10) it shows. Every test gets a fresh schema
(``pg_schema``) holding the outbox and, where a test needs one, a business table ``accounts``.
Concurrent writers are real connections, driven from threads where one must wait on another's
lock; every wait is bounded and every thread is joined.
"""

from __future__ import annotations

import asyncio
import functools
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from sqlalchemy import TextClause, create_engine, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from outboxbind import (
    AsyncRelay,
    BytesCodec,
    EncodeError,
    InvalidAttributes,
    InvalidIdentifier,
    InvalidOrderingKey,
    JsonCodec,
    MessageTooLarge,
    NotInTransaction,
    PersistedMessage,
    PublishError,
    Relay,
    RetryPolicy,
    bind,
)
from outboxbind.messages import OutboxEntry
from outboxbind.store import AsyncProgressStore, MarkDetails, ProgressStore, SequenceKey
from outboxbind.stores.postgres import (
    AsyncPostgresStore,
    PostgresStore,
    migrate,
    persister,
    sqlalchemy_persister,
)
from outboxbind.stores.postgres.persister import notify_channel
from outboxbind.testing import FakeClock, entry
from outboxbind.topics.memory import InMemoryTopic

FAST_RETRY = RetryPolicy(max_attempts=3, initial_delay=1.0, jitter=0.0)


# -- the business side: accounts and their change events -------------------------------------


@attrs.frozen
class AccountChanged:
    """The event a writer publishes when it changes an account's state."""

    account_id: int
    state: str


def account_topic(
    name: str = "accounts",
    *,
    strict_sequence: bool = False,
    fail: Callable[[PersistedMessage], BaseException | None] | None = None,
    delay: float = 0.0,
) -> InMemoryTopic[AccountChanged]:
    """Account events, ordered per account."""
    return InMemoryTopic(
        name,
        JsonCodec(AccountChanged),
        ordering_key=lambda m: f"acct-{m.account_id}",
        strict_sequence=strict_sequence,
        fail=fail,
        delay=delay,
    )


def states(topic: InMemoryTopic[AccountChanged]) -> list[tuple[int, str]]:
    """What subscribers received, in arrival order."""
    return [(m.account_id, m.state) for m in topic.messages()]


def final_states(topic: InMemoryTopic[AccountChanged]) -> dict[int, str]:
    """The state a subscriber that applies every event in arrival order ends on, per account."""
    return dict(states(topic))


def per_account(topic: InMemoryTopic[AccountChanged]) -> dict[int, list[str]]:
    seen: dict[int, list[str]] = {}
    for account_id, state in states(topic):
        seen.setdefault(account_id, []).append(state)
    return seen


class FailStates:
    """Failure injection: the destination refuses events carrying one of ``bad`` states."""

    def __init__(self, *bad: str, error: type[Exception] = ConnectionError) -> None:
        self.bad = set(bad)
        self.error = error

    def __call__(self, message: PersistedMessage) -> Exception | None:
        state = JsonCodec(AccountChanged).decode(message.data).state
        return self.error(f"destination refused {state}") if state in self.bad else None


def accounts_table(schema: str) -> str:
    return f'"{schema}".accounts'


@pytest.fixture
def pg_store(pg_pool: ConnectionPool[Any], pg_schema: str) -> PostgresStore:
    """A relay's store over this test's fresh outbox (migrated)."""
    store = PostgresStore(pg_pool, schema=pg_schema, lease_duration=30)
    store.migrate()
    return store


@pytest.fixture
def clocked_store(pg_pool: ConnectionPool[Any], pg_schema: str, clock: FakeClock) -> PostgresStore:
    """The same, reading a clock the test moves past retry delays."""
    store = PostgresStore(pg_pool, schema=pg_schema, lease_duration=30, clock=clock)
    store.migrate()
    return store


@pytest.fixture
def accounts(pg_dsn: str, pg_schema: str, pg_store: PostgresStore) -> str:
    """The business table, beside the outbox, with account 1 opened; its quoted name."""
    table = accounts_table(pg_schema)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, state text NOT NULL)")
        conn.execute(f"INSERT INTO {table} (id, state) VALUES (1, 'opened')")
    return table


# -- helpers -----------------------------------------------------------------------------------


def relay_for(store: PostgresStore, *topics: InMemoryTopic[Any], **policy: Any) -> Relay:
    relay = Relay(store, publish_timeout=5.0)
    for topic in topics:
        relay.register_topic(topic, **policy)
    return relay


def drain(relay: Relay, clock: FakeClock | None = None, rounds: int = 100) -> None:
    """Run rounds (moving ``clock`` past retry delays) until nothing is left to do."""
    for _ in range(rounds):
        result = relay.process_messages(100)
        assert result.store_error is None, result.store_error
        if result.checked_out == 0:
            if clock is None:
                return
            clock.advance(10)
            if relay.process_messages(100).checked_out == 0:
                return
    raise AssertionError(f"the relay did not drain in {rounds} rounds")


def publish_committed(
    pool: ConnectionPool[Any], schema: str, topic: InMemoryTopic[AccountChanged], *events: Any
) -> list[str]:
    """Publish ``events`` in one committed transaction; return their outbox ids."""
    with pool.connection() as conn, conn.transaction():
        bound = bind(topic, persister(conn, schema=schema))
        return [bound.publish(event) for event in events]


def outbox_rows(dsn: str, schema: str) -> int:
    """Rows in the outbox as another session sees them (committed ones only)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{schema}".outbox').fetchone()
        assert row is not None
        return int(row[0])


def account_rows(dsn: str, schema: str) -> list[tuple[int, str]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(f"SELECT id, state FROM {accounts_table(schema)} ORDER BY id")
        return [(int(id_), str(state)) for id_, state in rows]


def wait_until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "") -> float:
    """Poll ``condition`` until it holds; return the seconds it took; fail after ``timeout``."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what or condition}")
        time.sleep(0.002)
    return time.monotonic() - started


class Worker:
    """A thread whose exception is re-raised by :meth:`join`."""

    def __init__(self, target: Callable[[], None], name: str) -> None:
        self._target = target
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._target()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 10.0) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"{self.thread.name} still running after {timeout}s"
        if self.error is not None:
            raise self.error


def blocking_pids(observer: psycopg.Connection[Any], pid: int) -> list[int]:
    row = observer.execute("SELECT pg_blocking_pids(%s)", [pid]).fetchone()
    assert row is not None
    return [int(p) for p in row[0]]


def blocked_by(observer: psycopg.Connection[Any], pid: int) -> list[int]:
    """The backends waiting on a lock that ``pid`` holds."""
    rows = observer.execute(
        "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))", [pid]
    )
    return [int(row[0]) for row in rows]


# -- guarantee 1: atomic -----------------------------------------------------------------------


def test_atomic_g1_a_rolled_back_transaction_publishes_nothing(
    pg_dsn: str,
    pg_schema: str,
    pg_pool: ConnectionPool[Any],
    pg_store: PostgresStore,
    accounts: str,
) -> None:
    topic = account_topic()

    def close_an_account_but_fail() -> None:
        with pg_pool.connection() as conn, conn.transaction():
            conn.execute(f"UPDATE {accounts} SET state = 'closed' WHERE id = 1")
            bind(topic, persister(conn, schema=pg_schema)).publish(AccountChanged(1, "closed"))
            raise RuntimeError("payment declined")

    with pytest.raises(RuntimeError, match="payment declined"):
        close_an_account_but_fail()
    with pg_pool.connection() as conn, conn.transaction():
        conn.execute(f"UPDATE {accounts} SET state = 'frozen' WHERE id = 1")
        bind(topic, persister(conn, schema=pg_schema)).publish(AccountChanged(1, "frozen"))
    relay = relay_for(pg_store, topic)
    drain(relay)
    assert states(topic) == [(1, "frozen")]
    assert account_rows(pg_dsn, pg_schema) == [(1, "frozen")]
    assert outbox_rows(pg_dsn, pg_schema) == 0


def test_atomic_g1_an_uncommitted_message_is_not_checked_out_until_its_commit(
    pg_dsn: str, pg_schema: str, pg_pool: ConnectionPool[Any], pg_store: PostgresStore
) -> None:
    topic = account_topic()
    relay = relay_for(pg_store, topic)
    with psycopg.connect(pg_dsn) as writer:
        open_id = bind(topic, persister(writer, schema=pg_schema)).publish(AccountChanged(1, "a"))
        assert writer.info.transaction_status == TransactionStatus.INTRANS
        assert pg_store.checkout_batch(["accounts"], 100) is None
        # the open transaction neither shows nor blocks other committed work of the same key
        [committed_id] = publish_committed(pg_pool, pg_schema, topic, AccountChanged(1, "b"))
        during = relay.process_messages()
        assert (during.checked_out, during.successes, during.store_error) == (1, 1, None)
        assert topic.outbox_ids() == [committed_id]
        writer.commit()
    after = relay.process_messages()
    assert (after.checked_out, after.successes) == (1, 1)
    assert topic.outbox_ids() == [committed_id, open_id]


# -- guarantee 4: nothing skipped --------------------------------------------------------------


@pytest.mark.parametrize("strict_sequence", [False, True], ids=["plain", "strict"])
@pytest.mark.parametrize("keyed", [True, False], ids=["per-key", "topic-wide"])
def test_nothing_skipped_g4_a_row_committed_late_with_an_earlier_id_is_still_published(
    pg_dsn: str, pg_schema: str, pg_store: PostgresStore, strict_sequence: bool, keyed: bool
) -> None:
    topic: InMemoryTopic[AccountChanged] = InMemoryTopic(
        "accounts",
        JsonCodec(AccountChanged),
        ordering_key=(lambda m: f"acct-{m.account_id}") if keyed else None,
        strict_sequence=strict_sequence,
    )
    relay = relay_for(pg_store, topic)
    with psycopg.connect(pg_dsn) as conn_a, psycopg.connect(pg_dsn) as conn_b:
        id_a = bind(topic, persister(conn_a, schema=pg_schema)).publish(AccountChanged(1, "A"))
        id_b = bind(topic, persister(conn_b, schema=pg_schema)).publish(AccountChanged(1, "B"))
        assert int(id_a) < int(id_b)  # A took the earlier id ...
        conn_b.commit()  # ... and B commits first
        between = relay.process_messages()
        assert (between.checked_out, between.successes) == (1, 1)
        assert topic.outbox_ids() == [id_b]
        conn_a.commit()  # A commits after a round went past its id
    after = relay.process_messages()
    assert (after.checked_out, after.successes) == (1, 1)
    assert topic.outbox_ids() == [id_b, id_a]
    assert relay.process_messages().checked_out == 0
    assert pg_store.backlog() == []


def test_nothing_skipped_g4_concurrent_writers_committing_out_of_id_order_all_get_published(
    pg_dsn: str, pg_schema: str, pg_store: PostgresStore
) -> None:
    """Writers interleave id-taking and committing (some roll back) while a relay polls."""
    topic = account_topic()
    relay = Relay(pg_store, poll_interval=0.02, publish_timeout=5.0)
    relay.register_topic(topic)
    committed: list[str] = []
    rolled_back: list[str] = []
    lock = threading.Lock()

    def writer(seed: int) -> None:
        rng = random.Random(seed)
        with psycopg.connect(pg_dsn) as conn:
            bound = bind(topic, persister(conn, schema=pg_schema))
            for n in range(15):
                ids = [
                    bound.publish(AccountChanged(rng.randrange(4), f"w{seed}-{n}-{i}"))
                    for i in range(rng.randrange(1, 3))
                ]
                time.sleep(rng.random() * 0.004)  # hold the ids while others commit
                if rng.random() < 0.2:
                    conn.rollback()
                    with lock:
                        rolled_back.extend(ids)
                else:
                    conn.commit()
                    with lock:
                        committed.extend(ids)

    poller = Worker(lambda: relay.poll_for_messages(50), "relay")
    try:
        writers = [Worker(functools.partial(writer, seed), f"writer-{seed}") for seed in range(6)]
        for w in writers:
            w.join(20)
    finally:
        assert relay.stop(drain=True, timeout=10)
        poller.join(10)
    drain(relay)  # anything committed after the drain's last round
    published = topic.outbox_ids()
    assert len(published) == len(set(published)), "a message was published twice"
    assert sorted(published, key=int) == sorted(committed, key=int)
    assert not set(published) & set(rolled_back)
    assert outbox_rows(pg_dsn, pg_schema) == 0


# -- guarantee 5: strict sequence --------------------------------------------------------------


def interleave_on_a_row_lock(
    dsn: str,
    schema: str,
    topic: InMemoryTopic[AccountChanged],
    between: Callable[[], None] | None = None,
) -> tuple[str, str]:
    """Anomaly (b): A publishes its event, then waits on the row lock B holds; B updates the row,
    publishes and commits; A's update goes through and A commits. ``between`` runs after B's
    commit, before A's. Returns the outbox ids of A's and B's events.
    """
    table = accounts_table(schema)
    ids: dict[str, str] = {}
    a_published, a_updated, a_may_commit = threading.Event(), threading.Event(), threading.Event()
    with (
        psycopg.connect(dsn) as conn_a,
        psycopg.connect(dsn) as conn_b,
        psycopg.connect(dsn, autocommit=True) as observer,
    ):
        a_pid, b_pid = conn_a.info.backend_pid, conn_b.info.backend_pid
        conn_b.execute(f"UPDATE {table} SET state = 'B' WHERE id = 1")  # B holds the row lock

        def writer_a() -> None:
            ids["A"] = bind(topic, persister(conn_a, schema=schema)).publish(AccountChanged(1, "A"))
            a_published.set()
            conn_a.execute(f"UPDATE {table} SET state = 'A' WHERE id = 1")  # waits for B
            a_updated.set()
            if not a_may_commit.wait(10):
                raise TimeoutError("A was never told to commit")
            conn_a.commit()

        worker = Worker(writer_a, "writer-A")
        try:
            assert a_published.wait(5)
            wait_until(
                lambda: b_pid in blocking_pids(observer, a_pid), what="A waits for B's row lock"
            )
            assert not a_updated.is_set()
            ids["B"] = bind(topic, persister(conn_b, schema=schema)).publish(AccountChanged(1, "B"))
            conn_b.commit()
            assert a_updated.wait(5), "A's update did not go through after B's commit"
            if between is not None:
                between()
        finally:
            a_may_commit.set()
            worker.join(10)
    assert int(ids["A"]) < int(ids["B"])  # A wrote its event first
    return ids["A"], ids["B"]


@pytest.mark.parametrize("relay_round_between", [False, True], ids=["after", "round-between"])
def test_strict_sequence_g5_subscribers_end_on_the_state_the_database_ends_on(
    pg_dsn: str,
    pg_schema: str,
    pg_store: PostgresStore,
    accounts: str,
    relay_round_between: bool,
) -> None:
    topic = account_topic(strict_sequence=True)
    relay = relay_for(pg_store, topic)

    def round_between() -> None:  # B committed, A not yet: only B's event is there to publish
        result = relay.process_messages()
        assert (result.checked_out, result.successes) == (1, 1)
        assert states(topic) == [(1, "B")]

    id_a, id_b = interleave_on_a_row_lock(
        pg_dsn, pg_schema, topic, round_between if relay_round_between else None
    )
    assert account_rows(pg_dsn, pg_schema) == [(1, "A")]  # A's update came last
    drain(relay)
    assert topic.outbox_ids() == [id_b, id_a]  # commit order, not id order
    assert final_states(topic) == {1: "A"}  # subscribers agree with the database


def test_strict_sequence_g5_is_needed_without_it_publish_follows_id_order_and_ends_on_b(
    pg_dsn: str, pg_schema: str, pg_store: PostgresStore, accounts: str
) -> None:
    """Why strict mode exists: without it, the same interleaving leaves subscribers on B's state
    while the database holds A's. If this starts failing, the default mode changed."""
    topic = account_topic(strict_sequence=False)
    relay = relay_for(pg_store, topic)
    id_a, id_b = interleave_on_a_row_lock(pg_dsn, pg_schema, topic)
    assert account_rows(pg_dsn, pg_schema) == [(1, "A")]
    drain(relay)
    assert topic.outbox_ids() == [id_a, id_b]  # id order
    assert final_states(topic) == {1: "B"}  # the anomaly: subscribers disagree with the database


def test_strict_sequence_g5_writers_of_the_same_keys_in_opposite_orders_never_deadlock(
    pg_dsn: str, pg_schema: str, pg_store: PostgresStore
) -> None:
    """Each strict commit takes its keys' locks in one sorted order, whatever the write order."""
    topic = account_topic(strict_sequence=True)
    rounds = 30
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def writer(accounts: tuple[int, int]) -> None:
        with psycopg.connect(pg_dsn) as conn:
            for n in range(rounds):
                try:
                    for account in accounts:
                        bind(topic, persister(conn, schema=pg_schema)).publish(
                            AccountChanged(account, f"{accounts}-{n}")
                        )
                    barrier.wait(10)  # both transactions commit at the same moment
                    conn.commit()
                except BaseException as exc:
                    errors.append(exc)
                    barrier.abort()
                    return

    threads = [
        threading.Thread(target=writer, args=((1, 2),)),
        threading.Thread(target=writer, args=((2, 1),)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    relay = relay_for(pg_store, topic)
    drain(relay)
    assert len(topic.published) == 2 * 2 * rounds


def write_strict_while_a_commit_is_pending(
    dsn: str,
    a_outboxes: list[tuple[str, str, int]],
    b_outbox: tuple[str, str],
    before_a_writes: Callable[[psycopg.Connection[Any], int], None],
) -> list[str]:
    """Writer A publishes strict events to ``a_outboxes`` ((schema, table, account) each, in that
    order), calling ``before_a_writes(conn, i)`` before the i-th, and leaves its transaction open.
    Writer B then publishes account 2 to ``b_outbox`` and commits in a thread, while A waits up
    to a second for B either to commit or to wait on A's lock; then A commits. Returns the
    writers in commit order, the order guarantee 5 says the relay must follow.
    """
    b_schema, b_table = b_outbox
    topic = account_topic(strict_sequence=True)
    committed: list[str] = []
    with psycopg.connect(dsn) as conn_a, psycopg.connect(dsn, autocommit=True) as observer:
        for i, (schema, table, account) in enumerate(a_outboxes):
            before_a_writes(conn_a, i)
            bound = bind(topic, persister(conn_a, schema=schema, table=table))
            bound.publish(AccountChanged(account, "A"))

        b_started = threading.Event()
        b_pid: list[int] = []

        def writer_b() -> None:
            with psycopg.connect(dsn) as conn_b:
                b_pid.append(conn_b.info.backend_pid)
                bind(topic, persister(conn_b, schema=b_schema, table=b_table)).publish(
                    AccountChanged(2, "B")
                )
                b_started.set()
                conn_b.commit()
                committed.append("B")

        worker = Worker(writer_b, "writer-B")
        assert b_started.wait(5)
        b_waits = False
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not committed and not b_waits:
            b_waits = conn_a.info.backend_pid in blocking_pids(observer, b_pid[0])
            time.sleep(0.01)
        b_first = bool(committed)  # B's commit completed while A's transaction was open
        assert b_first or b_waits, "B neither committed nor waited for A within 1 s"
        conn_a.commit()
        worker.join(10)
    return ["B", "A"] if b_first else ["A", "B"]


def test_strict_sequence_g5_keys_written_after_set_constraints_immediate_are_locked(
    pg_dsn: str, pg_schema: str, pg_store: PostgresStore
) -> None:
    """A runs SET CONSTRAINTS ALL IMMEDIATE, writes acct-1 then acct-2 and stays open; B writes
    acct-2 and commits. B must wait for A, and acct-2 go out in commit order."""

    def immediate(conn: psycopg.Connection[Any], i: int) -> None:
        if i == 0:
            conn.execute("SET CONSTRAINTS ALL IMMEDIATE")

    commit_order = write_strict_while_a_commit_is_pending(
        pg_dsn,
        [(pg_schema, "outbox", 1), (pg_schema, "outbox", 2)],
        (pg_schema, "outbox"),
        immediate,
    )
    topic = account_topic(strict_sequence=True)
    drain(relay_for(pg_store, topic))
    assert per_account(topic)[2] == commit_order


def test_strict_sequence_g5_keys_written_after_constraints_went_immediate_and_back_are_locked(
    pg_dsn: str, pg_schema: str, pg_store: PostgresStore
) -> None:
    """Django's ``check_constraints()`` runs SET CONSTRAINTS ALL IMMEDIATE then DEFERRED, which
    fires the outbox trigger of the rows written so far. A writes acct-1, checks constraints,
    writes acct-2 and commits; an application trigger of its own makes the commit take a while
    after acct-2's position was drawn. B writes acct-2 and commits meanwhile: it must wait for A
    to commit, and acct-2 go out in commit order."""
    s = pg_schema
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE TABLE "{s}".audit (id integer)')
        conn.execute(
            f'CREATE FUNCTION "{s}".slow_audit() RETURNS trigger LANGUAGE plpgsql'
            " AS $$ BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$"
        )
        conn.execute(
            f'CREATE CONSTRAINT TRIGGER slow_audit AFTER INSERT ON "{s}".audit'
            f' DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION "{s}".slow_audit()'
        )
    topic = account_topic(strict_sequence=True)
    done: list[str] = []
    with psycopg.connect(pg_dsn) as conn_a, psycopg.connect(pg_dsn, autocommit=True) as observer:
        bind(topic, persister(conn_a, schema=s)).publish(AccountChanged(1, "A"))
        conn_a.execute("SET CONSTRAINTS ALL IMMEDIATE")
        conn_a.execute("SET CONSTRAINTS ALL DEFERRED")
        bind(topic, persister(conn_a, schema=s)).publish(AccountChanged(2, "A"))
        conn_a.execute(f'INSERT INTO "{s}".audit VALUES (1)')  # its trigger fires after ours
        a_pid = conn_a.info.backend_pid

        def commit_a() -> None:
            conn_a.commit()
            done.append("A")

        a_worker = Worker(commit_a, "writer-A")
        wait_until(
            lambda: (
                observer.execute(
                    "SELECT wait_event FROM pg_stat_activity WHERE pid = %s", [a_pid]
                ).fetchone()
                == ("PgSleep",)
            ),
            what="A's commit reaches the application's slow trigger",
        )
        with psycopg.connect(pg_dsn) as conn_b:
            bind(topic, persister(conn_b, schema=s)).publish(AccountChanged(2, "B"))
            b_pid = conn_b.info.backend_pid

            def commit_b() -> None:
                conn_b.commit()
                done.append("B")

            b_worker = Worker(commit_b, "writer-B")
            wait_until(
                lambda: bool(done) or a_pid in blocking_pids(observer, b_pid),
                what="B commits or waits for A",
            )
            a_worker.join(10)
            b_worker.join(10)
    drain(relay_for(pg_store, topic))
    assert per_account(topic)[2] == done


def test_strict_sequence_g5_outboxes_whose_names_run_together_each_take_their_locks(
    pg_dsn: str, pg_pool: ConnectionPool[Any], pg_schema: str
) -> None:
    """Schema ``X_b`` table ``c`` and schema ``X`` table ``b_c`` read the same when joined with
    an underscore; a transaction writing strict rows to both must still lock each one's keys."""
    schemas = [f"{pg_schema}_b", pg_schema]
    outboxes = [(schemas[0], "c"), (schemas[1], "b_c")]
    stores = [PostgresStore(pg_pool, schema=s, table=t) for s, t in outboxes]
    try:
        for store in stores:
            store.migrate()

        def immediate(conn: psycopg.Connection[Any], i: int) -> None:
            if i == 0:
                conn.execute("SET CONSTRAINTS ALL IMMEDIATE")

        commit_order = write_strict_while_a_commit_is_pending(
            pg_dsn, [(*outboxes[0], 1), (*outboxes[1], 2)], outboxes[1], immediate
        )
        topic = account_topic(strict_sequence=True)
        drain(relay_for(stores[1], topic))
        assert per_account(topic)[2] == commit_order
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schemas[0]}" CASCADE')


# -- guarantee 3: poison policies (block holds only its key; park goes on) ----------------------


def test_poison_block_g3_a_blocked_message_holds_only_its_key_until_replayed_or_purged(
    pg_dsn: str,
    pg_schema: str,
    pg_pool: ConnectionPool[Any],
    clocked_store: PostgresStore,
    clock: FakeClock,
) -> None:
    store = clocked_store
    topic = account_topic(fail=FailStates("1b", "2c"))
    ann, bob = functools.partial(AccountChanged, 1), functools.partial(AccountChanged, 2)
    publish_committed(pg_pool, pg_schema, topic, ann("1a"), ann("1b"))
    publish_committed(pg_pool, pg_schema, topic, ann("1c"), bob("2a"))
    relay = relay_for(store, topic, retry=FAST_RETRY, poison="block")
    drain(relay, clock)
    publish_committed(pg_pool, pg_schema, topic, bob("2b"), ann("1d"))
    drain(relay, clock)
    assert per_account(topic) == {1: ["1a"], 2: ["2a", "2b"]}

    [dead] = store.dead_letters()
    assert (dead.state, dead.message.attempts) == ("blocked", 3)
    assert dead.message.ordering_key == "acct-1"
    assert "destination refused 1b" in dead.error
    assert JsonCodec(AccountChanged).decode(dead.message.data) == ann("1b")
    [backlog] = store.backlog()
    assert (backlog.topic, backlog.pending, backlog.dead) == ("accounts", 3, 1)
    assert backlog.oldest_pending_age > 0
    assert relay.totals["dead"] == 1

    topic.fail = FailStates("2c")  # the destination takes 1b now; the operator replays it
    assert store.replay_dead_letters([dead.message.id]) == 1
    drain(relay, clock)
    assert per_account(topic) == {1: ["1a", "1b", "1c", "1d"], 2: ["2a", "2b"]}
    assert store.backlog() == []

    [poison] = publish_committed(pg_pool, pg_schema, topic, bob("2c"))
    publish_committed(pg_pool, pg_schema, topic, bob("2d"))
    drain(relay, clock)
    assert [(d.state, d.message.id) for d in store.dead_letters()] == [("blocked", poison)]
    assert store.purge_dead_letters([poison]) == 1  # gone for good: its key goes on
    drain(relay, clock)
    assert per_account(topic)[2] == ["2a", "2b", "2d"]
    assert store.dead_letters() == []
    assert outbox_rows(pg_dsn, pg_schema) == 0


def test_poison_block_g10_a_blocked_key_does_not_starve_the_keys_that_sort_before_it(
    pg_schema: str, pg_pool: ConnectionPool[Any], clocked_store: PostgresStore, clock: FakeClock
) -> None:
    topic = account_topic(fail=FailStates("9-poison"))
    relay = relay_for(clocked_store, topic, retry=RetryPolicy(max_attempts=1), poison="block")
    publish_committed(
        pg_pool, pg_schema, topic, AccountChanged(1, "1a"), AccountChanged(9, "9-poison")
    )
    drain(relay, clock)  # acct-9 is blocked now
    for state in ("1b", "1c", "1d"):
        publish_committed(pg_pool, pg_schema, topic, AccountChanged(1, state))
        drain(relay, clock)
    assert per_account(topic) == {1: ["1a", "1b", "1c", "1d"]}


def test_poison_park_g3_a_parked_message_lets_its_key_go_on_and_can_be_replayed_or_purged(
    pg_dsn: str,
    pg_schema: str,
    pg_pool: ConnectionPool[Any],
    clocked_store: PostgresStore,
    clock: FakeClock,
) -> None:
    store = clocked_store
    topic = account_topic(fail=FailStates("1b", "2b"))
    ids = publish_committed(
        pg_pool,
        pg_schema,
        topic,
        *(AccountChanged(a, s) for a, s in [(1, "1a"), (1, "1b"), (1, "1c"), (2, "2a"), (2, "2b")]),
    )
    relay = relay_for(store, topic, retry=FAST_RETRY, poison="park")
    drain(relay, clock)
    assert per_account(topic) == {1: ["1a", "1c"], 2: ["2a"]}
    parked = store.dead_letters("accounts")
    assert [(d.state, d.message.id, d.message.attempts) for d in parked] == [
        ("parked", ids[1], 3),
        ("parked", ids[4], 3),
    ]
    assert store.dead_letters("another-topic") == []
    [backlog] = store.backlog()
    assert (backlog.topic, backlog.pending, backlog.dead) == ("accounts", 0, 2)

    topic.fail = None
    assert store.replay_dead_letters([ids[1]]) == 1  # comes back with its id ...
    assert store.purge_dead_letters([ids[4]]) == 1  # ... the other is gone for good
    assert store.replay_dead_letters([ids[4]]) == 0
    drain(relay, clock)
    assert per_account(topic) == {1: ["1a", "1c", "1b"], 2: ["2a"]}
    assert topic.outbox_ids()[-1] == ids[1]
    assert store.dead_letters() == []
    assert store.backlog() == []
    assert outbox_rows(pg_dsn, pg_schema) == 0


# -- guarantee 9 (and 8): bad input ------------------------------------------------------------

HOSTILE_NAMES = ['outbox"; DROP TABLE victims; --', "a.b", "", "out box", "a" * 49, "é", "1x"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_bad_input_g9_hostile_schema_and_table_names_are_refused_before_any_sql(
    pg_dsn: str, pg_schema: str, pg_pool: ConnectionPool[Any], pg_store: PostgresStore, name: str
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE TABLE "{pg_schema}".victims (id integer)')
    refused = "not a plain SQL identifier|over the limit"
    with psycopg.connect(pg_dsn) as conn:
        with pytest.raises(InvalidIdentifier, match=refused):
            persister(conn, schema=name)
        with pytest.raises(InvalidIdentifier, match=refused):
            persister(conn, table=name)
        with pytest.raises(InvalidIdentifier, match=refused):
            PostgresStore(pg_pool, schema=name)
        with pytest.raises(InvalidIdentifier, match=refused):
            PostgresStore(pg_pool, table=name)
        with pytest.raises(InvalidIdentifier, match=refused):
            migrate(conn, schema=name)
        with pytest.raises(InvalidIdentifier, match=refused):
            migrate(conn, table=name)
        assert conn.info.transaction_status == TransactionStatus.IDLE  # nothing was sent

    async def async_store() -> None:
        async with AsyncConnectionPool(pg_dsn, open=False, min_size=1, max_size=1) as pool:
            with pytest.raises(InvalidIdentifier, match=refused):
                AsyncPostgresStore(pool, schema=name)
            with pytest.raises(InvalidIdentifier, match=refused):
                AsyncPostgresStore(pool, table=name)

    asyncio.run(async_store())
    with psycopg.connect(pg_dsn, autocommit=True) as admin:
        assert admin.execute(f'SELECT count(*) FROM "{pg_schema}".victims').fetchone() == (0,)


def test_fidelity_g8_nul_and_every_byte_value_round_trip_through_a_relay(
    pg_pool: ConnectionPool[Any], pg_schema: str, pg_store: PostgresStore
) -> None:
    topic: InMemoryTopic[bytes] = InMemoryTopic("blobs", BytesCodec())
    payloads = [
        bytes(range(256)),
        b"\x00" * 10 + b"NUL in the middle \x00 and invalid UTF-8 \xc3\x28 \xff\xfe",
        b"",
        random.Random(7).randbytes(256 * 1024),
    ]
    attributes = {"kind": "binary", "ünïcode": "välue ✓ 🎉", "quote": "'\"\\"}
    with pg_pool.connection() as conn, conn.transaction():
        bound = bind(topic, persister(conn, schema=pg_schema))
        ids = [bound.publish(p, attributes=attributes) for p in payloads]
    drain(relay_for(pg_store, topic))
    assert [p.data for p in topic.published] == payloads  # byte for byte, in write order
    assert topic.outbox_ids() == ids
    for received in topic.published:
        assert {k: received.attributes[k] for k in attributes} == attributes


def test_bad_input_g9_publish_on_an_autocommit_connection_outside_a_transaction_is_refused(
    pg_dsn: str, pg_schema: str, pg_store: PostgresStore
) -> None:
    topic = account_topic()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        with pytest.raises(NotInTransaction, match="autocommit mode outside a transaction"):
            bind(topic, persister(conn, schema=pg_schema)).publish(AccountChanged(1, "lost"))
        assert outbox_rows(pg_dsn, pg_schema) == 0
        with conn.transaction():
            outbox_id = bind(topic, persister(conn, schema=pg_schema)).publish(
                AccountChanged(1, "kept")
            )
            assert outbox_rows(pg_dsn, pg_schema) == 0  # not committed on its own
        with pytest.raises(NotInTransaction):
            bind(topic, persister(conn, schema=pg_schema)).publish(AccountChanged(1, "lost"))
    drain(relay_for(pg_store, topic))
    assert topic.outbox_ids() == [outbox_id]
    assert states(topic) == [(1, "kept")]


SURROGATE_KEY = "\ud800"


def _event_key(message: dict[str, Any]) -> str:
    key: str = message["key"]
    return SURROGATE_KEY if key == "lone-surrogate" else key


@pytest.mark.parametrize(
    ("message", "attributes", "error"),
    [
        pytest.param({"key": "k", "blob": "x" * 3000}, None, MessageTooLarge, id="oversize"),
        pytest.param({"key": ""}, None, InvalidOrderingKey, id="empty-key"),
        pytest.param({"key": "a\x00b"}, None, InvalidOrderingKey, id="nul-key"),
        pytest.param({"key": "k" * 1025}, None, InvalidOrderingKey, id="long-key"),
        pytest.param({"key": 42}, None, InvalidOrderingKey, id="int-key"),
        pytest.param({"no-key": 1}, None, InvalidOrderingKey, id="key-function-fails"),
        pytest.param({"key": "k", "when": object()}, None, EncodeError, id="unencodable"),
        pytest.param({"key": "k"}, {"n": "a\x00"}, InvalidAttributes, id="nul-attribute"),
        pytest.param(
            {"key": "lone-surrogate"},
            None,
            InvalidOrderingKey,
            id="surrogate-key",
        ),
        pytest.param(
            {"key": "k"},
            {"a": "\ud800"},
            InvalidAttributes,
            id="surrogate-attribute",
        ),
    ],
)
def test_bad_input_g9_is_refused_in_publish_and_the_callers_transaction_commits_its_other_work(
    pg_dsn: str,
    pg_schema: str,
    pg_store: PostgresStore,
    accounts: str,
    message: dict[str, Any],
    attributes: dict[str, str] | None,
    error: type[PublishError],
) -> None:
    topic: InMemoryTopic[dict[str, Any]] = InMemoryTopic(
        "events", JsonCodec(), ordering_key=_event_key, max_message_bytes=2000
    )
    with psycopg.connect(pg_dsn) as conn:
        conn.execute(f"UPDATE {accounts} SET state = 'updated' WHERE id = 1")
        bound = bind(topic, persister(conn, schema=pg_schema))
        with pytest.raises(error):
            bound.publish(message, attributes=attributes)
        assert conn.info.transaction_status == TransactionStatus.INTRANS  # not aborted
        good_id = bound.publish({"key": "k", "ok": True})
        conn.commit()
    assert account_rows(pg_dsn, pg_schema) == [(1, "updated")]
    drain(relay_for(pg_store, topic))
    assert topic.outbox_ids() == [good_id]
    assert topic.messages() == [{"key": "k", "ok": True}]


# -- persisters: each writes in the caller's transaction ---------------------------------------


@attrs.frozen
class WriteContext:
    dsn: str
    url: URL
    schema: str
    pool: ConnectionPool[Any]
    topic: InMemoryTopic[AccountChanged]
    probe: Callable[[], None]  # called inside the transaction, after publish

    @property
    def insert(self) -> str:
        return f"INSERT INTO {accounts_table(self.schema)} (id, state) VALUES (%s, %s)"

    @property
    def sa_insert(self) -> TextClause:
        return text(f"INSERT INTO {accounts_table(self.schema)} (id, state) VALUES (:id, :state)")


def sqlalchemy_url(dsn: str, drivername: str = "postgresql+psycopg") -> URL:
    """The SQLAlchemy URL of a libpq connection string."""
    params = {k: str(v) for k, v in conninfo_to_dict(dsn).items() if v is not None}
    port = params.pop("port", None)
    return URL.create(
        drivername,
        username=params.pop("user", None),
        password=params.pop("password", None),
        host=params.pop("host", None),
        port=int(port) if port else None,
        database=params.pop("dbname", None),
        query=params,
    )


def write_psycopg_pool_connection(ctx: WriteContext, event: AccountChanged, commit: bool) -> str:
    with ctx.pool.connection() as conn:
        conn.execute(ctx.insert, [event.account_id, event.state])
        outbox_id: str = bind(ctx.topic, persister(conn, schema=ctx.schema)).publish(event)
        ctx.probe()
        if commit:
            conn.commit()
        else:
            conn.rollback()
    return outbox_id


def write_psycopg_async_pool(ctx: WriteContext, event: AccountChanged, commit: bool) -> str:
    async def write() -> str:
        async with (
            AsyncConnectionPool(ctx.dsn, open=False, min_size=1, max_size=1) as pool,
            pool.connection() as conn,
        ):
            await conn.execute(ctx.insert, [event.account_id, event.state])
            bound = bind(ctx.topic, persister(conn, schema=ctx.schema))
            outbox_id = await bound.publish(event)
            ctx.probe()
            await (conn.commit() if commit else conn.rollback())
            return outbox_id

    return asyncio.run(write())


def write_psycopg_async_connection(ctx: WriteContext, event: AccountChanged, commit: bool) -> str:
    async def write() -> str:
        async with await psycopg.AsyncConnection.connect(ctx.dsn) as conn:
            await conn.execute(ctx.insert, [event.account_id, event.state])
            outbox_id = await bind(ctx.topic, persister(conn, schema=ctx.schema)).publish(event)
            ctx.probe()
            await (conn.commit() if commit else conn.rollback())
            return outbox_id

    return asyncio.run(write())


def write_sqlalchemy_session(ctx: WriteContext, event: AccountChanged, commit: bool) -> str:
    engine = create_engine(ctx.url)
    try:
        with Session(engine) as session:
            session.execute(ctx.sa_insert, {"id": event.account_id, "state": event.state})
            bound = bind(ctx.topic, sqlalchemy_persister(session, schema=ctx.schema))
            outbox_id = bound.publish(event)
            ctx.probe()
            if commit:
                session.commit()
            else:
                session.rollback()
            return outbox_id
    finally:
        engine.dispose()


def write_sqlalchemy_connection(ctx: WriteContext, event: AccountChanged, commit: bool) -> str:
    engine = create_engine(ctx.url)
    try:
        with engine.connect() as connection:
            connection.execute(ctx.sa_insert, {"id": event.account_id, "state": event.state})
            bound = bind(ctx.topic, sqlalchemy_persister(connection, schema=ctx.schema))
            outbox_id = bound.publish(event)
            ctx.probe()
            if commit:
                connection.commit()
            else:
                connection.rollback()
            return outbox_id
    finally:
        engine.dispose()


def write_sqlalchemy_async_session(ctx: WriteContext, event: AccountChanged, commit: bool) -> str:
    async def write() -> str:
        engine = create_async_engine(ctx.url)
        try:
            async with AsyncSession(engine) as session:
                await session.execute(ctx.sa_insert, {"id": event.account_id, "state": event.state})
                bound = bind(ctx.topic, sqlalchemy_persister(session, schema=ctx.schema))
                outbox_id = await bound.publish(event)
                ctx.probe()
                await (session.commit() if commit else session.rollback())
                return outbox_id
        finally:
            await engine.dispose()

    return asyncio.run(write())


def write_sqlalchemy_async_connection(
    ctx: WriteContext, event: AccountChanged, commit: bool
) -> str:
    async def write() -> str:
        engine = create_async_engine(ctx.url)
        try:
            async with engine.connect() as connection:
                params = {"id": event.account_id, "state": event.state}
                await connection.execute(ctx.sa_insert, params)
                bound = bind(ctx.topic, sqlalchemy_persister(connection, schema=ctx.schema))
                outbox_id = await bound.publish(event)
                ctx.probe()
                await (connection.commit() if commit else connection.rollback())
                return outbox_id
        finally:
            await engine.dispose()

    return asyncio.run(write())


WRITERS: dict[str, Callable[[WriteContext, AccountChanged, bool], str]] = {
    "psycopg-pool-connection": write_psycopg_pool_connection,
    "psycopg-async-pool-connection": write_psycopg_async_pool,
    "psycopg-async-connection": write_psycopg_async_connection,
    "sqlalchemy-session": write_sqlalchemy_session,
    "sqlalchemy-connection": write_sqlalchemy_connection,
    "sqlalchemy-async-session": write_sqlalchemy_async_session,
    "sqlalchemy-async-connection": write_sqlalchemy_async_connection,
}


@pytest.mark.parametrize("kind", list(WRITERS))
def test_atomic_g1_each_persister_writes_in_the_callers_transaction(
    pg_dsn: str,
    pg_schema: str,
    pg_pool: ConnectionPool[Any],
    pg_store: PostgresStore,
    accounts: str,
    kind: str,
) -> None:
    topic = account_topic()
    relay = relay_for(pg_store, topic)

    def invisible_until_commit() -> None:
        assert outbox_rows(pg_dsn, pg_schema) == 0
        assert relay.process_messages().checked_out == 0

    ctx = WriteContext(
        pg_dsn, sqlalchemy_url(pg_dsn), pg_schema, pg_pool, topic, invisible_until_commit
    )
    write = WRITERS[kind]
    write(ctx, AccountChanged(2, "rolled back"), False)
    assert account_rows(pg_dsn, pg_schema) == [(1, "opened")]
    assert outbox_rows(pg_dsn, pg_schema) == 0
    outbox_id = write(ctx, AccountChanged(3, "committed"), True)
    assert account_rows(pg_dsn, pg_schema) == [(1, "opened"), (3, "committed")]
    drain(relay)
    assert topic.outbox_ids() == [outbox_id]
    assert states(topic) == [(3, "committed")]


# -- the asyncio relay over AsyncPostgresStore -------------------------------------------------


async def wait_until_async(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.002)


def test_async_relay_g3_orders_each_key_polls_as_a_task_and_drains_on_stop(
    pg_dsn: str, pg_schema: str
) -> None:
    topic = account_topic(delay=0.002)

    async def scenario() -> None:
        async with AsyncConnectionPool(pg_dsn, open=False, min_size=1, max_size=4) as pool:
            store = AsyncPostgresStore(pool, schema=pg_schema, lease_duration=30)
            await store.migrate()

            async def publish(*events: AccountChanged) -> None:
                async with pool.connection() as conn, conn.transaction():
                    bound = bind(topic, persister(conn, schema=pg_schema))
                    for event in events:
                        await bound.publish(event)

            relay = AsyncRelay(store, poll_interval=30.0, publish_timeout=5.0)
            relay.register_topic(topic)
            # one round at a time: each key keeps its write order across small batches
            await publish(*(AccountChanged(i % 3, f"{i % 3}:{i}") for i in range(15)))
            await publish(*(AccountChanged(i % 3, f"{i % 3}:{i}") for i in range(15, 21)))
            for _ in range(20):
                if (await relay.process_messages(4)).checked_out == 0:
                    break
            expected = {k: [f"{k}:{i}" for i in range(21) if i % 3 == k] for k in range(3)}
            assert per_account(topic) == expected

            # polling as a task: it publishes what commits while it runs
            task = asyncio.create_task(relay.poll_for_messages(7))
            await publish(AccountChanged(5, "woken"))
            await wait_until_async(lambda: (5, "woken") in states(topic), timeout=5.0)
            assert relay.is_polling

            # a backlog committed just before stop(drain=True) is published before it returns
            await publish(*(AccountChanged(10 + i % 4, f"d{i}") for i in range(120)))
            assert await relay.stop(drain=True, timeout=20)
            await asyncio.wait_for(task, 5)
            assert not relay.is_polling
            assert len(topic.published) == 21 + 1 + 120
            for account, seen in per_account(topic).items():
                if account >= 10:
                    assert seen == [f"d{i}" for i in range(120) if 10 + i % 4 == account]
            assert await store.backlog() == []

    asyncio.run(scenario())


# -- wake-up on commit (LISTEN/NOTIFY) ---------------------------------------------------------


def listening(dsn: str, channel: str) -> bool:
    """Whether some session has LISTENed on ``channel`` (seen from outside, in pg_stat_activity)."""
    listen = sql.SQL("LISTEN {}").format(sql.Identifier(channel))
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query = %s", [listen.as_string(conn)]
        ).fetchone()
        return row is not None and int(row[0]) > 0


def published_count(topic: InMemoryTopic[Any], count: int) -> Callable[[], bool]:
    return lambda: len(topic.published) == count


def test_wakeup_a_relay_polling_every_30s_publishes_a_commit_within_a_second(
    pg_dsn: str, pg_schema: str, pg_pool: ConnectionPool[Any], pg_store: PostgresStore
) -> None:
    topic = account_topic()
    relay = Relay(pg_store, poll_interval=30.0, publish_timeout=5.0)
    relay.register_topic(topic)
    poller = Worker(lambda: relay.poll_for_messages(100), "relay")
    try:
        channel = notify_channel(pg_schema, "outbox")
        wait_until(lambda: listening(pg_dsn, channel), what="the relay's LISTEN")
        for n in range(3):
            time.sleep(0.1)  # past the relay's short re-checks: it sleeps its 30 s now
            with pg_pool.connection() as conn:  # rolled back: no wake-up, nothing published
                bind(topic, persister(conn, schema=pg_schema)).publish(AccountChanged(n, "no"))
                conn.rollback()
            publish_committed(pg_pool, pg_schema, topic, AccountChanged(n, "yes"))
            took = wait_until(published_count(topic, n + 1), timeout=1.0)
            assert took < 1.0
        assert states(topic) == [(0, "yes"), (1, "yes"), (2, "yes")]
        assert relay.totals["store_errors"] == 0
    finally:
        assert relay.stop(timeout=5)
        poller.join(5)
    wait_until(lambda: not listening(pg_dsn, channel), what="the LISTEN connection to close")


def test_wakeup_one_notification_per_transaction_and_topic_however_many_messages(
    pg_dsn: str, pg_schema: str, pg_store: PostgresStore
) -> None:
    accounts_topic, audit = account_topic(), account_topic("audit")
    channel = notify_channel(pg_schema, "outbox")
    with psycopg.connect(pg_dsn, autocommit=True) as listener, psycopg.connect(pg_dsn) as writer:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        for i in range(100):
            bind(accounts_topic, persister(writer, schema=pg_schema)).publish(
                AccountChanged(i % 7, f"s{i}")
            )
        for i in range(3):
            bind(audit, persister(writer, schema=pg_schema)).publish(AccountChanged(i, "audit"))
        writer.commit()
        bind(accounts_topic, persister(writer, schema=pg_schema)).publish(AccountChanged(1, "x"))
        writer.rollback()  # a rolled-back transaction notifies nobody
        writer.execute("SELECT pg_notify(%s, 'sentinel')", [channel])
        writer.commit()
        payloads: list[str] = []
        for notify in listener.notifies(timeout=5.0):  # delivered in commit order
            payloads.append(notify.payload)
            if notify.payload == "sentinel":
                break
    assert Counter(payloads) == Counter({"accounts": 1, "audit": 1, "sentinel": 1})


# -- guarantee 6: exclusive with many relays ---------------------------------------------------


def test_exclusive_g6_relays_checking_out_concurrently_never_share_a_sequence(
    pg_dsn: str, pg_schema: str, pg_pool: ConnectionPool[Any], pg_store: PostgresStore
) -> None:
    topics = {name: account_topic(name) for name in ("accounts", "audit")}
    written: dict[SequenceKey, list[str]] = {}
    for name, topic in topics.items():
        with pg_pool.connection() as conn, conn.transaction():
            bound = bind(topic, persister(conn, schema=pg_schema))
            for n in range(400):
                event = AccountChanged(n % 20, str(n))
                written.setdefault((name, f"acct-{event.account_id}"), []).append(
                    bound.publish(event)
                )
    total = sum(len(ids) for ids in written.values())
    relays = {
        f"relay-{i}": PostgresStore(
            pg_pool, schema=pg_schema, lease_duration=30, owner=f"relay-{i}"
        )
        for i in range(4)
    }
    held: dict[SequenceKey, str] = {}
    clashes: list[str] = []
    handed_out: list[tuple[SequenceKey, str]] = []
    batches = Counter[str]()
    lock = threading.Lock()
    start = threading.Barrier(len(relays))

    def run(store: PostgresStore, owner: str) -> None:
        rng = random.Random(owner)
        start.wait(5)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with lock:
                if len({id_ for _, id_ in handed_out}) >= total:
                    return
            batch = store.checkout_batch(list(topics), rng.randrange(1, 8))
            if batch is None:
                time.sleep(0.001)
                continue
            sequences = set(batch.tokens)
            with lock:
                clashes.extend(f"{owner} got {s} held by {held[s]}" for s in sequences & set(held))
                held.update(dict.fromkeys(sequences, owner))
                handed_out.extend((m.sequence, m.id) for m in batch.messages)
                batches[owner] += 1
            time.sleep(rng.random() * 0.002)  # "publishing"
            for message in batch.messages:
                batch.mark_published(message, f"{owner}-{message.id}")
            with lock:  # before close: once closed, another relay may rightly take them
                for s in sequences:
                    del held[s]
            batch.close()

    workers = [
        Worker(functools.partial(run, store, owner), owner) for owner, store in relays.items()
    ]
    for worker in workers:
        worker.join(20)
    assert clashes == []
    first_deliveries = list(dict.fromkeys(id_ for _, id_ in handed_out))
    assert len(first_deliveries) == total, f"{total - len(first_deliveries)} messages were lost"
    for sequence, expected in written.items():
        in_sequence = [id_ for s, id_ in handed_out if s == sequence]
        assert list(dict.fromkeys(in_sequence)) == expected  # in write order
    assert len(handed_out) == total, "a message was handed out twice"
    assert len(batches) == len(relays)  # every relay took part ...
    assert sum(batches.values()) > 50  # ... in many rounds
    assert pg_store.backlog() == []
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert conn.execute(f'SELECT count(*) FROM "{pg_schema}".outbox_leases').fetchone() == (0,)


def test_exclusive_g6_a_claim_skips_a_lease_another_relay_is_working_on_instead_of_waiting(
    pg_dsn: str, pg_schema: str, pg_pool: ConnectionPool[Any], pg_store: PostgresStore
) -> None:
    """Relay ``crashed`` leased one account's events and died. While another relay holds that
    expired lease's row locked (taking it over, say), relay ``late`` claims: it skips that
    account (SKIP LOCKED), takes the other at once, and gets the first on a later round, with
    nothing handed out twice."""
    topic = account_topic()
    ids = {"acct-0": publish_committed(pg_pool, pg_schema, topic, AccountChanged(0, "0a"))}
    ids["acct-1"] = publish_committed(
        pg_pool, pg_schema, topic, AccountChanged(1, "1a"), AccountChanged(1, "1b")
    )
    clock = FakeClock()
    crashed = PostgresStore(pg_pool, schema=pg_schema, lease_duration=60, owner="crashed")
    abandoned = crashed.checkout_batch(["accounts"], 1)  # one account's, never closed
    assert abandoned is not None
    [held] = {m.ordering_key for m in abandoned.messages}
    assert held is not None
    [other] = set(ids) - {held}
    assert [m.id for m in abandoned.messages] == ids[held][:1]
    clock.advance(120)  # late's clock: crashed's lease has expired
    late = PostgresStore(pg_pool, schema=pg_schema, lease_duration=30, owner="late", clock=clock)
    with psycopg.connect(pg_dsn) as locker:
        locker.execute(
            f'SELECT 1 FROM "{pg_schema}".outbox_leases WHERE ordering_key = %s FOR UPDATE',
            [held],
        )
        started = time.monotonic()
        batch = late.checkout_batch(["accounts"], 10)
        assert time.monotonic() - started < 2.0  # skipped the locked row, did not wait on it
        assert batch is not None
        assert [m.id for m in batch.messages] == ids[other]
        for message in batch.messages:
            batch.mark_published(message, "late")
        batch.close()
        locker.rollback()
    batch = late.checkout_batch(["accounts"], 10)
    assert batch is not None
    assert [m.id for m in batch.messages] == ids[held]  # now taken over from the crashed relay
    for message in batch.messages:
        batch.mark_published(message, "late")
    batch.close()
    assert late.backlog() == []


def test_bad_row_g9_an_unreadable_row_is_parked_and_blocks_nothing(
    pg_dsn: str, pg_schema: str, pg_pool: ConnectionPool[Any], pg_store: PostgresStore
) -> None:
    topic = account_topic()
    with psycopg.connect(pg_dsn) as conn:  # a row written by hand, attributes not an object
        conn.execute(
            f'INSERT INTO "{pg_schema}".outbox (id, position, topic, ordering_key, data, '
            f"attributes, available_at) SELECT n, n, 'accounts', 'acct-1', '\\x00', "
            f"'[1, 2]'::jsonb, now() FROM nextval('\"{pg_schema}\".outbox_message_ids') AS n"
        )
    publish_committed(pg_pool, pg_schema, topic, AccountChanged(1, "after"), AccountChanged(2, "x"))
    relay = relay_for(pg_store, topic)
    drain(relay)
    assert sorted(states(topic)) == [(1, "after"), (2, "x")]
    [dead] = pg_store.dead_letters()
    assert dead.state == "parked"
    assert f"unreadable outbox row {dead.message.id} in {pg_schema}.outbox" in dead.error
    assert "attributes are not an object of strings: [1, 2]" in dead.error


def test_fair_g10_a_claim_takes_only_what_its_batch_needs_and_walks_wider_when_it_must(
    pg_pool: ConnectionPool[Any], pg_schema: str, pg_store: PostgresStore
) -> None:
    topic = account_topic()
    # 40 accounts with 30 events each: four of them fill a batch of 100 (a quarter each)
    publish_committed(
        pg_pool,
        pg_schema,
        topic,
        *[AccountChanged(a, str(n)) for n in range(30) for a in range(40)],
    )
    batch = pg_store.checkout_batch(["accounts"], 100)
    assert batch is not None
    assert len(batch.tokens) == 4  # the rest is left to other relays
    assert len(batch.messages) == 100
    batch.close()

    # 300 more accounts with one event each: a claim must look at ever more of them to fill
    # its batch (16, 32, 64, then 100: never the whole topic at every claim)
    with pg_pool.connection() as conn:
        conn.execute(f'DELETE FROM "{pg_schema}".outbox')
    publish_committed(pg_pool, pg_schema, topic, *[AccountChanged(a, "one") for a in range(300)])
    sizes = []
    while (batch := pg_store.checkout_batch(["accounts"], 100)) is not None:
        sizes.append(len(batch.messages))
        for message in batch.messages:
            batch.mark_published(message, "p")
        batch.close()
    assert sizes[:4] == [16, 32, 64, 100]
    assert sum(sizes) == 300


# -- progress, follow-ups and settled messages --------------------------------------------------


def test_atomic_g1_a_marks_follow_ups_commit_with_it_or_not_at_all(
    pg_dsn: str, pg_schema: str, pg_pool: ConnectionPool[Any], clock: FakeClock
) -> None:
    store = PostgresStore(pg_pool, schema=pg_schema, lease_duration=30, clock=clock)
    store.migrate()
    assert isinstance(store, ProgressStore)
    assert isinstance(
        AsyncPostgresStore(AsyncConnectionPool(pg_dsn, open=False)), AsyncProgressStore
    )
    with pg_pool.connection() as conn, conn.transaction():
        [id_] = [persister(conn, schema=pg_schema)(entry(key="k"))]
    # the close's transaction fails at its commit: after the dead letter and the follow-up were
    # written (a deferred trigger runs at COMMIT, after every statement of the transaction)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            f'CREATE FUNCTION "{pg_schema}".refuse() RETURNS trigger LANGUAGE plpgsql AS '
            "$$ BEGIN RAISE EXCEPTION 'injected: the commit fails'; END $$"
        )
        conn.execute(
            f'CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON "{pg_schema}".'
            "outbox_dead_letters DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
            f'EXECUTE FUNCTION "{pg_schema}".refuse()'
        )

    def park_with_a_follow_up() -> None:
        batch = store.checkout_batch(["orders"], 10)
        assert batch is not None
        [message] = batch.messages
        assert (message.id, message.attempts, message.progress) == (id_, 0, None)
        follow_up = OutboxEntry("dead-events", b"parked", {"of": id_}, "k", strict_sequence=True)
        batch.add_details({id_: MarkDetails(progress='{"sent": 1}', follow_ups=[follow_up])})
        batch.mark_dead(message, "max errors")
        batch.close()

    def follow_ups() -> list[tuple[bytes, dict[str, str]]]:
        batch = store.checkout_batch(["dead-events"], 10)
        if batch is None:
            return []
        with batch:
            return [(m.data, dict(m.attributes)) for m in batch.messages]

    with pytest.raises(psycopg.errors.RaiseException, match="injected"):
        park_with_a_follow_up()
    clock.advance(31)  # the failed close's leases were rolled back with it: they expire
    assert follow_ups() == []
    assert store.dead_letters() == []
    found = store.find_message(id_)
    assert found is not None
    assert (found.state, found.error, found.message.attempts, found.message.progress) == (
        "pending",
        None,
        0,
        None,
    )

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'DROP TRIGGER refuse_at_commit ON "{pg_schema}".outbox_dead_letters')
    park_with_a_follow_up()  # checks that the message came back unchanged, then parks it
    [dead] = store.dead_letters()
    assert (dead.message.id, dead.error, dead.message.progress) == (
        id_,
        "max errors",
        '{"sent": 1}',
    )
    assert follow_ups() == [(b"parked", {"of": id_})]  # a strict row: its position was drawn


def test_a_batch_with_follow_ups_is_closed_on_its_own_not_inside_the_next_read_ahead(
    pg_pool: ConnectionPool[Any], pg_schema: str, pg_store: PostgresStore
) -> None:
    with pg_pool.connection() as conn, conn.transaction():
        write = persister(conn, schema=pg_schema)
        ids = [write(entry(key=key)) for key in ("a", "b", "c", "d")]
    first = pg_store.checkout_batch(["orders"], 1)
    assert first is not None
    second = first.read_ahead(["orders"], 1, (), None)
    assert second is not None
    [message] = first.messages
    first.add_details({message.id: MarkDetails(follow_ups=[entry("dead-events")])})
    first.mark_published(message, "p")
    third = second.read_ahead(["orders"], 1, (), first)  # would close `first` in its round trip
    assert third is not None
    assert not first.closed  # left to the relay, which closes it next
    first.close()
    [plain] = second.messages
    second.mark_published(plain, "p")
    fourth = third.read_ahead(["orders"], 1, (), second)
    assert fourth is not None
    assert second.closed  # without follow-ups: closed inside the read-ahead, as before
    for batch in (third, fourth):
        for message in batch.messages:
            batch.mark_published(message, "p")
        batch.close()
    assert {m.id for b in (first, second, third, fourth) for m in b.messages} == set(ids)
    follow_up = pg_store.checkout_batch(["dead-events"], 10)
    assert follow_up is not None
    assert len(follow_up.messages) == 1
    follow_up.close()
