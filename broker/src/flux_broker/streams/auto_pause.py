"""Auto-pause: a partition that receives nothing for a while pauses itself.

Liftbridge's rule (reference ``liftbridge-server.md`` §4.3): when a partition has received no
message for ``autoPauseTime`` (the stream's ``autoPauseTime`` in ms, else the server's
``streams.auto.pause.time``; 0 = never), the leader pauses it with ``resumeAll`` false -- unless
``autoPauseDisableIfSubscribers`` (else ``streams.auto.pause.disable.if.subscribers``) is set
and a Subscribe call reads it.

Flux's timer, one task per active partition with auto-pause on:

- The idle time counts from the latest of: the partition becoming active (created, recovered
  or resumed), its latest received message, and -- when subscribers prevent the pause -- its
  last subscriber leaving. So a partition is never paused while subscribed with the flag set,
  nor sooner than ``autoPauseTime`` after the last subscriber left.
- The task sleeps until the partition would become idle (never less than
  :data:`WAIT_MIN_S`, never more than ``autoPauseTime``, so a clock step cannot stall or spin
  it), and while subscribers prevent the pause it waits for the last one to leave.
- When the time has come it asks the manager to pause. The manager checks again under its lock
  (a message may have come in meanwhile) and pauses, which ends the task; if it declines, the
  task goes on waiting. A pause that fails (the metadata store) is logged and retried one
  ``autoPauseTime`` later.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Self

from flux_broker.clock import Clock
from flux_broker.metadata import StreamConfig
from flux_broker.streams.live import LivePartition

__all__ = ["WAIT_MIN_S", "AutoPause", "run_auto_pause"]

_logger = logging.getLogger(__name__)

#: Shortest sleep of the timer, so that rounding between the broker's wall clock and the event
#: loop's monotonic clock cannot turn it into a busy loop.
WAIT_MIN_S: Final = 0.001
_NS_PER_MS: Final = 1_000_000
_NS_PER_S: Final = 1_000_000_000


@dataclass(frozen=True, slots=True)
class AutoPause:
    """A stream's auto-pause settings, resolved against the server's defaults.

    Attributes:
        after_ns: Idle time before a pause, ns (positive).
        disable_if_subscribers: Never pause while a Subscribe call reads the partition.
    """

    after_ns: int
    disable_if_subscribers: bool

    @classmethod
    def of(
        cls, config: StreamConfig, *, default_s: float, default_disable_if_subscribers: bool
    ) -> Self | None:
        """The settings of a stream with ``config``, or ``None`` when auto-pause is off.

        Args:
            config: The stream's overrides (``autoPauseTime`` in ms).
            default_s: ``streams.auto.pause.time``, in seconds.
            default_disable_if_subscribers: ``streams.auto.pause.disable.if.subscribers``.
        """
        if config.auto_pause_time_ms is not None:
            after_ns = config.auto_pause_time_ms * _NS_PER_MS
        else:
            after_ns = round(default_s * _NS_PER_S)
        if after_ns <= 0:
            return None
        disable = config.auto_pause_disable_if_subscribers
        return cls(
            after_ns=after_ns,
            disable_if_subscribers=(default_disable_if_subscribers if disable is None else disable),
        )

    def idle_since_ns(self, partition: LivePartition) -> int:
        """When the partition's idle time began (Unix ns)."""
        since = max(partition.activated_ns, partition.stats.latest_received_ns)
        if self.disable_if_subscribers:
            since = max(since, partition.unsubscribed_ns)
        return since

    def blocked(self, partition: LivePartition) -> bool:
        """Whether subscribers keep the partition from pausing now."""
        return self.disable_if_subscribers and partition.subscribers > 0

    def due(self, partition: LivePartition, clock: Clock) -> bool:
        """Whether the partition should pause now."""
        if self.blocked(partition):
            return False
        return clock.now_ns() - self.idle_since_ns(partition) >= self.after_ns


async def run_auto_pause(
    partition: LivePartition,
    policy: AutoPause,
    clock: Clock,
    pause: Callable[[], Awaitable[None]],
) -> None:
    """Pause ``partition`` once it has been idle long enough; runs until cancelled.

    Args:
        partition: The (active) partition.
        policy: Its settings.
        clock: The broker's clock.
        pause: Asks the manager to pause the partition if :meth:`AutoPause.due` still holds
            under its lock; a pause cancels this task.
    """
    period_s = policy.after_ns / _NS_PER_S
    while True:
        if policy.blocked(partition):
            await partition.wait_unsubscribed()
            continue
        remaining_ns = policy.idle_since_ns(partition) + policy.after_ns - clock.now_ns()
        if remaining_ns > 0:
            await asyncio.sleep(min(max(remaining_ns / _NS_PER_S, WAIT_MIN_S), period_s))
            continue
        try:
            await pause()
        except Exception:
            _logger.warning(
                "stream %r partition %d: auto-pause failed; retrying in %gs",
                partition.stream,
                partition.id,
                period_s,
                exc_info=True,
            )
            await asyncio.sleep(period_s)
        else:
            # Declined (activity meanwhile) or about to be cancelled by the pause: yield once
            # so a pause's cancellation lands before the next check.
            await asyncio.sleep(WAIT_MIN_S)
