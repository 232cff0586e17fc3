"""The NATS fast path of the partition leader (flux_broker.nats.connection).

``subscribe_raw`` and ``publish_many`` rely on private parts of the pinned nats-py; these tests
check each part and the behaviour built on them, so a nats-py upgrade that changes them fails
here rather than losing messages in production. Real nats-server, real nats-py clients.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.protocol.parser import Parser

from flux_broker.nats.connection import (
    NATS_PY_INTERNALS,
    publish_many,
    round_trip,
    subscribe_raw,
)
from flux_testing import NatsServer, wait_for
from flux_testing.pytest_plugin import NatsServerFactory

pytestmark = pytest.mark.integration

TIMEOUT_S = 10.0


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    """The broker's connection."""
    client = await nats.connect(nats_server.url)
    yield client
    if not client.is_closed:
        await client.close()


@pytest.fixture
async def pub(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A publisher's connection."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
def subject() -> str:
    return f"hooks.{uuid.uuid4().hex}"


# -- what is used of nats-py -----------------------------------------------------------------


async def test_the_nats_py_internals_used_are_there(nc: Client, subject: str) -> None:
    sub = await nc.subscribe(subject)
    owners: dict[str, object] = {"Client": nc, "Subscription": sub}
    for name in NATS_PY_INTERNALS:
        owner, attribute = name.split(".")
        assert hasattr(owners[owner], attribute), f"nats-py no longer has {name}"
    assert isinstance(sub._id, int)
    assert isinstance(nc._pending, list)
    parameters = list(inspect.signature(Client._process_msg).parameters)
    assert parameters == ["self", "sid", "subject", "reply", "data", "headers"]
    # The parser must reach the dispatch through the client instance, per message.
    assert "self.nc._process_msg(" in inspect.getsource(Parser.parse)


async def test_subscribe_returns_without_yielding_to_the_event_loop(
    nc: Client, subject: str
) -> None:
    # subscribe_raw installs its handler right after nc.subscribe returns: no message of the
    # subscription can be read in between only if nats-py does not yield there.
    ran = asyncio.Event()
    asyncio.get_running_loop().call_soon(ran.set)
    await nc.subscribe(subject)
    assert not ran.is_set()


# -- raw subscriptions -----------------------------------------------------------------------


async def test_a_raw_subscription_gets_subject_reply_and_payload_in_order(
    nc: Client, pub: Client, subject: str
) -> None:
    got: list[tuple[bytes, bytes, bytes]] = []
    raw = await subscribe_raw(nc, f"{subject}.*", lambda s, r, p: got.append((s, r, p)))
    normal = await nc.subscribe(f"{subject}.*")  # the usual path, beside it, still works
    await round_trip(nc)
    await pub.publish(f"{subject}.a", b"one", reply="the.reply")
    await pub.publish(f"{subject}.b", b"two", headers={"h": "v"})  # NATS headers are not passed
    await pub.publish(f"{subject}.a", b"")

    await wait_for(lambda: len(got) == 3)
    assert got == [
        (f"{subject}.a".encode(), b"the.reply", b"one"),
        (f"{subject}.b".encode(), b"", b"two"),
        (f"{subject}.a".encode(), b"", b""),
    ]
    assert (raw.subject, raw.queue, raw.active) == (f"{subject}.*", "", True)
    first = await normal.next_msg(timeout=TIMEOUT_S)
    assert (first.subject, first.reply, first.data) == (f"{subject}.a", "the.reply", b"one")
    assert nc.stats["in_msgs"] >= 6


async def test_drain_delivers_everything_sent_before_it_and_nothing_after(
    nc: Client, pub: Client, subject: str
) -> None:
    got: list[bytes] = []
    raw = await subscribe_raw(nc, subject, lambda _s, _r, payload: got.append(payload))
    await round_trip(nc)
    count = 2000
    for i in range(count):
        await pub.publish(subject, b"%d" % i)
    await round_trip(pub)  # the server has routed them all to the subscriber's connection

    await raw.drain()
    assert got == [b"%d" % i for i in range(count)]
    assert not raw.active
    await pub.publish(subject, b"late")
    await round_trip(pub)
    await round_trip(nc)
    assert len(got) == count


async def test_queue_groups_share_messages_between_raw_subscriptions(
    nc: Client, pub: Client, subject: str
) -> None:
    a: list[bytes] = []
    b: list[bytes] = []
    await subscribe_raw(nc, subject, lambda _s, _r, p: a.append(p), queue="g")
    await subscribe_raw(nc, subject, lambda _s, _r, p: b.append(p), queue="g")
    await round_trip(nc)
    count = 200
    for i in range(count):
        await pub.publish(subject, b"%d" % i)
    await wait_for(lambda: len(a) + len(b) == count)
    assert sorted(a + b, key=int) == [b"%d" % i for i in range(count)]
    # NATS picks a member at random per message: both get some (failing odds 2**-199).
    assert a
    assert b


async def test_a_failing_handler_loses_its_message_only(
    nc: Client, pub: Client, subject: str, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[bytes] = []

    def handler(_subject: bytes, _reply: bytes, payload: bytes) -> None:
        if payload == b"boom":
            raise RuntimeError("handler bug")
        got.append(payload)

    await subscribe_raw(nc, subject, handler)
    await round_trip(nc)
    for payload in (b"before", b"boom", b"after"):
        await pub.publish(subject, payload)
    await wait_for(lambda: len(got) == 2)
    assert got == [b"before", b"after"]
    assert "raw NATS handler failed" in caplog.text
    assert nc.is_connected


async def test_subscribe_raw_fails_on_a_closed_connection(nc: Client, subject: str) -> None:
    await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await subscribe_raw(nc, subject, lambda _s, _r, _p: None)


# -- publish_many ----------------------------------------------------------------------------


async def test_publish_many_keeps_the_order_with_other_publishes(
    nc: Client, pub: Client, subject: str
) -> None:
    sub: Subscription = await pub.subscribe(f"{subject}.*")
    await round_trip(pub)
    out_msgs = nc.stats["out_msgs"]
    a, b = f"{subject}.a".encode(), f"{subject}.b".encode()
    await nc.publish(f"{subject}.a", b"0")
    await publish_many(nc, [(a, b"1"), (b, b"2"), (a, b"")])
    await publish_many(nc, [])
    await nc.publish(f"{subject}.b", b"4")

    got = [await sub.next_msg(timeout=TIMEOUT_S) for _ in range(4)]
    assert [(m.subject, m.data) for m in got] == [
        (f"{subject}.a", b"0"),
        (f"{subject}.a", b"1"),
        (f"{subject}.b", b"2"),
        (f"{subject}.a", b""),
    ]
    assert (await sub.next_msg(timeout=TIMEOUT_S)).data == b"4"
    assert nc.stats["out_msgs"] == out_msgs + 5


async def test_publish_many_refuses_a_payload_over_the_limit_and_queues_nothing(
    nc: Client, subject: str
) -> None:
    pending = nc.pending_data_size
    with pytest.raises(nats.errors.MaxPayloadError):
        await publish_many(nc, [(subject.encode(), b"ok"), (b"x", b"y" * (nc.max_payload + 1))])
    assert nc.pending_data_size == pending


async def test_publish_many_fails_on_a_closed_connection(nc: Client, subject: str) -> None:
    await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await publish_many(nc, [(subject.encode(), b"x")])


async def test_publish_many_waits_for_the_socket_past_the_buffer_bound(
    nats_server: NatsServer, pub: Client, subject: str
) -> None:
    small = await nats.connect(nats_server.url, pending_size=1024)
    try:
        sub = await pub.subscribe(subject)
        await round_trip(pub)
        payloads = [b"%04d" % i * 100 for i in range(20)]  # 8 KB, past the 1 KiB bound
        await publish_many(small, [(subject.encode(), p) for p in payloads])
        assert small.pending_data_size == 0  # written to the socket before returning
        got = [(await sub.next_msg(timeout=TIMEOUT_S)).data for _ in payloads]
        assert got == payloads
    finally:
        await small.close()


async def test_logging_of_the_module_is_quiet_on_the_happy_path(
    nc: Client, pub: Client, subject: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="flux_broker.nats.connection")
    got: list[bytes] = []
    raw = await subscribe_raw(nc, subject, lambda _s, _r, p: got.append(p))
    await round_trip(nc)
    await pub.publish(subject, b"x")
    await wait_for(lambda: got == [b"x"])
    await raw.drain()
    assert not [r for r in caplog.records if r.name == "flux_broker.nats.connection"]


async def test_across_a_reconnect_raw_subscriptions_stay_and_publishes_wait(
    nats_server_factory: NatsServerFactory, subject: str
) -> None:
    server = nats_server_factory()
    nc = await nats.connect(server.url, reconnect_time_wait=0.05, max_reconnect_attempts=-1)
    try:
        got: list[bytes] = []
        await subscribe_raw(nc, subject, lambda _s, _r, p: got.append(p))
        await round_trip(nc)
        server.stop()
        await wait_for(lambda: not nc.is_connected)
        # Disconnected: buffered by nats-py (the connection echoes to its own subscription).
        await publish_many(nc, [(subject.encode(), b"during")])
        assert nc.pending_data_size > 0
        server = nats_server_factory(port=server.port)
        await wait_for(lambda: nc.is_connected)
        await publish_many(nc, [(subject.encode(), b"after")])
        await wait_for(lambda: len(got) == 2)
        assert got == [b"during", b"after"]
    finally:
        await nc.close()
