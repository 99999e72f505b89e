"""A private, throwaway PostgreSQL cluster for tests that must stop and restart the server.

The machine's shared cluster (``tests/services.py``) is never restarted by the suite: other
tests and other people use it. A test that needs to restart PostgreSQL under a running relay
makes its own cluster with :meth:`PrivateCluster.create` (``initdb`` into a temporary
directory, trust authentication, a free port on 127.0.0.1, its socket in that directory),
starts it, restarts it as often as it likes and removes it with :meth:`PrivateCluster.destroy`.

PostgreSQL refuses to run as root: when the tests run as root, every server command runs as the
``postgres`` OS user through ``runuser -u postgres --`` and the directory is given to that user.
The cluster runs with ``fsync=off``: an immediate stop is a crash of the server process, not of
the machine, so every commit the server acknowledged is still in the kernel's page cache and
survives it (``synchronous_commit`` stays on).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

__all__ = ["PG_BIN", "PrivateCluster", "free_port"]

PG_BIN = Path(os.environ.get("OUTBOXBIND_PG_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_USER = "postgres"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_server_user(command: list[str]) -> list[str]:
    """``command``, run as the ``postgres`` OS user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", SERVER_USER, "--", *command]
    return command


class PrivateCluster:
    """One PostgreSQL cluster in a temporary directory, on its own port.

    Use :meth:`create`, then :meth:`start`; :meth:`restart` stops it the hard way (``-m
    immediate``, as a crash would) and starts it again; :meth:`destroy` stops it and deletes its
    directory.
    """

    def __init__(self, base: Path, port: int) -> None:
        self.base = base
        self.data = base / "data"
        self.logfile = base / "server.log"
        self.port = port

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres connect_timeout=5"

    @classmethod
    def create(cls, port: int | None = None) -> PrivateCluster:
        """``initdb`` a new cluster in a new temporary directory (not started yet)."""
        initdb = PG_BIN / "initdb"
        if not initdb.exists():
            raise RuntimeError(f"{initdb} not found: install PostgreSQL or set OUTBOXBIND_PG_BIN")
        base = Path(tempfile.mkdtemp(prefix="outboxbind-pg-"))
        cluster = cls(base, port or free_port())
        try:
            if os.geteuid() == 0:
                user = pwd.getpwnam(SERVER_USER)
                os.chown(base, user.pw_uid, user.pw_gid)
            initdb_options = ["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]
            cluster._run(
                [str(initdb), "-D", str(cluster.data), *initdb_options, "--no-instructions"],
                timeout=120,
            )
            settings = {
                "listen_addresses": "'127.0.0.1'",
                "port": str(cluster.port),
                "unix_socket_directories": f"'{base}'",
                "max_connections": "60",
                "fsync": "off",
                "full_page_writes": "off",
                "synchronous_commit": "on",
                "shared_buffers": "64MB",
                "log_min_messages": "warning",
            }
            conf = "".join(f"{name} = {value}\n" for name, value in settings.items())
            cluster._run(
                ["sh", "-c", f"cat >> '{cluster.data / 'postgresql.auto.conf'}'"],
                timeout=10,
                input=conf,
            )
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
        return cluster

    def _run(
        self, command: list[str], *, timeout: float, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            _as_server_user(command),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed with {result.returncode}:\n"
                f"{result.stdout}{result.stderr}{self.server_log()}"
            )
        return result

    def _pg_ctl(self, *args: str, timeout: float = 60) -> None:
        self._run([str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args], timeout=timeout)

    def server_log(self, tail: int = 3000) -> str:
        try:
            return self.logfile.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it accepts connections."""
        self._pg_ctl("-l", str(self.logfile), "-w", "-t", str(int(timeout)), "start")
        self.wait_ready(timeout)

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Stop the server (``immediate``: at once, without a checkpoint, like a crash)."""
        self._pg_ctl("-m", mode, "-w", "-t", str(int(timeout)), "stop")

    def restart(self, down_for: float = 0.0, timeout: float = 30) -> None:
        """Stop at once (``-m immediate``), stay down ``down_for`` seconds, start again."""
        self.stop("immediate", timeout)
        time.sleep(down_for)
        self.start(timeout)

    def is_running(self) -> bool:
        result = subprocess.run(
            _as_server_user([str(PG_BIN / "pg_ctl"), "-D", str(self.data), "status"]),
            capture_output=True,
            timeout=10,
            check=False,
        )
        return result.returncode == 0

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.dsn) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def destroy(self) -> None:
        """Stop the server if it runs (``-m immediate``) and delete the cluster's directory."""
        try:
            if self.data.exists() and self.is_running():
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self.stop("immediate", timeout=30)
        finally:
            shutil.rmtree(self.base, ignore_errors=True)
