"""Handler topics: txob's "user invited" example on SQLite. Inviting a user writes the user and a
UserInvited event in one transaction; the relay then runs two handlers for the event, send_email
and publish, each tracked on its own: when the mail server fails, only send_email runs again."""

from __future__ import annotations

import sqlite3
import tempfile
import uuid
from contextlib import closing
from datetime import timedelta
from pathlib import Path
from typing import Any

from outboxbind import JsonCodec, Relay, RetryPolicy, bind
from outboxbind.handlers import HandlerContext, HandlerTopic, MaxErrorsReached, handler_results
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.testing import FakeClock
from outboxbind.topics.memory import InMemoryTopic

Event = dict[str, Any]

sent_emails: list[str] = []
user_events = InMemoryTopic[Event]("user-events", JsonCodec())  # stands in for an event bus
mail_server_up = False  # the first try finds the mail server down


def send_email(event: Event, context: HandlerContext) -> None:
    if not mail_server_up:
        raise ConnectionError("smtp.example.com: connection refused")
    # idempotent: a handler may run again after a crash; key the side effect on the message id
    if context.message.id not in sent_emails:
        sent_emails.append(context.message.id)


async def publish(event: Event, context: HandlerContext) -> None:
    user_events.publish({"type": "user.invited", "user_id": event["user_id"]})


# txob's onEventMaxErrorsReached: a dead-letter event, written in the transaction that records
# the failure (both commit, or neither does)
alerts = HandlerTopic("alerts", JsonCodec(dict), {"EventFailed": {"page_ops": lambda e, c: None}})


def on_max_errors(reached: MaxErrorsReached) -> None:
    bind(alerts, reached.outbox).publish(
        {"type": "EventFailed", "event_id": reached.message.id, "error": reached.error}
    )


events = HandlerTopic(
    "events",
    JsonCodec(dict),  # events are dicts here; an attrs class or a dataclass works too
    {"UserInvited": {"send_email": send_email, "publish": publish}},
    type_of="type",  # the event's "type" field picks its handlers
    on_max_errors=on_max_errors,
)


def invite(conn: sqlite3.Connection, email: str, request_id: str) -> str:
    with conn:  # the user and the event commit together, or neither does
        user_id = str(uuid.uuid4())
        conn.execute("INSERT INTO users (id, email) VALUES (?, ?)", (user_id, email))
        return bind(events, persister(conn)).publish(
            {"type": "UserInvited", "user_id": user_id, "email": email},
            correlation_id=request_id,
        )


def main() -> None:
    global mail_server_up
    clock = FakeClock()  # lets the example skip the retry delay instead of sleeping through it
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "app.db"
        store = SQLiteStore(path, clock=clock)
        with closing(store), closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE users (id TEXT PRIMARY KEY, email TEXT NOT NULL)")
            event_id = invite(conn, "ada@example.com", request_id="req-1")

            relay = Relay(store)
            relay.register_topic(
                events,
                retry=RetryPolicy(max_attempts=5, initial_delay=1.0),
                keep_settled=timedelta(days=7),  # keep handled events a week, then purge
            )
            relay.register_topic(alerts)

            relay.process_messages()  # publish succeeds; send_email fails: retried later
            record = store.find_message(event_id)
            assert record is not None
            results = handler_results(record)
            assert results["publish"].succeeded
            assert results["send_email"].errors == 1
            assert "connection refused" in (results["send_email"].last_error or "")

            mail_server_up = True
            clock.advance(60)  # past the retry delay
            relay.process_messages()  # only send_email runs again

            record = store.find_message(event_id)
            assert record is not None
            assert record.state == "settled"
            assert all(result.succeeded for result in handler_results(record).values())
            assert sent_emails == [event_id]
            assert len(user_events.published) == 1  # publish ran once, not twice
            assert record.message.attributes["outbox-correlation-id"] == "req-1"
            assert store.checkout_batch(["alerts"], 10) is None  # no event failed for good
            print(f"event {event_id}: {sorted(handler_results(record))} succeeded")


if __name__ == "__main__":
    main()
