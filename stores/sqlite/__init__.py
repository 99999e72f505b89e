"""The embedded store: an outbox in an SQLite file (stdlib ``sqlite3``, WAL mode).

Writers use :func:`persister` on their own ``sqlite3.Connection``; relays use
:class:`SQLiteStore`. Several relay processes may share one file: sequences are leased, and a
lease held by a killed relay expires.
"""

from outboxbind.stores.sqlite.persister import SQLitePersister, persister
from outboxbind.stores.sqlite.schema import migrate
from outboxbind.stores.sqlite.store import SQLiteBatch, SQLiteStore

__all__ = ["SQLiteBatch", "SQLitePersister", "SQLiteStore", "migrate", "persister"]
