"""The outbox at work, in one run: ``python -m outboxbind.demo``.

A small shop keeps its orders in SQLite. Every change to an order and the event announcing it
are written in one transaction: the event goes into the outbox table through
``bind(topic, persister(conn)).publish(...)``. One transaction fails after publishing, and is
rolled back. A :class:`~outboxbind.Relay`, running in a thread from the start, publishes what
committed to an in-memory topic ordered by customer. The demo prints what was written and what
was published, and checks the outbox's promises, exiting 1 if one is broken.

The database is a temporary file unless ``--db PATH`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import sqlite3
import sys
import tempfile
import threading
from contextlib import closing
from pathlib import Path

from outboxbind import ConfigurationError, JsonCodec, Relay, SchemaTooNew, bind
from outboxbind.stores.sqlite import SQLiteStore, persister
from outboxbind.topics.memory import InMemoryTopic

__all__ = ["OrderEvent", "main"]

TOPIC = "order-events"
ORDERS_TABLE = "demo_orders"


@dataclasses.dataclass(frozen=True)
class OrderEvent:
    """The message the shop publishes when an order changes."""

    kind: str
    order_id: int
    customer: str
    item: str


class CheckFailed(Exception):
    """One of the outbox's promises did not hold in this run."""


class PaymentDeclined(Exception):
    """The business error that makes the demo's last transaction roll back."""


@dataclasses.dataclass
class Written:
    """One transaction the shop ran: what it said, and the outbox ids publish() returned."""

    summary: str
    outbox_ids: list[str]
    events: list[OrderEvent]
    committed: bool
    error: str = ""


class Shop:
    """The application: business rows and their events, one transaction per change."""

    def __init__(self, conn: sqlite3.Connection, topic: InMemoryTopic[OrderEvent]) -> None:
        self.conn = conn
        self.topic = topic
        self.log: list[Written] = []
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {ORDERS_TABLE} ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " customer TEXT NOT NULL, item TEXT NOT NULL, status TEXT NOT NULL)"
        )
        conn.commit()

    def place_order(self, customer: str, item: str, *, then_ship: int | None = None) -> int:
        """Insert an order and publish ``placed`` (shipping another order in the same
        transaction when ``then_ship`` is given); return the new order's id."""
        with self.conn:  # commits on success, rolls back on an exception
            events = []
            summary = ""
            if then_ship is not None:
                events.append(self._set_status(then_ship, "shipped"))
                summary = f"order {then_ship} shipped, "
            order_id = self._insert_order(customer, item)
            events.append(OrderEvent("placed", order_id, customer, item))
            ids = self._publish(events)
        self.log.append(
            Written(f"{summary}order {order_id} placed by {customer} ({item})", ids, events, True)
        )
        return order_id

    def change_status(self, order_id: int, status: str) -> None:
        """Update an order's status and publish the matching event."""
        with self.conn:
            event = self._set_status(order_id, status)
            ids = self._publish([event])
        self.log.append(Written(f"order {order_id} {status}", ids, [event], True))

    def place_order_and_charge(self, customer: str, item: str) -> None:
        """Insert an order, publish ``placed``, then fail to charge: everything rolls back."""
        ids: list[str] = []
        events: list[OrderEvent] = []
        try:
            with self.conn:
                order_id = self._insert_order(customer, item)
                events.append(OrderEvent("placed", order_id, customer, item))
                ids = self._publish(events)
                raise PaymentDeclined(f"the card of {customer} was declined")
        except PaymentDeclined as exc:
            summary = f"order placed by {customer} ({item})"
            self.log.append(Written(summary, ids, events, False, str(exc)))

    def _insert_order(self, customer: str, item: str) -> int:
        cursor = self.conn.execute(
            f"INSERT INTO {ORDERS_TABLE} (customer, item, status) VALUES (?, ?, 'placed')",
            (customer, item),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def _set_status(self, order_id: int, status: str) -> OrderEvent:
        row = self.conn.execute(
            f"UPDATE {ORDERS_TABLE} SET status = ? WHERE id = ? RETURNING customer, item",
            (status, order_id),
        ).fetchone()
        if row is None:
            raise LookupError(f"no order {order_id} in {ORDERS_TABLE}")
        return OrderEvent(status, order_id, row[0], row[1])

    def _publish(self, events: list[OrderEvent]) -> list[str]:
        outbox = bind(self.topic, persister(self.conn))  # the one-line change
        return [outbox.publish(event) for event in events]


def run_shop(shop: Shop) -> None:
    """The shop's day: five committed transactions and one that rolls back."""
    first = shop.place_order("alice", "book")
    second = shop.place_order("bob", "lamp")
    shop.change_status(first, "paid")
    shop.change_status(second, "cancelled")
    shop.place_order("alice", "pen", then_ship=first)
    shop.place_order_and_charge("carol", "piano")


def check(condition: bool, claim: str, detail: str = "") -> None:
    """Print ``claim`` as passed, or raise :class:`CheckFailed` with ``detail``."""
    if not condition:
        raise CheckFailed(f"{claim}: {detail}" if detail else claim)
    print(f"   ok  {claim}")


class RelayThread:
    """A :class:`~outboxbind.Relay` polling in a background thread, as a service runs it."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._poll, name="outboxbind-demo-relay")
        self.thread.start()

    def _poll(self) -> None:
        try:
            self.relay.poll_for_messages(batch_size=100)
        except BaseException as exc:  # kept for the report, not lost with the thread
            self.error = exc

    def stop(self, *, drain: bool, timeout: float) -> bool:
        """Stop the relay (publishing what is due first when ``drain``); True if it ended."""
        self.relay.stop(drain=drain, timeout=timeout)
        self.thread.join(timeout)
        return not self.thread.is_alive()


def demo(db_path: Path, *, temporary: bool) -> None:
    """Run the shop and the relay on ``db_path``, print the story, raise if a check fails."""
    store = SQLiteStore(db_path)
    with closing(store), closing(sqlite3.connect(db_path)) as conn:
        topic = InMemoryTopic(TOPIC, JsonCodec(OrderEvent), ordering_key=lambda e: e.customer)
        relay = Relay(store, poll_interval=0.2)
        relay.register_topic(topic)
        print("outboxbind demo: a shop writes each order change and its event in one SQLite")
        print(f'transaction; a Relay thread publishes committed events to the topic "{TOPIC}".')
        print(f"database: {db_path} ({'a temporary file' if temporary else 'kept'})")
        print()

        background = RelayThread(relay)  # running before the first write, as in a service
        try:
            shop = Shop(conn, topic)
            run_shop(shop)
        finally:
            stopped = background.stop(drain=True, timeout=10.0)  # publish what is due, stop
        if background.error is not None:
            raise CheckFailed(f"the relay thread failed: {background.error!r}")
        print_written(shop, conn)
        print_published(shop, topic)
        print("3. Checks")
        check(stopped, "the relay drained the outbox and stopped")
        check_outcome(shop, topic, conn, store)


def print_written(shop: Shop, conn: sqlite3.Connection) -> None:
    """Section 1: each transaction, its outcome and the outbox ids publish() returned."""
    print("1. Written: each order change and its event, committed or rolled back together")
    for written in shop.log:
        outcome = "commit  " if written.committed else "rollback"
        ids = "id " + ", ".join(written.outbox_ids)
        print(f"   {outcome}  {ids:<8} {written.summary}")
        if not written.committed:
            returned = f"publish() had returned id {ids[3:]}, then: " if written.outbox_ids else ""
            print(f"{'':22}{returned}{written.error}")
    orders = conn.execute(f"SELECT count(*) FROM {ORDERS_TABLE}").fetchone()[0]
    print(f"   the {ORDERS_TABLE} table now holds {orders} rows")
    print()


def print_published(shop: Shop, topic: InMemoryTopic[OrderEvent]) -> None:
    """Section 2: what reached the topic, per ordering key."""
    ours = {i for w in shop.log if w.committed for i in w.outbox_ids}
    mine = [p for p in topic.published if p.outbox_id in ours]
    leftovers = len(topic.published) - len(mine)
    print(f'2. Published to "{TOPIC}" by the relay, in order per ordering key (customer)')
    print("   as outbox id:event#order")
    for key in sorted({p.ordering_key or "" for p in mine}):
        events = [
            f"{p.outbox_id}:{e.kind}#{e.order_id}"
            for p in mine
            if p.ordering_key == key
            for e in [topic.codec.decode(p.data)]
        ]
        print(f"   {key:<6} {'  '.join(events)}")
    if leftovers:
        print(f"   and {leftovers} messages an earlier run had left in the outbox")
    print('   each message carries its outbox id as the "outbox-id" attribute, for dedup')
    print()


def check_outcome(
    shop: Shop, topic: InMemoryTopic[OrderEvent], conn: sqlite3.Connection, store: SQLiteStore
) -> None:
    """Section 3: the outbox's promises, checked against what was written and published."""
    committed = [w for w in shop.log if w.committed]
    written_ids = [i for w in committed for i in w.outbox_ids]
    mine = [p for p in topic.published if p.outbox_id in set(written_ids)]
    published_ids = [p.outbox_id for p in mine if p.outbox_id is not None]
    check(
        sorted(published_ids, key=int) == sorted(written_ids, key=int),
        f"each of the {len(written_ids)} committed events was published once",
        f"written {written_ids}, published {published_ids}",
    )
    for key in sorted({e.customer for w in committed for e in w.events}):
        wrote = [e for w in committed for e in w.events if e.customer == key]
        got = [topic.codec.decode(p.data) for p in mine if p.ordering_key == key]
        check(got == wrote, f"{key}'s events arrived in the order they were written")
    check(
        all(p.attributes.get("outbox-id") == p.outbox_id for p in mine),
        'every message carried its "outbox-id" attribute',
    )
    for failed in (w for w in shop.log if not w.committed):
        leaked = [
            p
            for p in topic.published
            if p.outbox_id in failed.outbox_ids or topic.codec.decode(p.data) in failed.events
        ]
        ids = ", ".join(failed.outbox_ids)
        check(not leaked, f"the rolled-back event (id {ids}) was NOT published", f"{leaked}")
        customers = sorted({e.customer for e in failed.events})
        rows = conn.execute(
            f"SELECT count(*) FROM {ORDERS_TABLE} WHERE customer IN "
            f"({', '.join('?' * len(customers))})",
            customers,
        ).fetchone()[0]
        check(rows == 0, "and its order row does not exist either")
    backlog = [b for b in store.backlog() if b.topic == TOPIC]
    check(not backlog, "the outbox is empty", f"backlog: {backlog}")


def main(argv: list[str] | None = None) -> int:
    """Run the demo; return 0 when every check passed, 1 when one failed, 2 on a bad setup."""
    parser = argparse.ArgumentParser(
        prog="python -m outboxbind.demo",
        description=(
            "Write orders and their events transactionally to an SQLite outbox, roll one "
            "transaction back, relay the rest to an in-memory topic, and check the result."
        ),
    )
    parser.add_argument(
        "--db",
        metavar="PATH",
        type=Path,
        help="the SQLite database file to use and keep (default: a temporary file)",
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:  # as passed on by a command that forwards its remaining arguments
        argv = argv[1:]
    args = parser.parse_args(argv)
    try:
        if args.db is not None:
            demo(args.db, temporary=False)
        else:
            with tempfile.TemporaryDirectory(prefix="outboxbind-demo-") as tmp:
                demo(Path(tmp) / "shop.db", temporary=True)
    except CheckFailed as exc:
        print(f"\nFAILED: {exc}", file=sys.stderr)
        return 1
    except (ConfigurationError, SchemaTooNew) as exc:  # the store's own, clear errors
        print(f"outboxbind demo: {exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:
        where = args.db if args.db is not None else "the temporary database"
        print(f"outboxbind demo: cannot use {where}: {exc}", file=sys.stderr)
        return 2
    print()
    if args.db is None:
        print("Done. Run with --db shop.db to keep the database and inspect it with sqlite3.")
    else:
        print(f"Done. The database is kept at {args.db}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
