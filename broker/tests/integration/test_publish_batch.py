"""PublishBatch and InitProducer against a real broker: all-or-nothing batches, idempotence."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import grpc
import pytest

from flux_broker.log.format import HEADER_BYTES, NewRecord, Placement, frame, iter_decode
from flux_broker.streams.producers import PRODUCER_HEADER, parse_producer_header
from flux_proto import api_pb2, api_pb2_grpc
from flux_testing.broker import BrokerProcess

if TYPE_CHECKING:
    from flux_testing.pytest_plugin import BrokerFactory

    API = api_pb2_grpc.APIAsyncStub

pytestmark = pytest.mark.integration

LEADER = api_pb2.AckPolicy.LEADER
NONE = api_pb2.AckPolicy.NONE
TIMEOUT_S = 10.0
_T = TypeVar("_T")


def framed(*values: bytes | None, key: bytes | None = None) -> bytes:
    """Records framed as a client frames them (offsets and times left at 0)."""
    records = [NewRecord(value=value, key=key) for value in values]
    data, _ = frame(records, Placement(0, 0, 0, 0, 0), 1 << 30, 1 << 30)
    return bytes(data)


def batch(stream: str, records: bytes, **fields: object) -> api_pb2.PublishBatchRequest:
    return api_pb2.PublishBatchRequest(
        stream=stream,
        records=records,
        ackPolicy=fields.pop("ackPolicy", LEADER),  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )


async def publish(
    api: API, requests: Sequence[api_pb2.PublishBatchRequest]
) -> list[api_pb2.PublishBatchResponse]:
    """Send ``requests`` on one PublishBatch call; every response, in order."""

    async def stream() -> AsyncIterator[api_pb2.PublishBatchRequest]:
        for request in requests:
            yield request

    async with asyncio.timeout(TIMEOUT_S):
        return [response async for response in api.PublishBatch(stream())]


async def drain(call: AsyncIterable[_T], into: list[_T]) -> None:
    """Append what ``call`` yields to ``into`` until it ends (bounded in time)."""
    async with asyncio.timeout(TIMEOUT_S):
        async for item in call:
            into.append(item)


async def create(api: API, name: str, partitions: int = 1, **fields: object) -> None:
    await api.CreateStream(
        api_pb2.CreateStreamRequest(
            name=name,
            subject=name,
            partitions=partitions,
            **fields,  # type: ignore[arg-type]
        )
    )


async def newest(api: API, stream: str, partition: int = 0) -> int:
    response = await api.FetchPartitionMetadata(
        api_pb2.FetchPartitionMetadataRequest(stream=stream, partition=partition)
    )
    return response.metadata.newestOffset


async def paused(api: API, stream: str) -> bool:
    response = await api.FetchPartitionMetadata(
        api_pb2.FetchPartitionMetadataRequest(stream=stream, partition=0)
    )
    return response.metadata.paused


async def read_all(api: API, stream: str, partition: int = 0) -> list[api_pb2.Message]:
    """Every message of the partition, through the Liftbridge Subscribe."""
    call = api.Subscribe(
        api_pb2.SubscribeRequest(
            stream=stream,
            partition=partition,
            startPosition=api_pb2.EARLIEST,
            stopPosition=api_pb2.STOP_LATEST,
        )
    )
    messages: list[api_pb2.Message] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await drain(call, messages)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    return messages[1:]  # the handshake


async def test_batches_are_appended_in_order_and_acked_once_each(api: API) -> None:
    await create(api, "pb")
    responses = await publish(
        api,
        [
            batch("pb", framed(b"a", b"b", b"c"), correlationId="1"),
            batch("pb", framed(b"d"), correlationId="2"),
            batch("pb", framed(None, b"", key=b"k"), correlationId="3"),
        ],
    )
    assert [(r.correlationId, r.baseOffset, r.recordCount) for r in responses] == [
        ("1", 0, 3),
        ("2", 3, 1),
        ("3", 4, 2),
    ]
    assert all(not r.HasField("error") and not r.duplicate for r in responses)
    assert all(r.stream == "pb" and r.partition == 0 for r in responses)
    assert responses[0].timestamp <= responses[1].timestamp <= responses[2].timestamp
    messages = await read_all(api, "pb")
    assert [(m.offset, m.value, m.key) for m in messages] == [
        (0, b"a", b""),
        (1, b"b", b""),
        (2, b"c", b""),
        (3, b"d", b""),
        (4, b"", b"k"),
        (5, b"", b"k"),
    ]
    # Records written without a subject header are served with the partition's subject.
    assert {m.subject for m in messages} == {"pb"}
    assert messages[0].timestamp == responses[0].timestamp


async def test_a_bad_record_refuses_the_whole_batch_and_names_it(api: API) -> None:
    await create(api, "bad")
    good = framed(b"one", b"two", b"three", b"four")
    corrupt = bytearray(good)
    third = 2 * len(framed(b"one"))  # where record 2 starts: records 0 and 1 are alike
    corrupt[third + HEADER_BYTES + 10] ^= 0xFF  # a body byte of record 2: its CRC fails
    responses = await publish(
        api,
        [
            batch("bad", bytes(corrupt), correlationId="corrupt"),
            batch("bad", good[:-1], correlationId="cut"),
            batch("bad", b"", correlationId="empty"),
            batch("bad", good, correlationId="good"),
        ],
    )
    errors = {r.correlationId: r.error for r in responses if r.HasField("error")}
    assert errors["corrupt"].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert errors["corrupt"].reason == "invalid-argument"
    assert errors["corrupt"].recordIndex == 2
    assert "CRC" in errors["corrupt"].message
    assert errors["cut"].recordIndex == 3
    assert errors["empty"].recordIndex == -1
    assert "empty" in errors["empty"].message
    assert responses[-1].baseOffset == 0  # nothing of the refused batches was written
    assert await newest(api, "bad") == 3


async def test_refusals_name_their_row_and_change_nothing(api: API) -> None:
    await create(api, "ref", partitions=2)
    await create(api, "occ", optimisticConcurrencyControl=api_pb2.NullableBool(value=True))
    await api.SetStreamReadonly(
        api_pb2.SetStreamReadonlyRequest(name="ref", partitions=[1], readonly=True)
    )
    one = framed(b"x")
    responses = await publish(
        api,
        [
            batch("", one, correlationId="unnamed"),
            batch("nope", one, correlationId="unknown"),
            batch("ref", one, partition=7, correlationId="partition"),
            batch("ref", one, partition=1, correlationId="readonly"),
            batch("ref", one, ackPolicy=9, correlationId="policy"),
            batch("occ", one, expectedOffset=api_pb2.NullableInt64(value=3), correlationId="occ"),
            batch("ref", one, producerId=5, producerSequence=-1, correlationId="sequence"),
        ],
    )
    reasons = {r.correlationId: r.error.reason for r in responses}
    assert reasons == {
        "unnamed": "invalid-argument",
        "unknown": "stream-not-found",
        "partition": "partition-not-found",
        "readonly": "readonly",
        "policy": "invalid-argument",
        "occ": "incorrect-offset",
        "sequence": "invalid-argument",
    }
    assert all(r.error.message for r in responses)
    assert await newest(api, "ref", 0) == -1
    assert await newest(api, "ref", 1) == -1
    assert await newest(api, "occ") == -1
    [ok] = await publish(api, [batch("occ", one, expectedOffset=api_pb2.NullableInt64(value=0))])
    assert not ok.HasField("error")
    assert ok.baseOffset == 0


async def test_batches_over_the_limit_are_refused(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(env={"FLUX_STREAMS_BATCH_MAX_BYTES": "1024"})
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await create(api, "big")
        responses = await publish(
            api, [batch("big", framed(b"x" * 2000)), batch("big", framed(b"x" * 100))]
        )
        assert responses[0].error.reason == "too-large"
        assert "streams.batch.max.bytes" in responses[0].error.message
        assert responses[1].baseOffset == 0
        assert not responses[1].HasField("error")


async def test_ack_policy_none_writes_without_an_answer(api: API) -> None:
    await create(api, "quiet")
    responses = await publish(
        api,
        [
            batch("quiet", framed(b"a", b"b"), ackPolicy=NONE),
            batch("nope", framed(b"a"), ackPolicy=NONE),  # refused, silently too
            batch("quiet", framed(b"c"), correlationId="last"),
        ],
    )
    assert [(r.correlationId, r.baseOffset) for r in responses] == [("last", 2)]


async def test_batches_reach_only_their_stream_and_resume_a_paused_partition(api: API) -> None:
    await create(api, "mine")
    await api.CreateStream(api_pb2.CreateStreamRequest(name="other", subject="mine"))
    await api.PauseStream(api_pb2.PauseStreamRequest(name="mine"))
    refused = await publish(api, [batch("mine", b""), batch("mine", framed(b"v") + b"\0")])
    assert all(r.HasField("error") for r in refused)
    assert await paused(api, "mine")  # a batch refused by the checks resumes nothing
    [response] = await publish(api, [batch("mine", framed(b"v"))])
    assert not await paused(api, "mine")
    assert response.baseOffset == 0
    assert not response.HasField("error")
    assert await newest(api, "mine") == 0
    assert await newest(api, "other") == -1  # no NATS fan-out


async def test_producer_ids_are_distinct_and_not_zero(api: API) -> None:
    ids = {(await api.InitProducer(api_pb2.InitProducerRequest())).producerId for _ in range(20)}
    assert len(ids) == 20
    assert 0 not in ids


async def test_a_retried_batch_is_answered_with_its_original_ack(api: API) -> None:
    await create(api, "idem")
    producer = (await api.InitProducer(api_pb2.InitProducerRequest())).producerId
    first = batch("idem", framed(b"a", b"b"), producerId=producer, producerSequence=0)
    second = batch("idem", framed(b"c"), producerId=producer, producerSequence=1)
    responses = await publish(api, [first, second, first, second])
    assert [(r.baseOffset, r.recordCount, r.duplicate) for r in responses] == [
        (0, 2, False),
        (2, 1, False),
        (0, 2, True),
        (2, 1, True),
    ]
    assert responses[2].timestamp == responses[0].timestamp
    assert await newest(api, "idem") == 2
    # The producer id travels with the batch, in its first record.
    messages = await read_all(api, "idem")
    assert parse_producer_header(messages[0].headers[PRODUCER_HEADER]) == (producer, 0, 2)
    assert PRODUCER_HEADER not in messages[1].headers
    assert parse_producer_header(messages[2].headers[PRODUCER_HEADER]) == (producer, 1, 1)


async def test_gaps_and_forgotten_duplicates_are_refused(api: API) -> None:
    await create(api, "gaps")
    producer = (await api.InitProducer(api_pb2.InitProducerRequest())).producerId
    requests = [
        batch("gaps", framed(b"v"), producerId=producer, producerSequence=sequence)
        for sequence in range(7)
    ]
    gap = batch("gaps", framed(b"v"), producerId=producer, producerSequence=9)
    responses = await publish(api, [*requests, gap, requests[0], requests[2], requests[6]])
    assert [r.baseOffset for r in responses[:7]] == list(range(7))
    assert responses[7].error.reason == "out-of-order-sequence"
    assert responses[7].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert responses[8].error.reason == "duplicate-sequence"  # older than the 5 remembered
    assert responses[9].duplicate
    assert responses[9].baseOffset == 2
    assert responses[10].duplicate
    assert responses[10].baseOffset == 6
    assert await newest(api, "gaps") == 6
    # Another producer, and a producer new to the partition, start anywhere.
    other = batch("gaps", framed(b"w"), producerId=producer + 1, producerSequence=40)
    [response] = await publish(api, [other])
    assert response.baseOffset == 7


async def test_idempotence_survives_a_crash(broker: BrokerProcess) -> None:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await create(api, "crash")
        producer = (await api.InitProducer(api_pb2.InitProducerRequest())).producerId
        requests = [
            batch("crash", framed(b"v", b"w"), producerId=producer, producerSequence=sequence)
            for sequence in range(3)
        ]
        await publish(api, requests)
    broker.kill()
    restarted = await broker.restart()
    async with grpc.aio.insecure_channel(restarted.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        retry = await publish(api, [requests[1], requests[2]])
        assert [(r.baseOffset, r.duplicate) for r in retry] == [(2, True), (4, True)]
        nxt = batch("crash", framed(b"x"), producerId=producer, producerSequence=3)
        skip = batch("crash", framed(b"x"), producerId=producer, producerSequence=5)
        responses = await publish(api, [nxt, skip])
        assert responses[0].baseOffset == 6
        assert not responses[0].duplicate
        assert responses[1].error.reason == "out-of-order-sequence"
        assert await newest(api, "crash") == 6


async def test_the_reserved_producer_header_is_refused_from_clients(api: API) -> None:
    await create(api, "forged")
    forged, _ = frame(
        [NewRecord(value=b"v", headers=((PRODUCER_HEADER, b"\0" * 20),))],
        Placement(0, 0, 0, 0, 0),
        1 << 20,
        1 << 20,
    )
    responses = await publish(
        api,
        [
            batch("forged", bytes(forged), producerId=1, producerSequence=0),
            batch("forged", framed(b"ok") + bytes(forged)),  # without a producer id too
        ],
    )
    assert [r.error.reason for r in responses] == ["invalid-argument"] * 2
    assert [r.error.recordIndex for r in responses] == [0, 1]
    assert "reserved" in responses[1].error.message
    assert await newest(api, "forged") == -1


def test_framing_helper_round_trips() -> None:
    records = list(iter_decode(framed(b"a", None, key=b"k")))
    assert [(r.key, r.value) for r in records] == [(b"k", b"a"), (b"k", None)]


async def test_acked_batches_survive_a_kill_under_sync_always(
    broker_factory: BrokerFactory,
) -> None:
    broker = await broker_factory(env={"FLUX_STREAMS_SYNC_POLICY": "always"})
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await create(api, "durable")
        responses = await publish(
            api, [batch("durable", framed(b"a", b"b", b"c")) for _ in range(20)]
        )
        assert [r.baseOffset for r in responses] == list(range(0, 60, 3))
    broker.kill()
    restarted = await broker.restart()
    async with grpc.aio.insecure_channel(restarted.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        assert await newest(api, "durable") == 59
        assert len(await read_all(api, "durable")) == 60
