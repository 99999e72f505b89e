"""What the multi-process tests of the SQLite and the PostgreSQL store share.

Two halves:

* for the scripts that run in the subprocesses (``tests/relay_process.py``,
  ``tests/pg_relay_process.py``): the test topics and :class:`LogTopic`, which publishes by
  appending to a log shared by every relay process; the life of a relay process until SIGTERM
  has it drain (:func:`run_relay_process`); the writers' loop of small transactions
  (:func:`write_transactions`); the command-line options both scripts take
  (:func:`command_line`);
* for the tests that drive them (``tests/test_sqlite_processes.py``,
  ``tests/test_postgres_processes.py``): :class:`Processes`, the subprocesses a test started,
  and :class:`RelayProcess`; reading the log (:func:`read_rows`, :func:`log_size`); the checks
  both stores make of what was published (:func:`check_identity`, :func:`duplicates_of`,
  :func:`first_publications`, :func:`check_relay_totals`).

What a log line or a writer's record holds is up to each store's script and tests. The scripts
run as ``python tests/<script>.py``, which puts ``tests/`` on ``sys.path``; pytest puts it there
for the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from abc import abstractmethod
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence, Set
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Protocol, TypeVar

import attrs
import pytest

from outboxbind import Relay
from outboxbind.codecs import Codec
from outboxbind.messages import PersistedMessage
from outboxbind.topics import PublishOutcome, Topic, publish_in_key_order

# -- the test topics -----------------------------------------------------------------------------

NO_KEY = "-"  # how logs and records write "no ordering key"
KEYED_TOPICS = ("alpha", "beta")  # ordered per key, some messages topic-wide (key None)
UNKEYED_TOPICS = ("gamma",)  # no ordering key function: one order for the whole topic
TOPICS = KEYED_TOPICS + UNKEYED_TOPICS

OrderingSequence = tuple[str, str]
"""Messages published in one order: (topic, ordering key or :data:`NO_KEY`)."""


class KeyedEvent(Protocol):
    """What :class:`LogTopic` needs of a test message: its ordering key."""

    @property
    def key(self) -> str | None: ...


EventT = TypeVar("EventT", bound=KeyedEvent)


def key_of(event: KeyedEvent) -> str | None:
    """The ordering key function of the keyed test topics."""
    return event.key


class LogTopic(Topic[EventT]):
    """Publishes by appending a line per message to a log shared by every relay process.

    The log is opened with ``O_APPEND`` and each line is one ``write``, so that the lines of
    several relays never mix; it is fsynced once per batch. A batch is logged in key order
    through :func:`~outboxbind.topics.publish_in_key_order`. A store's script says what a line
    holds (:meth:`line`) and may act around a batch (:meth:`before_batch`, :meth:`after_line`,
    :meth:`after_batch`).
    """

    def __init__(self, name: str, codec: Codec[EventT], log_fd: int, *, keyed: bool) -> None:
        super().__init__(name, codec, ordering_key=key_of if keyed else None)
        self.log_fd = log_fd
        self.pid = os.getpid()

    @abstractmethod
    def line(self, outbox_id: str, key: str | None, event: EventT, data: bytes) -> str:
        """The log line (tab-separated, newline-terminated) of one published message."""

    def before_batch(self) -> None:
        """Called before a batch is logged; nothing by default."""

    def after_line(self, message: PersistedMessage, remaining: int) -> None:
        """Called once ``message`` is logged, ``remaining`` messages of its batch still to send;
        nothing by default."""

    def after_batch(self) -> None:
        """Called once a batch is logged and fsynced, before the relay acknowledges it; nothing
        by default."""

    def write_line(self, outbox_id: str, key: str | None, event: EventT, data: bytes) -> None:
        """Append the line of one message to the log."""
        line = self.line(outbox_id, key, event, data)
        os.write(self.log_fd, line.encode())  # one write on an O_APPEND fd: lines never mix

    def publish(self, message: EventT, *, attributes: Mapping[str, str] | None = None) -> str:
        """A direct publish (not used by the tests): logged with the outbox id ``direct``."""
        entry = self.make_entry(message, attributes=attributes)
        self.write_line("direct", entry.ordering_key, message, entry.data)
        return f"{self.name}:direct"

    def publish_batch(
        self, messages: Sequence[PersistedMessage], *, timeout: float
    ) -> list[PublishOutcome]:
        """Log each message in key order; fsync once the batch is written."""
        self.before_batch()
        remaining = len(messages)

        def send(message: PersistedMessage) -> str:
            nonlocal remaining
            remaining -= 1
            event = self.codec.decode(message.data)
            self.write_line(message.id, message.ordering_key, event, message.data)
            self.after_line(message, remaining)
            return f"{self.name}:{message.id}"

        try:
            return publish_in_key_order(messages, send)
        finally:
            os.fsync(self.log_fd)
            self.after_batch()


# -- the scripts: a relay process, a writer's transactions, the command line -------------------


def run_relay_process(
    args: argparse.Namespace, open_relay: Callable[[int], tuple[Relay, Callable[[], None]]]
) -> int:
    """The life of a relay process: poll until SIGTERM, then drain, report and exit.

    ``open_relay(log_fd)`` makes the store and the relay, with the test topics registered to log
    to ``log_fd`` (the ``--log`` file), and returns the relay and what closes the store. The
    relay polls in a thread; ``--ready`` is written once it is started. On SIGTERM, or if the
    poll thread ends, the relay stops with ``stop(drain=True)`` within ``--drain-timeout``; then
    its totals go to ``--stats`` and to stdout as JSON. Exit status 0 when it stopped in time
    without a failure, 3 otherwise.
    """
    logging.basicConfig(
        level=logging.WARNING, format=f"%(asctime)s relay {os.getpid()} %(name)s: %(message)s"
    )
    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop_requested.set())

    log_fd = os.open(args.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    relay, close_store = open_relay(log_fd)
    failure: list[BaseException] = []

    def poll() -> None:
        try:
            relay.poll_for_messages(args.batch_size)
        except BaseException as exc:  # reported through the exit status
            failure.append(exc)
            raise

    thread = threading.Thread(target=poll, name="relay-poll", daemon=True)
    thread.start()
    Path(args.ready).write_text(f"{os.getpid()}\n")
    while not stop_requested.wait(0.05):
        if not thread.is_alive():
            break
    stopped = relay.stop(drain=True, timeout=args.drain_timeout)
    thread.join(args.drain_timeout)
    close_store()
    os.close(log_fd)
    stats = {
        "pid": os.getpid(),
        "totals": relay.totals,
        "stopped_in_time": stopped,
        "failure": repr(failure[0]) if failure else None,
    }
    Path(args.stats).write_text(json.dumps(stats))
    print(json.dumps(stats), flush=True)
    return 0 if stopped and not failure and not thread.is_alive() else 3


class WriterTransaction(NamedTuple):
    """One transaction of a writer, as :func:`write_transactions` reports it once it ended."""

    records: list[str]  # what ``publish`` returned for each of its messages
    started: float  # time.monotonic() before its first insert
    committed: float | None  # time.monotonic() after its commit returned; None: rolled back


class _Rollback(Exception):
    """Raised inside a transaction block to roll it back."""


def write_transactions(
    args: argparse.Namespace,
    count: int,
    rng: random.Random,
    *,
    keys: Sequence[str],
    keyed_share: float,
    transaction: Callable[[], AbstractContextManager[object]],
    publish: Callable[[str, str | None, int], str],
) -> Iterator[WriterTransaction]:
    """Commit ``count`` messages in many small transactions; yield each one once it ended.

    A transaction holds 1 to ``--max-per-tx`` messages and is rolled back with the chance
    ``--rollback-rate`` (its messages do not count towards ``count``); ``--pause`` seconds pass
    after each commit. Each message goes to a random test topic; on a keyed topic it has, with
    the chance ``keyed_share``, a random key of ``keys``, else none. Inside ``transaction()``
    (which commits on exit and rolls back on an exception), ``publish(topic, key, seq)`` writes
    the message and returns its record; ``seq`` numbers the messages from 1, rolled back or not.
    """
    seq = 0
    written = 0
    while written < count:
        size = min(rng.randint(1, args.max_per_tx), count - written)
        rollback = rng.random() < args.rollback_rate
        records = []
        started = time.monotonic()
        try:
            with transaction():
                for _ in range(size):
                    name = rng.choice(TOPICS)
                    keyed = name in KEYED_TOPICS and rng.random() < keyed_share
                    key = rng.choice(keys) if keyed else None
                    seq += 1
                    records.append(publish(name, key, seq))
                if rollback:
                    raise _Rollback
        except _Rollback:
            yield WriterTransaction(records, started, None)
            continue
        yield WriterTransaction(records, started, time.monotonic())
        written += size
        if args.pause:
            time.sleep(args.pause)


def command_line(
    description: str | None,
    *,
    run_relay: Callable[[argparse.Namespace], int],
    run_writer: Callable[[argparse.Namespace], int],
    batch_size: int,
    drain_timeout: float,
    rollback_rate: float,
) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    """The scripts' parser and its ``relay`` and ``write`` commands, with the options every
    store's script takes; the script adds its store's own options to the two commands. The
    parsed arguments' ``run`` is the command's function: ``run_relay`` or ``run_writer``."""
    parser = argparse.ArgumentParser(description=description)
    commands = parser.add_subparsers(dest="command", required=True)
    relay = commands.add_parser("relay")
    relay.set_defaults(run=run_relay)
    relay.add_argument("--log", required=True)
    relay.add_argument("--ready", required=True, help="file written once the relay polls")
    relay.add_argument("--stats", required=True, help="file the totals are written to on exit")
    relay.add_argument("--lease", type=float, default=30.0)
    relay.add_argument("--batch-size", type=int, default=batch_size)
    relay.add_argument("--poll-interval", type=float, default=0.05)
    relay.add_argument("--publish-timeout", type=float, default=10.0)
    relay.add_argument("--batch-delay", type=float, default=0.0)
    relay.add_argument("--drain-timeout", type=float, default=drain_timeout)
    writer = commands.add_parser("write")
    writer.set_defaults(run=run_writer)
    writer.add_argument("--out", required=True)
    writer.add_argument("--count", type=int, required=True, help="messages to commit")
    writer.add_argument("--seed", type=int, default=0)
    writer.add_argument("--max-per-tx", type=int, default=4)
    writer.add_argument("--rollback-rate", type=float, default=rollback_rate)
    writer.add_argument("--pause", type=float, default=0.0, help="seconds between transactions")
    return parser, relay, writer


# -- the tests: processes ------------------------------------------------------------------------


class RelayProcess(NamedTuple):
    """A relay process and its files: ``ready`` once it polls, ``stats`` when it exits."""

    process: subprocess.Popen[bytes]
    ready: Path
    stats: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def totals(self) -> dict[str, int]:
        """The relay's totals, as it wrote them on exit."""
        data: dict[str, Any] = json.loads(self.stats.read_text())
        totals: dict[str, int] = data["totals"]
        return totals


class Processes:
    """The subprocesses a test started from ``script``; every one still running is killed when
    the ``with`` block ends (the ``processes`` fixture's teardown).

    A process's stdout and stderr go to ``<name>.out`` in ``tmp_path``. ``stop_timeout`` bounds
    a relay's drain after SIGTERM; ``poll_interval`` is the default step of :meth:`wait_for`.
    """

    def __init__(
        self, tmp_path: Path, script: Path, *, stop_timeout: float, poll_interval: float
    ) -> None:
        self.tmp_path = tmp_path
        self.script = script
        self.stop_timeout = stop_timeout
        self.poll_interval = poll_interval
        self.running: list[tuple[subprocess.Popen[bytes], Path]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.kill_all()

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        """Run ``script`` with ``args``."""
        output = self.tmp_path / f"{name}.out"
        with open(output, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, str(self.script), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        self.running.append((process, output))
        return process

    def start_relay(self, name: str, log: Path, *options: str) -> RelayProcess:
        """Start a relay publishing to ``log``; ``options`` say where its outbox is and more."""
        ready = self.tmp_path / f"{name}.ready"
        stats = self.tmp_path / f"{name}.stats.json"
        process = self.start(
            name, "relay", f"--log={log}", f"--ready={ready}", f"--stats={stats}", *options
        )
        return RelayProcess(process, ready, stats)

    def output_of(self, process: subprocess.Popen[bytes]) -> str:
        """The end of what ``process`` printed (for a failure message)."""
        for candidate, output in self.running:
            if candidate is process:
                return output.read_text(errors="replace")[-4000:]
        return ""

    def check_alive(self, *processes: subprocess.Popen[bytes]) -> None:
        """Fail at once, with its output, if one of ``processes`` has exited."""
        for process in processes:
            if process.poll() is not None:
                pytest.fail(
                    f"process {process.args!r} exited early with {process.returncode}:\n"
                    + self.output_of(process)
                )

    def wait(self, process: subprocess.Popen[bytes], timeout: float) -> int:
        """The exit status of ``process``; fail if it does not exit within ``timeout``."""
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {process.args!r} did not exit within {timeout}s")

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM ``process`` (a relay drains and exits) and require a clean exit."""
        process.send_signal(signal.SIGTERM)
        code = self.wait(process, self.stop_timeout)
        assert code == 0, f"exit status {code}:\n{self.output_of(process)}"

    def kill_all(self) -> None:
        """SIGKILL every process still running and reap them."""
        for process, _ in self.running:
            if process.poll() is None:
                process.kill()
        for process, _ in self.running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(10)

    def wait_for(
        self,
        condition: Callable[[], bool],
        what: str,
        timeout: float,
        alive: Iterable[subprocess.Popen[bytes]] = (),
        interval: float | None = None,
    ) -> float:
        """Poll ``condition`` every ``interval`` seconds (by default ``poll_interval``) until
        true and return the seconds it took; fail after ``timeout`` or as soon as a process of
        ``alive`` died."""
        watched = list(alive)
        step = self.poll_interval if interval is None else interval
        start = time.monotonic()
        while not condition():
            self.check_alive(*watched)
            if time.monotonic() - start > timeout:
                pytest.fail(f"timed out after {timeout}s waiting for {what}")
            time.sleep(step)
        return time.monotonic() - start


# -- the tests: the log and what it shows --------------------------------------------------------

Row = TypeVar("Row")


def read_rows(path: Path, parse: Callable[[list[str]], Row]) -> list[Row]:
    """Each line of the tab-separated file ``path``, its fields parsed with ``parse``; none if
    the file does not exist (yet)."""
    if not path.exists():
        return []
    return [parse(row.split("\t")) for row in path.read_text().splitlines()]


def log_size(log: Path) -> int:
    """Lines in the log so far (cheap: counts newlines)."""
    if not log.exists():
        return 0
    return log.read_bytes().count(b"\n")


class PublishedLine(Protocol):
    """What the shared checks read of a log line (each store's ``Line`` holds more)."""

    @property
    def outbox_id(self) -> str: ...

    @property
    def content(self) -> Hashable:
        """What the message says: the line shows it as its writer recorded it."""

    @property
    def serial(self) -> Hashable:
        """Which message this is among all the writers wrote, committed or rolled back (what
        :attr:`WrittenMessages.rolled_back` holds)."""


LineT = TypeVar("LineT", bound=PublishedLine)


class WrittenMessages(Protocol):
    """What the shared checks read of what the writers recorded (each store's ``Written``)."""

    @property
    def rolled_back(self) -> Set[Hashable]:
        """The serials of the messages whose transaction was rolled back."""

    def contents(self) -> Mapping[str, Hashable]:
        """The content of each committed message, by outbox id."""


def check_identity(lines: Sequence[PublishedLine], written: WrittenMessages) -> None:
    """Every line is a committed message, under its own outbox id and with its own content (so
    every duplicate carries the same id and content); none was rolled back; none is missing."""
    committed = written.contents()
    wrong = [line for line in lines if committed.get(line.outbox_id) != line.content]
    assert not wrong, f"{len(wrong)} published lines do not match what was committed: {wrong[:5]}"
    leaked = [line for line in lines if line.serial in written.rolled_back]
    assert not leaked, (
        f"{len(leaked)} messages of rolled-back transactions were published: {leaked[:10]}"
    )
    missing = set(committed) - {line.outbox_id for line in lines}
    assert not missing, f"{len(missing)} committed messages never published: {sorted(missing)[:10]}"


def duplicates_of(lines: Iterable[PublishedLine]) -> dict[str, int]:
    """The outbox ids published more than once, with how many times."""
    return {i: n for i, n in Counter(line.outbox_id for line in lines).items() if n > 1}


def first_publications(lines: Iterable[LineT]) -> list[LineT]:
    """``lines`` without the later publications of a message."""
    seen: set[str] = set()
    firsts = []
    for line in lines:
        if line.outbox_id not in seen:
            seen.add(line.outbox_id)
            firsts.append(line)
    return firsts


def check_relay_totals(
    relays: Sequence[RelayProcess],
    per_relay: Counter[int],
    totals: Mapping[int, Mapping[str, int]],
) -> None:
    """Each relay's totals count what it logged (``per_relay``, by pid), with no store error and
    no failed message, and every relay published something."""
    for relay in relays:
        assert totals[relay.pid]["published"] == per_relay[relay.pid], totals
        assert totals[relay.pid]["store_errors"] == 0, totals
        assert totals[relay.pid]["failed"] == 0, totals
    assert all(per_relay[relay.pid] > 0 for relay in relays), (
        f"a relay did no work: {dict(per_relay)}"
    )


# -- shared by the SQLite and Redis relay scripts -------------------------------------------------

KEYS = tuple(f"k{i}" for i in range(5))


@attrs.frozen
class Event:
    """The test message: a writer-wide sequence number and its ordering key."""

    seq: int
    key: str | None = None


class Stall:
    """Hang the relay mid-batch once ``after`` messages were published, process-wide."""

    def __init__(self, after: int, marker: Path) -> None:
        self.after = after
        self.marker = marker
        self._count = 0
        self._lock = threading.Lock()

    def published_one(self) -> bool:
        """Count one published message; whether the threshold is reached."""
        with self._lock:
            self._count += 1
            return self._count >= self.after
