"""The producer against a real broker process: acks, batching, errors, faults and bounds.

Faults go through :class:`flux_testing.proxy.TcpProxy`: the broker advertises the proxy's
address, so every connection of the client (metadata included) crosses it, and a restarted
broker (new ports) is found behind the same address. The SDK acceptance criteria covered here
(../shared/reference/sdk-acceptance.md): 1 every send settles, 2 close is bounded, 3 graceful
close loses nothing, 4 backpressure, 11 fatal errors keep being raised, 13 idempotence
survives faults.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import pytest

import flux_client
from flux_client import AckPolicy, Record, RoundRobinPartitioner
from flux_client._records import DecodedRecord, decode_records
from flux_proto import api_pb2
from flux_testing import wait_for
from flux_testing.broker import BrokerProcess
from flux_testing.proxy import TcpProxy

if TYPE_CHECKING:
    from flux_testing.pytest_plugin import BrokerFactory

pytestmark = pytest.mark.integration

TIMEOUT_S = 20.0


@dataclass
class Proxied:
    """A broker reachable only through a proxy, and the proxy."""

    broker: BrokerProcess
    proxy: TcpProxy

    async def restart(self, *, kill: bool = True) -> None:
        """Kill (or stop) the broker, start it again on the same data, retarget the proxy."""
        if kill:
            self.broker.kill()
            await self.broker.wait_exited()
        else:
            await self.broker.stop()
        self.broker = await self.broker.restart()
        self.proxy.retarget(self.broker.address)


@pytest.fixture
async def proxied(broker_factory: BrokerFactory) -> AsyncIterator[Proxied]:
    async with await TcpProxy.start("127.0.0.1:9") as proxy:
        broker = await broker_factory(
            args=("--host", "127.0.0.1", "--port", str(proxy.port), "--listen", "127.0.0.1:0")
        )
        proxy.retarget(broker.address)
        yield Proxied(broker, proxy)


@pytest.fixture
async def client(proxied: Proxied) -> AsyncIterator[flux_client.Client]:
    async with await flux_client.connect(
        proxied.proxy.address, keepalive_ms=1_000, keepalive_timeout_ms=1_000
    ) as client:
        yield client


async def read_all(address: str, stream: str, partition: int = 0) -> list[DecodedRecord]:
    """Every record of a partition, read with the raw SubscribeBatch RPC (not the SDK)."""
    request = api_pb2.SubscribeBatchRequest(
        subscribe=api_pb2.SubscribeRequest(
            stream=stream,
            partition=partition,
            startPosition=api_pb2.EARLIEST,
            stopPosition=api_pb2.STOP_LATEST,
        )
    )
    records: list[DecodedRecord] = []
    async with grpc.aio.insecure_channel(address) as channel:
        from flux_proto import api_pb2_grpc  # noqa: PLC0415

        stub = api_pb2_grpc.APIStub(channel)
        try:
            async with asyncio.timeout(TIMEOUT_S):
                async for batch in stub.SubscribeBatch(request):
                    records += decode_records(batch.records)
        except grpc.aio.AioRpcError as error:
            if error.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:  # stream-empty
                raise
    return records


def values_of(records: Sequence[DecodedRecord]) -> list[bytes | None]:
    return [record.value for record in records]


# -- the basics --------------------------------------------------------------------------------


async def test_send_returns_where_the_record_was_written(client: flux_client.Client) -> None:
    await client.create_stream("basics", partitions=1)
    async with client.producer() as producer:
        first = await producer.send("basics", b"one", key=b"k", headers={"h": b"v"})
        second = await producer.send("basics", None)
    assert (first.stream, first.partition, first.offset) == ("basics", 0, 0)
    assert second.offset == 1
    assert second.timestamp >= first.timestamp > 0
    stored = await read_all(client.metadata_cache.broker_addresses[0], "basics")
    assert [(r.offset, r.key, r.value, r.headers) for r in stored] == [
        (0, b"k", b"one", (("h", b"v"),)),
        (1, None, None, ()),
    ]


async def test_concurrent_sends_share_batches(client: flux_client.Client) -> None:
    await client.create_stream("coalesce")
    async with client.producer() as producer:
        metas = await asyncio.gather(
            *(producer.send("coalesce", str(i).encode(), partition=0) for i in range(2000))
        )
        stats = producer.stats()
    assert [m.offset for m in metas] == list(range(2000))
    assert stats.batches_sent < 50
    assert stats.records_acked == 2000
    assert stats.sends_in_flight == 0
    assert stats.buffered_bytes == 0


async def test_send_batch_keeps_order_and_answers_in_order(client: flux_client.Client) -> None:
    await client.create_stream("many", partitions=3)
    records: list[Record | bytes | None] = [
        Record(f"v{i}".encode(), key=f"key-{i % 7}".encode()) for i in range(3000)
    ]
    async with client.producer(max_batch_bytes=16 * 1024) as producer:
        metas = await producer.send_batch("many", records)
        explicit = await producer.send_batch("many", [b"a", None, b"c"], partition=2)
    assert len(metas) == 3000
    for record, meta in zip(records, metas, strict=True):
        assert isinstance(record, Record)
        assert record.key is not None
        assert meta.partition == zlib.crc32(record.key) % 3
    for partition in range(3):
        offsets = [m.offset for m in metas if m.partition == partition]
        assert offsets == list(range(len(offsets)))
    assert [m.partition for m in explicit] == [2, 2, 2]
    address = client.metadata_cache.broker_addresses[0]
    stored = await read_all(address, "many", 2)
    assert values_of(stored)[-3:] == [b"a", None, b"c"]


async def test_round_robin_spreads_records(client: flux_client.Client) -> None:
    await client.create_stream("spread", partitions=4)
    async with client.producer(partitioner=RoundRobinPartitioner()) as producer:
        metas = await producer.send_batch("spread", [b"x"] * 8)
    assert [m.partition for m in metas] == [0, 1, 2, 3, 0, 1, 2, 3]


async def test_expected_offset_writes_only_at_that_offset(client: flux_client.Client) -> None:
    await client.create_stream("occ", optimistic_concurrency_control=True)
    async with client.producer() as producer:
        assert (await producer.send("occ", b"a", partition=0, expected_offset=0)).offset == 0
        with pytest.raises(flux_client.IncorrectOffsetError) as refused:
            await producer.send("occ", b"b", partition=0, expected_offset=0)
        assert refused.value.reason == "incorrect-offset"
        assert not refused.value.retriable
        assert (await producer.send("occ", b"c", partition=0, expected_offset=1)).offset == 1
    address = client.metadata_cache.broker_addresses[0]
    assert values_of(await read_all(address, "occ")) == [b"a", b"c"]


# -- errors ------------------------------------------------------------------------------------


async def test_an_unknown_stream_is_raised_on_every_send(client: flux_client.Client) -> None:
    async with client.producer() as producer:
        for _ in range(3):
            with pytest.raises(flux_client.StreamNotFoundError):
                await producer.send("missing", b"x")
        for _ in range(2):
            with pytest.raises(flux_client.StreamNotFoundError):
                await producer.send("missing", b"x", partition=0)
        await client.create_stream("one-partition")
        with pytest.raises(flux_client.PartitionNotFoundError):
            await producer.send("one-partition", b"x", partition=5)


async def test_refusals_carry_their_code_and_change_nothing(client: flux_client.Client) -> None:
    await client.create_stream("refusing")
    async with client.producer() as producer:
        await producer.send("refusing", b"kept")
        with pytest.raises(flux_client.InvalidArgumentError):
            await producer.send("refusing", b"x", headers={"flux.producer": b"mine"})
        await client.set_stream_readonly("refusing")
        with pytest.raises(flux_client.ReadonlyError) as readonly:
            await producer.send("refusing", b"y")
        assert readonly.value.code == "READONLY"
        assert readonly.value.grpc_code is grpc.StatusCode.FAILED_PRECONDITION
        await client.set_stream_readonly("refusing", readonly=False)
        assert (await producer.send("refusing", b"z")).offset == 1


async def test_a_closed_producer_or_client_refuses_at_once(proxied: Proxied) -> None:
    client = await flux_client.connect(proxied.proxy.address)
    producer = client.producer()
    await producer.close()
    with pytest.raises(flux_client.ClosedError):
        await producer.send("any", b"x")
    await client.close()
    with pytest.raises(flux_client.ClosedError):
        client.producer()
    with pytest.raises(flux_client.ClosedError):
        await client.fetch_metadata()


async def test_connect_fails_in_bounded_time_when_no_broker_answers(proxied: Proxied) -> None:
    proxied.proxy.refuse(True)
    started = time.monotonic()
    with pytest.raises(flux_client.ConnectionFailedError) as failed:
        await flux_client.connect(proxied.proxy.address, connect_timeout_ms=1_500)
    assert time.monotonic() - started < 1.5 + 1
    assert failed.value.retriable


# -- faults: criteria 1, 2, 4, 13 ---------------------------------------------------------------


async def _send_all(
    producer: flux_client.Producer, stream: str, count: int
) -> list[flux_client.RecordMetadata | BaseException]:
    """``count`` concurrent sends; each outcome (metadata or error)."""
    return await asyncio.gather(
        *(producer.send(stream, f"{i:06d}".encode(), partition=0) for i in range(count)),
        return_exceptions=True,
    )


async def test_every_send_settles_and_none_repeats_across_a_broker_kill(
    client: flux_client.Client, proxied: Proxied
) -> None:
    """Criteria 1 and 13: 10,000 idempotent sends, the broker killed and back within 5 s."""
    await client.create_stream("settle")
    delivery_timeout_ms = 8_000
    async with client.producer(delivery_timeout_ms=delivery_timeout_ms, linger_ms=1) as producer:
        sending = asyncio.create_task(_send_all(producer, "settle", 10_000))
        await wait_for(lambda: producer.stats().records_acked >= 2_000, TIMEOUT_S)
        await proxied.restart(kill=True)
        started = time.monotonic()
        outcomes = await asyncio.wait_for(sending, delivery_timeout_ms / 1000 + 5)
        settled_s = time.monotonic() - started
        stats = producer.stats()
    assert settled_s < delivery_timeout_ms / 1000 + 1
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    assert all(isinstance(e, flux_client.FluxError) for e in errors), errors[:3]
    acked = [o for o in outcomes if isinstance(o, flux_client.RecordMetadata)]
    assert len(acked) + len(errors) == 10_000
    assert stats.sends_in_flight == 0
    stored = [v or b"" for v in values_of(await read_all(proxied.broker.address, "settle"))]
    assert len(stored) == len(set(stored)), "a record was written twice"
    assert stored == sorted(stored), "records were reordered"
    assert {m.offset for m in acked} <= set(range(len(stored)))
    for meta in acked:
        assert stored[meta.offset] is not None


async def test_idempotent_retries_never_duplicate_across_restarts(
    client: flux_client.Client, proxied: Proxied
) -> None:
    """Criterion 13: several batches in flight, two restarts during 10,000 sends."""
    await client.create_stream("exactly-once")
    async with client.producer(max_batch_bytes=4 * 1024, delivery_timeout_ms=30_000) as producer:
        sending = asyncio.create_task(_send_all(producer, "exactly-once", 10_000))
        for threshold in (2_000, 6_000):

            def acked(at_least: int = threshold) -> bool:
                return producer.stats().records_acked >= at_least

            await wait_for(acked, TIMEOUT_S)
            await proxied.restart(kill=True)
        outcomes = await asyncio.wait_for(sending, 40)
        stats = producer.stats()
    assert not [o for o in outcomes if isinstance(o, BaseException)]
    assert stats.retries > 0
    stored = values_of(await read_all(proxied.broker.address, "exactly-once"))
    assert stored == [f"{i:06d}".encode() for i in range(10_000)]


async def test_sends_fail_in_bounded_time_while_the_broker_is_down(
    client: flux_client.Client, proxied: Proxied
) -> None:
    """Criterion 1, broker down: every send settles within delivery_timeout + 1 s."""
    await client.create_stream("down")
    async with client.producer(delivery_timeout_ms=1_500) as producer:
        await producer.send("down", b"warm")
        proxied.proxy.refuse(True)
        await proxied.proxy.reset()
        started = time.monotonic()
        outcomes = await _send_all(producer, "down", 500)
        elapsed = time.monotonic() - started
        assert producer.stats().sends_in_flight == 0
        proxied.proxy.refuse(False)
    assert elapsed < 1.5 + 1
    assert all(isinstance(o, flux_client.AckTimeoutError) for o in outcomes)
    timeouts = [o for o in outcomes if isinstance(o, flux_client.AckTimeoutError)]
    assert timeouts[0].retriable


async def test_without_idempotence_a_lost_ack_is_raised_not_retried(
    client: flux_client.Client, proxied: Proxied
) -> None:
    await client.create_stream("at-most-once")
    async with client.producer(idempotent=False, delivery_timeout_ms=5_000) as producer:
        await producer.send("at-most-once", b"warm")
        proxied.proxy.black_hole(True)
        sending = asyncio.create_task(_send_all(producer, "at-most-once", 50))
        await wait_for(lambda: producer.stats().batches_in_flight > 0, TIMEOUT_S)
        await proxied.proxy.reset()
        proxied.proxy.black_hole(False)
        outcomes = await asyncio.wait_for(sending, 10)
    lost = [o for o in outcomes if isinstance(o, flux_client.AckTimeoutError)]
    assert lost
    assert not any(error.retry_safe for error in lost)


async def test_close_is_bounded_with_the_broker_unreachable(
    client: flux_client.Client, proxied: Proxied
) -> None:
    """Criterion 2: close(timeout) returns in time; pending sends fail with ClosedError."""
    await client.create_stream("close")
    producer = client.producer(delivery_timeout_ms=60_000)
    await producer.send("close", b"warm")
    proxied.proxy.black_hole(True)
    sending = asyncio.create_task(_send_all(producer, "close", 100))
    await wait_for(lambda: producer.stats().sends_in_flight == 100, TIMEOUT_S)
    started = time.monotonic()
    await asyncio.gather(producer.close(timeout_ms=500), producer.close(timeout_ms=500))
    assert time.monotonic() - started < 0.5 + 1
    outcomes = await asyncio.wait_for(sending, 1)
    assert all(isinstance(o, flux_client.ClosedError) for o in outcomes)
    proxied.proxy.black_hole(False)


async def test_graceful_close_loses_nothing_accepted(client: flux_client.Client) -> None:
    """Criterion 3: sends accepted but not acked when close starts are all written."""
    await client.create_stream("graceful")
    async with client.producer(linger_ms=200) as producer:
        pending = [
            asyncio.ensure_future(producer.send("graceful", f"{i}".encode(), partition=0))
            for i in range(1000)
        ]
        await wait_for(lambda: producer.stats().sends_in_flight == 1000, TIMEOUT_S)
        assert producer.stats().records_acked == 0  # still lingering: close must flush them
    assert all(task.done() and not task.exception() for task in pending)
    address = client.metadata_cache.broker_addresses[0]
    assert values_of(await read_all(address, "graceful")) == [f"{i}".encode() for i in range(1000)]


async def test_a_full_buffer_makes_send_wait_then_fail(
    client: flux_client.Client, proxied: Proxied
) -> None:
    """Criterion 4: broker unreachable, memory bounded; a send waits max_block, then fails."""
    await client.create_stream("backpressure")
    max_buffer_bytes = 256 * 1024
    producer = client.producer(
        max_buffer_bytes=max_buffer_bytes,
        max_batch_bytes=64 * 1024,
        max_block_ms=300,
        delivery_timeout_ms=60_000,
    )
    try:
        await producer.send("backpressure", b"warm")
        proxied.proxy.black_hole(True)
        started = time.monotonic()
        # 400 records of ~1 KiB: far more than the buffer holds.
        sends = [
            asyncio.ensure_future(producer.send("backpressure", b"x" * 1000, partition=0))
            for _ in range(400)
        ]
        highest = 0

        def some_failed() -> bool:
            nonlocal highest
            highest = max(highest, producer.stats().buffered_bytes)
            return any(task.done() for task in sends)

        await wait_for(some_failed, TIMEOUT_S, interval_s=0.01)
        waited_s = time.monotonic() - started

        def settled() -> bool:  # every send either failed or holds buffer space
            waiting = sum(not task.done() for task in sends)
            return waiting == producer.stats().sends_in_flight

        await wait_for(settled, TIMEOUT_S, interval_s=0.01)
        failed = [task for task in sends if task.done()]
        assert all(isinstance(task.exception(), flux_client.BufferFullError) for task in failed)
        assert waited_s >= 0.3
        assert highest <= max_buffer_bytes
        accepted = [task for task in sends if not task.done()]
        # Each framed record is 1,044 bytes: the buffer holds 251 of them.
        assert len(accepted) == max_buffer_bytes // 1044
        proxied.proxy.black_hole(False)
        await proxied.proxy.reset()
        await asyncio.wait_for(asyncio.gather(*accepted), TIMEOUT_S)
        assert producer.stats().buffered_bytes == 0
    finally:
        await producer.close(timeout_ms=1_000)
        for task in sends:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: the ones that failed were checked above


async def test_ack_policy_none_resolves_without_offsets(client: flux_client.Client) -> None:
    await client.create_stream("fire-and-forget")
    async with client.producer(ack_policy=AckPolicy.NONE) as producer:
        meta = await producer.send("fire-and-forget", b"x", partition=0)
    assert meta.offset == -1
    address = client.metadata_cache.broker_addresses[0]

    async def stored() -> bool:
        return values_of(await read_all(address, "fire-and-forget")) == [b"x"]

    await wait_for(stored, TIMEOUT_S)


async def test_a_black_holed_connection_is_noticed_within_two_keepalives(
    client: flux_client.Client, proxied: Proxied
) -> None:
    """Criterion 6: pending sends see a reconnect (keepalive 1 s + 1 s timeout), then an ack."""
    await client.create_stream("black-hole")
    async with client.producer(delivery_timeout_ms=30_000) as producer:
        await producer.send("black-hole", b"warm")
        proxied.proxy.black_hole(True)
        sending = asyncio.ensure_future(producer.send("black-hole", b"pending"))
        await wait_for(lambda: producer.stats().batches_in_flight == 1, TIMEOUT_S)
        started = time.monotonic()
        await wait_for(lambda: producer.stats().retries > 0, TIMEOUT_S, interval_s=0.05)
        noticed_s = time.monotonic() - started
        proxied.proxy.black_hole(False)
        meta = await asyncio.wait_for(sending, TIMEOUT_S)
    assert noticed_s < 2 * (1.0 + 1.0) + 0.5
    assert meta.offset == 1
    assert producer.stats().reconnects >= 1


async def test_no_public_call_blocks_the_event_loop(client: flux_client.Client) -> None:
    """Criterion 14: asyncio debug mode logs every callback slower than the threshold."""
    loop = asyncio.get_running_loop()
    slow: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "Executing" in record.getMessage():
                slow.append(record.getMessage())

    handler = Catch()
    logging.getLogger("asyncio").addHandler(handler)
    loop.set_debug(True)
    loop.slow_callback_duration = 0.1
    try:
        await client.create_stream("non-blocking", partitions=2)
        async with client.producer() as producer:
            await producer.send_batch("non-blocking", [b"x" * 128] * 20_000)
            for _ in range(200):  # (creating many tasks at once is slow in debug mode itself)
                await producer.send("non-blocking", b"y")
        count = 0
        async for _ in client.subscribe_stream(
            "non-blocking", start=flux_client.Start.EARLIEST, stop=flux_client.Stop.LATEST
        ):
            count += 1
        await client.fetch_metadata()
    finally:
        loop.set_debug(False)
        logging.getLogger("asyncio").removeHandler(handler)
    assert count == 20_200
    assert not slow, slow[:3]


async def test_bad_arguments_are_refused_before_anything_is_sent(
    client: flux_client.Client, proxied: Proxied
) -> None:
    with pytest.raises(ValueError, match="host:port"):
        await flux_client.connect("no-port")
    with pytest.raises(ValueError, match="keepalive_ms"):
        await flux_client.connect(proxied.proxy.address, keepalive_ms=100)
    with pytest.raises(TypeError, match="retention_max_bites"):
        await client.create_stream("typo", retention_max_bites=5)
    with pytest.raises(TypeError, match="must be bool"):
        await client.create_stream("typo", compact_enabled=1)
    assert "typo" not in (await client.fetch_metadata()).streams
    with pytest.raises(ValueError, match="max_batch_bytes"):
        client.producer(max_batch_bytes=2 << 20, max_buffer_bytes=1 << 20)
    with pytest.raises(ValueError, match="cursor_id"):
        flux_client.Start.cursor("")
