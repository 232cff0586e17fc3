"""Slow consumers: a subscriber that stops reading is cut off, and nobody else notices.

A subscription streams from the partition's log, so the log itself is its backlog: the broker
never queues records for a subscriber. What a subscriber pins in the broker is its *send
path*, and that is bounded by construction:

- the batch its reader holds (at most the log's ``read_max_bytes`` for Subscribe, the
  request's ``maxBytes`` -- at most 4 MiB -- for SubscribeBatch, and at least one record);
- the one message being written: grpc.aio writes a message at a time and the next one is
  built only when the previous write has returned;
- what gRPC itself holds for the stream: once the client's HTTP/2 flow-control window is
  full, gRPC keeps the pending message and no more, and the write blocks.

So a client that stops reading costs a bounded amount of memory, but it would keep its
reader, its subscription slot and that memory for as long as it stays connected. The bound
that ends this is **time**: a write that stays blocked (the client's window stays full) for
``subscriptions.slow.consumer.timeout`` ends the call with UNAVAILABLE and reason
``slow-consumer`` (DESIGN.md §4.2), logged as one warning naming the stream, partition and
peer. Only a blocked write counts: a subscriber waiting at the end of the log for new records
has nothing pending and is never cut off, and one catching up from far behind is never cut off
while it keeps reading, whatever its lag.

The status is queued behind what the client has not read yet: the client sees it after the
messages already sent, and resubscribes from its last offset + 1 (UNAVAILABLE is what every
Liftbridge client resubscribes on). The call's reader is released before the status is
queued; gRPC keeps the pending message until the client reads, cancels or disconnects, and the
call counts against the connection's subscription limit until then (``api/service.py``
releases it from gRPC's done callback), which bounds what one connection can pin.

Every subscription has its own write and its own timer, so the others of the same partition
go on at full speed while a slow one is timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from typing import Final, Protocol, TypeVar

from flux_broker.api.status import FluxStatus

__all__ = ["SLOW_CONSUMER_TIMEOUT_S", "MessageWriter", "SlowConsumers", "send_all"]

#: How long one write to a subscriber may stay blocked before the subscriber is cut off. Long
#: enough that a busy client (a GC pause, a slow batch of work, a congested link) is not cut
#: off, short enough that a stuck one gives its reader and buffers back within a minute.
SLOW_CONSUMER_TIMEOUT_S: Final = 30.0

_T_contra = TypeVar("_T_contra", contravariant=True)
_T = TypeVar("_T")
_log = logging.getLogger(__name__)


class MessageWriter(Protocol[_T_contra]):
    """The call a subscription writes to (grpc.aio's servicer context fits).

    ``write`` returns once gRPC has taken the message; it blocks while the client's HTTP/2
    flow-control window is full, that is while the client is not reading.
    """

    async def write(self, message: _T_contra) -> None:
        """Send one message."""
        ...

    def peer(self) -> str:
        """The client's address, for the log (``ipv4:127.0.0.1:50000``)."""
        ...


class SlowConsumers:
    """The slow-consumer policy of a broker, and how often it cut a subscriber off.

    Attributes:
        timeout_s: How long one write may stay blocked (``subscriptions.slow.consumer.timeout``);
            0 turns the policy off (a stuck subscriber then holds its slot until it leaves).
        disconnected: Subscribers cut off since the broker started.
    """

    def __init__(self, timeout_s: float = SLOW_CONSUMER_TIMEOUT_S) -> None:
        """Set the policy.

        Raises:
            ValueError: ``timeout_s`` is negative.
        """
        if timeout_s < 0:
            raise ValueError(f"the slow-consumer timeout must not be negative, got {timeout_s}")
        self.timeout_s = timeout_s
        self.disconnected = 0


async def send_all(
    call: MessageWriter[_T],
    messages: AsyncGenerator[_T, None],
    policy: SlowConsumers,
    *,
    stream: str,
    partition: int,
) -> None:
    """Write every message of ``messages`` to ``call``, cutting off a client that stops reading.

    ``messages`` is closed before this returns or raises, so the subscription's reader is
    released before the call's status is sent.

    Args:
        call: The call to write to.
        messages: The subscription's messages; whatever it raises propagates.
        policy: The slow-consumer policy.
        stream: The stream's name, for the log.
        partition: The partition's id, for the log.

    Raises:
        FluxStatus: SLOW_CONSUMER (UNAVAILABLE, ``slow-consumer``) when one write stayed blocked
            for ``policy.timeout_s``.
    """
    timeout_s = policy.timeout_s
    loop = asyncio.get_running_loop()
    sent = 0
    async with contextlib.aclosing(messages):
        if timeout_s <= 0:
            async for message in messages:
                await call.write(message)
            return
        # One timer for the whole call, armed only while a write is in progress: waiting for
        # the next record (at the end of the log) never counts.
        try:
            async with asyncio.timeout(None) as deadline:
                async for message in messages:
                    deadline.reschedule(loop.time() + timeout_s)
                    await call.write(message)
                    deadline.reschedule(None)
                    sent += 1
        except TimeoutError:
            if not deadline.expired():
                raise  # not ours: raised by the subscription itself
            policy.disconnected += 1
            _log.warning(
                "slow consumer cut off: stream %r partition %d, peer %s: a write stayed blocked "
                "for %gs (subscriptions.slow.consumer.timeout) after %d messages; the call ends "
                "with UNAVAILABLE (slow-consumer)",
                stream,
                partition,
                call.peer(),
                timeout_s,
                sent,
            )
            raise FluxStatus.from_entry(
                "SLOW_CONSUMER",
                f"the subscriber did not read for {timeout_s:g}s and was disconnected; "
                "resubscribe from the last offset + 1",
            ) from None
