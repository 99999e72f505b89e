"""Bad input fails in publish(), inside the caller's transaction, before anything is written."""

from __future__ import annotations

import sqlite3
import tempfile
from contextlib import closing
from datetime import datetime
from pathlib import Path

import attrs

from outboxbind import (
    EncodeError,
    InvalidOrderingKey,
    JsonCodec,
    MessageTooLarge,
    PublishError,
    bind,
)
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.topics.memory import InMemoryTopic


@attrs.frozen
class Note:
    author: str
    body: object


def main() -> None:
    notes = InMemoryTopic(
        "notes", JsonCodec(Note), ordering_key=lambda n: n.author, max_message_bytes=1000
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "app.db"
        with closing(SQLiteStore(path)) as store, closing(sqlite3.connect(path)) as conn:
            refused: list[str] = []
            with conn:
                outbox = bind(notes, persister(conn))
                attempts: list[tuple[type[PublishError], Note, datetime | None]] = [
                    (EncodeError, Note("ann", {1, object()}), None),  # not JSON
                    (MessageTooLarge, Note("ann", "x" * 2000), None),  # over 1000 bytes
                    (InvalidOrderingKey, Note("", "hi"), None),  # an empty key
                    (PublishError, Note("ann", "hi"), datetime(2030, 1, 1)),  # naive datetime
                ]
                for error, note, when in attempts:
                    try:
                        outbox.publish(note, deliver_after=when)
                    except error as exc:  # every one is a PublishError (and a ValueError)
                        refused.append(str(exc))
                    else:
                        raise AssertionError(f"{note!r} was accepted")
                kept = outbox.publish(Note("ann", "fine"))  # the transaction is still usable

            assert len(refused) == 4
            assert [b.pending for b in store.backlog()] == [1]  # only the good note was written
            print(f"kept outbox id {kept}; refused:", *refused, sep="\n  ")


if __name__ == "__main__":
    main()
