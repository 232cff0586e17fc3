"""The broker's NATS connection: round trips that cancellation cannot break, and a fast path.

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

**The per-message fast path** of the Liftbridge ingest (one NATS message per record, DESIGN.md
§5). nats-py hands every message of a ``cb`` subscription through a ``Msg`` object, the
subscription's pending queue and a task awaiting the callback; publishing costs a subject check,
a command and a flusher kick per message. Profiled, that was about half of the broker's time per
message. Two functions replace those hops for the partition leaders:

- :func:`subscribe_raw` delivers each message as ``handler(subject, reply, payload)`` (bytes,
  straight from nats-py's protocol parser), synchronously, in the connection's read loop. The
  handler must be quick and must not raise; it decides itself what to do when it cannot keep
  up (it cannot wait). :meth:`RawSubscription.drain` ends it without losing a delivered message.
- :func:`publish_many` writes many PUBs as one command, straight to the socket behind what
  nats-py had queued, without waking nats-py's flusher task (see the function).

Both rely on private parts of the pinned nats-py, all named in :data:`NATS_PY_INTERNALS` and
used only in this module; the tests check each of them, so an upgrade that changes them fails
loudly rather than silently losing messages.
"""

from __future__ import annotations

import asyncio
import logging
import types
from collections.abc import Callable, Sequence
from typing import Final

import nats.errors
from nats.aio.client import Client
from nats.aio.subscription import Subscription

__all__ = [
    "NATS_PY_INTERNALS",
    "ROUND_TRIP_TIMEOUT_S",
    "RawHandler",
    "RawSubscription",
    "harden",
    "publish_many",
    "round_trip",
    "subscribe_raw",
    "write_pending",
]

_logger = logging.getLogger(__name__)

#: Bound on one PING/PONG round trip (nats-py's own default is 10 s).
ROUND_TRIP_TIMEOUT_S: Final = 10

#: What this module uses of nats-py beyond its public API (checked by the tests):
#: ``Client._process_msg(sid, subject, reply, data, headers)``, awaited by the protocol parser
#: for every MSG/HMSG; ``Client._process_pong``; ``Client._flush_pending(force_flush)``;
#: ``Client._pending`` (list of commands) with ``Client._pending_data_size`` and
#: ``Client._max_pending_size``; ``Client._transport`` (``writelines``, ``drain``);
#: ``Subscription._id`` (the sid).
NATS_PY_INTERNALS: Final = (
    "Client._process_msg",
    "Client._process_pong",
    "Client._flush_pending",
    "Client._pending",
    "Client._pending_data_size",
    "Client._max_pending_size",
    "Client._transport",
    "Subscription._id",
)

#: ``handler(subject, reply, payload)`` of a raw subscription; ``reply`` is ``b""`` if none.
RawHandler = Callable[[bytes, bytes, bytes], None]

# The attribute of a Client holding its raw handlers by sid, once dispatch is installed.
_RAW_HANDLERS_ATTRIBUTE: Final = "_flux_raw_handlers"


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


# -- raw subscriptions ---------------------------------------------------------------------------


class RawSubscription:
    """A NATS subscription whose messages go to a plain function (see :func:`subscribe_raw`)."""

    def __init__(
        self, nc: Client, subscription: Subscription, handlers: dict[int, RawHandler]
    ) -> None:
        """Wrap ``subscription``, whose sid is in ``handlers`` (use :func:`subscribe_raw`)."""
        self._nc = nc
        self._subscription = subscription
        self._handlers = handlers
        self._sid: int = subscription._id

    @property
    def subject(self) -> str:
        """The subscribed subject."""
        return self._subscription.subject

    @property
    def queue(self) -> str:
        """The queue group ("" = none)."""
        return self._subscription.queue

    @property
    def active(self) -> bool:
        """Whether messages still reach the handler (until :meth:`drain` ends)."""
        return self._sid in self._handlers

    async def drain(self) -> None:
        """Unsubscribe, then return once every message sent before it has reached the handler.

        The server sends nothing for the subscription after the UNSUB, and the PONG of the
        following round trip comes after every MSG it sent before, in the same byte stream:
        once the PONG is read, the handler has had them all. The handler is removed at the
        end whatever happens (an error still propagates).

        Raises:
            nats.errors.Error: The connection is closed or the round trip failed; messages
                still in flight may then never reach the handler.
        """
        try:
            # nats-py forgets the subscription at once (its own queue is never used); the
            # dispatch keeps routing the sid to the handler until the round trip is over.
            await self._subscription.unsubscribe()
            await round_trip(self._nc)
        finally:
            self._handlers.pop(self._sid, None)


async def subscribe_raw(
    nc: Client, subject: str, handler: RawHandler, *, queue: str = ""
) -> RawSubscription:
    """Subscribe ``handler`` to ``subject`` (in queue group ``queue``), bypassing ``Msg``.

    Every message is passed as ``handler(subject, reply, payload)``, in order, from the
    connection's read loop, before nats-py builds a ``Msg``: no pending queue, no task, no
    pending limits and no slow-consumer handling by nats-py. NATS headers are not passed.
    An exception from the handler is logged and the message is lost; the read loop goes on.

    Raises:
        nats.errors.Error: The subscription failed (e.g. the connection is closed).
    """
    handlers = _raw_handlers(nc)
    # Without a callback nats-py starts no task; its message iterator is never read.
    subscription = await nc.subscribe(subject, queue=queue)
    # nats-py queues the SUB and returns without yielding to the event loop, so no message of
    # this subscription can have been read yet; a newer nats-py that yields could deliver one
    # to its own queue first, which is detected here rather than silently lost.
    handlers[subscription._id] = handler
    if subscription.pending_msgs:
        await subscription.unsubscribe()
        handlers.pop(subscription._id, None)
        raise RuntimeError("nats-py delivered a message before the raw handler was installed")
    return RawSubscription(nc, subscription, handlers)


def _raw_handlers(nc: Client) -> dict[int, RawHandler]:
    """The connection's raw handlers by sid, installing the dispatch on first use."""
    handlers: dict[int, RawHandler] | None = getattr(nc, _RAW_HANDLERS_ATTRIBUTE, None)
    if handlers is not None:
        return handlers
    found: dict[int, RawHandler] = {}
    process_msg = nc._process_msg
    stats = nc.stats

    # nats-py declares ``headers: bytes`` and passes None for a MSG without headers.
    async def dispatch(sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        handler = found.get(sid)
        if handler is None:
            await process_msg(sid, subject, reply, data, headers)
            return
        stats["in_msgs"] += 1
        stats["in_bytes"] += len(data)
        try:
            handler(subject, reply, data)
        except Exception:
            _logger.exception("raw NATS handler failed; the message on %r is lost", subject)

    # The protocol parser calls self.nc._process_msg for every MSG: an instance attribute
    # takes precedence over the method, for this connection only.
    nc._process_msg = dispatch  # type: ignore[method-assign]
    setattr(nc, _RAW_HANDLERS_ATTRIBUTE, found)
    return found


# -- publishing ----------------------------------------------------------------------------------


async def publish_many(nc: Client, messages: Sequence[tuple[bytes, bytes]]) -> None:
    """Publish ``(subject, payload)`` pairs, in order, and write them to the socket now.

    What ``nc.publish`` does for each, as one command and one socket write, in the caller's
    task (after whatever nats-py had queued): no wait for nats-py's flusher task, whose wake-up
    costs a turn of the event loop on the way to the socket. While the connection is down
    (reconnecting) the command waits in nats-py's buffer, which nats-py sends once it is back.
    Subjects are written as they are: the caller has checked them (literal, no whitespace or
    control characters).

    Flow control: after the write this waits while the socket's buffer is over its
    high-water mark (the server reads slower than we write), so a caller that publishes
    faster than the connection carries is slowed down and memory stays bounded; while
    disconnected, nats-py's bound on its buffer (the ``pending_size`` connect option) applies.

    Raises:
        nats.errors.ConnectionClosedError: The connection is closed.
        nats.errors.ConnectionDrainingError: The connection is draining.
        nats.errors.OutboundBufferLimitError: Disconnected with a full buffer: nothing is
            queued.
        nats.errors.MaxPayloadError: A payload is over the server's limit: nothing is queued.
        nats.errors.Error: The socket failed (nats-py reconnects; the messages are lost).
    """
    if not messages:
        return
    if nc.is_closed:
        raise nats.errors.ConnectionClosedError
    if nc.is_draining_pubs:
        raise nats.errors.ConnectionDrainingError
    max_payload = nc.max_payload
    payload_bytes = 0
    parts = []
    for subject, payload in messages:
        size = len(payload)
        if size > max_payload:
            raise nats.errors.MaxPayloadError
        payload_bytes += size
        parts.append(b"PUB %b %d\r\n%b\r\n" % (subject, size, payload))
    command = b"".join(parts)
    connected = nc.is_connected
    limit = nc._max_pending_size
    if not connected and (limit <= 0 or nc._pending_data_size + len(command) > limit):
        raise nats.errors.OutboundBufferLimitError
    nc._pending.append(command)
    nc._pending_data_size += len(command)
    nc.stats["out_msgs"] += len(messages)
    nc.stats["out_bytes"] += payload_bytes
    if not connected:
        return  # nats-py sends its buffer after reconnecting
    transport = nc._transport
    if transport is None:  # not expected while connected: leave it to nats-py's flusher
        await nc._flush_pending()
        return
    # What nats-py's flusher does with its buffer, done here: everything queued, in order.
    transport.writelines(nc._pending)
    nc._pending = []
    nc._pending_data_size = 0
    try:
        await transport.drain()  # type: ignore[no-untyped-call]  # nats-py is untyped here
    except OSError as error:  # nats-py's read loop notices too, and reconnects
        raise nats.errors.Error(f"nats: write failed: {error}") from error
