"""SQLAlchemy on PostgreSQL: the outbox row in the session's own transaction, sync and asyncio.

The engines use the psycopg driver (``postgresql+psycopg``), which the persister needs. Needs
PostgreSQL (``OUTBOXBIND_PG_DSN``, by default
``host=127.0.0.1 port=5432 user=postgres dbname=test``); it works in a schema of its own and
drops it at the end.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import attrs
import psycopg
from psycopg_pool import ConnectionPool
from sqlalchemy import create_engine, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outboxbind import JsonCodec, Relay, bind
from outboxbind.stores.postgres import PostgresStore, sqlalchemy_persister
from outboxbind.topics.memory import InMemoryTopic

DSN = os.environ.get("OUTBOXBIND_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=test")
SCHEMA = f"shop_{uuid.uuid4().hex[:8]}"
OPTIONS = f"-c search_path={SCHEMA}"  # the example's tables live in its own schema


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str]


@attrs.frozen
class OrderPlaced:
    order_id: int
    customer: str


orders = InMemoryTopic("orders", JsonCodec(OrderPlaced), ordering_key=lambda m: m.customer)


def place_order(session: Session, customer: str) -> str:
    with session.begin():  # one transaction for the order and its message
        order = Order(customer=customer)
        session.add(order)
        session.flush()  # the INSERT, so the order has its id
        outbox = bind(orders, sqlalchemy_persister(session, schema=SCHEMA))
        return outbox.publish(OrderPlaced(order.id, customer))


async def place_order_async(session: AsyncSession, customer: str) -> str:
    async with session.begin():
        order = Order(customer=customer)
        session.add(order)
        await session.flush()
        outbox = bind(orders, sqlalchemy_persister(session, schema=SCHEMA))  # an async persister
        return await outbox.publish(OrderPlaced(order.id, customer))


async def write_async(customer: str) -> str:
    engine = create_async_engine(
        "postgresql+psycopg://",
        async_creator=lambda: psycopg.AsyncConnection.connect(DSN, options=OPTIONS),
    )
    try:
        async with AsyncSession(engine) as session:
            return await place_order_async(session, customer)
    finally:
        await engine.dispose()


def main() -> None:
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: psycopg.connect(DSN, options=OPTIONS)
    )
    try:
        with ConnectionPool(DSN, min_size=1, max_size=2) as pool:
            store = PostgresStore(pool, schema=SCHEMA)
            store.migrate()
            Base.metadata.create_all(engine)

            with Session(engine) as session:
                first = place_order(session, "alice")
                try:
                    with session.begin():
                        session.add(Order(customer="mallory"))
                        session.flush()
                        bind(orders, sqlalchemy_persister(session, schema=SCHEMA)).publish(
                            OrderPlaced(0, "mallory")
                        )
                        raise RuntimeError("payment declined")  # the order and message roll back
                except RuntimeError:
                    pass
                assert session.scalars(select(Order.customer)).all() == ["alice"]
            second = asyncio.run(write_async("bob"))

            relay = Relay(store)
            relay.register_topic(orders)
            assert relay.process_messages().successes == 2
            assert sorted(orders.outbox_ids()) == sorted([first, second])
            print(f"published {orders.messages()}")
    finally:
        engine.dispose()
        with psycopg.connect(DSN, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')


if __name__ == "__main__":
    main()
