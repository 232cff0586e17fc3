"""Time as a dependency: the broker reads the clock only through a :class:`Clock`.

Tests and simulations inject a :class:`ManualClock` so that ages, rolls and timestamps are
deterministic.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    """Source of wall-clock time."""

    def now_ns(self) -> int:
        """Unix time in nanoseconds."""
        ...


class SystemClock:
    """The real wall clock."""

    def now_ns(self) -> int:
        """Unix time in nanoseconds (``time.time_ns``)."""
        return time.time_ns()


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start_ns: int = 1_700_000_000_000_000_000) -> None:
        """Start at ``start_ns`` (default: November 2023)."""
        self._now_ns = start_ns

    def now_ns(self) -> int:
        """The current manual time."""
        return self._now_ns

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds``."""
        if seconds < 0:
            raise ValueError("a ManualClock only moves forward")
        self._now_ns += int(seconds * 1e9)

    def set_ns(self, now_ns: int) -> None:
        """Jump to ``now_ns`` (may go backwards, to test clock steps)."""
        self._now_ns = now_ns
