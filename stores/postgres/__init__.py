"""The PostgreSQL store (psycopg 3 and psycopg_pool, sync and asyncio).

Writers use :func:`persister` on their psycopg connection (or :func:`sqlalchemy_persister` on a
SQLAlchemy session); relays use :class:`PostgresStore` or :class:`AsyncPostgresStore` over a
pool. Sequences are leased with fencing tokens, claimed and read in one short transaction, and
relays wake on commit through LISTEN/NOTIFY.
"""

from outboxbind._extras import needs_extra

# checked here, before any module of the package imports them (importing one runs this first)
with needs_extra("postgres", __name__):
    import psycopg  # noqa: F401
    import psycopg_pool  # noqa: F401

from outboxbind.stores.postgres.persister import (
    AsyncPostgresPersister,
    PostgresPersister,
    persister,
    sqlalchemy_persister,
)
from outboxbind.stores.postgres.schema import migrate
from outboxbind.stores.postgres.store import (
    AsyncPostgresBatch,
    AsyncPostgresStore,
    PostgresBatch,
    PostgresStore,
)

__all__ = [
    "AsyncPostgresBatch",
    "AsyncPostgresPersister",
    "AsyncPostgresStore",
    "PostgresBatch",
    "PostgresPersister",
    "PostgresStore",
    "migrate",
    "persister",
    "sqlalchemy_persister",
]
