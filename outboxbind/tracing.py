"""W3C trace context and correlation ids: captured when a message is written, sent with it when
it is published, and current again while a handler runs for it.

Trace context uses OpenTelemetry when it is installed and a span is active; otherwise it costs one
check. A correlation id is yours: pass ``correlation_id=`` to ``publish()``, or set it for a
block (a request, say) with :func:`correlation`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar

__all__ = [
    "CORRELATION_ATTRIBUTE",
    "correlation",
    "current_correlation_id",
    "current_traceparent",
    "enter_message_context",
    "message_context",
]

CORRELATION_ATTRIBUTE = "outbox-correlation-id"
"""The attribute a message's correlation id travels in (to handlers, and to consumers)."""

_correlation_id: ContextVar[str | None] = ContextVar("outboxbind_correlation_id", default=None)


def current_correlation_id() -> str | None:
    """The correlation id set by the innermost :func:`correlation` block, or ``None``."""
    return _correlation_id.get()


@contextlib.contextmanager
def correlation(correlation_id: str | None) -> Iterator[None]:
    """Within the block, messages published without ``correlation_id=`` carry this one::

        with correlation(request.headers["x-request-id"]):
            bind(events, persister(conn)).publish(UserInvited(...))

    A handler runs inside its message's correlation, so what it publishes carries it on.
    ``None`` clears it for the block.
    """
    token = _correlation_id.set(correlation_id)
    try:
        yield
    finally:
        _correlation_id.reset(token)


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


def _load_attach() -> Callable[[Mapping[str, str]], Callable[[], None]] | None:
    try:
        from opentelemetry import context, propagate
    except ImportError:
        return None

    def attach(attributes: Mapping[str, str]) -> Callable[[], None]:
        token = context.attach(propagate.extract(dict(attributes)))
        return lambda: context.detach(token)

    return attach


_attach = _load_attach()


def enter_message_context(attributes: Mapping[str, str]) -> None:
    """Make the trace context and correlation id that a message carries the current ones, for
    good: call it in a context of the message's own (``contextvars.Context.run``)."""
    if _attach is not None and "traceparent" in attributes:
        _attach(attributes)
    correlation_id = attributes.get(CORRELATION_ATTRIBUTE)
    if correlation_id is not None:
        _correlation_id.set(correlation_id)


@contextlib.contextmanager
def message_context(attributes: Mapping[str, str]) -> Iterator[None]:
    """Within the block, the trace context and the correlation id that a message carries
    (``traceparent``, ``outbox-correlation-id``) are the current ones: a span started there is a
    child of the span that wrote the message, and messages published there carry both on. The
    handler topic runs each handler inside its message's context."""
    detach = None
    if _attach is not None and "traceparent" in attributes:
        detach = _attach(attributes)
    try:
        with correlation(attributes.get(CORRELATION_ATTRIBUTE)):
            yield
    finally:
        if detach is not None:
            detach()


def current_traceparent() -> dict[str, str]:
    """The active span's ``traceparent`` (and ``tracestate``), or nothing."""
    if _inject is None:
        return {}
    headers = _inject()
    return {k: v for k, v in headers.items() if k in ("traceparent", "tracestate")}
