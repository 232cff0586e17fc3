"""SubscribeBatch against a real broker: byte-bounded batches, positions, clean stops."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import grpc
import pytest

from flux_broker.log.format import iter_decode
from flux_proto import api_pb2

from .test_publish_batch import create, drain, framed, publish

if TYPE_CHECKING:
    from flux_proto import api_pb2_grpc

    API = api_pb2_grpc.APIAsyncStub

pytestmark = pytest.mark.integration

TIMEOUT_S = 10.0
VALUE_BYTES = 100


async def fill(api: API, stream: str, batches: int, per_batch: int) -> list[int]:
    """Write ``batches`` batches of ``per_batch`` records; the timestamp of each batch."""
    await create(api, stream)
    counter = iter(range(batches * per_batch))
    requests = [
        api_pb2.PublishBatchRequest(
            stream=stream,
            records=framed(*(b"%0100d" % next(counter) for _ in range(per_batch))),
        )
        for _ in range(batches)
    ]
    responses = await publish(api, requests)
    assert all(not r.HasField("error") for r in responses)
    return [r.timestamp for r in responses]


async def read(
    api: API, stream: str, max_bytes: int = 0, **positions: object
) -> list[api_pb2.RecordBatch]:
    """Every RecordBatch of a SubscribeBatch call that ends by itself, handshake first."""
    request = api_pb2.SubscribeBatchRequest(
        subscribe=api_pb2.SubscribeRequest(stream=stream, **positions),  # type: ignore[arg-type]
        maxBytes=max_bytes,
    )
    async with asyncio.timeout(TIMEOUT_S):
        return [batch async for batch in api.SubscribeBatch(request)]


def values(batches: list[api_pb2.RecordBatch]) -> list[int]:
    return [int(record.value or b"") for b in batches for record in iter_decode(b.records)]


async def test_batches_carry_every_record_once_within_the_budget(api: API) -> None:
    await fill(api, "sb", batches=10, per_batch=50)
    batches = await read(
        api,
        "sb",
        max_bytes=4096,
        startPosition=api_pb2.EARLIEST,
        stopPosition=api_pb2.STOP_LATEST,
    )
    handshake, *data = batches
    assert (handshake.records, handshake.firstOffset, handshake.lastOffset) == (b"", -1, -1)
    assert handshake.highWatermark == 499
    assert values(data) == list(range(500))
    assert all(0 < len(b.records) <= 4096 for b in data)
    assert len(data) > 500 * VALUE_BYTES // 4096
    offsets = [r.offset for b in data for r in iter_decode(b.records)]
    assert offsets == list(range(500))
    for b in data:
        decoded = list(iter_decode(b.records))
        assert (b.firstOffset, b.lastOffset, b.recordCount) == (
            decoded[0].offset,
            decoded[-1].offset,
            len(decoded),
        )
        assert b.highWatermark == 499


async def test_start_and_stop_cut_batches_at_records(api: API) -> None:
    timestamps = await fill(api, "cut", batches=4, per_batch=25)
    middle = await read(
        api,
        "cut",
        startPosition=api_pb2.OFFSET,
        startOffset=13,
        stopPosition=api_pb2.STOP_OFFSET,
        stopOffset=61,
    )
    assert values(middle[1:]) == list(range(13, 62))
    by_time = await read(
        api,
        "cut",
        startPosition=api_pb2.TIMESTAMP,
        startTimestamp=timestamps[1],
        stopPosition=api_pb2.STOP_TIMESTAMP,
        stopTimestamp=timestamps[3],
    )
    assert values(by_time[1:]) == list(range(25, 75))


async def test_a_record_larger_than_the_budget_comes_alone(api: API) -> None:
    await create(api, "large")
    await publish(
        api,
        [api_pb2.PublishBatchRequest(stream="large", records=framed(b"1" * 5000, b"2", b"3"))],
    )
    batches = await read(
        api, "large", max_bytes=1, startPosition=api_pb2.EARLIEST, stopPosition=api_pb2.STOP_LATEST
    )
    assert [b.recordCount for b in batches[1:]] == [1, 1, 1]


async def test_new_records_arrive_while_subscribed(api: API) -> None:
    await create(api, "live")
    request = api_pb2.SubscribeBatchRequest(subscribe=api_pb2.SubscribeRequest(stream="live"))
    call = api.SubscribeBatch(request)
    async with asyncio.timeout(TIMEOUT_S):
        stream = aiter(call)
        assert (await anext(stream)).lastOffset == -1
        await publish(api, [api_pb2.PublishBatchRequest(stream="live", records=framed(b"7"))])
        batch = await anext(stream)
    call.cancel()
    assert (batch.firstOffset, values([batch])) == (0, [7])


async def test_a_waiting_subscriber_gets_new_records_within_its_budget(api: API) -> None:
    await create(api, "live-budget")
    request = api_pb2.SubscribeBatchRequest(
        subscribe=api_pb2.SubscribeRequest(stream="live-budget"), maxBytes=1024
    )
    call = api.SubscribeBatch(request)
    received: list[api_pb2.RecordBatch] = []
    async with asyncio.timeout(TIMEOUT_S):
        stream = aiter(call)
        assert (await anext(stream)).lastOffset == -1  # now waiting at the end of the log
        records = framed(*(b"%0100d" % i for i in range(50)))
        await publish(api, [api_pb2.PublishBatchRequest(stream="live-budget", records=records)])
        while sum(batch.recordCount for batch in received) < 50:
            received.append(await anext(stream))
    call.cancel()
    assert values(received) == list(range(50))
    assert len(received) > 1
    assert all(len(batch.records) <= 1024 for batch in received)


async def test_bad_requests_fail_before_the_handshake(api: API) -> None:
    await create(api, "badsb")
    cases = {
        "negative budget": (api_pb2.SubscribeRequest(stream="badsb"), -1),
        "no partition": (api_pb2.SubscribeRequest(stream="badsb", partition=3), 0),
        "unknown start": (api_pb2.SubscribeRequest(stream="badsb", startPosition=42), 0),  # type: ignore[arg-type]
    }
    codes = {}
    for name, (subscribe, max_bytes) in cases.items():
        call = api.SubscribeBatch(
            api_pb2.SubscribeBatchRequest(subscribe=subscribe, maxBytes=max_bytes)
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await drain(call, list[api_pb2.RecordBatch]())
        codes[name] = info.value.code()
    assert codes == {
        "negative budget": grpc.StatusCode.INVALID_ARGUMENT,
        "no partition": grpc.StatusCode.NOT_FOUND,
        "unknown start": grpc.StatusCode.INVALID_ARGUMENT,
    }
