"""W3C trace context: captured when a message is written, sent with it when it is published.

Uses OpenTelemetry when it is installed and a span is active; otherwise costs one check.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["current_traceparent"]


def _load() -> Callable[[], dict[str, str]] | None:
    try:
        from opentelemetry import propagate
    except ImportError:
        return None

    def carrier() -> dict[str, str]:
        headers: dict[str, str] = {}
        propagate.inject(headers)
        return headers

    return carrier


_inject = _load()


def current_traceparent() -> dict[str, str]:
    """The active span's ``traceparent`` (and ``tracestate``), or nothing."""
    if _inject is None:
        return {}
    headers = _inject()
    return {k: v for k, v in headers.items() if k in ("traceparent", "tracestate")}
