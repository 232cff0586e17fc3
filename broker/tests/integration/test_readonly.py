"""SetStreamReadonly on a real broker process with its real NATS.

That a read-only partition stored nothing is checked as in ``test_pause.py``: after the
message, the same NATS connection (or gRPC path) writes to a writable partition and waits for
it; NATS delivers one connection's messages in order, so the first would have been stored
before.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final, TypeAlias

import grpc
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from flux_broker.nats.envelope import decode_ack, encode_message
from flux_proto import api_pb2, api_pb2_grpc
from flux_proto.errors import REASON_METADATA_KEY
from flux_testing import wait_for
from flux_testing.broker import BrokerProcess

pytestmark = pytest.mark.integration

if TYPE_CHECKING:  # the async stub exists only in the type stubs
    API: TypeAlias = api_pb2_grpc.APIAsyncStub
Call: TypeAlias = "grpc.aio.UnaryStreamCall[api_pb2.SubscribeRequest, api_pb2.Message]"

#: Bound on calls and waits that must succeed; a healthy run needs milliseconds.
DEADLINE_S: Final = 10.0
Code = api_pb2.PublishAsyncError.Code


# -- helpers --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _client(address: str) -> AsyncIterator[API]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield api_pb2_grpc.APIStub(channel)


@contextlib.asynccontextmanager
async def _nats(broker: BrokerProcess) -> AsyncIterator[Client]:
    nc = await nats.connect(broker.nats_url)
    try:
        yield nc
    finally:
        await nc.close()


def _reason(error: grpc.aio.AioRpcError) -> str:
    return str(dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY, ""))


async def _create(api: API, name: str, partitions: int = 1) -> None:
    request = api_pb2.CreateStreamRequest(name=name, subject=name, partitions=partitions)
    await api.CreateStream(request, timeout=DEADLINE_S)


async def _partitions(api: API, stream: str) -> dict[int, api_pb2.PartitionMetadata]:
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest(streams=[stream]))
    (meta,) = response.streamMetadata
    return dict(meta.partitions)


async def _readonly(api: API, stream: str, *partitions: int, readonly: bool = True) -> None:
    request = api_pb2.SetStreamReadonlyRequest(
        name=stream, partitions=partitions, readonly=readonly
    )
    await api.SetStreamReadonly(request, timeout=DEADLINE_S)


async def _publish(api: API, stream: str, partition: int = 0, value: bytes = b"v") -> int:
    request = api_pb2.PublishRequest(stream=stream, partition=partition, value=value)
    response = await api.Publish(request, timeout=DEADLINE_S)
    return response.ack.offset


async def _refused(api: API, stream: str, partition: int = 0) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _publish(api, stream, partition)
    return info.value


def _assert_readonly_status(error: grpc.aio.AioRpcError) -> None:
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION, error
    assert _reason(error) == "readonly"


async def _wait_newest(api: API, stream: str, partition: int, newest: int) -> None:
    async def reached() -> bool:
        return (await _partitions(api, stream))[partition].newestOffset == newest

    await wait_for(reached, DEADLINE_S, message=f"{stream}/{partition} newest {newest}")


def _subscribe(api: API, stream: str, partition: int = 0, **fields: object) -> Call:
    request = api_pb2.SubscribeRequest(stream=stream, partition=partition, **fields)  # type: ignore[arg-type]
    return api.Subscribe(request, timeout=DEADLINE_S * 3)


async def _end(call: Call) -> tuple[list[bytes], grpc.aio.AioRpcError]:
    """The values after the handshake until the call ends with an error status, and it."""
    values: list[bytes] = []
    while True:
        try:
            async with asyncio.timeout(DEADLINE_S):
                message = await call.read()
        except grpc.aio.AioRpcError as error:
            return values[1:], error
        assert isinstance(message, api_pb2.Message), message
        values.append(message.value)


def _assert_readonly_end(error: grpc.aio.AioRpcError) -> None:
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert error.details() == "End of readonly partition"
    assert _reason(error) == "readonly-end"


# -- publishing -----------------------------------------------------------------------------


async def test_readonly_refuses_publishes(api: API) -> None:
    await _create(api, "s", partitions=2)
    await _publish(api, "s", 0, b"before")
    before = time.time_ns()
    await _readonly(api, "s", 0)
    partitions = await _partitions(api, "s")
    assert [partitions[0].readonly, partitions[1].readonly] == [True, False]
    stamps = partitions[0].readonlyTimestamps
    assert before <= stamps.firstTimestamp == stamps.latestTimestamp
    assert (partitions[1].readonlyTimestamps.firstTimestamp, partitions[0].paused) == (0, False)

    _assert_readonly_status(await _refused(api, "s", 0))

    async def requests() -> AsyncIterator[api_pb2.PublishRequest]:
        yield api_pb2.PublishRequest(stream="s", partition=0, value=b"no", correlationId="ro")
        yield api_pb2.PublishRequest(stream="s", partition=1, value=b"yes", correlationId="ok")

    call = api.PublishAsync(requests(), timeout=DEADLINE_S)
    responses = {response.correlationId: response async for response in call}
    assert responses["ro"].asyncError.code == Code.READONLY
    assert "read-only" in responses["ro"].asyncError.message
    assert responses["ok"].ack.offset == 0
    assert not responses["ok"].HasField("asyncError")
    assert (await _partitions(api, "s"))[0].newestOffset == 0  # only "before"


async def test_raw_nats_messages_to_a_readonly_partition_are_dropped_unacked(
    api: API, broker: BrokerProcess
) -> None:
    await _create(api, "s", partitions=2)
    await _readonly(api, "s", 0)
    async with _nats(broker) as nc:
        acks: list[api_pb2.Ack] = []
        inbox = "test.acks"

        async def collect(msg: Msg) -> None:
            acks.append(decode_ack(msg.data))

        subscription = await nc.subscribe(inbox, cb=collect)
        for subject in ("s", "s.1"):
            envelope = encode_message(
                api_pb2.Message(value=b"v", ackInbox=inbox, correlationId=subject)
            )
            await nc.publish(subject, envelope)
        await nc.flush()
        await _wait_newest(api, "s", 1, 0)
        await wait_for(lambda: acks, DEADLINE_S, message="the writable partition's ack")
        await subscription.unsubscribe()
    assert [ack.correlationId for ack in acks] == ["s.1"]
    assert (await _partitions(api, "s"))[0].newestOffset == -1


async def test_clearing_readonly_restores_writes(api: API) -> None:
    await _create(api, "s")
    await _readonly(api, "s")
    _assert_readonly_status(await _refused(api, "s"))
    await _readonly(api, "s", readonly=False)
    partition = (await _partitions(api, "s"))[0]
    assert not partition.readonly
    first, latest = (
        partition.readonlyTimestamps.firstTimestamp,
        partition.readonlyTimestamps.latestTimestamp,
    )
    assert 0 < first < latest
    assert await _publish(api, "s") == 0


async def test_a_paused_readonly_partition_is_refused_not_resumed(api: API) -> None:
    await _create(api, "s")
    await api.PauseStream(api_pb2.PauseStreamRequest(name="s"), timeout=DEADLINE_S)
    await _readonly(api, "s")
    _assert_readonly_status(await _refused(api, "s"))
    partition = (await _partitions(api, "s"))[0]
    assert (partition.paused, partition.readonly) == (True, True)


# -- subscribing ----------------------------------------------------------------------------


async def test_subscriber_waiting_at_the_end_gets_readonly_end(api: API) -> None:
    await _create(api, "s")
    await _publish(api, "s", 0, b"a")
    call = _subscribe(api, "s", startPosition=api_pb2.EARLIEST)
    handshake = await call.read()
    assert handshake == api_pb2.Message()
    message = await call.read()
    assert isinstance(message, api_pb2.Message)
    assert message.value == b"a"
    await _readonly(api, "s")
    values, error = await _end(call)
    assert values == []
    _assert_readonly_end(error)


async def test_subscribers_read_a_readonly_partition_to_its_end(api: API) -> None:
    await _create(api, "s")
    for value in (b"a", b"b", b"c"):
        await _publish(api, "s", 0, value)
    await _readonly(api, "s")
    values, error = await _end(_subscribe(api, "s", startPosition=api_pb2.EARLIEST))
    assert values == [b"a", b"b", b"c"]
    _assert_readonly_end(error)
    values, error = await _end(_subscribe(api, "s"))  # NEW_ONLY: nothing more will come
    assert values == []
    _assert_readonly_end(error)
    # A stop position reached first still ends with its own status.
    call = _subscribe(
        api, "s", startPosition=api_pb2.EARLIEST, stopPosition=api_pb2.STOP_OFFSET, stopOffset=1
    )
    values, error = await _end(call)
    assert values == [b"a", b"b"]
    assert _reason(error) == "stop-reached"


# -- restart --------------------------------------------------------------------------------


async def test_readonly_survives_a_restart(api: API, broker: BrokerProcess) -> None:
    await _create(api, "s", partitions=2)
    await _publish(api, "s", 1, b"kept")
    await _readonly(api, "s", 1)
    before = (await _partitions(api, "s"))[1]
    assert await broker.stop() == 0
    restarted = await broker.restart()
    async with _client(restarted.address) as api2, _nats(restarted) as nc:
        after = (await _partitions(api2, "s"))[1]
        assert after.readonly
        assert after.readonlyTimestamps == before.readonlyTimestamps
        _assert_readonly_status(await _refused(api2, "s", 1))
        await nc.publish("s.1", b"dropped")
        await nc.publish("s", b"stored")
        await nc.flush()
        await _wait_newest(api2, "s", 0, 0)
        assert (await _partitions(api2, "s"))[1].newestOffset == 0
        values, error = await _end(_subscribe(api2, "s", 1, startPosition=api_pb2.EARLIEST))
        assert values == [b"kept"]
        _assert_readonly_end(error)
