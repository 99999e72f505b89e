"""A Relay polling in a background thread, stopped gracefully on shutdown."""

from __future__ import annotations

import sqlite3
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

from outboxbind import BytesCodec, Relay, bind
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.topics.memory import InMemoryTopic


def main() -> None:
    audit = InMemoryTopic("audit-log", BytesCodec())  # no ordering key: one order per topic
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "app.db"
        with closing(SQLiteStore(path)) as store, closing(sqlite3.connect(path)) as conn:
            relay = Relay(
                store,
                poll_interval=1.0,  # idle polling; a commit in this process wakes it sooner
                publish_timeout=30.0,  # at most half the store's lease_duration (60 s)
            )
            relay.register_topic(audit)
            thread = threading.Thread(target=relay.poll_for_messages, kwargs={"batch_size": 100})
            thread.start()
            try:
                with conn:  # the application at work
                    outbox = bind(audit, persister(conn))
                    ids = [outbox.publish(f"event {n}".encode()) for n in range(3)]
                committed = time.monotonic()
                while len(audit.published) < 3 and time.monotonic() < committed + 5.0:
                    time.sleep(0.001)
                latency = time.monotonic() - committed
            finally:  # on shutdown: publish what is due, then stop
                stopped = relay.stop(drain=True, timeout=10.0)
                thread.join()
            assert stopped
            assert audit.outbox_ids() == ids
            assert relay.totals["published"] == 3
            print(f"published {audit.messages()} {latency * 1000:.1f} ms after the commit")


if __name__ == "__main__":
    main()
