"""The ``outboxbind`` command: run a relay, migrate, inspect the backlog and dead letters.

Stores are named by URL: ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``
(with ``?table=name`` for another outbox table). Only ``migrate`` and ``relay`` create an
outbox; ``status`` and ``dead-letters`` refuse a database that does not exist or holds none.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs

from outboxbind.errors import ConfigurationError, OutboxError
from outboxbind.handlers import handler_results
from outboxbind.relay import RELEASE_GRACE, Relay
from outboxbind.store import DeadLetterAdmin, ProgressStore

__all__ = ["main", "open_store"]

#: ``outboxbind relay`` exit statuses (2 is a configuration error, as for every command).
EXIT_DRAINED = 0  # stopped by a signal, after publishing everything due
EXIT_NOT_DRAINED = 3  # stopped, but the drain did not finish within --drain-timeout
EXIT_FORCED = 4  # a second signal during the drain: exited at once

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def open_store(url: str, *, migrate: bool = True, create: bool = True) -> Any:
    """Open the store a URL names (``sqlite:///path.db?table=outbox``).

    With ``create=False`` (the commands that inspect or repair an outbox) nothing is created:
    the database must exist and hold the outbox.

    Raises:
        ConfigurationError: the URL is malformed, or names a database that cannot be used.
        SchemaTooNew: the outbox was migrated by a newer outboxbind.
    """
    parts = urlsplit(url)
    options = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    if parts.scheme == "sqlite":
        from outboxbind.stores.sqlite import SQLiteStore

        if parts.netloc:
            raise ConfigurationError(
                f"{url!r}: an SQLite URL names no host ({parts.netloc!r}); write "
                "sqlite:///relative.db for a file under the current folder, or "
                "sqlite:////absolute/path.db for an absolute path"
            )
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ConfigurationError(f"{url!r}: name the database file, as sqlite:///app.db")
        return SQLiteStore(
            path, table=options.get("table", "outbox"), migrate=migrate, create=create
        )
    raise ConfigurationError(f"{url!r}: unknown store scheme {parts.scheme!r} (known: sqlite)")


def _load_relay(target: str) -> Relay:
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"{target!r}: give the relay factory as 'package.module:function'")
    factory = getattr(importlib.import_module(module_name), attribute)
    relay = factory() if callable(factory) and not isinstance(factory, Relay) else factory
    if not isinstance(relay, Relay):
        raise ConfigurationError(f"{target!r} gave {type(relay).__name__}, not an outboxbind Relay")
    return relay


def _admin(url: str) -> DeadLetterAdmin:
    store = open_store(url, migrate=False, create=False)  # inspect or repair: create nothing
    if not isinstance(store, DeadLetterAdmin):
        raise ConfigurationError(f"{url!r}: this store does not support dead-letter operations")
    return store


def _exit_at_once(signum: int) -> None:
    """A second signal: exit now, whatever the relay's threads are waiting for."""
    message = f"signal {signum} again: exiting at once, without draining\n"
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # the signal interrupted a write: exit all the same
            stream.flush()
    try:
        os.write(sys.stderr.fileno(), message.encode())
    finally:
        os._exit(EXIT_FORCED)


def _relay(args: argparse.Namespace) -> int:
    """Poll in a thread while the main thread waits for signals: the main thread is then never
    stuck in a call (a hung topic, a store waiting for a lock) when a signal comes."""
    relay = _load_relay(args.factory)
    signalled = threading.Event()
    wake = threading.Event()  # a signal came, or the poll loop ended
    failure: list[BaseException] = []

    def on_signal(signum: int, _frame: object) -> None:
        if signalled.is_set():
            _exit_at_once(signum)
        signalled.set()
        print(f"signal {signum}: draining (up to {args.drain_timeout}s)", file=sys.stderr)
        wake.set()

    def poll() -> None:
        try:
            relay.poll_for_messages(args.batch_size)
        except BaseException as exc:  # raised again in the main thread
            failure.append(exc)
        finally:
            wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"relaying topics {', '.join(sorted(relay.topics))}", file=sys.stderr)
    poller = threading.Thread(target=poll, name="outboxbind-relay", daemon=True)
    poller.start()
    while not wake.wait(1.0):  # a timed wait, so that signals are handled on every platform
        pass
    drained = relay.stop(drain=True, timeout=args.drain_timeout) if signalled.is_set() else True
    stuck = relay.is_polling  # stop() gave up, and waited for the loop in vain
    if not stuck:
        poller.join(RELEASE_GRACE)  # the loop has ended: let its thread finish
    if failure:
        raise failure[0]
    print(f"stopped: {json.dumps(relay.totals)}", file=sys.stderr)
    if stuck:  # a daemon thread: it does not hold up the exit
        print("the poll loop is stuck in a call that ignores the stop; leaving it", file=sys.stderr)
    if not drained or stuck:
        print(
            f"not drained within {args.drain_timeout}s (drain timed out, or the store failed): "
            "what was not published stays in the outbox for the next relay",
            file=sys.stderr,
        )
        return EXIT_NOT_DRAINED
    return EXIT_DRAINED


def _migrate(args: argparse.Namespace) -> int:
    store = open_store(args.store, migrate=False)
    applied = store.migrate()
    print(f"applied migrations: {applied}" if applied else "the schema is up to date")
    return 0


def _status(args: argparse.Namespace) -> int:
    rows = _admin(args.store).backlog()
    if args.json:
        print(json.dumps([attrs.asdict(row) for row in rows]))
        return 0
    if not rows:
        print("the outbox is empty")
        return 0
    print(f"{'topic':30} {'pending':>9} {'oldest (s)':>11} {'dead':>6}")
    for row in rows:
        print(f"{row.topic:30} {row.pending:>9} {row.oldest_pending_age:>11.1f} {row.dead:>6}")
    return 0


def _dead_letters(args: argparse.Namespace) -> int:
    admin = _admin(args.store)
    if args.action == "list":
        for dead in admin.dead_letters(args.topic, args.limit):
            message = dead.message
            print(
                f"{message.id}\t{dead.state}\t{message.topic}\t{message.ordering_key or '-'}\t"
                f"attempts={message.attempts}\t{dead.since.isoformat()}\t{dead.error}"
            )
        return 0
    if not args.ids:
        raise ConfigurationError(f"dead-letters {args.action}: give the ids of the messages")
    if args.action == "replay":
        print(f"replayed {admin.replay_dead_letters(args.ids)} message(s)")
    else:
        print(f"purged {admin.purge_dead_letters(args.ids)} message(s)")
    return 0


def _show(args: argparse.Namespace) -> int:
    store = open_store(args.store, migrate=False, create=False)
    if not isinstance(store, ProgressStore):
        raise ConfigurationError(f"{args.store!r}: this store cannot look messages up by id")
    record = store.find_message(args.id)
    if record is None:
        print(f"no message {args.id} in the outbox (never written, or deleted once published)")
        return 1
    message = record.message
    try:
        results = handler_results(record) if message.progress else {}
    except ValueError:
        results = {}  # progress of another kind than a handler topic's: shown as it is
    if args.json:
        print(
            json.dumps(
                {
                    "id": message.id,
                    "topic": message.topic,
                    "ordering_key": message.ordering_key,
                    "state": record.state,
                    "attempts": message.attempts,
                    "created_at": message.created_at.isoformat(),
                    "error": record.error,
                    "since": record.since.isoformat() if record.since else None,
                    "publish_id": record.publish_id,
                    "attributes": dict(message.attributes),
                    "progress": json.loads(message.progress) if message.progress else None,
                }
            )
        )
        return 0
    print(f"message {message.id}: {record.state}")
    print(f"  topic {message.topic!r}, key {message.ordering_key or '-'}")
    print(f"  written {message.created_at.isoformat()}, {message.attempts} failed attempt(s)")
    if record.since is not None:
        print(f"  {'settled' if record.state == 'settled' else 'last failed'} {record.since}")
    if record.publish_id:
        print(f"  publish id {record.publish_id}")
    if record.error:
        print(f"  last error: {record.error}")
    for name, result in sorted(results.items()):
        if result.processed_at is not None:
            state = f"succeeded {result.processed_at.isoformat()}"
        elif result.unprocessable_at is not None:
            state = f"unprocessable {result.unprocessable_at.isoformat()}"
        else:
            state = "not yet succeeded"
        line = f"  handler {name}: {state}, {result.errors} error(s)"
        print(f"{line}; last: {result.last_error}" if result.last_error else line)
    if message.progress and not results:
        print(f"  progress: {message.progress}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="outboxbind", description=__doc__)
    parser.add_argument("--log-level", **_log_level_option("INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    relay = commands.add_parser("relay", help="run a relay until SIGTERM/SIGINT, then drain")
    relay.add_argument("factory", help="'module:function' returning a configured Relay")
    relay.add_argument("--batch-size", type=int, default=100)
    relay.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds to drain after SIGTERM/SIGINT (exit status 0 drained, 3 not drained; "
        "a second signal exits at once with 4)",
    )
    relay.add_argument("--log-level", **_log_level_option(argparse.SUPPRESS))
    relay.set_defaults(run=_relay)

    migrate = commands.add_parser("migrate", help="create or upgrade the outbox schema")
    migrate.add_argument("store", help="store URL, e.g. sqlite:///app.db")
    migrate.set_defaults(run=_migrate)

    status = commands.add_parser("status", help="backlog and oldest pending age per topic")
    status.add_argument("store", help="store URL")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=_status)

    dead = commands.add_parser("dead-letters", help="list, replay or purge dead letters")
    dead.add_argument("action", choices=["list", "replay", "purge"])
    dead.add_argument("store", help="store URL")
    dead.add_argument("ids", nargs="*", help="message ids (replay, purge)")
    dead.add_argument("--topic", help="only this topic (list)")
    dead.add_argument("--limit", type=int, default=100)
    dead.set_defaults(run=_dead_letters)

    show = commands.add_parser(
        "show", help="one message: where it stands, its last error, its handlers' results"
    )
    show.add_argument("store", help="store URL")
    show.add_argument("id", help="the message's outbox id")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=_show)

    commands.add_parser("demo", help="run the SQLite demo (see: outboxbind demo --help)")
    return parser


def _log_level_option(default: str) -> dict[str, Any]:
    return {
        "default": default,
        "type": str.upper,
        "choices": ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        "help": "log to stderr from this level on (default: INFO)",
    }


def _configure_logging(level: str) -> None:
    """The command's logging: to stderr, from ``level`` on; the library itself configures none.
    A no-op when the process has configured logging already (embedding, tests)."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options (--db, --help)
        from outboxbind.demo import main as demo

        return demo(argv[1:])
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    _configure_logging(args.log_level)
    try:
        return run(args)
    except (OutboxError, ImportError, AttributeError, ValueError) as exc:
        print(f"outboxbind {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
