"""PauseStream, resuming and auto-pause on a real broker process with its real NATS.

A paused partition has no NATS subscription, so a raw NATS message to it is lost. That is
checked without waiting for time to pass: the same connection then publishes to a running
partition and waits until that one stored its message; NATS delivers one connection's
messages in order, so the first would have been delivered (and stored) before. Auto-pause is
likewise checked against events, never against a sleep: a stream that must not pause is
compared with one created after it that does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Final, TypeAlias

import grpc
import nats
import pytest
from nats.aio.client import Client

from flux_proto import api_pb2, api_pb2_grpc
from flux_proto.errors import REASON_METADATA_KEY
from flux_testing import wait_for
from flux_testing.broker import BrokerProcess
from flux_testing.pytest_plugin import BrokerFactory

pytestmark = pytest.mark.integration

if TYPE_CHECKING:  # the async stub exists only in the type stubs
    API: TypeAlias = api_pb2_grpc.APIAsyncStub
Call: TypeAlias = "grpc.aio.UnaryStreamCall[api_pb2.SubscribeRequest, api_pb2.Message]"

#: Bound on calls and waits that must succeed; a healthy run needs milliseconds.
DEADLINE_S: Final = 10.0
#: Auto-pause time of the streams that test it.
AUTO_PAUSE_MS: Final = 300
_NS_PER_MS: Final = 1_000_000


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


async def _create(api: API, name: str, partitions: int = 1, **fields: object) -> None:
    request = api_pb2.CreateStreamRequest(name=name, subject=name, partitions=partitions, **fields)  # type: ignore[arg-type]
    await api.CreateStream(request, timeout=DEADLINE_S)


async def _partitions(api: API, stream: str) -> dict[int, api_pb2.PartitionMetadata]:
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest(streams=[stream]))
    (meta,) = response.streamMetadata
    assert meta.error == api_pb2.StreamMetadata.Error.OK
    return dict(meta.partitions)


async def _paused(api: API, stream: str) -> list[bool]:
    partitions = await _partitions(api, stream)
    return [partitions[i].paused for i in sorted(partitions)]


async def _pause(api: API, stream: str, *partitions: int, resume_all: bool = False) -> None:
    request = api_pb2.PauseStreamRequest(name=stream, partitions=partitions, resumeAll=resume_all)
    await api.PauseStream(request, timeout=DEADLINE_S)


async def _publish(api: API, stream: str, partition: int = 0, value: bytes = b"v") -> int:
    """Publish through gRPC, wait for the ack; return the offset."""
    request = api_pb2.PublishRequest(stream=stream, partition=partition, value=value)
    response = await api.Publish(request, timeout=DEADLINE_S)
    return response.ack.offset


async def _wait_newest(api: API, stream: str, partition: int, newest: int) -> None:
    async def reached() -> bool:
        return (await _partitions(api, stream))[partition].newestOffset == newest

    await wait_for(reached, DEADLINE_S, message=f"{stream}/{partition} newest {newest}")


def _subscribe(api: API, stream: str, partition: int = 0, **fields: object) -> Call:
    request = api_pb2.SubscribeRequest(stream=stream, partition=partition, **fields)  # type: ignore[arg-type]
    return api.Subscribe(request, timeout=DEADLINE_S * 3)


async def _read(call: Call) -> api_pb2.Message:
    async with asyncio.timeout(DEADLINE_S):
        message = await call.read()
    assert isinstance(message, api_pb2.Message), message
    return message


async def _end(call: Call) -> tuple[list[api_pb2.Message], grpc.aio.AioRpcError]:
    """Every message until the call ends with an error status, and that status."""
    messages: list[api_pb2.Message] = []
    while True:
        try:
            messages.append(await _read(call))
        except grpc.aio.AioRpcError as error:
            return messages, error


def _assert_paused_status(error: grpc.aio.AioRpcError) -> None:
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION, error
    assert _reason(error) == "partition-paused"


# -- pausing --------------------------------------------------------------------------------


async def test_pause_all_partitions(api: API, broker: BrokerProcess) -> None:
    await _create(api, "s", partitions=3)
    await _publish(api, "s", 1)
    before = time.time_ns()
    await _pause(api, "s")
    after = time.time_ns()
    partitions = await _partitions(api, "s")
    for partition in partitions.values():
        assert partition.paused
        assert not partition.readonly
        assert before <= partition.pauseTimestamps.firstTimestamp <= after
        assert partition.pauseTimestamps.latestTimestamp == partition.pauseTimestamps.firstTimestamp
        assert (
            partition.readonlyTimestamps.firstTimestamp,
            partition.readonlyTimestamps.latestTimestamp,
        ) == (0, 0)
        # Still listed with its leader, replicas and ISR, and the offsets it had.
        assert partition.leader == broker.broker_id
        assert list(partition.isr) == [broker.broker_id]
    assert (partitions[1].newestOffset, partitions[1].highWatermark) == (0, 0)
    assert (partitions[0].newestOffset, partitions[0].highWatermark) == (-1, -1)
    single = await api.FetchPartitionMetadata(
        api_pb2.FetchPartitionMetadataRequest(stream="s", partition=2)
    )
    assert single.metadata.paused
    # Pausing again is accepted and changes nothing.
    await _pause(api, "s", 2)
    again = (await _partitions(api, "s"))[2]
    assert again.pauseTimestamps == partitions[2].pauseTimestamps


async def test_paused_partition_stores_no_raw_nats_message(api: API, broker: BrokerProcess) -> None:
    await _create(api, "s", partitions=3)
    await _pause(api, "s", 0, 2)
    assert await _paused(api, "s") == [True, False, True]
    async with _nats(broker) as nc:
        await nc.publish("s", b"lost")
        await nc.publish("s.2", b"lost")
        await nc.publish("s.1", b"kept")
        await nc.flush()
        await _wait_newest(api, "s", 1, 0)
    partitions = await _partitions(api, "s")
    assert partitions[0].newestOffset == partitions[2].newestOffset == -1
    # Resumed, it still has nothing: the message was never received.
    await _publish(api, "s", 0, b"after")
    assert (await _partitions(api, "s"))[0].newestOffset == 0
    call = _subscribe(api, "s", 0, startPosition=api_pb2.EARLIEST)
    assert await _read(call) == api_pb2.Message()
    assert (await _read(call)).value == b"after"
    call.cancel()


async def test_publish_resumes_only_its_partition(api: API) -> None:
    await _create(api, "s", partitions=2)
    await _pause(api, "s")
    paused_at = (await _partitions(api, "s"))[1].pauseTimestamps.firstTimestamp
    assert await _publish(api, "s", 1, b"x") == 0
    partitions = await _partitions(api, "s")
    assert [partitions[0].paused, partitions[1].paused] == [True, False]
    resumed = partitions[1].pauseTimestamps
    assert resumed.firstTimestamp == paused_at < resumed.latestTimestamp
    assert partitions[1].newestOffset == 0
    assert await _publish(api, "s", 1, b"y") == 1


async def test_publish_with_resume_all_resumes_every_partition(api: API) -> None:
    await _create(api, "s", partitions=3)
    await _pause(api, "s", resume_all=True)
    assert await _publish(api, "s", 2) == 0
    assert await _paused(api, "s") == [False, False, False]


async def test_publish_async_resumes(api: API) -> None:
    await _create(api, "s", partitions=2)
    await _pause(api, "s", 1)

    async def requests() -> AsyncIterator[api_pb2.PublishRequest]:
        yield api_pb2.PublishRequest(stream="s", partition=1, value=b"a", correlationId="a")
        yield api_pb2.PublishRequest(stream="s", partition=1, value=b"b", correlationId="b")

    call = api.PublishAsync(requests(), timeout=DEADLINE_S)
    responses = [response async for response in call]
    assert [(r.correlationId, r.ack.offset) for r in responses] == [("a", 0), ("b", 1)]
    assert not any(r.HasField("asyncError") for r in responses)
    assert await _paused(api, "s") == [False, False]


async def test_publish_to_subject_does_not_resume(api: API) -> None:
    await _create(api, "s")
    await _pause(api, "s")
    request = api_pb2.PublishToSubjectRequest(subject="s", value=b"v")
    await api.PublishToSubject(request)  # no deadline: fire-and-forget, straight to NATS
    assert await _paused(api, "s") == [True]


# -- subscribing ----------------------------------------------------------------------------


async def test_subscribe_without_resume_is_refused(api: API) -> None:
    await _create(api, "s")
    await _publish(api, "s")
    await _pause(api, "s")
    messages, error = await _end(_subscribe(api, "s", startPosition=api_pb2.EARLIEST))
    assert messages == []  # not even the handshake
    _assert_paused_status(error)
    assert await _paused(api, "s") == [True]


async def test_subscribe_with_resume_resumes(api: API) -> None:
    await _create(api, "s", partitions=2)
    await _publish(api, "s", 0, b"v0")
    await _pause(api, "s", resume_all=True)
    call = _subscribe(api, "s", 0, startPosition=api_pb2.EARLIEST, resume=True)
    assert await _read(call) == api_pb2.Message()
    assert (await _read(call)).value == b"v0"
    assert await _paused(api, "s") == [False, False]  # resumeAll applies to subscribers too
    assert await _publish(api, "s", 0, b"v1") == 1
    assert (await _read(call)).value == b"v1"
    call.cancel()


async def test_a_pause_ends_the_partitions_subscribers(api: API) -> None:
    await _create(api, "s", partitions=2)
    await _publish(api, "s", 0, b"v0")
    first = _subscribe(api, "s", 0, startPosition=api_pb2.EARLIEST)
    other = _subscribe(api, "s", 1)
    assert await _read(first) == api_pb2.Message()
    assert (await _read(first)).value == b"v0"
    assert await _read(other) == api_pb2.Message()
    await _pause(api, "s", 0)
    messages, error = await _end(first)
    assert messages == []
    _assert_paused_status(error)
    # The other partition's subscriber goes on.
    await _publish(api, "s", 1, b"w0")
    assert (await _read(other)).value == b"w0"
    other.cancel()


# -- restart --------------------------------------------------------------------------------


async def test_paused_state_survives_a_restart(api: API, broker: BrokerProcess) -> None:
    await _create(api, "s", partitions=2)
    for value in (b"a", b"b"):
        await _publish(api, "s", 0, value)
    await _pause(api, "s", 0, resume_all=True)
    before = await _partitions(api, "s")
    assert await broker.stop() == 0
    restarted = await broker.restart()
    async with _client(restarted.address) as api2, _nats(restarted) as nc:
        after = await _partitions(api2, "s")
        assert [after[0].paused, after[1].paused] == [True, False]
        assert after[0].pauseTimestamps == before[0].pauseTimestamps
        assert (after[0].newestOffset, after[0].highWatermark) == (1, 1)
        await nc.publish("s", b"lost")
        await nc.publish("s.1", b"kept")
        await nc.flush()
        await _wait_newest(api2, "s", 1, 0)
        assert (await _partitions(api2, "s"))[0].newestOffset == 1
        # A publish resumes it where it stopped.
        assert await _publish(api2, "s", 0, b"c") == 2
        assert await _paused(api2, "s") == [False, False]
        call = _subscribe(
            api2, "s", 0, startPosition=api_pb2.EARLIEST, stopPosition=api_pb2.STOP_LATEST
        )
        messages, error = await _end(call)
        assert [m.value for m in messages[1:]] == [b"a", b"b", b"c"]
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_resume_all_is_remembered_across_a_restart(api: API, broker: BrokerProcess) -> None:
    await _create(api, "s", partitions=2)
    await _pause(api, "s", resume_all=True)
    assert await broker.stop() == 0
    restarted = await broker.restart()
    async with _client(restarted.address) as api2:
        assert await _paused(api2, "s") == [True, True]
        assert await _publish(api2, "s", 1) == 0
        assert await _paused(api2, "s") == [False, False]


# -- auto-pause -----------------------------------------------------------------------------


async def test_auto_pause_after_idle_time(api: API) -> None:
    await _create(api, "idle", autoPauseTime=api_pb2.NullableInt64(value=AUTO_PAUSE_MS))
    created = await api.FetchMetadata(api_pb2.FetchMetadataRequest(streams=["idle"]))
    created_ns = created.streamMetadata[0].creationTimestamp

    async def paused() -> bool:
        return await _paused(api, "idle") == [True]

    await wait_for(paused, DEADLINE_S, message="auto-pause")
    pause = (await _partitions(api, "idle"))[0].pauseTimestamps.latestTimestamp
    assert pause - created_ns >= AUTO_PAUSE_MS * _NS_PER_MS
    # A publish resumes it (the ack says it was stored), and the idle time starts again.
    assert await _publish(api, "idle") == 0

    async def paused_again() -> bool:
        partition = (await _partitions(api, "idle"))[0]
        return partition.paused and partition.pauseTimestamps.latestTimestamp > pause

    await wait_for(paused_again, DEADLINE_S, message="auto-pause after the publish")


async def test_auto_pause_waits_for_subscribers_to_leave_when_asked(api: API) -> None:
    auto = api_pb2.NullableInt64(value=AUTO_PAUSE_MS)
    keep = api_pb2.NullableBool(value=True)
    await _create(api, "guarded", autoPauseTime=auto, autoPauseDisableIfSubscribers=keep)
    guard = _subscribe(api, "guarded")
    assert await _read(guard) == api_pb2.Message()
    # Created after the guarded stream was subscribed, with twice the idle time and a
    # subscriber that does not prevent the pause: by the time it pauses, the guarded stream
    # has been idle for more than twice its own auto-pause time.
    twice = api_pb2.NullableInt64(value=2 * AUTO_PAUSE_MS)
    await _create(api, "control", autoPauseTime=twice)
    watcher = _subscribe(api, "control")
    assert await _read(watcher) == api_pb2.Message()
    messages, error = await _end(watcher)
    assert messages == []
    _assert_paused_status(error)
    assert await _paused(api, "guarded") == [False]
    # Once its subscriber leaves, it pauses an auto-pause time later.
    guard.cancel()
    left_ns = time.time_ns()

    async def paused() -> bool:
        return await _paused(api, "guarded") == [True]

    await wait_for(paused, DEADLINE_S, message="auto-pause after the subscriber left")
    pause = (await _partitions(api, "guarded"))[0].pauseTimestamps.latestTimestamp
    assert pause - left_ns >= AUTO_PAUSE_MS * _NS_PER_MS


async def test_server_default_auto_pause(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(env={"FLUX_STREAMS_AUTO_PAUSE_TIME": f"{AUTO_PAUSE_MS}ms"})
    async with _client(broker.address) as api:
        await _create(api, "d")
        await _create(api, "off", autoPauseTime=api_pb2.NullableInt64(value=0))

        async def paused() -> bool:
            return await _paused(api, "d") == [True]

        await wait_for(paused, DEADLINE_S, message="auto-pause by the server default")
        assert await _paused(api, "off") == [False]
        # __cursors never pauses (it overrides the default with 0).
        response = await api.FetchMetadata(api_pb2.FetchMetadataRequest())
        internal = [m for m in response.streamMetadata if m.name.startswith("__")]
        assert all(not p.paused for m in internal for p in m.partitions.values())


# -- bad requests ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "partitions", "code", "reason"),
    [
        ("nope", [], grpc.StatusCode.NOT_FOUND, "stream-not-found"),
        ("s", [2], grpc.StatusCode.NOT_FOUND, "partition-not-found"),
        ("s", [0, 1, 7], grpc.StatusCode.NOT_FOUND, "partition-not-found"),
        ("s", [-1], grpc.StatusCode.INVALID_ARGUMENT, "invalid-argument"),
        ("s", [1, 1], grpc.StatusCode.INVALID_ARGUMENT, "invalid-argument"),
        ("s", list(range(1025)), grpc.StatusCode.INVALID_ARGUMENT, "invalid-argument"),
        ("", [], grpc.StatusCode.INVALID_ARGUMENT, "invalid-argument"),
        ("../s", [], grpc.StatusCode.INVALID_ARGUMENT, "invalid-argument"),
        ("__cursors", [], grpc.StatusCode.INVALID_ARGUMENT, "stream-reserved"),
    ],
)
async def test_bad_requests_change_nothing(
    api: API, name: str, partitions: list[int], code: grpc.StatusCode, reason: str
) -> None:
    await _create(api, "s", partitions=2)
    before = await _partitions(api, "s")
    calls: list[Awaitable[object]] = [
        api.PauseStream(api_pb2.PauseStreamRequest(name=name, partitions=partitions)),
        api.SetStreamReadonly(
            api_pb2.SetStreamReadonlyRequest(name=name, partitions=partitions, readonly=True)
        ),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() is code
        assert _reason(info.value) == reason
        if reason == "partition-not-found":
            assert info.value.details() == "No such partition"
    assert await _partitions(api, "s") == before
