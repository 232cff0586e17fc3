"""Compatibility: gufo-liftbridge 0.2.0's cursor calls, unchanged, against a running Flux broker.

Like ``test_gufo_liftbridge.py``, this module must not import ``flux_proto`` or
``flux_broker`` (gufo bundles its own generated ``api.proto``); the broker runs in its own
process.

What gufo 0.2.0 does with cursors:

* It sends every SetCursor and FetchCursor to the leader of ``__cursors`` partition 0, which it
  finds in FetchMetadata: the broker must list ``__cursors`` there.
* ``set_cursor(offset=n)`` stores ``n + 1`` (the next offset to read) and ``get_cursor`` returns
  the stored value; ``subscribe(start_position=RESUME, cursor_id=...)`` starts at it.
* It retries Unavailable, FailedPrecondition, NotFound and Internal forever, so these tests
  only make calls that succeed or fail with another code (InvalidArgument, OutOfRange).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Final

import pytest
from gufo.liftbridge.client import LiftbridgeClient
from gufo.liftbridge.error import LiftbridgeError
from gufo.liftbridge.types import Message, StartPosition

from flux_testing import wait_for
from flux_testing.broker import BrokerProcess

pytestmark = pytest.mark.integration

#: Bound of every wait in this module.
WAIT_S: Final = 10.0
#: Messages stored in the stream every test starts from (offsets 0-2).
STORED: Final = 3


def _client(broker: BrokerProcess) -> LiftbridgeClient:
    """A gufo client of ``broker`` whose metadata retries stay inside the tests' deadlines."""
    return LiftbridgeClient(
        [broker.address],
        publish_async_ack_timeout=WAIT_S,
        metadata_leader_timeout=0.2,
        metadata_leader_dev=0.1,
    )


@pytest.fixture
async def client(broker: BrokerProcess) -> AsyncIterator[LiftbridgeClient]:
    """A gufo client of the test's broker; its channels are closed afterwards."""
    async with _client(broker) as lb:
        yield lb


async def _seed(client: LiftbridgeClient, name: str) -> None:
    """Create ``name`` and store :data:`STORED` messages in its partition 0."""
    await client.create_stream(name, subject=f"compat.{name}")
    for i in range(STORED):
        await client.publish(b"v%d" % i, stream=name, partition=0)

    async def stored() -> bool:
        metadata = await client.get_metadata(name)
        (stream,) = metadata.metadata
        return stream.partitions[0].high_watermark == STORED - 1

    # gufo publishes without an ack: the watermark says when the messages are stored.
    await wait_for(stored, WAIT_S, message=f"{STORED} messages stored in {name}")


async def _take(client: LiftbridgeClient, name: str, cursor_id: str, count: int) -> list[Message]:
    """The first ``count`` messages of a subscription resumed from ``cursor_id``."""
    received: list[Message] = []
    messages = client.subscribe(
        name, partition=0, start_position=StartPosition.RESUME, cursor_id=cursor_id
    )
    try:
        async with asyncio.timeout(WAIT_S):
            async for message in messages:
                received.append(message)
                if len(received) == count:
                    break
    finally:
        if isinstance(messages, AsyncGenerator):
            await messages.aclose()
    return received


async def test_cursors_stream_is_in_metadata(client: LiftbridgeClient) -> None:
    """The client finds ``__cursors`` partition 0 and its leader in FetchMetadata."""
    async with asyncio.timeout(WAIT_S):
        await client.wait_for_cursors()
    metadata = await client.get_metadata("__cursors")
    (stream,) = metadata.metadata
    assert stream.name == "__cursors"
    assert 0 in stream.partitions
    assert stream.partitions[0].leader == metadata.brokers[0].id


async def test_set_and_get_cursor(client: LiftbridgeClient) -> None:
    """A cursor never set is -1; gufo stores the offset + 1 and reads back what it stored."""
    await _seed(client, "gufo-cursor")
    assert await client.get_cursor("gufo-cursor", 0, "reader") == -1

    await client.set_cursor("gufo-cursor", 0, "reader", 1)
    assert await client.get_cursor("gufo-cursor", 0, "reader") == 2
    # The newest offset processed: gufo stores newest + 1, the most a cursor may hold.
    await client.set_cursor("gufo-cursor", 0, "reader", STORED - 1)
    assert await client.get_cursor("gufo-cursor", 0, "reader") == STORED
    # Backwards is allowed.
    await client.set_cursor("gufo-cursor", 0, "reader", 0)
    assert await client.get_cursor("gufo-cursor", 0, "reader") == 1
    assert await client.get_cursor("gufo-cursor", 0, "other") == -1


async def test_subscribe_resumes_from_the_cursor(client: LiftbridgeClient) -> None:
    """``StartPosition.RESUME`` starts at the stored cursor."""
    await _seed(client, "gufo-resume")
    await client.set_cursor("gufo-resume", 0, "worker", 0)  # offset 0 processed

    messages = await _take(client, "gufo-resume", "worker", STORED - 1)

    assert [message.offset for message in messages] == [1, 2]
    assert [message.value for message in messages] == [b"v1", b"v2"]


async def test_bad_cursor_calls_raise(client: LiftbridgeClient) -> None:
    """An empty cursor id and a cursor past the end fail with an error gufo does not retry."""
    await _seed(client, "gufo-bad-cursor")
    with pytest.raises(LiftbridgeError, match="cursorId is empty"):
        await client.set_cursor("gufo-bad-cursor", 0, "", 0)
    with pytest.raises(LiftbridgeError, match="past the end"):
        await client.set_cursor("gufo-bad-cursor", 0, "reader", STORED)  # stores STORED + 1
    assert await client.get_cursor("gufo-bad-cursor", 0, "reader") == -1


async def test_cursors_survive_a_restart(broker: BrokerProcess) -> None:
    """A cursor gufo stored is there after the broker restarts."""
    async with _client(broker) as client:
        await _seed(client, "gufo-restart")
        await client.set_cursor("gufo-restart", 0, "reader", 1)
    assert await broker.stop() == 0
    restarted = await broker.restart()
    async with _client(restarted) as client:
        assert await client.get_cursor("gufo-restart", 0, "reader") == 2
