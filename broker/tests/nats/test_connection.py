"""The broker's NATS connection survives flushes cancelled midway (the nats-py PONG bug)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client

from flux_broker.nats.connection import harden, round_trip
from flux_testing import NatsServer


@pytest_asyncio.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


async def _cancel_flushes(nc: Client, count: int) -> None:
    for _ in range(count):
        flush = asyncio.ensure_future(nc.flush())
        await asyncio.sleep(0)  # the PING is queued; its PONG is on its way
        flush.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flush


async def _still_receives(nc: Client) -> bool:
    # The bug shows as a lost message, or as a round trip that times out (FlushTimeoutError):
    # which one depends on timing, so both count.
    sub = await nc.subscribe(nc.new_inbox())
    try:
        await round_trip(nc)
        await nc.publish(sub.subject, b"ping")
        await sub.next_msg(timeout=2)
    except nats.errors.TimeoutError:
        return False
    finally:
        await sub.unsubscribe()
    return True


async def test_a_hardened_connection_survives_cancelled_flushes(nc: Client) -> None:
    harden(nc)
    await _cancel_flushes(nc, 20)
    assert await _still_receives(nc)
    assert nc.is_connected


async def test_without_hardening_the_bug_is_real(nc: Client) -> None:
    # Guards the premise: if nats-py fixes the bug, this fails and harden() can go.
    await _cancel_flushes(nc, 20)
    assert not await _still_receives(nc)


async def test_round_trip_is_not_cancelled_with_its_caller(nc: Client) -> None:
    harden(nc)
    waiter = asyncio.ensure_future(round_trip(nc))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await _still_receives(nc)
