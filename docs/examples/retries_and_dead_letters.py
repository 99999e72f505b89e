"""Retries with backoff, then the poison policy: block the key, or park the message."""

from __future__ import annotations

import sqlite3
import tempfile
import time
from contextlib import closing
from pathlib import Path

import attrs

from outboxbind import JsonCodec, PersistedMessage, Relay, RetryPolicy, UnpublishableError, bind
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.topics.memory import InMemoryTopic


@attrs.frozen
class Payment:
    account: str
    cents: int


class Bank:
    """A destination that is down at first, then refuses payments over its limit."""

    def __init__(self) -> None:
        self.up = False
        self.limit = 1000

    def __call__(self, message: PersistedMessage) -> BaseException | None:
        payment = JsonCodec(Payment).decode(message.data)
        if not self.up:
            return ConnectionError("bank unreachable")
        if payment.cents > self.limit:
            return ValueError(f"{payment.cents} is over the limit of {self.limit}")
        return None


def refuse_foreign(message: PersistedMessage) -> BaseException | None:
    """Receipts to other countries can never be sent: no retry can help."""
    if message.ordering_key and not message.ordering_key.endswith(".example"):
        return UnpublishableError(f"no route to {message.ordering_key}")
    return None


FAST = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.01, jitter=0.0)


def run_rounds(relay: Relay, count: int) -> None:
    for _ in range(count):
        relay.process_messages()
        time.sleep(0.02)  # longer than FAST's delay, so a failed message is due again


def main() -> None:
    bank = Bank()
    payments = InMemoryTopic(
        "payments", JsonCodec(Payment), ordering_key=lambda p: p.account, fail=bank
    )
    receipts = InMemoryTopic(
        "receipts", JsonCodec[dict[str, str]](), ordering_key=lambda r: r["to"], fail=refuse_foreign
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "app.db"
        with closing(SQLiteStore(path)) as store, closing(sqlite3.connect(path)) as conn:
            relay = Relay(store)
            relay.register_topic(payments, retry=FAST, poison="block")  # never break the order
            relay.register_topic(receipts, retry=FAST, poison="park")  # set it aside, go on

            with conn:
                pay = bind(payments, persister(conn))
                big = pay.publish(Payment("acme", 5000))  # over the bank's limit
                after_big = pay.publish(Payment("acme", 10))  # must not overtake it
                other = pay.publish(Payment("globex", 20))  # another key: not held back
                send = bind(receipts, persister(conn))
                foreign = send.publish({"to": "shop.invalid"})
                local = send.publish({"to": "shop.example"})

            # 1. The bank is down: the payments fail and are retried after a backoff (acme's
            # second one is not even attempted: it waits behind the first).
            result = relay.process_messages()
            assert (result.successes, result.errors) == (1, 3)  # the local receipt got through
            assert result.dead == 1  # the foreign receipt: unpublishable, parked at once
            bank.up = True
            run_rounds(relay, 4)  # globex goes through; acme's big payment fails 3 times

            # 2. block: the big payment holds back acme's next payment, not globex's.
            assert payments.outbox_ids() == [other]
            [blocked] = store.dead_letters(topic="payments")
            assert (blocked.message.id, blocked.state) == (big, "blocked")
            assert blocked.message.attempts == 3
            assert "over the limit" in blocked.error

            # 3. park: the foreign receipt was set aside; the receipt after it went on.
            [parked] = store.dead_letters(topic="receipts")
            assert (parked.message.id, parked.state) == (foreign, "parked")
            assert receipts.outbox_ids() == [local]
            backlog = {b.topic: (b.pending, b.dead) for b in store.backlog()}
            assert backlog == {"payments": (2, 1), "receipts": (0, 1)}

            # 4. The operator fixes the cause and replays; the order is kept.
            bank.limit = 10_000
            assert store.replay_dead_letters([big]) == 1
            relay.process_messages()
            assert payments.outbox_ids() == [other, big, after_big]
            assert store.purge_dead_letters([foreign]) == 1  # gone for good
            assert store.dead_letters() == []
            assert store.backlog() == []
            print(f"payments published: {payments.messages()}")


if __name__ == "__main__":
    main()
