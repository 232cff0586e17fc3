"""RetryPolicy: how flux_client backs off between attempts of a call that is safe to repeat."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Backoff", "RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, bounded by a number of attempts.

    Every call that may be repeated (metadata reads, admin calls that failed before reaching a
    broker, idempotent batches, resubscribes) uses one policy: wait ``initial_backoff_ms``, then
    multiply by ``multiplier`` up to ``max_backoff_ms``; each wait is spread by ``±jitter``
    (a fraction) so that many clients do not retry in step. Calls also stop at their own
    deadline (``delivery_timeout_ms`` for sends), whichever comes first.

    Attributes:
        initial_backoff_ms: The first wait.
        max_backoff_ms: The longest wait.
        multiplier: Growth of the wait per attempt (>= 1).
        jitter: Fraction of each wait drawn at random, 0 to 1.
        max_attempts: Attempts in total, the first included (>= 1); subscriptions and
            producers reconnecting after a broker restart count attempts per outage.
    """

    initial_backoff_ms: float = 50.0
    max_backoff_ms: float = 2_000.0
    multiplier: float = 2.0
    jitter: float = 0.2
    max_attempts: int = 20

    def __post_init__(self) -> None:
        if self.initial_backoff_ms < 0 or self.max_backoff_ms < self.initial_backoff_ms:
            raise ValueError("need 0 <= initial_backoff_ms <= max_backoff_ms")
        if self.multiplier < 1:
            raise ValueError("multiplier must be >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")

    def backoffs_s(self, rng: random.Random | None = None) -> Iterator[float]:
        """The waits between attempts, in seconds: ``max_attempts - 1`` of them."""
        draw = (rng or random).uniform
        wait_ms = self.initial_backoff_ms
        for _ in range(self.max_attempts - 1):
            spread = wait_ms * self.jitter
            yield max(0.0, wait_ms + draw(-spread, spread)) / 1000
            wait_ms = min(self.max_backoff_ms, wait_ms * self.multiplier)


class Backoff:
    """The waits of one outage under a :class:`RetryPolicy`; :meth:`reset` when it ends.

    Unlike :meth:`RetryPolicy.backoffs_s`, it never runs out: once ``max_attempts`` waits were
    taken, :attr:`exhausted` is true and every further wait is ``max_backoff_ms`` (callers that
    are bounded by a deadline, like sends, keep going; others give up).
    """

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self._policy = policy
        self._rng = rng
        self._waits = policy.backoffs_s(rng)
        self.attempts = 0

    @property
    def exhausted(self) -> bool:
        """Whether the policy's attempts are used up in this outage."""
        return self.attempts >= self._policy.max_attempts - 1

    def next_s(self) -> float:
        """The next wait, in seconds."""
        self.attempts += 1
        wait = next(self._waits, None)
        return wait if wait is not None else self._policy.max_backoff_ms / 1000

    def reset(self) -> None:
        """The outage is over: the next wait is the first again."""
        if self.attempts:
            self._waits = self._policy.backoffs_s(self._rng)
            self.attempts = 0
