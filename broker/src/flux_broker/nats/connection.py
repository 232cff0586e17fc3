"""The broker's NATS connection: round trips that cancellation cannot break.

**The nats-py PONG bug.** In the pinned nats-py (2.16), ``Client.flush()`` queues a future for
the server's PONG; if the caller is cancelled (a gRPC deadline, a stop timeout) or ``flush``'s
own timeout fires, that future is cancelled but stays queued, and the PONG that arrives later
calls ``set_result`` on it. The ``InvalidStateError`` ends the connection's read loop: the
client still looks connected, every subscription goes silent and every later ``flush()``
quietly degrades to a no-op, until the stale-ping check reconnects minutes later. A code
review reproduced it with CreateStream calls cancelled by 1-20 ms deadlines.

Two defences:

- :func:`harden` replaces the PONG handler of the broker's connection with one that skips a
  future that is already done (what nats-py should do; each PONG still answers the oldest PING).
- :func:`write_pending` and :func:`round_trip` shield the nats-py calls, so cancelling the
  caller never cancels them midway.

:func:`round_trip` also writes nats-py's pending buffer before the PING: ``flush()`` writes the
PING straight to the socket, ahead of commands still queued for nats-py's flusher task (a SUB
just issued), so its PONG alone would prove nothing about them.
"""

from __future__ import annotations

import asyncio
import types
from typing import Final

from nats.aio.client import Client

__all__ = ["ROUND_TRIP_TIMEOUT_S", "harden", "round_trip", "write_pending"]

#: Bound on one PING/PONG round trip (nats-py's own default is 10 s).
ROUND_TRIP_TIMEOUT_S: Final = 10


def harden(nc: Client) -> None:
    """Make ``nc`` survive PONGs for flushes that were cancelled or timed out (see above)."""

    async def process_pong(self: Client) -> None:
        if self._pongs:
            future = self._pongs.pop(0)
            if not future.done():
                future.set_result(True)
            self._pongs_received += 1
            self._pings_outstanding = 0

    nc._process_pong = types.MethodType(process_pong, nc)  # type: ignore[method-assign]


async def write_pending(nc: Client) -> None:
    """Write what nats-py has queued to the socket now, without a round trip."""
    # A private method of the pinned nats-py: no public call writes the queue without a PING.
    await asyncio.shield(nc._flush_pending(force_flush=True))


async def round_trip(nc: Client, timeout_s: int = ROUND_TRIP_TIMEOUT_S) -> None:
    """Wait until the server has processed every command sent so far (SUBs, PUBs).

    Raises:
        nats.errors.Error: The connection is closed, or no PONG came within ``timeout_s``.
    """
    await asyncio.shield(_round_trip(nc, timeout_s))


async def _round_trip(nc: Client, timeout_s: int) -> None:
    await nc._flush_pending(force_flush=True)
    await nc.flush(timeout_s)
