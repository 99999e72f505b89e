"""The ``outboxbind`` command line, run as users run it."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from contextlib import closing
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
        "applied migrations: [1, 2]",
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
    SQLiteStore(tmp_path / "app.db").close()  # replay refuses a database that does not exist
    assert main(["dead-letters", "replay", f"sqlite:///{tmp_path / 'app.db'}", "abc"]) == 2
    assert "outbox ids are whole numbers here; 'abc' is not one" in capsys.readouterr().err


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err  # one line, no traceback
    return lines[0]


@pytest.mark.parametrize(
    "command",
    [["status"], ["status", "--json"], ["dead-letters", "list"], ["dead-letters", "replay"]],
)
def test_inspecting_a_database_that_does_not_exist_creates_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    db = tmp_path / "typo.db"
    args = [*command, f"sqlite:///{db}"] + (["1"] if command[-1] == "replay" else [])
    assert main(args) == 2
    assert f"no database at '{db}'" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_folder_is_named_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "no-such-folder" / "app.db"
    assert main(["status", f"sqlite:///{db}"]) == 2
    assert f"the folder '{db.parent}' does not exist" in one_error_line(capsys)
    assert main(["migrate", f"sqlite:///{db}"]) == 2
    line = one_error_line(capsys)
    assert f"cannot create the SQLite database '{db}'" in line
    assert f"the folder '{db.parent}' does not exist" in line
    assert not db.parent.exists()


@pytest.mark.parametrize("command", [["status"], ["migrate"], ["dead-letters", "list"]])
def test_a_file_that_is_not_a_database_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    db = tmp_path / "notes.txt"
    db.write_bytes(b"not an SQLite file, " * 50)
    assert main([*command, f"sqlite:///{db}"]) == 2
    assert f"cannot use '{db}' as an SQLite database: file is not a database" in one_error_line(
        capsys
    )
    assert db.read_bytes() == b"not an SQLite file, " * 50


def test_inspecting_a_database_without_an_outbox_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "other.db"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    before = db.read_bytes()
    assert main(["status", f"sqlite:///{db}"]) == 2
    line = one_error_line(capsys)
    assert f"no outbox (table 'outbox') in the SQLite database '{db}'" in line
    assert "outboxbind migrate" in line
    assert db.read_bytes() == before  # not even switched to WAL
    with closing(sqlite3.connect(db)) as conn:
        tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    assert tables == [("notes",)]


@pytest.mark.parametrize("command", [["status"], ["migrate"]])
def test_a_host_in_a_sqlite_url_is_refused_with_the_forms_that_work(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: list[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*command, "sqlite://localhost/app.db"]) == 2
    line = one_error_line(capsys)
    assert "'sqlite://localhost/app.db': an SQLite URL names no host ('localhost')" in line
    assert "sqlite:///relative.db" in line
    assert "sqlite:////absolute/path.db" in line
    assert list(tmp_path.iterdir()) == []
