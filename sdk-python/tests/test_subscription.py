"""Subscription against a real broker: positions, merged partitions, faults, backpressure, close."""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import grpc
import pytest

from flux_client._client import Client, connect
from flux_client._errors import FluxError, PartitionNotFoundError, StreamNotFoundError
from flux_client._records import encode_record
from flux_client._retry import RetryPolicy
from flux_client._subscription import Subscription
from flux_client._types import Message, Start, Stop
from flux_proto import api_pb2, api_pb2_grpc
from flux_testing import wait_for

if TYPE_CHECKING:
    from conftest import ProxiedBroker, Publish

    from flux_testing.broker import BrokerProcess

    #: ``fill(address, stream, partition, first, count)`` -> (base offset, timestamp).
    Fill = Callable[[str, str, int, int, int], Awaitable[tuple[int, int]]]

pytestmark = pytest.mark.integration

TIMEOUT_S = 20.0
#: Quick retries, so twenty disconnects take well under a second of backoff; enough attempts
#: for a broker restart.
FAST_RETRY = RetryPolicy(initial_backoff_ms=5, max_backoff_ms=100, max_attempts=200)


def value(partition: int, offset: int) -> bytes:
    """The value written at ``offset`` of ``partition`` (so a message proves its position)."""
    return b"%d:%d" % (partition, offset)


@pytest.fixture
def fill(publish: Publish) -> Fill:
    """Write records ``first`` .. ``first + count - 1`` of a partition, valued by position."""

    async def write(
        address: str, stream: str, partition: int, first: int, count: int
    ) -> tuple[int, int]:
        answer = await publish(
            address,
            stream,
            [value(partition, first + i) for i in range(count)],
            partition=partition,
        )
        assert answer.baseOffset == first
        return answer.baseOffset, answer.timestamp

    return write


async def take(messages: AsyncIterator[Message], count: int) -> list[Message]:
    """The next ``count`` messages (bounded in time)."""
    taken: list[Message] = []
    async with asyncio.timeout(TIMEOUT_S):
        while len(taken) < count:
            taken.append(await anext(messages))
    return taken


async def drain(messages: Subscription) -> list[Message]:
    """Every message until the iteration ends by itself (bounded in time)."""
    async with asyncio.timeout(TIMEOUT_S):
        return [message async for message in messages]


def offsets(messages: Iterable[Message]) -> list[int]:
    return [message.offset for message in messages]


def by_partition(messages: Iterable[Message]) -> dict[int, list[int]]:
    grouped: dict[int, list[int]] = defaultdict(list)
    for message in messages:
        assert message.value == value(message.partition, message.offset), message
        grouped[message.partition].append(message.offset)
    return dict(grouped)


async def connected(subscription: Subscription, partitions: int = 1) -> None:
    """Wait until every partition's call is open (its handshake arrived)."""
    await wait_for(
        lambda: (
            len(subscription.stats().partitions) == partitions
            and all(p.connected for p in subscription.stats().partitions.values())
        ),
        TIMEOUT_S,
        message="subscription connected",
    )


# -- positions -------------------------------------------------------------------------------


async def test_every_start_position(broker: BrokerProcess, fill: Fill) -> None:
    address = broker.address
    async with await connect(address) as client:
        await client.create_stream("starts")
        _, first_stamp = await fill(address, "starts", 0, 0, 5)
        _, second_stamp = await fill(address, "starts", 0, 5, 5)
        assert first_stamp < second_stamp
        await client.set_cursor("starts", 0, "reader", 6)

        async def read(start: Start) -> list[int]:
            return offsets(await drain(client.subscribe("starts", start=start, stop=Stop.LATEST)))

        assert await read(Start.EARLIEST) == list(range(10))
        assert await read(Start.LATEST) == [9]
        assert await read(Start.offset(3)) == list(range(3, 10))
        assert await read(Start.offset(-4)) == list(range(10))
        assert await read(Start.timestamp(second_stamp)) == list(range(5, 10))
        assert await read(Start.cursor("reader")) == list(range(7, 10))
        assert await read(Start.cursor("never-set")) == list(range(10))

        # NEW_ONLY (the default): only what is published once the subscription is open.
        async with client.subscribe("starts") as subscription:
            await connected(subscription)
            await fill(address, "starts", 0, 10, 3)
            assert offsets(await take(subscription, 3)) == [10, 11, 12]


async def test_every_stop_position(broker: BrokerProcess, fill: Fill) -> None:
    address = broker.address
    async with await connect(address) as client:
        await client.create_stream("stops")
        await client.create_stream("empty")
        await fill(address, "stops", 0, 0, 5)
        _, second_stamp = await fill(address, "stops", 0, 5, 5)

        async def read(
            stop: Stop, start: Start = Start.EARLIEST, stream: str = "stops"
        ) -> list[int]:
            return offsets(await drain(client.subscribe(stream, start=start, stop=stop)))

        assert await read(Stop.LATEST) == list(range(10))
        assert await read(Stop.offset(4)) == list(range(5))
        assert await read(Stop.offset(7), Start.offset(7)) == [7]
        assert await read(Stop.timestamp(second_stamp)) == list(range(5))
        # Clean ends with nothing to deliver.
        assert await read(Stop.LATEST, stream="empty") == []
        assert await read(Stop.LATEST, Start.NEW_ONLY) == []
        assert await read(Stop.LATEST, Start.offset(50)) == []

        # Stop.LATEST is the newest record when the subscription opened, not when it ends.
        async with client.subscribe(
            "stops", start=Start.EARLIEST, stop=Stop.LATEST, max_batch_bytes=64
        ) as subscription:
            head = await take(subscription, 1)
            await fill(address, "stops", 0, 10, 5)
            assert offsets(head + await drain(subscription)) == list(range(10))

        # An offset stop in the future waits for it, then ends.
        async with client.subscribe(
            "stops", start=Start.offset(13), stop=Stop.offset(16)
        ) as subscription:
            assert offsets(await take(subscription, 2)) == [13, 14]
            await fill(address, "stops", 0, 15, 5)
            assert offsets(await drain(subscription)) == [15, 16]
            assert subscription.stats().partitions[0].finished


async def test_subscribe_stream_merges_every_partition(broker: BrokerProcess, fill: Fill) -> None:
    address = broker.address
    async with await connect(address) as client:
        await client.create_stream("merged", subject="orders", partitions=3)
        for first in range(0, 60, 20):
            for partition in range(3):
                await fill(address, "merged", partition, first, 20)
        subscription = client.subscribe_stream(
            "merged", start=Start.EARLIEST, stop=Stop.LATEST, max_batch_bytes=256
        )
        messages = await drain(subscription)
        assert by_partition(messages) == {p: list(range(60)) for p in range(3)}
        subjects = {m.partition: m.subject for m in messages}
        assert subjects == {0: "orders", 1: "orders.1", 2: "orders.2"}
        assert subscription.closed  # the loop ended: the subscription closed itself
        assert subscription.stats().delivered == 180


async def test_messages_carry_every_field(broker: BrokerProcess, publish: Publish) -> None:
    address = broker.address
    async with await connect(address) as client:
        await client.create_stream("fields", subject="fields.subject")
        headed = await publish(
            address,
            "fields",
            [b"v"],
            key=b"k",
            headers=[("subject", b"from.nats"), ("reply", b"_INBOX.1"), ("trace", b"\x00\x01")],
        )
        await publish(address, "fields", [None])  # a tombstone
        await publish(address, "fields", [b""], key=b"")
        idempotent = await publish(address, "fields", [b"once"], idempotent=True)
        first, tombstone, empty, produced = await drain(
            client.subscribe("fields", start=Start.EARLIEST, stop=Stop.LATEST)
        )
    assert first == Message(
        stream="fields",
        partition=0,
        offset=0,
        key=b"k",
        value=b"v",
        headers={"subject": b"from.nats", "reply": b"_INBOX.1", "trace": b"\x00\x01"},
        timestamp=headed.timestamp,
        subject="from.nats",
        reply_subject="_INBOX.1",
    )
    assert (tombstone.key, tombstone.value, dict(tombstone.headers)) == (None, None, {})
    assert (tombstone.subject, tombstone.reply_subject) == ("fields.subject", "")
    assert (empty.key, empty.value) == (b"", b"")
    # The broker's idempotence bookkeeping is not the application's.
    assert (produced.value, dict(produced.headers)) == (b"once", {})
    assert produced.timestamp == idempotent.timestamp


# -- errors ----------------------------------------------------------------------------------


async def test_a_missing_stream_raises_every_time(broker: BrokerProcess) -> None:
    async with await connect(broker.address) as client:
        subscription = client.subscribe("missing", start=Start.EARLIEST)
        with pytest.raises(StreamNotFoundError):
            async for _ in subscription:
                pass
        # The loop above closed it; the error is still what every later call gets.
        assert subscription.closed
        with pytest.raises(StreamNotFoundError):
            await anext(subscription)
        with pytest.raises(StreamNotFoundError):
            async for _ in subscription:
                pass

        await client.create_stream("one", partitions=1)
        async with client.subscribe("one", partition=3) as wrong:
            for _ in range(2):
                with pytest.raises(PartitionNotFoundError):
                    await anext(wrong)


# -- faults ----------------------------------------------------------------------------------

PRELOAD = 40  # records per partition before subscribing
BATCHES = 20  # then this many batches of BATCH_RECORDS per partition while reading
BATCH_RECORDS = 10


async def preload(client: Client, fill: Fill, direct: str) -> dict[str, tuple[Start, int]]:
    """Stream ``d`` (2 partitions) with PRELOAD records each; each start and its first offset."""
    await client.create_stream("d", partitions=2)
    stamps: dict[int, int] = {}
    for first in range(0, PRELOAD, BATCH_RECORDS):
        for partition in (0, 1):  # interleaved: partition 0's stamp cuts both at 20
            _, stamp = await fill(direct, "d", partition, first, BATCH_RECORDS)
            stamps.setdefault(first, stamp)
    for partition in (0, 1):
        await client.set_cursor("d", partition, "c", 24)
    await client.fetch_metadata("d")  # cached, so the first subscribe needs no broker
    return {
        "earliest": (Start.EARLIEST, 0),
        "latest": (Start.LATEST, PRELOAD - 1),
        "new_only": (Start.NEW_ONLY, PRELOAD),
        "offset": (Start.offset(15), 15),
        "timestamp": (Start.timestamp(stamps[20]), 20),
        "cursor": (Start.cursor("c"), 25),
    }


async def reconnected(subscription: Subscription, times: int) -> None:
    """Wait until both partitions have tried to resubscribe ``times`` times."""
    await wait_for(
        lambda: (
            len(subscription.stats().partitions) == 2
            and all(p.reconnects >= times for p in subscription.stats().partitions.values())
        ),
        TIMEOUT_S,
    )


@pytest.mark.parametrize(
    "kind", ["earliest", "latest", "new_only", "offset", "timestamp", "cursor"]
)
async def test_twenty_disconnects_neither_skip_nor_repeat(
    proxied_broker: ProxiedBroker, fill: Fill, kind: str
) -> None:
    """Forced disconnects, before the first message and at random points, per start position."""
    direct, proxy = proxied_broker.direct_address, proxied_broker.proxy
    rng = random.Random(kind)  # noqa: S311 -- reproducible test data, not cryptography
    async with await connect(
        proxied_broker.address, request_timeout_ms=1500, retry=FAST_RETRY
    ) as client:
        start, first_offset = (await preload(client, fill, direct))[kind]
        end = PRELOAD + BATCHES * BATCH_RECORDS

        # 1: the network is down when the subscription starts: no call is accepted yet.
        proxy.refuse(True)
        await proxy.reset()
        disconnects = 1
        async with client.subscribe_stream("d", start=start, max_batch_bytes=128) as subscription:
            await reconnected(subscription, 1)
            proxy.refuse(False)
            # The subscription starts when a broker first accepts it.
            await connected(subscription, 2)
            if kind == "new_only":
                # 2: calls accepted, nothing delivered yet; the records published while the
                # network is down again must not be skipped by the resubscribe.
                proxy.refuse(True)
                await proxy.reset()
                disconnects += 1
                for partition in (0, 1):
                    await fill(direct, "d", partition, PRELOAD, BATCH_RECORDS)
                await reconnected(subscription, 2)
                proxy.refuse(False)

            async def produce(first: int) -> None:
                for offset in range(first, end, BATCH_RECORDS):
                    for partition in (0, 1):
                        await fill(direct, "d", partition, offset, BATCH_RECORDS)

            producer = asyncio.create_task(produce(PRELOAD + BATCH_RECORDS * (disconnects - 1)))
            count = 2 * (end - first_offset)
            resets = set(rng.sample(range(1, count - 20), 20 - disconnects))
            received: list[Message] = []
            async with asyncio.timeout(TIMEOUT_S * 2):
                while len(received) < count:
                    received.append(await anext(subscription))
                    if len(received) in resets:
                        await proxy.reset()
                        disconnects += 1
                await producer
            assert disconnects == 20
            assert by_partition(received) == {p: list(range(first_offset, end)) for p in (0, 1)}
            assert subscription.stats().reconnects >= 2


@pytest.mark.parametrize("kill", [False, True], ids=["stop", "kill"])
async def test_a_broker_restart_loses_and_repeats_nothing(
    proxied_broker: ProxiedBroker, fill: Fill, kill: bool
) -> None:
    async with await connect(proxied_broker.address, retry=FAST_RETRY) as client:
        await client.create_stream("r", partitions=2)
        for partition in (0, 1):
            await fill(proxied_broker.direct_address, "r", partition, 0, 50)
        async with client.subscribe_stream(
            "r", start=Start.EARLIEST, max_batch_bytes=256
        ) as subscription:
            received = await take(subscription, 30)
            await proxied_broker.restart(kill=kill)
            for partition in (0, 1):
                await fill(proxied_broker.direct_address, "r", partition, 50, 50)
            received += await take(subscription, 200 - 30)
            assert by_partition(received) == {0: list(range(100)), 1: list(range(100))}
            assert subscription.stats().reconnects >= 2


async def test_a_black_holed_connection_is_noticed_and_left(
    proxied_broker: ProxiedBroker, fill: Fill
) -> None:
    """A dead connection is noticed by keepalive (a visible reconnect), then read past."""
    proxy, direct = proxied_broker.proxy, proxied_broker.direct_address
    async with await connect(
        proxied_broker.address,
        keepalive_ms=1000,
        keepalive_timeout_ms=500,
        request_timeout_ms=1000,
        retry=FAST_RETRY,
    ) as client:
        await client.create_stream("bh")
        async with client.subscribe("bh") as subscription:
            await connected(subscription)
            await fill(direct, "bh", 0, 0, 5)
            received = await take(subscription, 5)
            before = subscription.stats().reconnects
            proxy.black_hole(True)
            noticed_from = time.monotonic()
            await fill(direct, "bh", 0, 5, 5)  # stored, not delivered while the network is down
            await wait_for(
                lambda: subscription.stats().reconnects > before, 10, message="a visible reconnect"
            )
            noticed_s = time.monotonic() - noticed_from
            assert subscription.stats().partitions[0].connected is False
            proxy.black_hole(False)
            await proxy.reset()  # black-holed connections stay dead; let the client see it
            received += await take(subscription, 5)
            await fill(direct, "bh", 0, 10, 5)
            received += await take(subscription, 5)
            assert offsets(received) == list(range(15))
    # Two keepalive intervals (ping + its timeout) plus slack for a shared 2-core machine.
    assert noticed_s < 2 * (1.0 + 0.5) + 1.0


async def test_an_exhausted_retry_budget_fails_for_good(proxied_broker: ProxiedBroker) -> None:
    proxy = proxied_broker.proxy
    impatient = RetryPolicy(initial_backoff_ms=5, max_backoff_ms=10, max_attempts=3)
    async with await connect(
        proxied_broker.address, request_timeout_ms=1000, retry=impatient
    ) as client:
        await client.create_stream("gone")
        async with client.subscribe("gone") as subscription:
            await connected(subscription)
            proxy.refuse(True)
            await proxy.reset()
            with pytest.raises(FluxError) as first:
                await asyncio.wait_for(anext(subscription), TIMEOUT_S)
            assert first.value.retriable
            with pytest.raises(FluxError) as again:
                await anext(subscription)
            assert again.value is first.value
            assert subscription.stats().partitions[0].finished


# -- backpressure ----------------------------------------------------------------------------


async def test_a_slow_consumer_holds_the_buffer_bound(broker: BrokerProcess) -> None:
    """A stalled consumer pauses fetching at the bound; nothing is dropped."""
    address = broker.address
    bound, batch_bytes, per_batch = 128 * 1024, 16 * 1024, 60
    count = 0

    async def produce(batches: int) -> None:
        """Write ``batches`` batches of ``per_batch`` records of ~1 KiB on one call.

        A written batch is larger than ``batch_bytes``: the broker sends records that arrive
        while a subscriber waits at the end as they were written, so this checks that the
        bound holds whatever the size of the batches the broker sends.
        """
        nonlocal count
        requests = []
        for _ in range(batches):
            values = [b"%01000d" % (count + i) for i in range(per_batch)]
            records = b"".join(encode_record(v, None, ()) for v in values)
            requests.append(
                api_pb2.PublishBatchRequest(
                    stream="slow", records=records, ackPolicy=api_pb2.LEADER
                )
            )
            count += per_batch
        async with grpc.aio.insecure_channel(address) as channel:
            calls = api_pb2_grpc.APIStub(channel).PublishBatch(iter(requests), timeout=TIMEOUT_S)
            answers = [answer async for answer in calls]
        assert len(answers) == batches
        assert not any(answer.HasField("error") for answer in answers)

    async with await connect(address) as client:
        await client.create_stream("slow")
        async with client.subscribe(
            "slow", start=Start.EARLIEST, max_batch_bytes=batch_bytes, max_buffer_bytes=bound
        ) as subscription:
            await connected(subscription)  # waiting at the end: batches come as written
            await produce(4)
            received = await take(subscription, 1)  # then stall while 1.5 MiB more arrive
            await produce(25)
            await wait_for(
                lambda: subscription.stats().buffered_bytes > bound - 2 * batch_bytes, TIMEOUT_S
            )
            stats = subscription.stats()
            assert stats.buffered_bytes <= bound
            mine = stats.partitions[0]
            assert mine.lag == mine.high_watermark - mine.last_delivered_offset > 100
            most = 0
            async with asyncio.timeout(TIMEOUT_S):
                while len(received) < count:
                    received.append(await anext(subscription))
                    if len(received) % 16 == 0:
                        most = max(most, subscription.stats().buffered_bytes)
            assert most <= bound
            assert [int(m.value or b"") for m in received] == list(range(count))
            assert offsets(received) == list(range(count))


# -- closing ---------------------------------------------------------------------------------


async def test_breaking_out_of_the_loop_closes_the_subscription(
    broker: BrokerProcess, fill: Fill
) -> None:
    address = broker.address
    async with await connect(address) as client:
        await client.create_stream("brk")
        await fill(address, "brk", 0, 0, 10)
        subscription = client.subscribe("brk", start=Start.EARLIEST)
        async for message in subscription:
            call = subscription._partitions[0].call
            assert message.offset == 0
            break
        # Closed as the loop was left: the calls are cancelled, the client forgets it.
        assert subscription.closed
        assert subscription not in client._children
        assert call is not None
        await wait_for(lambda: call.done() and all(t.done() for t in subscription._tasks), 5)
        assert call.cancelled()
        with pytest.raises(StopAsyncIteration):
            await anext(subscription)

        # Inside ``async with`` the block owns it: a loop may be left and entered again.
        async with client.subscribe("brk", start=Start.EARLIEST) as owned:
            async for _ in owned:
                break
            assert not owned.closed
            async for message in owned:
                if message.offset == 9:
                    break
        assert owned.closed


async def test_close_is_bounded_with_the_broker_unreachable(proxied_broker: ProxiedBroker) -> None:
    proxy = proxied_broker.proxy
    async with await connect(
        proxied_broker.address, request_timeout_ms=10_000, retry=FAST_RETRY
    ) as client:
        await client.create_stream("cl", partitions=2)
        # A call in flight on a connection that went silent.
        black_holed = client.subscribe_stream("cl")
        await black_holed.__aenter__()
        await connected(black_holed, 2)
        proxy.black_hole(True)
        waiting = asyncio.create_task(anext(black_holed))
        began = time.monotonic()
        await asyncio.gather(black_holed.close(timeout_ms=1000), black_holed.close(timeout_ms=1000))
        assert time.monotonic() - began < 2.0
        with pytest.raises(StopAsyncIteration):
            await waiting
        proxy.black_hole(False)
        await proxy.reset()

        # Resubscribing against a broker that refuses connections.
        refused = client.subscribe("cl", partition=1)
        await refused.__aenter__()
        await connected(refused)
        proxy.refuse(True)
        await proxy.reset()
        await wait_for(lambda: refused.stats().reconnects >= 1, TIMEOUT_S)
        began = time.monotonic()
        await asyncio.gather(refused.close(timeout_ms=1000), refused.close(timeout_ms=1000))
        assert time.monotonic() - began < 2.0
        proxy.refuse(False)

        # Closing the client closes what is still open; a blocked iteration then ends.
        last = client.subscribe("cl")
        await last.__aenter__()
        pending = asyncio.create_task(anext(last))
        await connected(last)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 5)
    assert last.closed


# -- observability ---------------------------------------------------------------------------


async def test_stats_report_lag_and_delivery(broker: BrokerProcess, fill: Fill) -> None:
    address = broker.address
    async with await connect(address) as client:
        await client.create_stream("lag", partitions=2)
        await fill(address, "lag", 0, 0, 100)
        await fill(address, "lag", 1, 0, 30)
        async with client.subscribe_stream(
            "lag", start=Start.EARLIEST, max_batch_bytes=512
        ) as subscription:
            received = await take(subscription, 10)
            partition = received[-1].partition
            await wait_for(
                lambda: subscription.stats().partitions[partition].high_watermark >= 0, TIMEOUT_S
            )
            stats = subscription.stats()
            mine = stats.partitions[partition]
            assert mine.last_delivered_offset == received[-1].offset
            assert mine.lag == mine.high_watermark - received[-1].offset
            assert mine.lag == (99 if partition == 0 else 29) - received[-1].offset
            assert stats.delivered == 10
            assert stats.reconnects == 0
            assert 0 < stats.buffered_bytes <= stats.max_buffer_bytes
            assert stats.lag == {p: s.lag for p, s in stats.partitions.items()}
            rest = await take(subscription, 120)
            assert by_partition(received + rest) == {0: list(range(100)), 1: list(range(30))}
            done = subscription.stats()
            assert done.lag == {0: 0, 1: 0}
            assert done.delivered == 130
