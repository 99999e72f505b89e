"""Delayed delivery: a message waits until it is due, without holding back its sequence."""

from __future__ import annotations

import sqlite3
import tempfile
import time
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import attrs

from outboxbind import JsonCodec, Relay, bind
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.topics.memory import InMemoryTopic


@attrs.frozen
class Notice:
    customer: str
    text: str


def main() -> None:
    notices = InMemoryTopic("notices", JsonCodec(Notice), ordering_key=lambda n: n.customer)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "app.db"
        with closing(SQLiteStore(path)) as store, closing(sqlite3.connect(path)) as conn:
            relay = Relay(store)
            relay.register_topic(notices)
            with conn:
                outbox = bind(notices, persister(conn))
                nudge = outbox.publish(
                    Notice("alice", "items left in your cart"),
                    deliver_after=timedelta(seconds=0.3),  # or an aware datetime
                )
                welcome = outbox.publish(Notice("alice", "welcome"))

            relay.process_messages()
            assert notices.outbox_ids() == [welcome]  # the nudge is not due; alice goes on
            assert [b.pending for b in store.backlog()] == [1]

            time.sleep(0.35)
            relay.process_messages()
            assert notices.outbox_ids() == [welcome, nudge]
            print([n.text for n in notices.messages()])


if __name__ == "__main__":
    main()
