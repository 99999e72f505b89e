"""Per-topic policies: how failed publishes are retried, and what happens after the last try."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Literal

import attrs

from outboxbind.errors import ConfigurationError

__all__ = ["PoisonPolicy", "RetryPolicy"]

PoisonPolicy = Literal["block", "park"]
"""What the relay does with a message that used up its attempts (or is unpublishable).

* ``"block"``: keep it at the head of its sequence, holding back the later messages of its
  ordering key (or topic) until an operator replays or purges it. Order is never broken.
* ``"park"``: move it to the dead letters and go on with the rest of its sequence.
"""


def _positive(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not value > 0:
        raise ConfigurationError(f"RetryPolicy.{attribute.name} must be positive, not {value!r}")


@attrs.frozen
class RetryPolicy:
    """Exponential backoff with jitter between publish attempts of one message.

    The delay after the n-th failed attempt is ``initial_delay * multiplier ** (n - 1)``, capped
    at ``max_delay``, then spread by ``jitter`` (0.2 means anywhere from 80% to 120%) so that
    relays and keys that failed together do not retry together.

    Attributes:
        max_attempts: attempts before the poison policy applies (1 means no retry).
        initial_delay: seconds before the first retry.
        max_delay: the longest delay in seconds.
        multiplier: growth factor per attempt.
        jitter: the fraction by which a delay is randomly spread, in ``[0, 1)``.
        backoff: a function of the attempt count giving the delay (seconds, or a timedelta)
            instead of the exponential formula; used as it is, without jitter (txob's
            ``backoff`` option).
    """

    max_attempts: int = attrs.field(default=10)
    initial_delay: float = attrs.field(default=1.0, validator=_positive)
    max_delay: float = attrs.field(default=300.0, validator=_positive)
    multiplier: float = attrs.field(default=2.0, validator=_positive)
    jitter: float = attrs.field(default=0.2)
    backoff: Callable[[int], float | timedelta] | None = attrs.field(default=None)

    @max_attempts.validator
    def _check_attempts(self, _attribute: attrs.Attribute[int], value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise ConfigurationError(f"RetryPolicy.max_attempts must be >= 1, not {value!r}")

    @jitter.validator
    def _check_jitter(self, _attribute: attrs.Attribute[float], value: float) -> None:
        if not 0 <= value < 1:
            raise ConfigurationError(f"RetryPolicy.jitter must be in [0, 1), not {value!r}")

    @backoff.validator
    def _check_backoff(self, _attribute: attrs.Attribute[object], value: object) -> None:
        if value is not None and not callable(value):
            raise ConfigurationError(f"RetryPolicy.backoff must be callable, not {value!r}")

    def delay(self, attempts: int, random: Callable[[], float]) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt; ``random()`` is in [0, 1)."""
        if self.backoff is not None:
            chosen = self.backoff(attempts)
            seconds = chosen.total_seconds() if isinstance(chosen, timedelta) else float(chosen)
            return max(0.0, seconds)
        exponent = max(0, attempts - 1)
        base = min(self.max_delay, self.initial_delay * self.multiplier ** min(exponent, 64))
        return base * (1.0 - self.jitter + 2.0 * self.jitter * random())
