"""The activity stream ``__activity`` against a real broker process.

Events are read the way a user reads them: a Subscribe to ``__activity`` from the earliest
offset, each message value decoded as an ``ActivityStreamEvent``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

import grpc
import pytest

from flux_proto import api_pb2, api_pb2_grpc
from flux_testing import wait_for
from flux_testing.broker import BrokerProcess
from flux_testing.pytest_plugin import BrokerFactory

pytestmark = pytest.mark.integration

if TYPE_CHECKING:  # the async stub exists only in the type stubs
    API: TypeAlias = api_pb2_grpc.APIAsyncStub

DEADLINE_S = 10.0
ACTIVITY = "__activity"
ENABLED = {"FLUX_ACTIVITY_STREAM_ENABLED": "true"}
Event: TypeAlias = api_pb2.ActivityStreamEvent


async def _events(api: API) -> list[Event]:
    """Every event in ``__activity`` now, in offset order."""
    meta = await api.FetchPartitionMetadata(
        api_pb2.FetchPartitionMetadataRequest(stream=ACTIVITY, partition=0), timeout=DEADLINE_S
    )
    newest = meta.metadata.newestOffset
    if newest < 0:
        return []
    call = api.Subscribe(
        api_pb2.SubscribeRequest(
            stream=ACTIVITY,
            startPosition=api_pb2.StartPosition.EARLIEST,
            stopPosition=api_pb2.StopPosition.STOP_OFFSET,
            stopOffset=newest,
        ),
        timeout=DEADLINE_S,
    )
    events: list[Event] = []
    try:
        async for message in call:
            if message.offset == 0 and not message.value and not events:
                continue  # the handshake
            events.append(Event.FromString(message.value))
            if message.offset == newest:
                break
    finally:
        call.cancel()
    return events


async def _wait_events(api: API, done: Callable[[list[Event]], bool]) -> list[Event]:
    async def check() -> list[Event] | None:
        events = await _events(api)
        return events if done(events) else None

    return await wait_for(check, DEADLINE_S, message="activity events")


def _of(events: list[Event], stream: str) -> list[Event]:
    """The events about ``stream``, duplicates (same id) dropped."""
    seen: set[int] = set()
    found = []
    for event in events:
        if _stream_of(event) == stream and event.id not in seen:
            seen.add(event.id)
            found.append(event)
    return found


def _stream_of(event: Event) -> str:
    """The stream named by the op message matching ``event.op`` (the only one set)."""
    ops: dict[int, str] = {
        api_pb2.CREATE_STREAM: event.createStreamOp.stream,
        api_pb2.DELETE_STREAM: event.deleteStreamOp.stream,
        api_pb2.PAUSE_STREAM: event.pauseStreamOp.stream,
        api_pb2.RESUME_STREAM: event.resumeStreamOp.stream,
        api_pb2.SET_STREAM_READONLY: event.setStreamReadonlyOp.stream,
    }
    set_ops = {d.name for d, _ in event.ListFields()} - {"id", "op"}
    assert set_ops == {_OP_FIELDS[event.op]}, event
    return ops[event.op]


_OP_FIELDS = {
    api_pb2.CREATE_STREAM: "createStreamOp",
    api_pb2.DELETE_STREAM: "deleteStreamOp",
    api_pb2.PAUSE_STREAM: "pauseStreamOp",
    api_pb2.RESUME_STREAM: "resumeStreamOp",
    api_pb2.SET_STREAM_READONLY: "setStreamReadonlyOp",
}


def _strictly_increasing_without_duplicates(events: list[Event]) -> bool:
    """Ids grow; a repeated id (at-least-once) repeats the same event right where it was."""
    first: dict[int, bytes] = {}
    last = 0
    for event in events:
        data = event.SerializeToString()
        if event.id in first:
            assert first[event.id] == data, "a repeated id carries a different event"
            continue
        assert event.id > last, f"id {event.id} after {last}"
        first[event.id] = data
        last = event.id
    return True


async def _create(api: API, name: str, partitions: int = 1) -> None:
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=name, subject=f"{name}.s", partitions=partitions),
        timeout=DEADLINE_S,
    )


async def test_every_stream_change_is_an_event(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(env=ENABLED)
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await _create(api, "a", partitions=2)
        await api.PauseStream(
            api_pb2.PauseStreamRequest(name="a", partitions=[0], resumeAll=False),
            timeout=DEADLINE_S,
        )
        # Publishing to a paused partition resumes it.
        await api.Publish(
            api_pb2.PublishRequest(
                stream="a", partition=0, value=b"x", ackPolicy=api_pb2.AckPolicy.LEADER
            ),
            timeout=DEADLINE_S,
        )
        await api.SetStreamReadonly(
            api_pb2.SetStreamReadonlyRequest(name="a", partitions=[1], readonly=True),
            timeout=DEADLINE_S,
        )
        await api.PauseStream(api_pb2.PauseStreamRequest(name="a", resumeAll=True))
        await api.DeleteStream(api_pb2.DeleteStreamRequest(name="a"), timeout=DEADLINE_S)

        events = await _wait_events(
            api, lambda evs: any(e.op == api_pb2.DELETE_STREAM for e in _of(evs, "a"))
        )
    assert _strictly_increasing_without_duplicates(events)
    about_a = _of(events, "a")
    assert [e.op for e in about_a] == [
        api_pb2.CREATE_STREAM,
        api_pb2.PAUSE_STREAM,
        api_pb2.RESUME_STREAM,
        api_pb2.SET_STREAM_READONLY,
        api_pb2.PAUSE_STREAM,
        api_pb2.DELETE_STREAM,
    ]
    create, pause, resume, readonly, pause_all, delete = about_a
    assert list(create.createStreamOp.partitions) == [0, 1]
    assert list(pause.pauseStreamOp.partitions) == [0]
    assert pause.pauseStreamOp.resumeAll is False
    assert list(resume.resumeStreamOp.partitions) == [0]
    assert list(readonly.setStreamReadonlyOp.partitions) == [1]
    assert readonly.setStreamReadonlyOp.readonly is True
    # A pause of "every partition" lists them all, as Liftbridge's events do.
    assert list(pause_all.pauseStreamOp.partitions) == [0, 1]
    assert pause_all.pauseStreamOp.resumeAll is True
    assert delete.deleteStreamOp.stream == "a"
    # Only the requested op message is set.
    assert not create.HasField("deleteStreamOp")
    # The internal streams were created with the activity stream on: their creation is there.
    assert [e.op for e in _of(events, ACTIVITY)] == [api_pb2.CREATE_STREAM]


async def test_ids_keep_growing_across_restarts(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(env=ENABLED)
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await _create(api, "before")
        before = await _wait_events(api, lambda evs: bool(_of(evs, "before")))
    assert await broker.stop() == 0
    restarted = await broker.restart()
    async with grpc.aio.insecure_channel(restarted.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await _create(api, "after")
        events = await _wait_events(api, lambda evs: bool(_of(evs, "after")))
    assert events[: len(before)] == before  # the history is kept
    assert _strictly_increasing_without_duplicates(events)
    assert _of(events, "after")[0].id > _of(events, "before")[0].id


async def test_an_event_survives_a_kill_right_after_the_change(
    broker_factory: BrokerFactory,
) -> None:
    """The event is durable with the change: a SIGKILL cannot lose it (at least once)."""
    broker = await broker_factory(env=ENABLED)
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        for i in range(5):
            await _create(api, f"s{i}")
    broker.kill()
    restarted = await broker.restart()
    async with grpc.aio.insecure_channel(restarted.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        events = await _wait_events(api, lambda evs: bool(_of(evs, "s4")))
    assert _strictly_increasing_without_duplicates(events)
    for i in range(5):
        assert [e.op for e in _of(events, f"s{i}")] == [api_pb2.CREATE_STREAM]


async def test_disabled_by_default(broker: BrokerProcess, api: API) -> None:
    await _create(api, "s")
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest(), timeout=DEADLINE_S)
    assert ACTIVITY not in {stream.name for stream in response.streamMetadata}
    assert "activity.stream.enabled" not in broker.output()  # no "not supported" warning


@pytest.mark.parametrize("rpc", ["create", "delete"])
async def test_clients_cannot_create_or_delete_it(broker_factory: BrokerFactory, rpc: str) -> None:
    broker = await broker_factory(env=ENABLED)
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        call = (
            api.CreateStream(
                api_pb2.CreateStreamRequest(name=ACTIVITY, subject="x"), timeout=DEADLINE_S
            )
            if rpc == "create"
            else api.DeleteStream(api_pb2.DeleteStreamRequest(name=ACTIVITY), timeout=DEADLINE_S)
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "reserved" in (info.value.details() or "").lower()
        events = await _wait_events(api, lambda evs: bool(_of(evs, ACTIVITY)))
        assert [e.op for e in _of(events, ACTIVITY)] == [api_pb2.CREATE_STREAM]
