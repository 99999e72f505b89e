"""Leases and fencing: two relays on one outbox never share a sequence, and a relay whose
lease expired cannot acknowledge what another relay now holds."""

from __future__ import annotations

import sqlite3
import tempfile
import time
from contextlib import closing
from pathlib import Path

from outboxbind import BytesCodec, LeaseLost, bind
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.topics.memory import InMemoryTopic


class Clock:
    """Real time, plus however far the example jumps ahead."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def main() -> None:
    topic = InMemoryTopic("jobs", BytesCodec(), ordering_key=lambda _: "shard-1")
    clock = Clock()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "app.db"
        # Two stores on one file stand for two relay processes.
        relay_a = SQLiteStore(path, lease_duration=30.0, clock=clock)
        relay_b = SQLiteStore(path, lease_duration=30.0, clock=clock)
        with closing(relay_a), closing(relay_b), closing(sqlite3.connect(path)) as conn:
            with conn:
                ids = [bind(topic, persister(conn)).publish(b"job %d" % n) for n in range(2)]

            batch_a = relay_a.checkout_batch(["jobs"], limit=10)
            assert batch_a is not None
            assert [m.id for m in batch_a.messages] == ids
            assert relay_b.checkout_batch(["jobs"], limit=10) is None  # held by relay A

            clock.offset += 31.0  # relay A stalls past its lease (a GC pause, a lost network)
            batch_b = relay_b.checkout_batch(["jobs"], limit=10)  # B takes the sequence over
            assert batch_b is not None
            assert [m.id for m in batch_b.messages] == ids

            for message in batch_a.messages:
                batch_a.mark_published(message, "late")
            try:
                batch_a.close()  # A's token no longer matches the lease: nothing is applied
            except LeaseLost as exc:
                print(f"relay A: {exc}")
            else:
                raise AssertionError("a stale batch was allowed to acknowledge")
            assert [b.pending for b in relay_b.backlog()] == [2]  # still there, for B to publish

            with batch_b:  # closing applies B's marks under its own, current token
                for message in batch_b.messages:
                    batch_b.mark_published(message, "ok")
            assert relay_b.backlog() == []


if __name__ == "__main__":
    main()
