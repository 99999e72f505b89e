"""The documentation is tested like the code: its examples run, and cannot drift from the docs.

Conventions for ```python blocks in README.md and docs/*.md, checked here:

* ``<!-- example: docs/examples/NAME.py -->`` on the line before a block: the block must appear,
  line for line, in that script (the whole script or an excerpt). Every script in
  docs/examples/ has a ``main()`` that asserts what it shows, and this module runs it.
* ``<!-- snippet -->`` on the line before a block: an illustration that is not run. It must
  still be valid Python, and every name it imports from outboxbind must exist.

An example that needs a server reads it from the environment, as a user runs it: PostgreSQL from
``OUTBOXBIND_PG_DSN`` (with the suite's default), the Pub/Sub emulator from
``PUBSUB_EMULATOR_HOST``. Here they are set from the session's ``pg_dsn`` and ``pubsub_host``
fixtures, which start the servers when they are installed but not running. Such an example works
in a schema of its own, named by its ``SCHEMA``, and must drop it.

A ```python block with neither marker fails the suite. Relative links between the pages must
point at files (and headings) that exist. The demo (``python -m outboxbind.demo``) runs too.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import os
import re
import runpy
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import attrs
import psycopg
import pytest
from services import DEFAULT_PG_DSN

from outboxbind import demo

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "docs" / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

MARKER = re.compile(r"<!--\s*(?:example:\s*(?P<path>\S+)|(?P<snippet>snippet))\s*-->")
FENCE = re.compile(r"^(?P<fence>`{3,})(?P<language>[\w+-]*)\s*$")
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


@attrs.frozen
class Block:
    """A fenced code block of a Markdown page, with the marker on the line before it."""

    page: Path
    line: int  # 1-based line of the opening fence
    end: int  # 1-based line of the closing fence
    language: str
    code: str
    example: str | None  # the script path of an example marker
    snippet: bool

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page``, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        start = index
        closing_fence = opening.group("fence")
        index += 1
        body: list[str] = []
        while index < len(lines) and lines[index].strip() != closing_fence:
            body.append(lines[index])
            index += 1
        if index == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{start + 1}: unclosed code block")
        previous = next((line for line in reversed(lines[:start]) if line.strip()), "")
        marker = MARKER.fullmatch(previous.strip())
        blocks.append(
            Block(
                page=page,
                line=start + 1,
                end=index + 1,
                language=opening.group("language"),
                code="\n".join(body),
                example=marker.group("path") if marker else None,
                snippet=bool(marker and marker.group("snippet")),
            )
        )
        index += 1
    return blocks


BLOCKS = [block for page in PAGES for block in fenced_blocks(page)]
PYTHON_BLOCKS = [block for block in BLOCKS if block.language == "python"]
EXAMPLE_BLOCKS = [block for block in BLOCKS if block.example is not None]
SNIPPETS = [block for block in BLOCKS if block.snippet]


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines()]


def _contains(haystack: list[str], needle: list[str]) -> bool:
    width = len(needle)
    return any(haystack[i : i + width] == needle for i in range(len(haystack) - width + 1))


def _closest_excerpt(script: list[str], block: list[str]) -> str:
    """A diff of ``block`` against the stretch of ``script`` most like it, for the failure."""
    first = block[0] if block else ""
    starts = [i for i, line in enumerate(script) if line == first] or [0]
    best = max(
        starts,
        key=lambda i: difflib.SequenceMatcher(None, script[i : i + len(block)], block).ratio(),
    )
    excerpt = script[best : best + len(block)]
    return "\n".join(difflib.unified_diff(excerpt, block, "script", "docs", lineterm=""))


# -- (a) every example runs --------------------------------------------------------------------


def test_there_are_examples() -> None:
    assert EXAMPLES, f"no scripts in {EXAMPLES_DIR}"


#: The environment variables naming the servers an example may need, and the fixtures that
#: provide them.
SERVERS = {"OUTBOXBIND_PG_DSN": "pg_dsn", "PUBSUB_EMULATOR_HOST": "pubsub_host"}


def _servers(script: Path) -> list[str]:
    source = script.read_text(encoding="utf-8")
    return [variable for variable in SERVERS if variable in source]


def _schema_exists(dsn: str, schema: str) -> bool:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM information_schema.schemata WHERE schema_name = %s", (schema,)
        ).fetchone()
    return row == (1,)


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(
    script: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in _servers(script):
        monkeypatch.setenv(variable, request.getfixturevalue(SERVERS[variable]))
    namespace = runpy.run_path(str(script), run_name=f"docs_example_{script.stem}")
    main = namespace.get("main")
    assert callable(main), f"{script.relative_to(ROOT)} must define main()"
    run: Callable[[], object] = main
    run()
    schema = namespace.get("SCHEMA")
    if "OUTBOXBIND_PG_DSN" in _servers(script) and isinstance(schema, str):
        dsn = os.environ["OUTBOXBIND_PG_DSN"]
        assert not _schema_exists(dsn, schema), f"{script.name} left its schema {schema} behind"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_an_example_needing_postgres_reads_the_dsn_with_the_default(script: Path) -> None:
    if "OUTBOXBIND_PG_DSN" not in _servers(script):
        return
    source = script.read_text(encoding="utf-8")
    assert f'os.environ.get("OUTBOXBIND_PG_DSN", "{DEFAULT_PG_DSN}")' in source, script.name
    assert re.search(r"^SCHEMA = f\"\w+_\{uuid\.uuid4\(\)", source, re.MULTILINE), (
        f'{script.name}: work in a schema of its own, SCHEMA = f"name_{{uuid.uuid4()...}}"'
    )


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs_as_a_script(script: Path) -> None:
    source = script.read_text(encoding="utf-8")
    assert 'if __name__ == "__main__":\n    main()' in source, (
        f'{script.relative_to(ROOT)} must end with: if __name__ == "__main__": main()'
    )


# -- (b) the docs show the tested code ---------------------------------------------------------


def test_every_python_block_is_marked() -> None:
    unmarked = [str(b) for b in PYTHON_BLOCKS if b.example is None and not b.snippet]
    assert not unmarked, (
        "put <!-- example: docs/examples/NAME.py --> (a tested excerpt) or <!-- snippet --> "
        f"(an illustration) on the line before each ```python block: {unmarked}"
    )


@pytest.mark.parametrize("block", EXAMPLE_BLOCKS, ids=str)
def test_example_block_is_in_its_script(block: Block) -> None:
    assert block.example is not None
    assert block.language == "python", f"{block}: an example block must be ```python"
    script = ROOT / block.example
    assert script.parent == EXAMPLES_DIR, f"{block}: examples live in docs/examples/"
    assert script.is_file(), f"{block}: {block.example} does not exist"
    code, source = _lines(block.code), _lines(script.read_text(encoding="utf-8"))
    assert code, f"{block}: the example block is empty"
    if not _contains(source, code):
        pytest.fail(
            f"{block}: this block is not (part of) {block.example}; copy it from the script, "
            f"which the suite runs:\n{_closest_excerpt(source, code)}"
        )


def test_every_example_is_shown_in_the_docs() -> None:
    shown = {ROOT / block.example for block in EXAMPLE_BLOCKS if block.example}
    hidden = [p.name for p in EXAMPLES if p not in shown]
    assert not hidden, f"examples no page shows (mark a block with them): {hidden}"


@pytest.mark.parametrize("block", SNIPPETS, ids=str)
def test_snippet_is_python_importing_real_names(block: Block) -> None:
    try:
        tree = ast.parse(block.code)
    except SyntaxError as exc:
        raise AssertionError(f"{block}: the snippet is not valid Python: {exc}") from exc
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("outboxbind"):
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                assert hasattr(module, alias.name), f"{block}: {node.module} has no {alias.name}"


def _slug(heading: str) -> str:
    """The anchor a heading gets on GitHub."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    """The anchors of the headings of ``page`` (a ``#`` line in a code block is no heading)."""
    in_code = {n for b in fenced_blocks(page) for n in range(b.line, b.end + 1)}
    lines = page.read_text(encoding="utf-8").splitlines()
    return {
        _slug(line.lstrip("#"))
        for number, line in enumerate(lines, 1)
        if line.startswith("#") and number not in in_code
    }


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    for match in LINK.finditer(page.read_text(encoding="utf-8")):
        target = match.group("target")
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.relative_to(ROOT)}: broken link {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), (
                f"{page.relative_to(ROOT)}: {target}: no such heading in {linked.name}"
            )


# -- (c) the demo ------------------------------------------------------------------------------

NOT_PUBLISHED = re.compile(r"ok  the rolled-back event \(id \d+\) was NOT published")


def test_demo_shows_the_rolled_back_message_was_not_published(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert demo.main([]) == 0
    out, err = capsys.readouterr()
    assert re.search(r"rollback +id (\d+) +order placed by carol", out), out
    assert NOT_PUBLISHED.search(out), out
    assert "ok  each of the 6 committed events was published once" in out
    assert "alice  1:placed#1  3:paid#1  5:shipped#1  6:placed#3" in out
    assert "FAILED" not in out + err


def test_demo_keeps_its_database_and_runs_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "shop.db"
    assert demo.main(["--db", str(db)]) == 0
    assert demo.main(["--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert len(NOT_PUBLISHED.findall(out)) == 2
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM demo_orders").fetchone() == (6,)
        assert conn.execute("SELECT count(*) FROM outbox").fetchone() == (0,)


def test_demo_fails_when_a_rolled_back_message_is_published(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def commit_but_claim_rollback(shop: demo.Shop, customer: str, item: str) -> None:
        with shop.conn:
            order_id = shop._insert_order(customer, item)
            events = [demo.OrderEvent("placed", order_id, customer, item)]
            ids = shop._publish(events)
        shop.log.append(demo.Written("a leak", ids, events, committed=False, error="pretend"))

    monkeypatch.setattr(demo.Shop, "place_order_and_charge", commit_but_claim_rollback)
    assert demo.main([]) == 1
    err = capsys.readouterr().err
    assert "FAILED: the rolled-back event (id 7) was NOT published" in err


def test_demo_reports_an_unusable_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "not-a-database.db"
    db.write_bytes(b"this is not SQLite" * 100)
    assert demo.main(["--db", str(db)]) == 2
    assert "cannot use" in capsys.readouterr().err


def test_demo_runs_as_a_module() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "outboxbind.demo"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert NOT_PUBLISHED.search(result.stdout), result.stdout
