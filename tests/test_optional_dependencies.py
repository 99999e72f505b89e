"""A missing optional dependency names the extra that installs it.

Each case runs a fresh interpreter in which the dependency cannot be imported
(``sys.modules[name] = None``), imports the outboxbind module that needs it, and checks the
error: an ``ImportError`` (so ``except ImportError`` still works) that says which
``pip install 'outboxbind[extra]'`` to run. The extras are read from ``pyproject.toml``, so a
renamed extra fails here.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

SNIPPET = """
import sys
for blocked in {blocked!r}:
    sys.modules[blocked] = None
import outboxbind  # the core needs none of them
try:
{statement}
except ImportError as exc:
    print(type(exc).__name__, exc.name, exc, sep="|")
else:
    print("imported")
"""


def run(blocked: list[str], statement: str) -> str:
    code = SNIPPET.format(blocked=blocked, statement=textwrap.indent(statement, "    "))
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


CASES = [
    (["psycopg"], "import outboxbind.stores.postgres", "postgres", "psycopg"),
    (["psycopg_pool"], "from outboxbind.stores.postgres import PostgresStore", "postgres", None),
    (["psycopg"], "import outboxbind.stores.postgres.schema", "postgres", "psycopg"),
    (["redis"], "from outboxbind.stores.redis import RedisStore", "redis", "redis"),
    (["redis"], "import outboxbind.topics.redis_streams", "redis", "redis"),
    (["google.cloud.pubsub_v1"], "import outboxbind.topics.pubsub", "pubsub", None),
    (["google"], "from outboxbind.topics.pubsub import PubSubTopic", "pubsub", None),
    (["pytest"], "import outboxbind.testing", "testing", "pytest"),
    (
        ["sqlalchemy", "sqlalchemy.orm", "sqlalchemy.engine", "sqlalchemy.ext.asyncio"],
        "from outboxbind.stores.postgres import sqlalchemy_persister\n"
        "sqlalchemy_persister(object())",
        "sqlalchemy",
        None,
    ),
]


@pytest.mark.parametrize(
    ("blocked", "statement", "extra", "name"),
    CASES,
    ids=[f"{case[2]}:{case[1].split()[1]}" for case in CASES],
)
def test_a_missing_dependency_names_the_extra_to_install(
    blocked: list[str], statement: str, extra: str, name: str | None
) -> None:
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert extra in extras
    _kind, missing, message = run(blocked, statement).split("|", 2)  # caught as ImportError
    assert f"pip install 'outboxbind[{extra}]'" in message
    if name is not None:
        assert missing == name  # the module that is missing, as ImportError.name
    assert blocked[0] in message  # and the original reason


def test_the_core_imports_without_any_optional_dependency() -> None:
    blocked = ["psycopg", "psycopg_pool", "redis", "google", "sqlalchemy", "opentelemetry"]
    statement = (
        "import outboxbind.cli, outboxbind.demo, outboxbind.stores.sqlite\n"
        "import outboxbind.stores.memory, outboxbind.topics.memory"
    )
    assert run(blocked, statement) == "imported"
