"""Testing code that publishes through the outbox: InMemoryStore and InMemoryTopic, no database.

The code under test takes the persister as an argument: production passes ``persister(conn)``
inside its transaction, a test passes an in-memory transaction.
"""

from __future__ import annotations

import asyncio

import attrs

from outboxbind import (
    AsyncPersister,
    AsyncRelay,
    JsonCodec,
    OutboxEntry,
    Persister,
    Relay,
    RetryPolicy,
    bind,
)
from outboxbind.stores.memory import InMemoryStore, InMemoryTransaction
from outboxbind.testing import FakeClock
from outboxbind.topics.memory import InMemoryTopic


@attrs.frozen
class Welcome:
    email: str


welcomes = InMemoryTopic("welcomes", JsonCodec(Welcome), ordering_key=lambda w: w.email)


# -- the application code ------------------------------------------------------------------


def sign_up(users: set[str], outbox: Persister, email: str) -> str:
    """Announce and add a user; raises ValueError for a taken email."""
    outbox_id = bind(welcomes, outbox).publish(Welcome(email))
    if email in users:  # stands for an INSERT failing on a unique index
        raise ValueError(f"{email} is taken")  # the transaction rolls back, message included
    users.add(email)
    return outbox_id


# -- the tests (plain functions here; pytest runs them as they are) -----------------------


def test_a_committed_sign_up_is_published() -> None:
    store = InMemoryStore()
    with store.transaction() as tx:  # commits when the block ends without an exception
        outbox_id = sign_up(set(), tx, "ann@example.com")
    relay = Relay(store)
    relay.register_topic(welcomes)
    assert relay.process_messages().successes == 1
    assert welcomes.messages()[-1] == Welcome("ann@example.com")
    assert welcomes.published[-1].attributes["outbox-id"] == outbox_id


def test_a_failed_sign_up_publishes_nothing() -> None:
    store = InMemoryStore()
    try:
        with store.transaction() as tx:  # rolls back on the exception
            sign_up({"bob@example.com"}, tx, "bob@example.com")
    except ValueError:
        pass
    assert store.pending_ids() == []


def test_a_failed_publish_is_retried_after_its_backoff() -> None:
    clock = FakeClock()  # real time plus an offset the test moves: no sleeping through a backoff
    outage = iter([ConnectionError("mail server down")])  # the first attempt fails
    flaky = InMemoryTopic("welcomes", JsonCodec(Welcome), fail=lambda m: next(outage, None))
    store = InMemoryStore(clock=clock)
    with store.transaction() as tx:
        sign_up(set(), tx, "cy@example.com")
    relay = Relay(store)
    relay.register_topic(flaky, retry=RetryPolicy(initial_delay=60.0, jitter=0.0))
    assert relay.process_messages().errors == 1
    assert relay.process_messages().checked_out == 0  # waiting out its 60 s backoff
    clock.advance(61.0)
    assert relay.process_messages().successes == 1
    assert flaky.messages() == [Welcome("cy@example.com")]


def test_a_message_that_keeps_failing_is_parked() -> None:
    down = InMemoryTopic(
        "welcomes", JsonCodec(Welcome), fail=lambda m: ConnectionError("mail server down")
    )
    store = InMemoryStore()
    with store.transaction() as tx:
        sign_up(set(), tx, "dan@example.com")
    relay = Relay(store)
    relay.register_topic(down, retry=RetryPolicy(max_attempts=1), poison="park")
    result = relay.process_messages()
    assert (result.errors, result.dead) == (1, 1)
    [dead] = store.dead_letters()
    assert dead.state == "parked"
    assert "mail server down" in dead.error


# -- asyncio code under test awaits publish(): give it an async persister ------------------


class AsyncTransaction:
    """The in-memory transaction behind an ``async`` call, as an async driver's persister is."""

    def __init__(self, tx: InMemoryTransaction) -> None:
        self.tx = tx

    async def __call__(self, entry: OutboxEntry, /) -> str:
        return self.tx(entry)


async def sign_up_async(outbox: AsyncPersister, email: str) -> str:
    return await bind(welcomes, outbox).publish(Welcome(email))


def test_async_code_and_the_async_relay() -> None:
    async def scenario() -> None:
        store = InMemoryStore()
        with store.transaction() as tx:
            await sign_up_async(AsyncTransaction(tx), "eve@example.com")
        relay = AsyncRelay(store)
        relay.register_topic(welcomes)
        assert (await relay.process_messages()).successes == 1

    asyncio.run(scenario())
    assert welcomes.messages()[-1] == Welcome("eve@example.com")


def main() -> None:
    tests = [value for name, value in sorted(globals().items()) if name.startswith("test_")]
    for test in tests:
        test()
    print(f"{len(tests)} tests passed")


if __name__ == "__main__":
    main()
