"""The servers the suite needs: found running, or started here; never skipped when missing.

PostgreSQL: ``OUTBOXBIND_PG_DSN`` if set; otherwise the machine's cluster on 127.0.0.1:5432,
started with ``pg_ctlcluster`` when it is installed but down.

Pub/Sub: ``PUBSUB_EMULATOR_HOST`` if set; otherwise an emulator started for the session
(:class:`outboxbind.testing.emulator.PubSubEmulator`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import psycopg

DEFAULT_PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"


def _pg_ready(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False


def ensure_postgres() -> str:
    """Return a DSN of a running PostgreSQL, starting the local cluster if it is down."""
    dsn = os.environ.get("OUTBOXBIND_PG_DSN", DEFAULT_PG_DSN)
    if _pg_ready(dsn):
        return dsn
    if "OUTBOXBIND_PG_DSN" in os.environ:
        raise RuntimeError(f"OUTBOXBIND_PG_DSN={dsn!r} does not answer")
    versions = (
        sorted(p.name for p in Path("/etc/postgresql").glob("*"))
        if Path("/etc/postgresql").is_dir()
        else []
    )
    if not versions or shutil.which("pg_ctlcluster") is None:
        raise RuntimeError(
            "PostgreSQL is not running on 127.0.0.1:5432 and no local cluster is installed; "
            "install PostgreSQL or set OUTBOXBIND_PG_DSN"
        )
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main", "start"],
        check=False,
        capture_output=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _pg_ready(dsn):
            return dsn
        time.sleep(0.2)
    raise RuntimeError(f"started PostgreSQL {versions[-1]}, but {dsn!r} does not answer")


DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_ready(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


def ensure_redis() -> str:
    """Return the URL of a running Redis: ``OUTBOXBIND_REDIS_URL``, or 127.0.0.1:6379, started
    with ``redis-server`` (no persistence, loopback only) when it is installed but down."""
    url = os.environ.get("OUTBOXBIND_REDIS_URL", DEFAULT_REDIS_URL)
    if _redis_ready(url):
        return url
    if "OUTBOXBIND_REDIS_URL" in os.environ:
        raise RuntimeError(f"OUTBOXBIND_REDIS_URL={url!r} does not answer")
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError(
            "Redis is not running on 127.0.0.1:6379 and redis-server is not installed; "
            "install Redis or set OUTBOXBIND_REDIS_URL"
        )
    subprocess.run(
        [server, "--daemonize", "yes", "--bind", "127.0.0.1", "--port", "6379",
         "--save", "", "--appendonly", "no"],
        check=False,
        capture_output=True,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if _redis_ready(url):
            return url
        time.sleep(0.1)
    raise RuntimeError(f"started redis-server, but {url!r} does not answer")
