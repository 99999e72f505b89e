"""Run ``mypy --strict`` over the package as it installs, the stores included.

setuptools maps ``outboxbind.stores`` to the top-level ``stores/`` folder; mypy cannot follow
that mapping, so this builds a view of symlinks (``.typecheck/outboxbind`` with ``stores``
inside it), checks the package there together with the tests and the docs' examples, and
prints paths as they are in the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VIEW = ROOT / ".typecheck"


def build_view() -> None:
    shutil.rmtree(VIEW, ignore_errors=True)
    package = VIEW / "outboxbind"
    package.mkdir(parents=True)
    for entry in (ROOT / "outboxbind").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    (package / "stores").symlink_to(ROOT / "stores")


def main() -> int:
    build_view()
    targets = [p for p in ("tests", "docs/examples", "benchmarks") if (ROOT / p).is_dir()]
    command = [sys.executable, "-m", "mypy", str(VIEW / "outboxbind"), *targets, *sys.argv[1:]]
    env = {**os.environ, "MYPYPATH": str(VIEW)}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    view_prefix = ".typecheck/outboxbind/stores/"
    output = (result.stdout + result.stderr).replace(view_prefix, "stores/")
    print(output.replace(".typecheck/outboxbind/", "outboxbind/"), end="")
    return result.returncode


if __name__ == "__main__":
    raise SystemExit(main())
