"""The ``outboxbind`` command line, run as users run it."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from outboxbind import Relay, RetryPolicy, bind
from outboxbind.cli import main
from outboxbind.stores.sqlite import SQLiteStore, persister

from support import OrderPlaced, order_topic


def write_orders(db: Path, count: int) -> list[str]:
    topic = order_topic()
    conn = sqlite3.connect(db)
    with conn:
        ids = [bind(topic, persister(conn)).publish(OrderPlaced(i, "ann")) for i in range(count)]
    conn.close()
    return ids


def pending(db: Path) -> int:
    store = SQLiteStore(db)
    try:
        return sum(b.pending for b in store.backlog())
    finally:
        store.close()


def test_migrate_applies_the_schema_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    assert main(["migrate", url]) == 0
    assert main(["migrate", url]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "applied migrations: [1]",
        "the schema is up to date",
    ]


def test_status_shows_backlog_per_topic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "app.db"
    SQLiteStore(db).close()
    write_orders(db, 3)
    assert main(["status", f"sqlite:///{db}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["topic", "pending", "oldest", "(s)", "dead"]
    assert lines[1].split()[:2] == ["orders", "3"]
    assert main(["status", "--json", f"sqlite:///{db}"]) == 0
    assert '"pending": 3' in capsys.readouterr().out


def test_dead_letters_list_replay_and_purge(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "app.db"
    store = SQLiteStore(db)
    ids = write_orders(db, 2)
    topic = order_topic(fail=lambda m: ConnectionError("broker down"))
    relay = Relay(store)
    relay.register_topic(topic, retry=RetryPolicy(max_attempts=1), poison="park")
    relay.process_messages()
    relay.process_messages()
    url = f"sqlite:///{db}"
    assert main(["dead-letters", "list", url]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[:3] for line in listed] == [
        [ids[0], "parked", "orders"],
        [ids[1], "parked", "orders"],
    ]
    assert "ConnectionError: broker down" in listed[0]
    assert main(["dead-letters", "replay", url, ids[0]]) == 0
    assert main(["dead-letters", "purge", url, ids[1]]) == 0
    assert capsys.readouterr().out.splitlines() == ["replayed 1 message(s)", "purged 1 message(s)"]
    assert [b.pending for b in store.backlog()] == [1]
    assert store.dead_letters() == []


def test_errors_are_reported_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "postgres://nowhere"]) == 2
    assert main(["status", f"sqlite:///{tmp_path / 'x.db'}?table=bad;name"]) == 2
    assert main(["relay", "no_such_module:make"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert "unknown store scheme 'postgres'" in errors[0]
    assert "is not a plain SQL identifier" in errors[1]
    assert "No module named 'no_such_module'" in errors[2]


@pytest.mark.slow
def test_relay_command_runs_until_sigterm_and_drains(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    SQLiteStore(db).close()
    (tmp_path / "myapp_outbox.py").write_text(
        textwrap.dedent(
            f"""
            from outboxbind import JsonCodec, Relay
            from outboxbind.stores.sqlite import SQLiteStore
            from outboxbind.topics.memory import InMemoryTopic

            def make_relay() -> Relay:
                relay = Relay(SQLiteStore({str(db)!r}), poll_interval=0.05)
                relay.register_topic(InMemoryTopic("orders", JsonCodec()))
                return relay
            """
        )
    )
    write_orders(db, 50)
    process = subprocess.Popen(
        [sys.executable, "-m", "outboxbind.cli", "relay", "myapp_outbox:make_relay"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while pending(db) and time.monotonic() < deadline:
            time.sleep(0.05)
        write_orders(db, 25)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=20)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "relaying topics orders" in err
    assert '"published": 75' in err
    assert pending(db) == 0


def test_demo_runs_from_the_command_line_with_its_own_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--db", str(tmp_path / "demo.db")]) == 0
    assert "NOT published" in capsys.readouterr().out


def test_a_malformed_id_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dead-letters", "replay", f"sqlite:///{tmp_path / 'app.db'}", "abc"]) == 2
    assert "outbox ids are whole numbers here; 'abc' is not one" in capsys.readouterr().err
