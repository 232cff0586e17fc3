"""PublishAsync: a stream of publish requests in, a stream of acks and async errors out.

**PublishAsync** (bidirectional). One broker-generated inbox per call. Every ack arriving on
it is sent as ``PublishResponse(correlationId=ack.correlationId, ack=ack)``; an ack carrying an
error also gets an ``asyncError`` (Liftbridge's ``convertAckError``: INCORRECT_OFFSET →
INCORRECT_OFFSET, TOO_LARGE → BAD_REQUEST, ENCRYPTION → ENCRYPTION_FAILED, other → UNKNOWN).
A request that fails a check does not end the call: it is answered with its correlation id,
an ``asyncError`` (BAD_REQUEST, NOT_FOUND or READONLY) and an ``ack`` that is present but
empty (Liftbridge's shim for clients older than ``asyncError``). A request to a paused
partition resumes it first (see :mod:`~flux_broker.api.publish_request`). Requests with policy
NONE get no response. When the client half-closes, the call waits up to
:data:`PUBLISH_ASYNC_DRAIN_S` for acks still due, then ends OK.

**Broker shutdown** (the API's ``closing`` event) stops the call from reading requests: those
the client sent but the call had not read yet are not published. Messages already published
are still stored and acked by their partitions, which run until the gRPC server's grace
(:data:`flux_broker.server.SHUTDOWN_GRACE_S`) ends, so the call goes on sending the acks still
due for up to :data:`PUBLISH_ASYNC_SHUTDOWN_DRAIN_S` (shorter than the grace, so its ending
reaches the client) and then ends with UNAVAILABLE. A client thus gets the ack of every
message it sent that was stored, and republishes only the others; ending at once would make a
Liftbridge client retry stored messages and store them twice.

At most
:data:`PUBLISH_ASYNC_IN_FLIGHT_MAX` requests awaiting an ack plus responses not yet sent are
held per call: past that, requests are not read until the client drains (backpressure, nothing
dropped); acks due for :data:`PUBLISH_ASYNC_ACK_LOST_S` without any arriving are presumed lost,
so a lost ack cannot wedge the call. Acks beyond :data:`PUBLISH_ASYNC_BUFFERED_MAX` unsent
responses (a client that stopped reading while several streams ack each message) end the call
with SLOW_CONSUMER.

Liftbridge leaves room here: PublishAsync ignores ``PublishRequest.ackInbox`` (the call's
inbox carries the acks), so it does not check it either. Checks and the ack-error mapping are
:mod:`flux_broker.api.publish_request`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Final

from flux_broker.api.context import BrokerContext
from flux_broker.api.publish_request import (
    ACK_ERRORS,
    NONE,
    OTHER_ACK_ERROR,
    AckError,
    RejectedError,
    ack_error_text,
    encoded,
    message_of,
    nats_failures,
    resumed_target,
)
from flux_broker.api.status import UNAVAILABLE_MESSAGE, FluxStatus
from flux_proto import api_pb2

__all__ = [
    "PUBLISH_ASYNC_ACK_LOST_S",
    "PUBLISH_ASYNC_BUFFERED_MAX",
    "PUBLISH_ASYNC_DRAIN_S",
    "PUBLISH_ASYNC_IN_FLIGHT_MAX",
    "PUBLISH_ASYNC_SHUTDOWN_DRAIN_S",
    "publish_async",
]

_logger = logging.getLogger(__name__)

#: Per PublishAsync call: requests awaiting an ack plus responses not yet sent. Liftbridge's
#: partition channel holds 64 Ki messages; one call may fill about that much.
PUBLISH_ASYNC_IN_FLIGHT_MAX: Final = 64 * 1024
#: Per PublishAsync call: responses waiting for the client to read them before the call ends
#: with SLOW_CONSUMER. Exceeded only when several streams ack every message and the client does
#: not read; about 100 bytes each.
PUBLISH_ASYNC_BUFFERED_MAX: Final = 4 * PUBLISH_ASYNC_IN_FLIGHT_MAX
#: After the client half-closes PublishAsync, how long the call waits for acks still due.
PUBLISH_ASYNC_DRAIN_S: Final = 5.0
#: Once the broker begins to shut down, how long a PublishAsync call waits for acks still due
#: before it ends with UNAVAILABLE. Below :data:`flux_broker.server.SHUTDOWN_GRACE_S` (5 s), the
#: time in-flight calls get before the server cancels them, so the acks and the status arrive.
PUBLISH_ASYNC_SHUTDOWN_DRAIN_S: Final = 4.0
#: When a PublishAsync call is full of requests awaiting acks and no ack has arrived for this
#: long, those acks are presumed lost (a deleted stream, a leader that dropped messages) and
#: no longer hold the call up. Liftbridge clients give up on an ack after 5 s by default.
PUBLISH_ASYNC_ACK_LOST_S: Final = 30.0


class _Signal(enum.Enum):
    """Events of a PublishAsync call besides responses."""

    HALF_CLOSED = enum.auto()  # the client sent its last request
    CLOSING = enum.auto()  # the broker is shutting down


@dataclass(frozen=True, slots=True)
class _Failure:
    """The request reader failed; the call ends with this error's status."""

    error: Exception


_Event = api_pb2.PublishResponse | _Signal | _Failure


def _ack_response(ack: api_pb2.Ack) -> api_pb2.PublishResponse:
    response = api_pb2.PublishResponse(correlationId=ack.correlationId, ack=ack)
    if ack.ackError != AckError.OK:
        _, code = ACK_ERRORS.get(ack.ackError, OTHER_ACK_ERROR)
        response.asyncError.code = code
        response.asyncError.message = ack_error_text(ack.ackError)
    return response


class _PublishAsyncCall:
    """One PublishAsync call: a request reader task, acks from the router, responses out."""

    def __init__(self, broker: BrokerContext, closing: asyncio.Event) -> None:
        self._broker = broker
        self._closing = closing
        self._router = broker.acks
        self._inbox = self._router.new_inbox()
        self._events: asyncio.Queue[_Event] = asyncio.Queue()
        self._room = asyncio.Event()  # set whenever the client took a response
        self._due: dict[str, int] = {}  # correlation id → acks still due
        self._due_total = 0
        self._acks_received = 0
        self._overflowed = False
        self._reader: asyncio.Task[None] | None = None
        self._stopped_reading = False  # the broker is shutting down

    async def responses(
        self, requests: AsyncIterator[api_pb2.PublishRequest]
    ) -> AsyncGenerator[api_pb2.PublishResponse, None]:
        """Run the call, yielding its responses until it ends."""
        if self._closing.is_set():
            raise FluxStatus.from_entry("UNAVAILABLE", UNAVAILABLE_MESSAGE)
        # Only the route's subscription can raise a NATS error here; the reader turns its own
        # into a status.
        with nats_failures():
            async with self._router.route(self._inbox, self._on_ack):
                self._reader = asyncio.create_task(self._read(requests), name="publish-async-read")
                tasks = (
                    self._reader,
                    asyncio.create_task(self._watch_closing(), name="publish-async-closing"),
                )
                try:
                    async with contextlib.aclosing(self._drain_events()) as responses:
                        async for response in responses:
                            yield response
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.wait(tasks)

    async def _drain_events(self) -> AsyncGenerator[api_pb2.PublishResponse, None]:
        """Yield responses until the call ends.

        Once the client half-closed or the broker began to shut down, the call drains: it
        waits, until ``drain_until``, only for the acks still due, and yields those that came.
        Responses already queued when that time passes are yielded all the same: they are
        acks of stored messages, and the gRPC server's grace bounds sending them.
        """
        loop = asyncio.get_running_loop()
        drain_until: float | None = None  # set once the client half-closed or closing began
        closing = False
        while drain_until is None or self._due_total > 0 or not self._events.empty():
            if self._overflowed:  # checked first: the queue behind it may be long
                raise FluxStatus.from_entry(
                    "SLOW_CONSUMER",
                    f"over {PUBLISH_ASYNC_BUFFERED_MAX} responses were waiting for the client "
                    "to read them",
                )
            try:
                async with asyncio.timeout_at(drain_until):
                    event = await self._events.get()
            except TimeoutError:
                break
            self._room.set()
            if isinstance(event, api_pb2.PublishResponse):
                yield event
            elif isinstance(event, _Failure):
                raise event.error
            elif event is _Signal.HALF_CLOSED:
                drain_until = _earliest(drain_until, loop.time() + PUBLISH_ASYNC_DRAIN_S)
            elif event is _Signal.CLOSING:
                closing = True
                self._stop_reading()
                drain_until = _earliest(drain_until, loop.time() + PUBLISH_ASYNC_SHUTDOWN_DRAIN_S)
        while not self._events.empty():  # acks that arrived before draining timed out
            event = self._events.get_nowait()
            if isinstance(event, api_pb2.PublishResponse):
                yield event
        if closing:
            if self._due_total > 0:
                _logger.warning(
                    "PublishAsync: shutting down with %d ack(s) still due after %gs",
                    self._due_total,
                    PUBLISH_ASYNC_SHUTDOWN_DRAIN_S,
                )
            raise FluxStatus.from_entry("UNAVAILABLE", UNAVAILABLE_MESSAGE)

    def _stop_reading(self) -> None:
        """Read no more requests: cancel the reader where it waits (a request, room).

        A request read but still waiting for room is not published. One the reader is handing
        to NATS is already in the NATS client's outbound buffer (nats-py appends before its
        first wait and swallows a cancel that lands in its flush), so it is sent, its ack
        stays due, and the reader stops right after.
        """
        self._stopped_reading = True
        if self._reader is not None:
            self._reader.cancel()

    async def _watch_closing(self) -> None:
        await self._closing.wait()
        self._events.put_nowait(_Signal.CLOSING)

    async def _read(self, requests: AsyncIterator[api_pb2.PublishRequest]) -> None:
        try:
            async for request in requests:
                await self._wait_for_room()
                await self._publish(request)
                if self._stopped_reading:  # nats-py swallows a cancel that lands in its flush
                    return
        except Exception as error:  # noqa: BLE001 -- the call ends with its status
            self._events.put_nowait(_Failure(error))
        else:
            self._events.put_nowait(_Signal.HALF_CLOSED)

    async def _wait_for_room(self) -> None:
        while self._due_total + self._events.qsize() >= PUBLISH_ASYNC_IN_FLIGHT_MAX:
            self._room.clear()
            acks_before = self._acks_received
            try:
                async with asyncio.timeout(PUBLISH_ASYNC_ACK_LOST_S):
                    await self._room.wait()
            except TimeoutError:
                if self._acks_received == acks_before:
                    self._forget_due_acks()

    def _forget_due_acks(self) -> None:
        _logger.warning(
            "PublishAsync: no ack for %gs with %d due; presuming them lost",
            PUBLISH_ASYNC_ACK_LOST_S,
            self._due_total,
        )
        self._due.clear()
        self._due_total = 0

    async def _publish(self, request: api_pb2.PublishRequest) -> None:
        try:
            partition = await resumed_target(self._broker, request)
            message = message_of(request)
            message.ackInbox = self._inbox
            data = encoded(message, self._broker.record_max_bytes)
        except RejectedError as rejected:
            self._events.put_nowait(rejected.response(request.correlationId))
            return
        if request.ackPolicy != NONE:
            self._due[request.correlationId] = self._due.get(request.correlationId, 0) + 1
            self._due_total += 1
        with nats_failures():
            await self._broker.nc.publish(partition.subject, data)

    def _on_ack(self, ack: api_pb2.Ack) -> None:
        self._acks_received += 1
        if self._overflowed:
            return
        if self._events.qsize() >= PUBLISH_ASYNC_BUFFERED_MAX:
            self._overflowed = True  # the call ends when the client takes its next response
            return
        self._events.put_nowait(_ack_response(ack))
        due = self._due.get(ack.correlationId)
        if due is None:  # a second stream on the subject, or an ack for a NONE message
            return
        if due == 1:
            del self._due[ack.correlationId]
        else:
            self._due[ack.correlationId] = due - 1
        self._due_total -= 1


def _earliest(deadline: float | None, other: float) -> float:
    return other if deadline is None else min(deadline, other)


async def publish_async(
    broker: BrokerContext,
    requests: AsyncIterator[api_pb2.PublishRequest],
    closing: asyncio.Event,
) -> AsyncGenerator[api_pb2.PublishResponse, None]:
    """Publish a stream of messages; yield their acks and async errors.

    Args:
        broker: The broker.
        requests: The client's requests, until it half-closes.
        closing: Set when the broker shuts down; the call then reads no more requests, sends
            the acks still due for up to :data:`PUBLISH_ASYNC_SHUTDOWN_DRAIN_S` and ends with
            UNAVAILABLE.

    Yields:
        One response per ack (with ``asyncError`` when the ack carries an error) and one per
        request that failed a check; none for policy NONE.

    Raises:
        FluxStatus: UNAVAILABLE (shutdown, NATS failure), SLOW_CONSUMER (the client does not
            read its responses).
    """
    call = _PublishAsyncCall(broker, closing)
    async with contextlib.aclosing(call.responses(requests)) as responses:
        async for response in responses:
            yield response
