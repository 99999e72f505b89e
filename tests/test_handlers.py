"""Handler topics (txob's event processor) on every store: the in-memory store, SQLite, and real
PostgreSQL and Redis servers. Each test runs a relay over the store and counts what the handlers
did; the results are read back from the store, never from the relay's memory."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from test_store_contract import MemoryHarness, SQLiteHarness

from outboxbind import JsonCodec, Relay, RetryPolicy, bind
from outboxbind.errors import ConfigurationError
from outboxbind.handlers import (
    HandlerContext,
    HandlerTopic,
    MaxErrorsReached,
    RetryAt,
    Unprocessable,
    handler_results,
)
from outboxbind.relay import AsyncRelay
from outboxbind.store import ProgressStore, Store
from outboxbind.stores.sqlite import SQLiteStore
from outboxbind.testing import FakeClock, StoreHarness
from outboxbind.topics.memory import InMemoryTopic
from outboxbind.tracing import correlation, current_correlation_id

Event = dict[str, Any]

BACKENDS = ["memory", "sqlite", "postgres", "redis"]

CODEC: JsonCodec[Event] = JsonCodec()


@pytest.fixture(params=BACKENDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreHarness]:
    kind = request.param
    if kind == "memory":
        yield MemoryHarness()
    elif kind == "sqlite":
        sqlite = SQLiteHarness(tmp_path / "outbox.db")
        SQLiteStore(sqlite.path).close()
        yield sqlite
    elif kind == "postgres":
        from test_postgres_contract import PostgresHarness

        yield PostgresHarness(
            request.getfixturevalue("pg_pool"), request.getfixturevalue("pg_schema")
        )
    else:
        import redis
        from test_redis_contract import RedisHarness

        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        yield RedisHarness(client, request.getfixturevalue("redis_prefix"))
        client.close()


@pytest.fixture
def store(harness: StoreHarness, clock: FakeClock) -> Store:
    return harness.open_store(clock)


def progress_store(store: Store) -> ProgressStore:
    assert isinstance(store, ProgressStore)
    return store


def write(
    harness: StoreHarness, topic: HandlerTopic[Event], *events: Event, **kw: Any
) -> list[str]:
    return harness.write([topic.make_entry(event, **kw) for event in events])


def relay_for(store: Store, *topics: HandlerTopic[Any], **register: Any) -> Relay:
    relay = Relay(store, publish_timeout=5, poll_interval=0.01)
    for topic in topics:
        relay.register_topic(topic, **register)
    return relay


class Flaky:
    """A handler that fails its first ``failures`` calls, and counts every call."""

    def __init__(self, failures: int = 0, error: Callable[[], Exception] = RuntimeError) -> None:
        self.failures = failures
        self.error = error
        self.calls = 0

    def __call__(self, event: Event, context: HandlerContext) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error()


# -- per-handler results --------------------------------------------------------------------------


def test_a_retry_runs_only_the_handlers_that_have_not_succeeded(
    harness: StoreHarness, store: Store, clock: FakeClock
) -> None:
    a, b = Flaky(), Flaky(failures=2)
    events = HandlerTopic("events", CODEC, {"Invited": {"a": a, "b": b}})
    [id_] = write(harness, events, {"type": "Invited", "user": 1})
    relay = relay_for(store, events, retry=RetryPolicy(initial_delay=1, jitter=0))
    for _ in range(3):
        relay.process_messages()
        clock.advance(10)
    assert (a.calls, b.calls) == (1, 3)
    assert relay.process_messages().checked_out == 0  # settled: nothing left
    assert progress_store(store).find_message(id_) is None  # not kept: deleted


def test_the_results_of_a_failing_message_are_saved_in_the_store(
    harness: StoreHarness, store: Store, clock: FakeClock
) -> None:
    def broken(event: Event, context: HandlerContext) -> None:
        raise ValueError(f"no mailbox for user {event['user']}")

    events = HandlerTopic("events", CODEC, {"Invited": {"email": broken, "log": Flaky()}})
    [id_] = write(harness, events, {"type": "Invited", "user": 7})
    relay_for(store, events).process_messages()
    record = progress_store(store).find_message(id_)
    assert record is not None
    assert (record.state, record.message.attempts) == ("pending", 1)
    results = handler_results(record)
    assert results["log"].succeeded
    assert results["log"].errors == 0
    assert not results["email"].succeeded
    assert results["email"].errors == 1
    assert results["email"].last_error == "ValueError: no mailbox for user 7"
    assert "email" in (record.error or "")


def test_settled_messages_are_kept_with_their_results_and_purged_after_keep_settled(
    harness: StoreHarness, store: Store, clock: FakeClock
) -> None:
    events = HandlerTopic("events", CODEC, {"Invited": {"a": Flaky(), "b": Flaky()}})
    [id_] = write(harness, events, {"type": "Invited"})
    relay = relay_for(store, events, keep_settled=timedelta(hours=1))
    relay.process_messages()
    record = progress_store(store).find_message(id_)
    assert record is not None
    assert record.state == "settled"
    assert {name: r.succeeded for name, r in handler_results(record).items()} == {
        "a": True,
        "b": True,
    }
    assert relay.purge_settled() == 0  # not an hour old yet
    clock.advance(3601)
    assert relay.purge_settled() == 1
    assert progress_store(store).find_message(id_) is None


def test_the_poll_loop_purges_kept_messages_on_its_own(
    harness: StoreHarness, store: Store, clock: FakeClock
) -> None:
    events = HandlerTopic("events", CODEC, {"Invited": {"a": Flaky()}})
    [id_] = write(harness, events, {"type": "Invited"})
    relay = Relay(store, publish_timeout=5, poll_interval=0.01, purge_interval=0.05)
    relay.register_topic(events, keep_settled=timedelta(minutes=5))
    loop = threading.Thread(target=relay.poll_for_messages)
    loop.start()
    try:
        assert _eventually(lambda: _state(store, id_) == "settled")
        clock.advance(301)
        assert _eventually(lambda: _state(store, id_) is None)
    finally:
        relay.stop()
        loop.join(10)


# -- txob's error controls ------------------------------------------------------------------------


def test_unprocessable_stops_one_handler_while_the_others_go_on_then_settles_the_message(
    harness: StoreHarness, store: Store, clock: FakeClock
) -> None:
    bad = Flaky(failures=99, error=lambda: Unprocessable("not an email address"))
    slow = Flaky(failures=1)
    fine = Flaky()
    events = HandlerTopic("events", CODEC, {"Invited": {"email": bad, "crm": slow, "log": fine}})
    [id_, after] = write(harness, events, {"type": "Invited"}, {"type": "Invited"})
    relay = relay_for(store, events, retry=RetryPolicy(initial_delay=1, jitter=0))
    relay.process_messages()  # email: unprocessable, crm: failed, log: ok
    clock.advance(10)
    relay.process_messages()  # crm again (not email, not log): settles as unprocessable
    assert (bad.calls, slow.calls, fine.calls) == (1, 2, 1)
    record = progress_store(store).find_message(id_)
    assert record is not None
    assert record.state == "parked"
    assert "unprocessable" in (record.error or "")
    assert "not an email address" in (record.error or "")
    results = handler_results(record)
    assert results["email"].unprocessable_at is not None
    assert results["crm"].succeeded
    assert results["log"].succeeded
    clock.advance(10)
    relay.process_messages()  # the next message of the topic went on (parked, not blocking)
    assert progress_store(store).find_message(after) is None or _state(store, after) != "pending"


def test_an_event_without_handlers_is_settled_as_unprocessable(
    harness: StoreHarness, store: Store
) -> None:
    events = HandlerTopic("events", CODEC, {"Invited": {"a": Flaky()}})
    [id_] = write(harness, events, {"type": "Deleted"})
    relay_for(store, events).process_messages()
    record = progress_store(store).find_message(id_)
    assert record is not None
    assert record.state == "parked"
    assert "no handlers for events of type 'Deleted'" in (record.error or "")


def test_retry_at_is_honoured_and_the_latest_of_several_wins(
    harness: StoreHarness, store: Store, clock: FakeClock
) -> None:
    def soon(event: Event, context: HandlerContext) -> None:
        if context.attempt == 1:
            raise RetryAt(timedelta(seconds=20), "rate limited")

    def later(event: Event, context: HandlerContext) -> None:
        if context.attempt == 1:
            raise RetryAt(datetime.now(UTC) + timedelta(seconds=60))

    events = HandlerTopic("events", CODEC, {"Invited": {"soon": soon, "later": later}})
    [id_] = write(harness, events, {"type": "Invited"})
    relay = relay_for(store, events, retry=RetryPolicy(initial_delay=1, jitter=0))
    relay.process_messages()
    clock.advance(30)  # past the policy's 1 s and the first handler's 20 s
    assert relay.process_messages().checked_out == 0
    clock.advance(35)
    assert relay.process_messages().successes == 1
    assert progress_store(store).find_message(id_) is None


def test_the_max_errors_hook_writes_a_dead_letter_event_with_the_failure(
    harness: StoreHarness, store: Store, clock: FakeClock
) -> None:
    def broken(event: Event, context: HandlerContext) -> None:
        raise RuntimeError("smtp down")

    failed_events = HandlerTopic("failed-events", CODEC, {"EventFailed": {"a": Flaky()}})
    seen: list[MaxErrorsReached] = []

    def on_max_errors(reached: MaxErrorsReached) -> None:
        seen.append(reached)
        bind(failed_events, reached.outbox).publish(
            {"type": "EventFailed", "event_id": reached.message.id, "reason": reached.error}
        )

    events = HandlerTopic(
        "events", CODEC, {"Invited": {"email": broken}}, on_max_errors=on_max_errors
    )
    [id_] = write(harness, events, {"type": "Invited"}, correlation_id="req-42")
    relay = relay_for(store, events, retry=RetryPolicy(max_attempts=3, initial_delay=1, jitter=0))
    for _ in range(3):
        assert not seen
        relay.process_messages()
        clock.advance(10)
    [reached] = seen
    assert (reached.message.id, reached.event_type, reached.correlation_id) == (
        id_,
        "Invited",
        "req-42",
    )
    assert reached.results["email"].errors == 3
    record = progress_store(store).find_message(id_)
    assert record is not None
    assert record.state == "parked"
    batch = store.checkout_batch(["failed-events"], 10)
    assert batch is not None
    with batch:
        [dead_event] = batch.messages
        body = CODEC.decode(dead_event.data)
        assert body["event_id"] == id_
        assert "smtp down" in body["reason"]
        assert dead_event.attributes["outbox-correlation-id"] == "req-42"  # carried on


def test_a_hook_that_fails_writes_nothing_and_the_message_is_not_given_up_yet(
    harness: StoreHarness, store: Store, clock: FakeClock
) -> None:
    failed_events = HandlerTopic("failed-events", CODEC, {"EventFailed": {"a": Flaky()}})
    calls = Counter[str]()

    def on_max_errors(reached: MaxErrorsReached) -> None:
        calls["hook"] += 1
        bind(failed_events, reached.outbox).publish({"type": "EventFailed"})
        if calls["hook"] == 1:
            raise RuntimeError("alerting is down")

    email = Flaky(failures=99)
    events = HandlerTopic(
        "events", CODEC, {"Invited": {"email": email}}, on_max_errors=on_max_errors
    )
    [id_] = write(harness, events, {"type": "Invited"})
    policy = RetryPolicy(max_attempts=1, initial_delay=1, max_delay=5, jitter=0)
    relay = relay_for(store, events, retry=policy)
    relay.process_messages()  # given up, hook raises: not given up, nothing written
    assert calls["hook"] == 1
    assert _state(store, id_) == "pending"
    assert store.checkout_batch(["failed-events"], 10) is None
    clock.advance(10)
    relay.process_messages()  # tried again; given up again; the hook succeeds: both written
    assert (calls["hook"], email.calls) == (2, 2)
    assert _state(store, id_) == "parked"
    batch = store.checkout_batch(["failed-events"], 10)
    assert batch is not None
    assert len(batch.messages) == 1
    batch.close()


# -- concurrency and order ------------------------------------------------------------------------


def test_the_handlers_of_one_event_run_concurrently(harness: StoreHarness, store: Store) -> None:
    together = threading.Barrier(2, timeout=5)

    def meet(event: Event, context: HandlerContext) -> None:
        together.wait()  # both must be running at once, or this times out

    async def meet_async(event: Event, context: HandlerContext) -> None:
        await asyncio.to_thread(together.wait)

    events = HandlerTopic("events", CODEC, {"Invited": {"a": meet, "b": meet_async}})
    write(harness, events, {"type": "Invited"})
    assert relay_for(store, events).process_messages().successes == 1


def test_events_of_one_key_never_overlap_while_keys_run_concurrently(
    harness: StoreHarness, store: Store
) -> None:
    spans: list[tuple[str, int, float, float]] = []
    lock = threading.Lock()

    async def slow(event: Event, context: HandlerContext) -> None:
        started = time.monotonic()
        await asyncio.sleep(0.02)
        with lock:
            spans.append((event["key"], event["n"], started, time.monotonic()))

    def quick(event: Event, context: HandlerContext) -> None:
        started = time.monotonic()
        time.sleep(0.01)
        with lock:
            spans.append((event["key"], event["n"], started, time.monotonic()))

    events = HandlerTopic(
        "events",
        CODEC,
        {"Step": {"slow": slow, "quick": quick}},
        ordering_key=lambda event: event["key"],
        max_event_concurrency=4,
    )
    write(harness, events, *({"type": "Step", "key": k, "n": n} for n in range(5) for k in "abcd"))
    relay = relay_for(store, events)
    while relay.process_messages(limit=100).checked_out:
        pass
    assert len(spans) == 40
    for key in "abcd":
        mine = sorted((s for s in spans if s[0] == key), key=lambda s: s[2])
        assert [n for _, n, _, _ in mine] == sorted(n for _, n, _, _ in mine)  # in order
        for n in range(4):  # every handler of event n ended before any of event n + 1 began
            ended = max(end for _, m, _, end in mine if m == n)
            began = min(start for _, m, start, _ in mine if m == n + 1)
            assert ended <= began
    first = {k: min(s[2] for s in spans if s[0] == k) for k in "abcd"}
    last = {k: max(s[3] for s in spans if s[0] == k) for k in "abcd"}
    assert max(first.values()) < min(last.values())  # the keys overlapped in time


def test_a_failed_event_holds_back_the_later_events_of_its_key(
    harness: StoreHarness, store: Store, clock: FakeClock
) -> None:
    handled: list[int] = []

    def step(event: Event, context: HandlerContext) -> None:
        if event["n"] == 0 and context.attempt == 1:
            raise RuntimeError("not yet")
        handled.append(event["n"])

    events = HandlerTopic(
        "events", CODEC, {"Step": {"step": step}}, ordering_key=lambda e: e["key"]
    )
    write(harness, events, *({"type": "Step", "key": "k", "n": n} for n in range(3)))
    relay = relay_for(store, events, retry=RetryPolicy(initial_delay=5, jitter=0))
    relay.process_messages()
    assert handled == []
    clock.advance(6)
    relay.process_messages()
    assert handled == [0, 1, 2]


# -- cancellation on shutdown ---------------------------------------------------------------------


def test_stop_cancels_running_handlers_and_saves_what_finished(
    harness: StoreHarness, store: Store
) -> None:
    started = threading.Event()
    token_seen = threading.Event()
    cancelled = threading.Event()
    done = Flaky()

    def waits_for_its_token(event: Event, context: HandlerContext) -> None:
        started.set()
        if context.cancellation.wait(30):
            token_seen.set()
            context.cancellation.raise_if_cancelled()

    async_started = threading.Event()

    async def sleeps(event: Event, context: HandlerContext) -> None:
        async_started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    events = HandlerTopic(
        "events",
        CODEC,
        {"Invited": {"sync": waits_for_its_token, "async": sleeps, "done": done}},
    )
    [id_] = write(harness, events, {"type": "Invited"})
    relay = Relay(store, publish_timeout=14, poll_interval=0.01)
    relay.register_topic(events)
    loop = threading.Thread(target=relay.poll_for_messages)
    loop.start()
    assert started.wait(10)
    assert async_started.wait(10)
    begun = time.monotonic()
    relay.stop(drain=False, timeout=10)
    loop.join(10)
    assert time.monotonic() - begun < 3
    assert token_seen.is_set()
    assert cancelled.is_set()
    record = progress_store(store).find_message(id_)
    assert record is not None
    results = handler_results(record)
    assert results["done"].succeeded  # saved: it will not run again
    assert "cancelled" in (results["async"].last_error or "").lower()
    assert not results["sync"].succeeded


def test_a_draining_stop_that_runs_out_of_time_cancels_the_handlers_and_saves_results(
    harness: StoreHarness, store: Store
) -> None:
    done = Flaky()
    started = threading.Event()

    async def sleeps(event: Event, context: HandlerContext) -> None:
        started.set()
        await asyncio.sleep(30)

    events = HandlerTopic("events", CODEC, {"Invited": {"sleeps": sleeps, "done": done}})
    [id_] = write(harness, events, {"type": "Invited"})
    relay = Relay(store, publish_timeout=14, poll_interval=0.01)
    relay.register_topic(events)
    loop = threading.Thread(target=relay.poll_for_messages)
    loop.start()
    assert started.wait(10)
    begun = time.monotonic()
    assert relay.stop(timeout=1.0) is False  # drain first: it cannot, within a second
    loop.join(10)
    assert 1.0 <= time.monotonic() - begun < 3
    record = progress_store(store).find_message(id_)
    assert record is not None
    results = handler_results(record)
    assert results["done"].succeeded
    assert "cancelled" in (results["sleeps"].last_error or "").lower()


def test_the_asyncio_relay_cancels_async_handlers_on_stop(
    harness: StoreHarness, store: Store
) -> None:
    done = Flaky()

    async def sleeps(event: Event, context: HandlerContext) -> None:
        await asyncio.sleep(30)

    events = HandlerTopic("events", CODEC, {"Invited": {"sleeps": sleeps, "done": done}})
    [id_] = write(harness, events, {"type": "Invited"})

    async def main() -> None:
        relay = AsyncRelay(store, publish_timeout=14, poll_interval=0.01)
        relay.register_topic(events)
        task = asyncio.create_task(relay.poll_for_messages())
        while done.calls == 0:
            await asyncio.sleep(0.01)
        await relay.stop(drain=False, timeout=10)
        await asyncio.wait_for(task, 5)

    begun = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - begun < 4
    record = progress_store(store).find_message(id_)
    assert record is not None
    assert handler_results(record)["done"].succeeded


def test_a_handler_past_the_publish_timeout_is_cancelled_and_tried_again(
    harness: StoreHarness, store: Store, clock: FakeClock
) -> None:
    calls = Counter[int]()

    async def slow_once(event: Event, context: HandlerContext) -> None:
        calls[context.attempt] += 1
        if context.attempt == 1:
            await asyncio.sleep(30)

    events = HandlerTopic("events", CODEC, {"Invited": {"slow": slow_once}})
    write(harness, events, {"type": "Invited"})
    relay = Relay(store, publish_timeout=0.5, poll_interval=0.01)
    relay.register_topic(events, retry=RetryPolicy(initial_delay=1, jitter=0))
    begun = time.monotonic()
    assert relay.process_messages().errors == 1
    assert time.monotonic() - begun < 2
    clock.advance(5)
    assert relay.process_messages().successes == 1
    assert calls == {1: 1, 2: 1}


# -- correlation ----------------------------------------------------------------------------------


def test_the_correlation_id_travels_from_publish_to_the_handler_and_on(
    harness: StoreHarness, store: Store
) -> None:
    seen: list[tuple[str | None, str | None]] = []
    downstream = InMemoryTopic[Event]("downstream", JsonCodec())

    def handler(event: Event, context: HandlerContext) -> None:
        seen.append((context.correlation_id, current_correlation_id()))
        entry = downstream.make_entry({"after": event["type"]})
        seen.append((entry.attributes.get("outbox-correlation-id"), None))

    async def async_handler(event: Event, context: HandlerContext) -> None:
        seen.append((context.correlation_id, current_correlation_id()))

    events = HandlerTopic("events", CODEC, {"Invited": {"h": handler, "a": async_handler}})
    write(harness, events, {"type": "Invited"}, correlation_id="req-1")
    with correlation("req-2"):
        write(harness, events, {"type": "Invited"})
    write(harness, events, {"type": "Invited"})
    relay_for(store, events).process_messages()
    assert sorted(seen, key=str) == sorted(
        [
            ("req-1", "req-1"), ("req-1", None), ("req-1", "req-1"),
            ("req-2", "req-2"), ("req-2", None), ("req-2", "req-2"),
            (None, None), (None, None), (None, None),
        ],
        key=str,
    )  # fmt: skip


# -- configuration --------------------------------------------------------------------------------


def test_bad_handler_maps_are_refused_with_what_is_wrong() -> None:
    with pytest.raises(ConfigurationError, match="non-empty mapping"):
        HandlerTopic("events", CODEC, {})
    with pytest.raises(ConfigurationError, match="handler 'a' of 'Invited' is not callable"):
        HandlerTopic("events", CODEC, {"Invited": {"a": "send_email"}})  # type: ignore[dict-item]
    with pytest.raises(ConfigurationError, match="max_handler_concurrency must be >= 1"):
        HandlerTopic("events", CODEC, {"I": {"a": Flaky()}}, max_handler_concurrency=0)
    with pytest.raises(ConfigurationError, match="timezone-aware"):
        RetryAt(datetime(2030, 1, 1))


def test_a_store_that_cannot_keep_progress_is_refused_at_registration() -> None:
    class Bare:
        def checkout_batch(self, topic_names: list[str], limit: int) -> None:
            return None

    events = HandlerTopic("events", CODEC, {"I": {"a": Flaky()}})
    relay = Relay(Bare())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="needs a store that keeps progress"):
        relay.register_topic(events)


def _state(store: Store, id_: str) -> str | None:
    record = progress_store(store).find_message(id_)
    return None if record is None else record.state


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


# -- the command line and txob's backoff ----------------------------------------------------------


def test_outboxbind_show_prints_a_messages_handler_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from outboxbind.cli import main

    harness = SQLiteHarness(tmp_path / "app.db")
    store = SQLiteStore(harness.path)

    def broken(event: Event, context: HandlerContext) -> None:
        raise ConnectionError("smtp down")

    events = HandlerTopic("events", CODEC, {"Invited": {"email": broken, "crm": Flaky()}})
    [id_] = write(harness, events, {"type": "Invited"})
    relay_for(store, events).process_messages()
    store.close()
    url = f"sqlite:///{harness.path}"
    assert main(["show", url, id_]) == 0
    shown = capsys.readouterr().out
    assert f"message {id_}: pending" in shown
    assert "1 failed attempt(s)" in shown
    assert "handler crm: succeeded" in shown
    assert "handler email: not yet succeeded, 1 error(s); last: ConnectionError: smtp down" in shown
    assert main(["show", url, id_, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["state"] == "pending"
    assert data["progress"]["handlers"]["email"]["errors"] == 1
    assert main(["show", url, "999"]) == 1
    assert "no message 999" in capsys.readouterr().out


def test_a_backoff_function_sets_the_retry_delay(
    harness: StoreHarness, store: Store, clock: FakeClock
) -> None:
    email = Flaky(failures=1)
    events = HandlerTopic("events", CODEC, {"Invited": {"email": email}})
    write(harness, events, {"type": "Invited"})
    relay = relay_for(store, events, retry=RetryPolicy(backoff=lambda attempts: 100 * attempts))
    relay.process_messages()
    clock.advance(90)
    assert relay.process_messages().checked_out == 0  # not before 100 s
    clock.advance(20)
    assert relay.process_messages().successes == 1
    assert email.calls == 2


def test_handlers_run_in_the_trace_context_captured_at_publish() -> None:
    from opentelemetry import context, trace

    from outboxbind.stores.memory import InMemoryStore

    seen: list[int] = []

    def handler(event: Event, context_: HandlerContext) -> None:
        seen.append(trace.get_current_span().get_span_context().trace_id)

    async def async_handler(event: Event, context_: HandlerContext) -> None:
        seen.append(trace.get_current_span().get_span_context().trace_id)

    events = HandlerTopic("events", CODEC, {"Invited": {"h": handler, "a": async_handler}})
    store = InMemoryStore()
    publisher = trace.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0xB7AD6B7169203331,
        is_remote=False,
        trace_flags=trace.TraceFlags(0x01),
    )
    token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(publisher)))
    try:
        with store.transaction() as tx:
            bind(events, tx).publish({"type": "Invited"})
    finally:
        context.detach(token)
    relay = Relay(store)
    relay.register_topic(events)
    assert relay.process_messages().successes == 1
    assert seen == [publisher.trace_id] * 2
    assert trace.get_current_span().get_span_context().trace_id == 0  # nothing leaked out


@pytest.mark.parametrize("harness", ["sqlite", "postgres"], indirect=True)
def test_the_hooks_message_is_rolled_back_with_a_failure_that_comes_after_it(
    harness: StoreHarness, store: Store, clock: FakeClock
) -> None:
    """A failure injected in the store after the hook ran (the dead-letter insert raises, in
    the transaction that writes the hook's message first): neither is committed; once the fault
    is gone, both are."""
    failed_events = HandlerTopic("failed-events", CODEC, {"EventFailed": {"a": Flaky()}})

    def on_max_errors(reached: MaxErrorsReached) -> None:
        bind(failed_events, reached.outbox).publish({"type": "EventFailed"})

    email = Flaky(failures=99)
    events = HandlerTopic(
        "events", CODEC, {"Invited": {"email": email}}, on_max_errors=on_max_errors
    )
    [id_] = write(harness, events, {"type": "Invited"})
    relay = relay_for(store, events, retry=RetryPolicy(max_attempts=1))
    fault = _inject_dead_letter_failure(harness)
    try:
        assert relay.process_messages().store_error is not None
        assert _state(store, id_) == "pending"
        record = progress_store(store).find_message(id_)
        assert record is not None
        assert record.message.attempts == 0  # the failure was not recorded either
        clock.advance(3600)  # the failed close released nothing: let its lease run out
        assert store.checkout_batch(["failed-events"], 10) is None
    finally:
        fault()
    assert relay.process_messages().dead == 1
    assert _state(store, id_) == "parked"
    batch = store.checkout_batch(["failed-events"], 10)
    assert batch is not None
    assert len(batch.messages) == 1
    batch.close()


def _inject_dead_letter_failure(harness: StoreHarness) -> Callable[[], None]:
    """Make every insert into the dead letters fail; return what removes the fault."""
    if isinstance(harness, SQLiteHarness):
        import sqlite3

        def run(sql: str) -> None:
            with sqlite3.connect(harness.path) as conn:
                conn.execute(sql)

        run(
            "CREATE TRIGGER injected BEFORE INSERT ON outbox_dead_letters "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
        return lambda: run("DROP TRIGGER injected")
    pool, schema = harness.pool, harness.schema  # type: ignore[attr-defined]
    with pool.connection() as conn:
        conn.execute(
            f"CREATE FUNCTION {schema}.injected() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'injected failure'; END $$"
        )
        conn.execute(
            f"CREATE TRIGGER injected BEFORE INSERT ON {schema}.outbox_dead_letters "
            f"FOR EACH ROW EXECUTE FUNCTION {schema}.injected()"
        )

    def remove() -> None:
        with pool.connection() as conn:
            conn.execute(f"DROP TRIGGER injected ON {schema}.outbox_dead_letters")

    return remove
