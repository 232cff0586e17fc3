"""Ack inboxes (flux_broker.nats.acks) against a real nats-server.

Each test uses its own namespace, so tests sharing the session's server never see each
other's acks. Acks are published from a second connection, as a partition leader of another
broker would.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from flux_broker.nats.acks import AckRouter, AckRouterFullError, listen
from flux_broker.nats.envelope import encode_ack, encode_message
from flux_proto import api_pb2
from flux_testing import NatsServer, wait_for

pytestmark = pytest.mark.integration

BOUND_S = 10.0


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    """The broker's connection."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
async def other(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A second connection, publishing acks."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
def namespace() -> str:
    return f"ns-{uuid.uuid4().hex}"


def _ack(correlation_id: str, offset: int = 0) -> bytes:
    return encode_ack(api_pb2.Ack(stream="s", offset=offset, correlationId=correlation_id))


async def test_acks_reach_the_handler_of_their_inbox(
    nc: Client, other: Client, namespace: str
) -> None:
    router = AckRouter(nc, namespace)
    first: list[api_pb2.Ack] = []
    second: list[api_pb2.Ack] = []
    inbox_1, inbox_2 = router.new_inbox(), router.new_inbox()
    assert inbox_1 != inbox_2
    assert inbox_1.startswith(f"{namespace}.ack.")
    async with router.route(inbox_1, first.append), router.route(inbox_2, second.append):
        assert router.routes == 2
        for offset in range(3):
            await other.publish(inbox_1, _ack("one", offset))
        await other.publish(inbox_2, _ack("two"))
        await other.flush()
        await wait_for(lambda: len(first) == 3 and len(second) == 1, BOUND_S)
    assert [ack.offset for ack in first] == [0, 1, 2]  # in arrival order
    assert {ack.correlationId for ack in first} == {"one"}
    assert second[0].correlationId == "two"
    assert router.routes == 0
    assert router.stats.routed == 4


async def test_the_first_route_is_ready_when_route_returns(
    nc: Client, other: Client, namespace: str
) -> None:
    # The wildcard subscription is created on the first route; the router confirms it with the
    # server before handing the inbox out, so an ack sent at once from another connection
    # arrives. Fresh routers, so that every round creates a new subscription.
    for round_ in range(20):
        router = AckRouter(nc, f"{namespace}-{round_}")
        received = await _route_one_ack(router, other)
        assert received.correlationId == "only"
        await router.close()


async def _route_one_ack(router: AckRouter, publisher: Client) -> api_pb2.Ack:
    received: list[api_pb2.Ack] = []
    inbox = router.new_inbox()
    async with router.route(inbox, received.append):
        await publisher.publish(inbox, _ack("only"))
        await publisher.flush()
        await wait_for(lambda: received, BOUND_S, message=f"an ack on {inbox}")
    return received[0]


async def test_late_and_malformed_acks_are_counted_and_dropped(
    nc: Client, other: Client, namespace: str
) -> None:
    router = AckRouter(nc, namespace)
    received: list[api_pb2.Ack] = []
    inbox = router.new_inbox()
    async with router.route(inbox, received.append):
        await other.publish(inbox, b"not an envelope")
        await other.publish(inbox, encode_message(api_pb2.Message(value=b"type 0, not an ack")))
        await other.publish(inbox, _ack("good"))
        await other.flush()
        await wait_for(lambda: received, BOUND_S)
    assert [ack.correlationId for ack in received] == ["good"]
    assert router.stats.malformed == 2
    await other.publish(inbox, _ack("late"))  # nobody waits on the inbox any more
    await other.flush()
    await wait_for(lambda: router.stats.unrouted == 1, BOUND_S)
    assert len(received) == 1


async def test_routes_are_bounded(nc: Client, namespace: str) -> None:
    router = AckRouter(nc, namespace, routes_max=2)
    async with router.route(router.new_inbox(), lambda ack: None):
        async with router.route(router.new_inbox(), lambda ack: None):
            with pytest.raises(AckRouterFullError):
                async with router.route(router.new_inbox(), lambda ack: None):
                    pass  # pragma: no cover
        async with router.route(router.new_inbox(), lambda ack: None):
            assert router.routes == 2
    assert router.routes == 0


async def test_route_refuses_foreign_and_duplicate_inboxes(nc: Client, namespace: str) -> None:
    router = AckRouter(nc, namespace)
    inbox = router.new_inbox()
    assert router.owns(inbox)
    assert router.owns(inbox + ".deeper")
    assert not router.owns(f"{namespace}.ack.someone-else")
    assert not router.owns(AckRouter(nc, namespace).new_inbox())
    for foreign in (f"{namespace}.ack.x", inbox + ".deeper", router.subject):
        with pytest.raises(ValueError, match="not an inbox of this router"):
            async with router.route(foreign, lambda ack: None):
                pass  # pragma: no cover
    async with router.route(inbox, lambda ack: None):
        with pytest.raises(ValueError, match="routed already"):
            async with router.route(inbox, lambda ack: None):
                pass  # pragma: no cover
    with pytest.raises(ValueError, match="positive"):
        AckRouter(nc, namespace, routes_max=0)


async def test_route_after_close_subscribes_again(
    nc: Client, other: Client, namespace: str
) -> None:
    router = AckRouter(nc, namespace)
    received: list[api_pb2.Ack] = []
    async with router.route(router.new_inbox(), received.append):
        pass
    await router.close()
    await router.close()  # idempotent
    inbox = router.new_inbox()
    async with router.route(inbox, received.append):
        await other.publish(inbox, _ack("again"))
        await other.flush()
        await wait_for(lambda: received, BOUND_S)
    assert received[0].correlationId == "again"


async def test_listen_on_a_client_inbox(nc: Client, namespace: str) -> None:
    inbox = f"{namespace}.client.inbox"
    received: list[api_pb2.Ack] = []
    async with listen(nc, inbox, received.append):
        # Published on the listening connection, as the broker publishes the message the ack
        # answers: its SUB went out first, so no round trip is needed.
        await nc.publish(inbox, b"the client's own traffic")
        await nc.publish(inbox, _ack("c"))
        await wait_for(lambda: received, BOUND_S)
    assert [ack.correlationId for ack in received] == ["c"]
