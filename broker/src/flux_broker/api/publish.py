"""Publish and PublishToSubject: requests in, envelopes to NATS, acks back.

Every gRPC publish path works as Liftbridge's does (reference ``liftbridge-api.md`` §1.6, §2,
§3; DESIGN.md §4, §4.2): the request becomes a :class:`~flux_proto.api_pb2.Message` in a
type-0 envelope, published **through NATS** to the partition's subject (or, for
PublishToSubject, to any literal subject), so every stream on that subject receives it and
load-balance groups apply. The partition leaders append it and publish a type-1 ack envelope
to the message's ack inbox.

Checks and ack-error mapping: :mod:`flux_broker.api.publish_request`.

**Publish** (unary). With policy NONE or no gRPC deadline it is fire-and-forget (DESIGN.md
§4): the envelope is written to the NATS socket and an empty response returned; the record is
still stored. Otherwise the call waits for the first ack until shortly before the deadline
(:data:`ACK_WAIT_MARGIN_S`, so the ACK_TIMEOUT status with its ``flux-reason`` reaches the
client before its own deadline fires). An ack error becomes its status (see
:mod:`~flux_broker.api.publish_request`). Success returns the ack and the request's
correlation id.

**PublishAsync** is :mod:`flux_broker.api.publish_async`.

**PublishToSubject.** The subject must be literal. Fire-and-forget as Publish; otherwise the
first ack to arrive (from any stream on the subject) is returned, with the same ack-error
statuses as Publish, or ACK_TIMEOUT when no stream acks in time.

Decisions where Liftbridge leaves room:

- A fire-and-forget Publish/PublishToSubject without a client ``ackInbox`` publishes with no
  ack inbox at all (Liftbridge sets a generated one nobody listens to), sparing the leader an
  ack publish per message.
- PublishToSubject's request has no expected offset; the envelope says -1 (no OCC check).
- A client-chosen ack inbox may be shared by several of its calls: each call takes the first
  ack carrying its own correlation id and subject, not merely the first ack on the inbox.
- A publish whose remaining deadline is already below :data:`ACK_WAIT_MARGIN_S` publishes
  nothing and answers ACK_TIMEOUT.
"""

from __future__ import annotations

import asyncio
from typing import Final

from nats.aio.client import Client

from flux_broker.api.context import BrokerContext
from flux_broker.api.publish_async import publish_async
from flux_broker.api.publish_request import (
    NONE,
    RejectedError,
    bad_request,
    check_ack,
    check_ack_inbox,
    check_ack_policy,
    check_headers,
    encoded,
    message_of,
    nats_failures,
    resumed_target,
)
from flux_broker.api.status import FluxStatus
from flux_broker.nats.acks import listen
from flux_broker.nats.connection import write_pending
from flux_broker.nats.subjects import InvalidSubjectError, validate_literal_subject
from flux_proto import api_pb2

__all__ = ["ACK_WAIT_MARGIN_S", "publish", "publish_async", "publish_to_subject"]

#: How much earlier than the gRPC deadline a waiting publish gives up, so that its own
#: DEADLINE_EXCEEDED (with reason ``ack-timeout``) reaches the client first.
ACK_WAIT_MARGIN_S: Final = 0.01
#: PublishToSubject has no expected offset: -1 asks for no OCC check.
_NO_EXPECTED_OFFSET: Final = -1


# -- NATS ----------------------------------------------------------------------------------------


async def _send_now(nc: Client, subject: str, data: bytes) -> None:
    """Publish and wait until nats-py has written its queue to the socket (no round trip)."""
    with nats_failures():
        await nc.publish(subject, data)
        await write_pending(nc)  # on the wire before the reply; a round trip is not needed


async def _deliver(
    broker: BrokerContext,
    subject: str,
    message: api_pb2.Message,
    client_inbox: str,
    deadline_s: float | None,
) -> api_pb2.Ack | None:
    """Publish ``message`` to ``subject``; return its first ack, or ``None`` if not waited for.

    Raises:
        RejectedError: The envelope is too large (nothing published).
        FluxStatus: ACK_TIMEOUT, an ack error's row, or a NATS failure's.
    """
    if deadline_s is None or message.ackPolicy == NONE:
        message.ackInbox = client_inbox
        await _send_now(broker.nc, subject, encoded(message, broker.record_max_bytes))
        return None
    router = broker.acks
    message.ackInbox = client_inbox or router.new_inbox()
    data = encoded(message, broker.record_max_bytes)
    wait_s = deadline_s - ACK_WAIT_MARGIN_S
    if wait_s <= 0:
        raise FluxStatus.from_entry(
            "ACK_TIMEOUT",
            "the deadline passed before the message could be published; nothing was published",
        )
    first: asyncio.Future[api_pb2.Ack] = asyncio.get_running_loop().create_future()

    def on_ack(ack: api_pb2.Ack) -> None:
        # A client's inbox may be shared by its other publishes: take only this message's ack.
        mine = ack.correlationId == message.correlationId and ack.msgSubject == subject
        if mine and not first.done():
            first.set_result(ack)

    if client_inbox:
        acks = listen(broker.nc, client_inbox, on_ack)
    else:
        acks = router.route(message.ackInbox, on_ack)
    with nats_failures():
        async with acks:
            await broker.nc.publish(subject, data)
            ack = await _first_ack(first, wait_s, deadline_s)
    check_ack(ack)
    return ack


async def _first_ack(
    first: asyncio.Future[api_pb2.Ack], wait_s: float, deadline_s: float
) -> api_pb2.Ack:
    try:
        async with asyncio.timeout(wait_s):
            return await first
    except TimeoutError:
        raise FluxStatus.from_entry(
            "ACK_TIMEOUT",
            f"no ack within the deadline ({deadline_s:.3g}s); "
            "the message may or may not have been stored",
        ) from None


# -- Publish and PublishToSubject ----------------------------------------------------------------


async def publish(
    broker: BrokerContext, request: api_pb2.PublishRequest, deadline_s: float | None
) -> api_pb2.PublishResponse:
    """Publish one message through NATS; wait for its ack until the deadline if there is one.

    Args:
        broker: The broker.
        request: The request.
        deadline_s: Seconds left until the call's gRPC deadline; ``None`` without one
            (fire-and-forget).

    Returns:
        The ack and the request's correlation id, or an empty response when fire-and-forget.

    Raises:
        FluxStatus: A failed check (see the module docstring), ACK_TIMEOUT, an ack error's
            row, or UNAVAILABLE when NATS failed.
    """
    try:
        partition = await resumed_target(broker, request)
        check_ack_inbox(broker, request.ackInbox)
        ack = await _deliver(
            broker, partition.subject, message_of(request), request.ackInbox, deadline_s
        )
    except RejectedError as rejected:
        raise rejected.status() from None
    if ack is None:
        return api_pb2.PublishResponse()
    return api_pb2.PublishResponse(ack=ack, correlationId=request.correlationId)


async def publish_to_subject(
    broker: BrokerContext, request: api_pb2.PublishToSubjectRequest, deadline_s: float | None
) -> api_pb2.PublishToSubjectResponse:
    """Publish one message to a NATS subject; wait for the first ack if there is a deadline.

    Args:
        broker: The broker.
        request: The request; ``subject`` must be literal.
        deadline_s: Seconds left until the call's gRPC deadline; ``None`` without one.

    Returns:
        The first ack, or an empty response when fire-and-forget.

    Raises:
        FluxStatus: A failed check, ACK_TIMEOUT (e.g. no stream on the subject), an ack
            error's row, or UNAVAILABLE when NATS failed.
    """
    try:
        try:
            validate_literal_subject(request.subject)
        except InvalidSubjectError as error:
            raise bad_request(str(error)) from None
        check_ack_policy(request.ackPolicy)
        check_ack_inbox(broker, request.ackInbox)
        check_headers(request.headers, broker.limits)
        message = api_pb2.Message(
            offset=_NO_EXPECTED_OFFSET,
            key=request.key,
            value=request.value,
            headers=request.headers,
            correlationId=request.correlationId,
            ackPolicy=request.ackPolicy,
        )
        ack = await _deliver(broker, request.subject, message, request.ackInbox, deadline_s)
    except RejectedError as rejected:
        raise rejected.status() from None
    if ack is None:
        return api_pb2.PublishToSubjectResponse()
    return api_pb2.PublishToSubjectResponse(ack=ack)
