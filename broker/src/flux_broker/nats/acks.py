"""Ack inboxes for the gRPC publish paths: one wildcard subscription routes every ack.

A gRPC publish that waits for its ack needs a NATS subject the partition leader publishes the
ack to. Subscribing to a fresh inbox for every call would cost a SUB, an UNSUB and, to be sure
of the subscription, a round trip each time. The :class:`AckRouter` subscribes **once**, to
``<namespace>.ack.<router-nuid>.*``, and hands out inboxes below it::

    <namespace>.ack.<router-nuid>.<token>      one per waiting call; the token is a NUID

When an ack arrives, the router looks the token up in a dict of handlers and calls the
handler with the decoded :class:`~flux_proto.api_pb2.Ack`. A handler is registered for the
lifetime of a call with :meth:`AckRouter.route` and always removed when the call ends, so the
dict holds only calls in progress; it is bounded by :data:`ACK_ROUTES_MAX`.

The inboxes keep Liftbridge's shape, ``<namespace>.ack.<nuid>``, with one more token: the
router's own NUID, so brokers sharing a NATS cluster never receive each other's acks.
Clients never parse ack inboxes.

**Ordering.** The subscription is created lazily, on the first :meth:`AckRouter.route`, and
confirmed by a round trip to the NATS server before the route is handed out. After that, no
round trip is needed per call: nats-py writes SUB and PUB commands to the socket in the order
they were issued, and the server handles one connection's commands in order.

Acks to an inbox the *client* chose (``PublishRequest.ackInbox``) cannot go through the router;
:func:`listen` subscribes to such a subject for one call. Its SUB is queued before the call's
PUB on the same connection, so the server has the subscription before the message reaches a
partition leader.

Payloads on an inbox that are not valid ack envelopes are counted and dropped
(:class:`AckRouterStats`), never raised into nats-py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.nuid import NUID

from flux_broker.nats.connection import round_trip
from flux_broker.nats.envelope import EnvelopeError, decode_ack
from flux_broker.nats.subjects import SEPARATOR, SINGLE_WILDCARD, ack_inbox
from flux_proto import api_pb2

__all__ = [
    "ACK_ROUTES_MAX",
    "AckHandler",
    "AckRouter",
    "AckRouterFullError",
    "AckRouterStats",
    "listen",
]

_logger = logging.getLogger(__name__)

#: Inboxes one router serves at once: calls waiting for acks on this broker. Each costs a
#: dict entry; past this, new calls are refused (the broker is overloaded, not the router).
ACK_ROUTES_MAX: Final = 64 * 1024

#: Called with every ack that arrives on an inbox; it must not block (it runs in nats-py's
#: delivery task, shared by every inbox of the router).
AckHandler = Callable[[api_pb2.Ack], None]


class AckRouterFullError(Exception):
    """The router already serves :data:`ACK_ROUTES_MAX` inboxes."""


@dataclass(slots=True)
class AckRouterStats:
    """Counters of one router, exported as metrics.

    Attributes:
        received: NATS messages received on the router's subscription.
        routed: Acks handed to a handler.
        unrouted: Messages for an inbox no call waits on any more (a late ack).
        malformed: Messages that were not valid ack envelopes; dropped.
    """

    received: int = 0
    routed: int = 0
    unrouted: int = 0
    malformed: int = 0


class AckRouter:
    """Ack inboxes under one wildcard NATS subscription of a broker's connection."""

    def __init__(self, nc: Client, namespace: str, *, routes_max: int = ACK_ROUTES_MAX) -> None:
        """Describe the router; it subscribes on its first :meth:`route`.

        Args:
            nc: The broker's connected NATS client.
            namespace: The broker's NATS namespace (``clustering.namespace``).
            routes_max: Inboxes served at once at most.

        Raises:
            ValueError: ``routes_max`` is not positive.
            flux_broker.nats.subjects.InvalidSubjectError: ``namespace`` cannot start a
                subject.
        """
        if routes_max <= 0:
            raise ValueError(f"routes_max must be positive, got {routes_max}")
        self._nc = nc
        self._nuid = NUID()
        self._prefix = ack_inbox(namespace, self._nuid.next().decode()) + SEPARATOR
        self._routes_max = routes_max
        self._handlers: dict[str, AckHandler] = {}
        self._subscription: Subscription | None = None
        self._start_lock = asyncio.Lock()
        self.stats = AckRouterStats()

    @property
    def subject(self) -> str:
        """The wildcard subject the router subscribes to."""
        return self._prefix + SINGLE_WILDCARD

    @property
    def routes(self) -> int:
        """Inboxes currently served."""
        return len(self._handlers)

    def new_inbox(self) -> str:
        """A fresh inbox subject of this router; acks to it reach a handler once routed."""
        return self._prefix + self._nuid.next().decode()

    def owns(self, subject: str) -> bool:
        """Whether ``subject`` lies in this router's inbox space (``<prefix>.`` and below).

        A client-chosen ack inbox there could receive, or divert, the acks of other calls.
        """
        return subject.startswith(self._prefix)

    @contextlib.asynccontextmanager
    async def route(self, inbox: str, handler: AckHandler) -> AsyncIterator[None]:
        """Call ``handler`` with every ack arriving on ``inbox`` while the context is open.

        Args:
            inbox: A subject from :meth:`new_inbox`, not routed yet.
            handler: Called with each ack, in arrival order.

        Raises:
            AckRouterFullError: The router serves :data:`ACK_ROUTES_MAX` inboxes already.
            nats.errors.Error: The subscription could not be created.
            ValueError: ``inbox`` is not this router's, or is routed already.
        """
        token = inbox[len(self._prefix) :]
        if not (self.owns(inbox) and token.isascii() and token.isalnum()):
            raise ValueError(f"{inbox!r} is not an inbox of this router")
        if token in self._handlers:
            raise ValueError(f"{inbox!r} is routed already")
        if len(self._handlers) >= self._routes_max:
            raise AckRouterFullError(f"{self._routes_max} calls are waiting for acks already")
        await self._start()
        self._handlers[token] = handler
        try:
            yield
        finally:
            self._handlers.pop(token, None)

    async def close(self) -> None:
        """Unsubscribe; a later :meth:`route` subscribes again. Idempotent."""
        async with self._start_lock:
            subscription, self._subscription = self._subscription, None
            if subscription is not None:
                with contextlib.suppress(nats.errors.Error):
                    await subscription.unsubscribe()

    async def _start(self) -> None:
        # An uncontended asyncio.Lock is taken without suspending: cheap on every route.
        async with self._start_lock:
            if self._subscription is not None:
                return
            subscription = await self._nc.subscribe(self.subject, cb=self._on_message)
            try:
                # Round trip once, so the server has the subscription before the first inbox
                # is used.
                await round_trip(self._nc)
            except BaseException:
                with contextlib.suppress(nats.errors.Error):
                    await subscription.unsubscribe()
                raise
            self._subscription = subscription

    async def _on_message(self, msg: Msg) -> None:
        self.stats.received += 1
        handler = self._handlers.get(msg.subject[len(self._prefix) :])
        if handler is None:
            self.stats.unrouted += 1
            return
        try:
            ack = decode_ack(msg.data)
        except EnvelopeError as error:
            self.stats.malformed += 1
            _logger.debug("dropping a malformed ack on %r: %s", msg.subject, error)
            return
        self.stats.routed += 1
        handler(ack)


@contextlib.asynccontextmanager
async def listen(nc: Client, inbox: str, handler: AckHandler) -> AsyncIterator[None]:
    """Call ``handler`` with every ack arriving on ``inbox`` while the context is open.

    For an inbox the client chose; the caller validated it as a literal subject. Payloads that
    are not ack envelopes are dropped (the client may use the subject for more than acks).

    Args:
        nc: The broker's connected NATS client.
        inbox: The subject to listen on.
        handler: Called with each ack, in arrival order.

    Raises:
        nats.errors.Error: The subscription could not be created.
    """

    async def on_message(msg: Msg) -> None:
        try:
            ack = decode_ack(msg.data)
        except EnvelopeError as error:
            _logger.debug("ignoring a non-ack payload on %r: %s", inbox, error)
            return
        handler(ack)

    subscription = await nc.subscribe(inbox, cb=on_message)
    try:
        yield
    finally:
        with contextlib.suppress(nats.errors.Error):
            await subscription.unsubscribe()
