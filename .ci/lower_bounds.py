"""The lower bounds pyproject.toml declares for the library, as exact pins.

``python .ci/lower_bounds.py`` prints one ``name==version`` a line: every ``name>=version`` of
the dependencies and of the extras users install (the development and benchmark extras are not
the library's). ``--check`` compares them with what is installed and exits non-zero on any
difference, so CI's minimums run cannot drift from what the package declares.
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
NOT_THE_LIBRARY = {"dev", "bench", "testing"}


def lower_bounds() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra, listed in project["optional-dependencies"].items():
        if extra not in NOT_THE_LIBRARY:
            requirements += listed
    bounds: dict[str, str] = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?>=([^,;\s]+)", requirement)
        if match is None:
            raise SystemExit(f"pyproject.toml: {requirement!r} has no plain >= lower bound")
        name = re.sub(r"[-_.]+", "-", match.group(1)).lower()
        bounds[name] = match.group(3)
    return bounds


def main() -> int:
    bounds = lower_bounds()
    if sys.argv[1:] != ["--check"]:
        print("\n".join(f"{name}=={version}" for name, version in sorted(bounds.items())))
        return 0
    wrong = []
    for name, version in sorted(bounds.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = "not installed"
        if installed == "not installed" or Version(installed) != Version(version):
            wrong.append(f"{name}: declared >={version}, installed {installed}")
    print("\n".join(wrong) or f"installed at the declared lower bounds: {len(bounds)} packages")
    return 1 if wrong else 0


if __name__ == "__main__":
    raise SystemExit(main())
