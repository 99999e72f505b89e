"""Optional dependencies: a missing one is reported with the extra that installs it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from outboxbind.errors import MissingExtra

__all__ = ["needs_extra"]


@contextmanager
def needs_extra(extra: str, module: str) -> Iterator[None]:
    """Turn an ``ImportError`` raised inside the block into :class:`MissingExtra`, which names
    ``module`` (what needed it) and the ``extra`` of ``pyproject.toml`` that installs it."""
    try:
        yield
    except ImportError as exc:
        raise MissingExtra.of(module, extra, exc) from exc
