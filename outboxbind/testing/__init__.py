"""The store conformance kit: the :mod:`outboxbind.store` contract in executable form.

Subclass :class:`StoreContract` in a test module and give it a ``harness`` fixture that opens
your store over a fresh database; pytest then runs every contract test against it::

    import pytest
    from outboxbind.testing import StoreContract, StoreHarness

    class TestMyStore(StoreContract):
        @pytest.fixture
        def harness(self, tmp_path) -> StoreHarness:
            return MyHarness(tmp_path / "outbox.db")

The expectations are written out by hand in each test, never derived from a reference store,
so no store can pass by agreeing with another. Every built-in store passes this kit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

import attrs

from outboxbind._extras import needs_extra

with needs_extra("testing", __name__):
    import pytest

from outboxbind.errors import LeaseLost
from outboxbind.messages import OutboxEntry, PersistedMessage
from outboxbind.store import (
    DeadLetterAdmin,
    DetailedBatch,
    MarkDetails,
    MessageBatch,
    ProgressStore,
    ReadAheadBatch,
    Store,
)

__all__ = [
    "FakeClock",
    "ProgressContract",
    "ReadAheadContract",
    "StoreContract",
    "StoreHarness",
    "entry",
]

#: Advancing the clock by this much must outlast any lease and any retry delay the kit uses.
LONG_AFTER = 3600.0


class FakeClock:
    """Real time plus an offset that tests advance: ``clock.advance(61)`` jumps a minute on."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward."""
        self.offset += seconds


class StoreHarness(Protocol):
    """What the kit needs from a store under test: a fresh database per test, and a writer."""

    def open_store(self, clock: Callable[[], float]) -> Store:
        """Open a store (as one relay would) over this test's database, reading ``clock``.

        Called more than once in a test to stand for several relays; all see the same data.
        Its lease duration must be shorter than an hour.
        """
        ...

    def write(self, entries: Sequence[OutboxEntry], *, commit: bool = True) -> list[str]:
        """Write ``entries`` with the store's persister in one transaction, in order; commit it
        (or roll it back when ``commit`` is false); return the outbox ids."""
        ...


def entry(
    topic: str = "orders",
    data: bytes = b"{}",
    *,
    key: str | None = None,
    attributes: dict[str, str] | None = None,
    deliver_after: datetime | None = None,
) -> OutboxEntry:
    """A shorthand for an :class:`OutboxEntry` in tests."""
    return OutboxEntry(topic, data, attributes, key, deliver_after)


def _checkout(store: Store, limit: int) -> MessageBatch:
    batch = store.checkout_batch(["orders"], limit)
    assert batch is not None, "expected a batch of messages, the store returned None"
    return batch


def _ids(batch: MessageBatch | None) -> list[str]:
    return [] if batch is None else [m.id for m in batch.messages]


def _by_id(batch: MessageBatch, id_: str) -> PersistedMessage:
    return next(m for m in batch.messages if m.id == id_)


def _read_ahead_batch(store: Store, limit: int) -> ReadAheadBatch:
    batch = _checkout(store, limit)
    assert isinstance(batch, ReadAheadBatch), f"{type(batch).__name__} has no read_ahead()"
    return batch


def _admin(store: Store) -> DeadLetterAdmin:
    if not isinstance(store, DeadLetterAdmin):
        pytest.skip(f"{type(store).__name__} does not implement DeadLetterAdmin")
    return store


class StoreContract:
    """Contract tests for a :class:`~outboxbind.store.Store`; subclass and add ``harness``."""

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock()

    @pytest.fixture
    def store(self, harness: StoreHarness, clock: FakeClock) -> Store:
        return harness.open_store(clock)

    # -- basics -----------------------------------------------------------------------------

    def test_checkout_of_an_empty_outbox_returns_none(self, store: Store) -> None:
        assert store.checkout_batch(["orders"], 10) is None

    def test_checkout_returns_only_the_given_topics(
        self, harness: StoreHarness, store: Store
    ) -> None:
        ids = harness.write([entry("orders"), entry("emails"), entry("orders")])
        with _checkout(store, 10) as batch:
            assert _ids(batch) == [ids[0], ids[2]]
            assert {m.topic for m in batch.messages} == {"orders"}

    def test_rolled_back_writes_are_never_checked_out(
        self, harness: StoreHarness, store: Store
    ) -> None:
        harness.write([entry(data=b"rolled back")], commit=False)
        kept = harness.write([entry(data=b"kept")])
        with _checkout(store, 10) as batch:
            assert _ids(batch) == kept
            assert [m.data for m in batch.messages] == [b"kept"]

    def test_limit_caps_the_batch(self, harness: StoreHarness, store: Store) -> None:
        ids = harness.write([entry(data=str(i).encode()) for i in range(7)])
        with _checkout(store, 3) as batch:
            assert _ids(batch) == ids[:3]

    def test_committed_ids_are_unique_and_never_reused(
        self, harness: StoreHarness, store: Store
    ) -> None:
        first = harness.write([entry(), entry()])
        with _checkout(store, 10) as batch:
            for message in batch.messages:
                batch.mark_published(message, "p")
        second = harness.write([entry()])
        assert len(set(first)) == 2
        assert second[0] not in first

    def test_messages_keep_bytes_attributes_and_metadata(
        self, harness: StoreHarness, store: Store
    ) -> None:
        payload = bytes(range(256)) + b"\x00 NUL inside \x00"
        attributes = {"tenant": "ä-1", "trace": "00-ab-01"}
        before = datetime.now(UTC) - timedelta(seconds=1)
        [id_] = harness.write([entry(data=payload, key="kéy/1", attributes=attributes)])
        with _checkout(store, 10) as batch:
            [message] = batch.messages
        assert message.id == id_
        assert message.data == payload
        assert dict(message.attributes) == attributes
        assert message.ordering_key == "kéy/1"
        assert message.topic == "orders"
        assert message.attempts == 0
        assert before <= message.created_at <= datetime.now(UTC) + timedelta(seconds=1)

    def test_no_ordering_key_comes_back_as_none(self, harness: StoreHarness, store: Store) -> None:
        harness.write([entry()])
        with _checkout(store, 10) as batch:
            assert batch.messages[0].ordering_key is None
            assert dict(batch.messages[0].attributes) == {}

    # -- order ------------------------------------------------------------------------------

    def test_a_topic_without_keys_comes_in_write_order(
        self, harness: StoreHarness, store: Store
    ) -> None:
        ids = harness.write([entry(data=b"1"), entry(data=b"2")])
        ids += harness.write([entry(data=b"3")])
        with _checkout(store, 10) as batch:
            assert _ids(batch) == ids

    def test_each_ordering_key_comes_in_write_order(
        self, harness: StoreHarness, store: Store
    ) -> None:
        keys = ["a", "b", "a", "c", "b", "a"]
        ids = harness.write([entry(key=k, data=str(i).encode()) for i, k in enumerate(keys)])
        with _checkout(store, 10) as batch:
            assert sorted(_ids(batch)) == sorted(ids)
            for key in "abc":
                got = [m.id for m in batch.messages if m.ordering_key == key]
                assert got == [i for i, k in zip(ids, keys, strict=True) if k == key]

    def test_a_batch_takes_a_prefix_of_each_sequence(
        self, harness: StoreHarness, store: Store
    ) -> None:
        ids = harness.write([entry(key="a", data=str(i).encode()) for i in range(5)])
        with _checkout(store, 2) as batch:
            assert _ids(batch) == ids[:2]
            for message in batch.messages:
                batch.mark_published(message, "p")
        with _checkout(store, 10) as batch:
            assert _ids(batch) == ids[2:]

    def test_no_sequence_takes_the_whole_batch_while_others_wait(
        self, harness: StoreHarness, store: Store
    ) -> None:
        for key in "abcd":
            harness.write([entry(key=key, data=f"{key}{i}".encode()) for i in range(50)])
        with _checkout(store, 40) as batch:
            per_key = {k: [m for m in batch.messages if m.ordering_key == k] for k in "abcd"}
            assert {k: len(v) for k, v in per_key.items()} == dict.fromkeys("abcd", 10)
            for key, messages in per_key.items():  # each key's share is its first ten, in order
                assert [m.data for m in messages] == [f"{key}{i}".encode() for i in range(10)]

    def test_a_blocked_sequence_never_starves_the_others(
        self, harness: StoreHarness, store: Store
    ) -> None:
        [z1] = harness.write([entry(key="z")])
        with _checkout(store, 1) as batch:
            batch.mark_failed(_by_id(batch, z1), "poison", None)  # "z" is blocked for good
        for _ in range(3):  # the walk goes past "z" and round to "a" every time
            [a_next] = harness.write([entry(key="a")])
            with _checkout(store, 1) as batch:
                assert _ids(batch) == [a_next]
                batch.mark_published(batch.messages[0], "p")

    def test_a_small_sequence_is_served_beside_a_huge_one(
        self, harness: StoreHarness, store: Store
    ) -> None:
        harness.write([entry(key="big", data=str(i).encode()) for i in range(50)])
        [small] = harness.write([entry(key="small")])
        with _checkout(store, 10) as batch:
            assert small in _ids(batch)
            assert len(batch.messages) > 1

    # -- exclusivity and leases -------------------------------------------------------------

    def test_two_checkouts_never_share_a_sequence(
        self, harness: StoreHarness, clock: FakeClock
    ) -> None:
        first_relay, second_relay = harness.open_store(clock), harness.open_store(clock)
        ids = harness.write([entry(key="a"), entry(key="b"), entry(key="a")])
        first = first_relay.checkout_batch(["orders"], 10)
        assert first is not None
        assert set(_ids(first)) == set(ids)
        assert second_relay.checkout_batch(["orders"], 10) is None
        later = harness.write([entry(key="a"), entry(key="c")])
        second = second_relay.checkout_batch(["orders"], 10)
        assert _ids(second) == [later[1]]  # "a" is still held by the first batch
        first.close()
        assert second is not None
        second.close()

    def test_a_new_message_of_a_leased_sequence_waits(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        [first_id] = harness.write([entry()])
        batch = store.checkout_batch(["orders"], 10)
        assert _ids(batch) == [first_id]
        [later_id] = harness.write([entry()])
        assert harness.open_store(clock).checkout_batch(["orders"], 10) is None
        assert batch is not None
        batch.mark_published(batch.messages[0], "p")
        batch.close()
        with _checkout(store, 10) as next_batch:
            assert _ids(next_batch) == [later_id]

    def test_close_releases_what_was_not_marked(self, harness: StoreHarness, store: Store) -> None:
        ids = harness.write([entry(), entry(), entry()])
        with _checkout(store, 10) as batch:
            batch.mark_published(batch.messages[0], "p")
        with _checkout(store, 10) as batch:
            assert _ids(batch) == ids[1:]
            assert [m.attempts for m in batch.messages] == [0, 0]

    def test_an_expired_lease_can_be_taken_over(
        self, harness: StoreHarness, clock: FakeClock
    ) -> None:
        crashed, survivor = harness.open_store(clock), harness.open_store(clock)
        ids = harness.write([entry(key="a"), entry(key="a")])
        stale = crashed.checkout_batch(["orders"], 10)
        assert _ids(stale) == ids
        clock.advance(LONG_AFTER)
        with _checkout(survivor, 10) as batch:
            assert _ids(batch) == ids

    def test_a_batch_whose_lease_was_taken_over_changes_nothing(
        self, harness: StoreHarness, clock: FakeClock
    ) -> None:
        slow, fast = harness.open_store(clock), harness.open_store(clock)
        ids = harness.write([entry(), entry()])
        stale = slow.checkout_batch(["orders"], 10)
        assert stale is not None
        clock.advance(LONG_AFTER)
        current = fast.checkout_batch(["orders"], 10)
        assert _ids(current) == ids
        stale.mark_published(stale.messages[0], "late ack")
        stale.mark_dead(stale.messages[1], "late failure")
        with pytest.raises(LeaseLost):
            stale.close()
        assert current is not None
        current.close()  # releases without marks: both must still be there, unchanged
        with _checkout(fast, 10) as batch:
            assert _ids(batch) == ids
            assert [m.attempts for m in batch.messages] == [0, 0]

    def test_an_expired_lease_nobody_took_still_acks(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        harness.write([entry()])
        batch = store.checkout_batch(["orders"], 10)
        assert batch is not None
        clock.advance(LONG_AFTER)
        batch.mark_published(batch.messages[0], "p")
        batch.close()
        assert store.checkout_batch(["orders"], 10) is None

    # -- failures, retries and dead letters --------------------------------------------------

    def test_a_failed_message_waits_and_holds_back_its_sequence(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        ids = harness.write([entry(key="a"), entry(key="a"), entry(key="b")])
        with _checkout(store, 10) as batch:
            batch.mark_failed(_by_id(batch, ids[0]), "boom", timedelta(seconds=30))
            batch.mark_published(_by_id(batch, ids[2]), "p")
        assert store.checkout_batch(["orders"], 10) is None  # "a" waits for its head's retry
        harness.write([entry(key="b")])
        with _checkout(store, 10) as batch:
            assert [m.ordering_key for m in batch.messages] == ["b"]  # other keys flow
            batch.mark_published(batch.messages[0], "p")
        clock.advance(31)
        with _checkout(store, 10) as batch:
            assert _ids(batch) == ids[:2]
            assert [m.attempts for m in batch.messages] == [1, 0]

    def test_attempts_accumulate(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        harness.write([entry()])
        for expected in range(3):
            with _checkout(store, 10) as batch:
                assert batch.messages[0].attempts == expected
                batch.mark_failed(batch.messages[0], f"failure {expected}", timedelta(seconds=1))
            clock.advance(2)

    def test_a_blocked_message_holds_its_sequence_until_replayed(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        ids = harness.write([entry(key="a"), entry(key="a")])
        with _checkout(store, 10) as batch:
            batch.mark_failed(_by_id(batch, ids[0]), "poison", None)
        clock.advance(LONG_AFTER)
        assert store.checkout_batch(["orders"], 10) is None
        admin = _admin(store)
        [dead] = admin.dead_letters()
        assert (dead.message.id, dead.state, dead.error) == (ids[0], "blocked", "poison")
        assert admin.replay_dead_letters([ids[0]]) == 1
        assert admin.dead_letters() == []
        with _checkout(store, 10) as batch:
            assert _ids(batch) == ids
            assert batch.messages[0].attempts == 0

    def test_a_parked_message_lets_its_sequence_go_on(
        self, harness: StoreHarness, store: Store
    ) -> None:
        ids = harness.write([entry(key="a", data=b"poison\x00"), entry(key="a")])
        with _checkout(store, 10) as batch:
            batch.mark_dead(_by_id(batch, ids[0]), "unpublishable")
        with _checkout(store, 10) as batch:
            assert _ids(batch) == [ids[1]]
            batch.mark_published(batch.messages[0], "p")
        admin = _admin(store)
        [dead] = admin.dead_letters("orders")
        assert (dead.message.id, dead.state, dead.error) == (ids[0], "parked", "unpublishable")
        assert dead.message.data == b"poison\x00"
        assert dead.message.attempts == 1
        assert admin.dead_letters("emails") == []

    def test_a_replayed_parked_message_comes_back_with_its_id(
        self, harness: StoreHarness, store: Store
    ) -> None:
        [id_] = harness.write([entry(data=b"again")])
        with _checkout(store, 10) as batch:
            batch.mark_dead(batch.messages[0], "down")
        assert store.checkout_batch(["orders"], 10) is None
        assert _admin(store).replay_dead_letters([id_]) == 1
        with _checkout(store, 10) as batch:
            assert _ids(batch) == [id_]
            assert batch.messages[0].data == b"again"
            assert batch.messages[0].attempts == 0

    def test_purged_dead_letters_are_gone(self, harness: StoreHarness, store: Store) -> None:
        ids = harness.write([entry(key="a"), entry(key="b")])
        with _checkout(store, 10) as batch:
            batch.mark_dead(_by_id(batch, ids[0]), "parked")
            batch.mark_failed(_by_id(batch, ids[1]), "blocked", None)
        admin = _admin(store)
        assert {d.state for d in admin.dead_letters()} == {"parked", "blocked"}
        assert admin.purge_dead_letters(ids) == 2
        assert admin.dead_letters() == []
        assert store.checkout_batch(["orders"], 10) is None

    def test_backlog_counts_pending_and_dead(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        ids = harness.write([entry(key="a"), entry(key="b"), entry("emails")])
        with _checkout(store, 10) as batch:
            batch.mark_dead(_by_id(batch, ids[0]), "parked")
        clock.advance(5)
        backlog = {b.topic: b for b in _admin(store).backlog()}
        assert set(backlog) == {"orders", "emails"}
        assert (backlog["orders"].pending, backlog["orders"].dead) == (1, 1)
        assert (backlog["emails"].pending, backlog["emails"].dead) == (1, 0)
        assert backlog["orders"].oldest_pending_age >= 5

    def test_backlog_age_ignores_messages_that_are_not_due_yet(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        harness.write([entry(deliver_after=datetime.now(UTC) + timedelta(hours=1))])
        clock.advance(60)
        [backlog] = _admin(store).backlog()
        assert (backlog.pending, backlog.oldest_pending_age) == (1, 0.0)

    # -- delayed delivery -------------------------------------------------------------------

    def test_a_delayed_message_waits_until_due(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        due = datetime.now(UTC) + timedelta(seconds=60)
        [delayed] = harness.write([entry(key="a", deliver_after=due)])
        [now_id] = harness.write([entry(key="a")])
        with _checkout(store, 10) as batch:
            assert _ids(batch) == [now_id]  # not held back by the delayed one
            batch.mark_published(batch.messages[0], "p")
        assert store.checkout_batch(["orders"], 10) is None
        clock.advance(61)
        with _checkout(store, 10) as batch:
            assert _ids(batch) == [delayed]

    def test_many_delayed_messages_do_not_hide_a_due_one_behind_them(
        self, harness: StoreHarness, store: Store
    ) -> None:
        later = datetime.now(UTC) + timedelta(days=1)
        harness.write([entry(key="a", deliver_after=later) for _ in range(150)])
        [due] = harness.write([entry(key="a")])
        with _checkout(store, 10) as batch:
            assert _ids(batch) == [due]

    def test_a_past_deliver_after_is_due_at_once(self, harness: StoreHarness, store: Store) -> None:
        [id_] = harness.write([entry(deliver_after=datetime.now(UTC) - timedelta(hours=1))])
        with _checkout(store, 10) as batch:
            assert _ids(batch) == [id_]

    # -- the batch object -------------------------------------------------------------------

    def test_marks_after_close_are_refused(self, harness: StoreHarness, store: Store) -> None:
        harness.write([entry()])
        batch = store.checkout_batch(["orders"], 10)
        assert batch is not None
        message = batch.messages[0]
        batch.close()
        batch.close()  # closing twice is harmless
        with pytest.raises(RuntimeError):
            batch.mark_published(message, "p")

    def test_a_message_of_another_batch_is_refused(
        self, harness: StoreHarness, store: Store
    ) -> None:
        harness.write([entry(key="a")])
        with _checkout(store, 10) as batch:
            stranger = PersistedMessage("999999", "orders", b"", None, "zz", datetime.now(UTC), 0)
            with pytest.raises(ValueError, match="not part of this batch"):
                batch.mark_published(stranger, "p")
            same_key = attrs.evolve(batch.messages[0], id="999999")
            with pytest.raises(ValueError, match="not part of this batch"):
                batch.mark_published(same_key, "p")


class ReadAheadContract:
    """Contract tests for stores whose batches can read the next one ahead
    (:class:`~outboxbind.store.ReadAheadBatch`, optional); add it beside
    :class:`StoreContract`: ``class TestMyStore(StoreContract, ReadAheadContract)``."""

    def test_read_ahead_carries_a_sequence_on_after_the_batch_under_its_lease(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        ids = harness.write([entry() for _ in range(9)])
        first = _read_ahead_batch(store, 3)
        assert _ids(first) == ids[:3]
        second = first.read_ahead(["orders"], 3, {("orders", "")}, None)
        assert _ids(second) == ids[3:6]  # continues after the open batch, nothing twice
        assert harness.open_store(clock).checkout_batch(["orders"], 10) is None  # still held
        for message in first.messages:
            first.mark_published(message, "p")
        first.close()  # keeps the lease for the next batch: no LeaseLost
        assert harness.open_store(clock).checkout_batch(["orders"], 10) is None
        assert second is not None
        for message in second.messages:
            second.mark_published(message, "p")
        second.close()
        with _checkout(harness.open_store(clock), 10) as rest:
            assert _ids(rest) == ids[6:]

    def test_read_ahead_does_not_carry_on_a_sequence_it_is_not_told_to(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        ids = harness.write([entry(key="a"), entry(key="a"), entry(key="b"), entry(key="b")])
        first = _read_ahead_batch(store, 1)
        [held] = {m.ordering_key for m in first.messages}
        second = first.read_ahead(["orders"], 10, set(), None)
        assert held not in {m.ordering_key for m in second.messages} if second else True
        first.close()  # ends its lease, as a batch that was not carried on
        if second is not None:
            second.close()
        with _checkout(harness.open_store(clock), 10) as rest:
            assert set(_ids(rest)) == set(ids)  # nothing published, nothing lost

    def test_a_carried_on_batch_whose_lease_was_taken_over_changes_nothing(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        ids = harness.write([entry() for _ in range(4)])
        first = _read_ahead_batch(store, 2)
        second = first.read_ahead(["orders"], 2, {("orders", "")}, None)
        assert _ids(second) == ids[2:]
        clock.advance(LONG_AFTER)
        with _checkout(harness.open_store(clock), 10) as taken:
            assert _ids(taken) == ids
            for batch in (first, second):
                assert batch is not None
                for message in batch.messages:
                    batch.mark_published(message, "late ack")
                with pytest.raises(LeaseLost):
                    batch.close()
        with _checkout(harness.open_store(clock), 10) as again:
            assert _ids(again) == ids  # the fenced-off batches acknowledged nothing

    def test_read_ahead_may_close_the_batch_before_and_its_close_tells_what_it_found(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        ids = harness.write([entry() for _ in range(9)])
        first = _read_ahead_batch(store, 3)
        second = first.read_ahead(["orders"], 3, {("orders", "")}, None)
        assert isinstance(second, ReadAheadBatch)
        for message in first.messages:
            first.mark_published(message, "p")
        third = second.read_ahead(["orders"], 3, {("orders", "")}, first)
        first.close()  # whether the read-ahead closed it or not, its marks are applied once
        assert _ids(third) == ids[6:]
        for batch in (second, third):
            assert batch is not None
            batch.close()  # released: the first batch's three are gone, the rest are back
        with _checkout(harness.open_store(clock), 10) as rest:
            assert _ids(rest) == ids[3:]

    def test_a_batch_closed_by_a_read_ahead_after_its_lease_was_taken_raises_on_close(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        ids = harness.write([entry(key="a"), entry(key="a"), entry(key="b"), entry(key="b")])
        first = _read_ahead_batch(store, 4)
        clock.advance(LONG_AFTER)
        with _checkout(harness.open_store(clock), 10) as taken:  # both keys taken over
            assert set(_ids(taken)) == set(ids)
            for message in first.messages:
                first.mark_published(message, "late ack")
            ahead = first.read_ahead(["orders"], 4, set(), None)
            assert ahead is None  # everything is leased by the batch that took over
        # a store's batch closing another one it read ahead from; here the same batch type
        second = _read_ahead_batch(store, 4)  # after the takeover was released: all four again
        assert set(_ids(second)) == set(ids)
        later = second.read_ahead(["orders"], 4, set(), first)
        with pytest.raises(LeaseLost):
            first.close()  # the read-ahead found its leases gone: nothing it marked applied
        if later is not None:
            later.close()
        second.close()
        with _checkout(harness.open_store(clock), 10) as again:
            assert set(_ids(again)) == set(ids)


def _detailed(batch: MessageBatch) -> DetailedBatch:
    assert isinstance(batch, DetailedBatch), f"{type(batch).__name__} has no add_details()"
    return batch


def _progress_store(store: Store) -> ProgressStore:
    assert isinstance(store, ProgressStore), f"{type(store).__name__} is not a ProgressStore"
    return store


def _topic_ids(store: Store, topic: str) -> list[str]:
    batch = store.checkout_batch([topic], 100)
    if batch is None:
        return []
    with batch:
        return _ids(batch)


class ProgressContract:
    """Contract tests for stores that keep what the relay saves with a message
    (:class:`~outboxbind.store.ProgressStore`: progress, follow-up messages, settled messages),
    which handler topics and ``keep_settled`` need; add it beside :class:`StoreContract`."""

    def test_progress_saved_with_a_failure_comes_back_at_the_next_checkout(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        ids = harness.write([entry(key="a"), entry(key="b")])
        with _checkout(store, 10) as batch:
            _detailed(batch).add_details({ids[0]: MarkDetails(progress='{"send": "done"}')})
            batch.mark_failed(_by_id(batch, ids[0]), "boom", timedelta(seconds=1))
            batch.mark_failed(_by_id(batch, ids[1]), "boom", timedelta(seconds=1))
        clock.advance(2)
        with _checkout(store, 10) as batch:
            assert _by_id(batch, ids[0]).progress == '{"send": "done"}'
            assert _by_id(batch, ids[1]).progress is None  # no details: nothing kept

    def test_later_progress_replaces_earlier_and_none_leaves_it(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        [id_] = harness.write([entry()])
        for progress in ('{"n": 1}', '{"n": 2}', None):
            with _checkout(store, 10) as batch:
                _detailed(batch).add_details({id_: MarkDetails(progress=progress)})
                batch.mark_failed(batch.messages[0], "again", timedelta(seconds=1))
            clock.advance(2)
        with _checkout(store, 10) as batch:
            assert (batch.messages[0].progress, batch.messages[0].attempts) == ('{"n": 2}', 3)

    def test_details_without_a_mark_change_nothing(
        self, harness: StoreHarness, store: Store
    ) -> None:
        [id_] = harness.write([entry()])
        with _checkout(store, 10) as batch:
            _detailed(batch).add_details({id_: MarkDetails(progress="{}", follow_ups=[entry("x")])})
        with _checkout(store, 10) as batch:
            assert (batch.messages[0].progress, batch.messages[0].attempts) == (None, 0)
        assert _topic_ids(store, "x") == []

    def test_details_for_a_message_of_another_batch_are_refused(
        self, harness: StoreHarness, store: Store
    ) -> None:
        harness.write([entry()])
        with _checkout(store, 10) as batch, pytest.raises(ValueError, match="not part of"):
            _detailed(batch).add_details({"999999": MarkDetails(progress="{}")})

    def test_progress_goes_with_a_dead_letter_and_is_kept_through_a_replay(
        self, harness: StoreHarness, store: Store
    ) -> None:
        ids = harness.write([entry(key="a"), entry(key="b")])
        with _checkout(store, 10) as batch:
            _detailed(batch).add_details(
                {ids[0]: MarkDetails(progress='{"p": 1}'), ids[1]: MarkDetails(progress='{"b": 1}')}
            )
            batch.mark_dead(_by_id(batch, ids[0]), "parked")
            batch.mark_failed(_by_id(batch, ids[1]), "blocked", None)
        admin = _admin(store)
        dead = {d.message.id: d for d in admin.dead_letters()}
        assert dead[ids[0]].message.progress == '{"p": 1}'
        assert dead[ids[1]].message.progress == '{"b": 1}'
        found = _progress_store(store).find_message(ids[0])
        assert found is not None
        assert (found.state, found.error, found.message.progress) == (
            "parked",
            "parked",
            '{"p": 1}',
        )
        blocked = _progress_store(store).find_message(ids[1])
        assert blocked is not None
        assert blocked.state == "blocked"
        assert admin.replay_dead_letters(ids) == 2
        with _checkout(store, 10) as batch:  # two sequences: their order is the store's
            assert {m.id: (m.progress, m.attempts) for m in batch.messages} == {
                ids[0]: ('{"p": 1}', 0),
                ids[1]: ('{"b": 1}', 0),
            }

    def test_a_pending_message_is_found_with_its_last_error(
        self, harness: StoreHarness, store: Store
    ) -> None:
        [id_] = harness.write([entry(data=b"d", attributes={"a": "1"})])
        pending = _progress_store(store).find_message(id_)
        assert pending is not None
        assert (pending.state, pending.error, pending.since) == ("pending", None, None)
        assert (pending.message.data, dict(pending.message.attributes)) == (b"d", {"a": "1"})
        with _checkout(store, 10) as batch:
            _detailed(batch).add_details({id_: MarkDetails(progress="[1]")})
            batch.mark_failed(batch.messages[0], "boom", timedelta(seconds=60))
        failed = _progress_store(store).find_message(id_)
        assert failed is not None
        assert failed.since is not None
        assert (failed.state, failed.error, failed.message.attempts) == ("pending", "boom", 1)
        assert failed.message.progress == "[1]"
        assert _progress_store(store).find_message("424242") is None

    def test_a_kept_settled_message_is_found_with_its_progress(
        self, harness: StoreHarness, store: Store
    ) -> None:
        ids = harness.write([entry(), entry()])
        with _checkout(store, 10) as batch:
            _detailed(batch).add_details({ids[0]: MarkDetails(progress='{"ok": 1}', keep=True)})
            batch.mark_published(_by_id(batch, ids[0]), "pub-1")
            batch.mark_published(_by_id(batch, ids[1]), "pub-2")
        settled = _progress_store(store).find_message(ids[0])
        assert settled is not None
        assert settled.since is not None
        assert (settled.state, settled.publish_id) == ("settled", "pub-1")
        assert settled.message.progress == '{"ok": 1}'
        assert _progress_store(store).find_message(ids[1]) is None  # not kept: deleted
        assert store.checkout_batch(["orders"], 10) is None

    def test_purge_settled_removes_only_the_old_ones_of_its_topic(
        self, harness: StoreHarness, store: Store, clock: FakeClock
    ) -> None:
        old = harness.write([entry(), entry("emails")])
        for topic in ("orders", "emails"):
            batch = store.checkout_batch([topic], 10)
            assert batch is not None
            with batch:
                _detailed(batch).add_details({batch.messages[0].id: MarkDetails(keep=True)})
                batch.mark_published(batch.messages[0], "p")
        clock.advance(3600)
        [young] = harness.write([entry()])
        with _checkout(store, 10) as batch:
            _detailed(batch).add_details({young: MarkDetails(keep=True)})
            batch.mark_published(batch.messages[0], "p")
        progress_store = _progress_store(store)
        assert progress_store.purge_settled("orders", timedelta(minutes=30)) == 1
        assert progress_store.find_message(old[0]) is None
        assert progress_store.find_message(young) is not None
        assert progress_store.find_message(old[1]) is not None  # another topic's
        assert progress_store.purge_settled("orders", timedelta(minutes=30)) == 0

    def test_follow_ups_are_written_with_the_mark(
        self, harness: StoreHarness, store: Store
    ) -> None:
        ids = harness.write([entry(key="a"), entry(key="b")])
        follow_ups = [
            entry("dead-events", b"first", key="k", attributes={"of": ids[0]}),
            entry("dead-events", b"second", key="k"),
        ]
        with _checkout(store, 10) as batch:
            _detailed(batch).add_details({ids[0]: MarkDetails(follow_ups=follow_ups)})
            batch.mark_dead(_by_id(batch, ids[0]), "max errors")
            batch.mark_failed(_by_id(batch, ids[1]), "blocked", None)
        written = store.checkout_batch(["dead-events"], 10)
        assert written is not None
        with written:
            assert [m.data for m in written.messages] == [b"first", b"second"]
            assert [m.ordering_key for m in written.messages] == ["k", "k"]
            assert dict(written.messages[0].attributes) == {"of": ids[0]}
            assert len({m.id for m in written.messages} | set(ids)) == 4  # new ids

    def test_follow_ups_of_a_batch_whose_lease_was_taken_over_are_not_written(
        self, harness: StoreHarness, clock: FakeClock
    ) -> None:
        slow, fast = harness.open_store(clock), harness.open_store(clock)
        [id_] = harness.write([entry()])
        stale = slow.checkout_batch(["orders"], 10)
        assert stale is not None
        clock.advance(LONG_AFTER)
        current = fast.checkout_batch(["orders"], 10)
        assert _ids(current) == [id_]
        _detailed(stale).add_details(
            {id_: MarkDetails(progress="{}", follow_ups=[entry("dead-events")])}
        )
        stale.mark_dead(stale.messages[0], "late")
        with pytest.raises(LeaseLost):
            stale.close()
        assert current is not None
        current.close()
        assert _topic_ids(fast, "dead-events") == []
        with _checkout(fast, 10) as batch:
            assert (batch.messages[0].progress, batch.messages[0].attempts) == (None, 0)
