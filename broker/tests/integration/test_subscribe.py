"""Subscribe on a real broker process, fed through its real NATS server.

Records get into a partition the way a Liftbridge client that publishes straight to NATS puts
them there: raw payloads or type-0 envelopes on the stream's subject. Each test waits until
FetchPartitionMetadata shows them committed before it subscribes, so what the subscription
sees is known.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Final, TypeAlias

import grpc
import nats
import pytest
from nats.aio.client import Client

from flux_broker.nats.envelope import encode_message
from flux_proto import api_pb2, api_pb2_grpc
from flux_proto.errors import REASON_METADATA_KEY
from flux_testing.broker import BrokerProcess
from flux_testing.wait import wait_for

# Names the type stubs define, for annotations only.
Stub: TypeAlias = "api_pb2_grpc.APIAsyncStub"
Call: TypeAlias = "grpc.aio.UnaryStreamCall[api_pb2.SubscribeRequest, api_pb2.Message]"

#: Bound on one read from a subscription: the broker is local, so a message that is due
#: arrives in milliseconds; a shared 2-core CI machine can stall for seconds.
READ_TIMEOUT_S: Final = 10.0
#: Bound on a publish becoming visible in the partition metadata.
COMMIT_TIMEOUT_S: Final = 10.0


# -- helpers --------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _client(address: str) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(address) as channel:
        yield api_pb2_grpc.APIStub(channel)


@contextlib.asynccontextmanager
async def _nats(broker: BrokerProcess) -> AsyncIterator[Client]:
    nc = await nats.connect(broker.nats_url)
    try:
        yield nc
    finally:
        await nc.close()


async def _create(api: Stub, name: str, subject: str | None = None, partitions: int = 1) -> None:
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=name, subject=subject or name, partitions=partitions)
    )


async def _committed(api: Stub, stream: str, partition: int, newest: int) -> None:
    """Wait until the partition's newest offset and HW are both ``newest``."""

    async def done() -> bool:
        response = await api.FetchPartitionMetadata(
            api_pb2.FetchPartitionMetadataRequest(stream=stream, partition=partition)
        )
        meta = response.metadata
        return meta.newestOffset == newest and meta.highWatermark == newest

    await wait_for(done, COMMIT_TIMEOUT_S, message=f"{stream}/{partition} committed to {newest}")


async def _publish(nc: Client, subject: str, payloads: Sequence[bytes], *, reply: str = "") -> None:
    for payload in payloads:
        await nc.publish(subject, payload, reply=reply)
    await nc.flush()


async def _fill(
    api: Stub, nc: Client, stream: str, count: int, *, subject: str | None = None, first: int = 0
) -> None:
    """Publish values ``v<first>``..``v<first+count-1>`` as envelopes; wait until committed."""
    values = [f"v{i}".encode() for i in range(first, first + count)]
    await _publish(
        nc, subject or stream, [encode_message(api_pb2.Message(value=v)) for v in values]
    )
    await _committed(api, stream, 0, first + count - 1)


def _subscribe(api: Stub, stream: str, **fields: object) -> Call:
    return api.Subscribe(api_pb2.SubscribeRequest(stream=stream, **fields))  # type: ignore[arg-type]


async def _read(call: Call) -> api_pb2.Message:
    async with asyncio.timeout(READ_TIMEOUT_S):
        message = await call.read()
    assert isinstance(message, api_pb2.Message), message
    return message


async def _handshake(call: Call) -> None:
    assert await _read(call) == api_pb2.Message()


async def _read_until_end(call: Call) -> tuple[list[api_pb2.Message], grpc.aio.AioRpcError]:
    """Every message until the call ends with an error status, and that status."""
    messages: list[api_pb2.Message] = []
    while True:
        try:
            messages.append(await _read(call))
        except grpc.aio.AioRpcError as error:
            return messages, error


def _reason(error: grpc.aio.AioRpcError) -> str:
    return str(dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY, ""))


async def _stopped_values(call: Call) -> list[bytes]:
    """Read the handshake, then the values until the stream ends with STOP_REACHED."""
    await _handshake(call)
    messages, error = await _read_until_end(call)
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error
    assert error.details() == "Stop offset reached"
    assert _reason(error) == "stop-reached"
    return [message.value for message in messages]


async def _expect_error(call: Call, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    """The call ends with ``code`` before sending anything (not even the handshake)."""
    messages, error = await _read_until_end(call)
    assert messages == []
    assert error.code() is code, error
    return error


def _values(first: int, last: int) -> list[bytes]:
    return [f"v{i}".encode() for i in range(first, last + 1)]


# -- handshake and validation -----------------------------------------------------------------


async def test_handshake_comes_first(api: Stub, broker: BrokerProcess) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 2)
    call = _subscribe(api, "s", startPosition=api_pb2.EARLIEST)
    first = await _read(call)
    assert first == api_pb2.Message()
    assert first.SerializeToString() == b""
    assert (await _read(call)).value == b"v0"
    call.cancel()


async def test_unknown_partition_is_not_found(api: Stub, subtests: pytest.Subtests) -> None:
    await _create(api, "s")
    for stream, partition in [("nope", 0), ("s", 1), ("s", -1)]:
        with subtests.test(f"{stream}/{partition}"):
            call = _subscribe(api, stream, partition=partition)
            error = await _expect_error(call, grpc.StatusCode.NOT_FOUND)
            assert error.details() == "No such partition"
            assert _reason(error) == "partition-not-found"


async def test_bad_request_is_invalid_argument(api: Stub, subtests: pytest.Subtests) -> None:
    await _create(api, "s")
    cases: list[tuple[str, dict[str, object]]] = [
        ("start", {"startPosition": 99}),
        ("negative-start", {"startPosition": -1}),
        ("stop", {"stopPosition": 42}),
        ("no-consumer-id", {"consumer": api_pb2.Consumer(groupId="g")}),
        ("no-group-id", {"consumer": api_pb2.Consumer(consumerId="c")}),
        (
            "isr-and-group",
            {"consumer": api_pb2.Consumer(groupId="g", consumerId="c"), "readISRReplica": True},
        ),
    ]
    for name, fields in cases:
        with subtests.test(name):
            call = _subscribe(api, "s", **fields)
            error = await _expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
            assert _reason(error) == "invalid-argument"


async def test_isr_replica_and_resume_are_accepted(api: Stub, broker: BrokerProcess) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 2)
    call = _subscribe(
        api,
        "s",
        startPosition=api_pb2.EARLIEST,
        stopPosition=api_pb2.STOP_LATEST,
        readISRReplica=True,
        resume=True,
    )
    assert await _stopped_values(call) == _values(0, 1)


# -- start and stop positions on stored records -----------------------------------------------


async def test_positions_over_stored_records(
    api: Stub, broker: BrokerProcess, subtests: pytest.Subtests
) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 5)
    cases: list[tuple[str, dict[str, object], list[bytes]]] = [
        ("earliest", {"startPosition": api_pb2.EARLIEST}, _values(0, 4)),
        ("latest", {"startPosition": api_pb2.LATEST}, _values(4, 4)),
        ("offset", {"startPosition": api_pb2.OFFSET, "startOffset": 2}, _values(2, 4)),
        ("offset-zero", {"startPosition": api_pb2.OFFSET}, _values(0, 4)),
        ("offset-negative", {"startPosition": api_pb2.OFFSET, "startOffset": -7}, _values(0, 4)),
        ("new-only", {"startPosition": api_pb2.NEW_ONLY}, []),
        ("offset-at-end", {"startPosition": api_pb2.OFFSET, "startOffset": 5}, []),
    ]
    for name, fields, expected in cases:
        with subtests.test(name):
            call = _subscribe(api, "s", stopPosition=api_pb2.STOP_LATEST, **fields)
            assert await _stopped_values(call) == expected


async def test_stop_offset(api: Stub, broker: BrokerProcess, subtests: pytest.Subtests) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 5)
    cases = [(0, 2, _values(0, 2)), (3, 3, _values(3, 3)), (1, 4, _values(1, 4))]
    for start, stop, expected in cases:
        with subtests.test(f"{start}..{stop}"):
            call = _subscribe(
                api,
                "s",
                startPosition=api_pb2.OFFSET,
                startOffset=start,
                stopPosition=api_pb2.STOP_OFFSET,
                stopOffset=stop,
            )
            assert await _stopped_values(call) == expected


async def test_stop_offset_before_start_is_invalid(api: Stub, broker: BrokerProcess) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 5)
    call = _subscribe(
        api,
        "s",
        startPosition=api_pb2.OFFSET,
        startOffset=3,
        stopPosition=api_pb2.STOP_OFFSET,
        stopOffset=2,
    )
    error = await _expect_error(call, grpc.StatusCode.INVALID_ARGUMENT)
    assert "stopOffset 2" in (error.details() or "")


async def test_stop_latest_on_empty_partition(api: Stub) -> None:
    await _create(api, "s")
    call = _subscribe(api, "s", startPosition=api_pb2.EARLIEST, stopPosition=api_pb2.STOP_LATEST)
    error = await _expect_error(call, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert error.details() == "Stream is empty"
    assert _reason(error) == "stream-empty"


async def test_stop_offset_reached_by_a_later_record(api: Stub, broker: BrokerProcess) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 2)
        call = _subscribe(api, "s", stopPosition=api_pb2.STOP_OFFSET, stopOffset=3)
        await _handshake(call)  # live from here: NEW_ONLY starts at offset 2
        await _publish(nc, "s", [b"v2", b"v3", b"v4"])
        messages, error = await _read_until_end(call)
    assert [(m.offset, m.value) for m in messages] == [(2, b"v2"), (3, b"v3")]
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _reason(error) == "stop-reached"


async def test_timestamps(api: Stub, broker: BrokerProcess, subtests: pytest.Subtests) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 3)
        await _fill(api, nc, "s", 3, first=3)  # a second append: later timestamps
    call = _subscribe(api, "s", startPosition=api_pb2.EARLIEST, stopPosition=api_pb2.STOP_LATEST)
    await _handshake(call)
    stored, _ = await _read_until_end(call)
    assert [m.offset for m in stored] == [0, 1, 2, 3, 4, 5]
    second = stored[3].timestamp
    assert stored[2].timestamp < second, "the two appends got the same timestamp"
    cases: list[tuple[str, dict[str, object], list[bytes]]] = [
        ("start", {"startPosition": api_pb2.TIMESTAMP, "startTimestamp": second}, _values(3, 5)),
        (
            "start-before-all",
            {"startPosition": api_pb2.TIMESTAMP, "startTimestamp": 1},
            _values(0, 5),
        ),
        (
            "stop",
            {
                "startPosition": api_pb2.EARLIEST,
                "stopPosition": api_pb2.STOP_TIMESTAMP,
                "stopTimestamp": second,
            },
            _values(0, 2),
        ),
        (
            "stop-before-all",
            {
                "startPosition": api_pb2.EARLIEST,
                "stopPosition": api_pb2.STOP_TIMESTAMP,
                "stopTimestamp": stored[0].timestamp,
            },
            [],
        ),
        (
            "stop-passed",  # every record is older and the time is past: ends after the last
            {
                "startPosition": api_pb2.EARLIEST,
                "stopPosition": api_pb2.STOP_TIMESTAMP,
                "stopTimestamp": stored[5].timestamp + 1,
            },
            _values(0, 5),
        ),
    ]
    for name, fields, expected in cases:
        with subtests.test(name):
            stop = {} if "stopPosition" in fields else {"stopPosition": api_pb2.STOP_LATEST}
            assert await _stopped_values(_subscribe(api, "s", **fields, **stop)) == expected


async def test_start_timestamp_after_all_waits_for_new(api: Stub, broker: BrokerProcess) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 2)
        call = _subscribe(
            api, "s", startPosition=api_pb2.TIMESTAMP, startTimestamp=time.time_ns() + 1
        )
        await _handshake(call)
        await _publish(nc, "s", [b"later"])
        message = await _read(call)
    assert (message.offset, message.value) == (2, b"later")
    call.cancel()


async def test_stop_timestamp_delivers_later_records(api: Stub, broker: BrokerProcess) -> None:
    await _create(api, "s")
    an_hour_ns = 3600 * 1_000_000_000
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 1)
        call = _subscribe(
            api,
            "s",
            startPosition=api_pb2.EARLIEST,
            stopPosition=api_pb2.STOP_TIMESTAMP,
            stopTimestamp=time.time_ns() + an_hour_ns,
        )
        await _handshake(call)
        assert (await _read(call)).value == b"v0"
        await _publish(nc, "s", [b"later"])
        message = await _read(call)
    assert (message.offset, message.value) == (1, b"later")
    call.cancel()


async def test_stop_timestamp_passing_without_records_ends_the_stream(api: Stub) -> None:
    # The subscription waits at the end until the stop time passes (its wait times out), then
    # ends with STOP_REACHED; the timed-out read must not end the call as cancelled.
    await _create(api, "s")
    half_a_second_ns = 500_000_000
    call = _subscribe(
        api,
        "s",
        stopPosition=api_pb2.STOP_TIMESTAMP,
        stopTimestamp=time.time_ns() + half_a_second_ns,
    )
    assert await _stopped_values(call) == []


async def test_new_only_and_stop_latest_on_records_ends_at_once(
    api: Stub, broker: BrokerProcess
) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 3)
    call = _subscribe(api, "s", stopPosition=api_pb2.STOP_LATEST)
    assert await _stopped_values(call) == []


# -- waiting for new records ----------------------------------------------------------------


async def test_new_only_receives_later_messages(api: Stub, broker: BrokerProcess) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 3)
        call = _subscribe(api, "s")  # NEW_ONLY is the default
        await _handshake(call)
        await _publish(nc, "s", [b"new"])
        message = await _read(call)
    assert (message.offset, message.value) == (3, b"new")
    call.cancel()


async def test_latest_on_empty_partition_waits_for_the_first(
    api: Stub, broker: BrokerProcess
) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        call = _subscribe(api, "s", startPosition=api_pb2.LATEST)
        await _handshake(call)
        await _publish(nc, "s", [b"first", b"second"])
        messages = [await _read(call), await _read(call)]
    assert [(m.offset, m.value) for m in messages] == [(0, b"first"), (1, b"second")]
    call.cancel()


async def test_offset_beyond_the_end_skips_to_it(api: Stub, broker: BrokerProcess) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 2)
        call = _subscribe(api, "s", startPosition=api_pb2.OFFSET, startOffset=4)
        await _handshake(call)
        await _publish(nc, "s", [b"v2", b"v3", b"v4", b"v5"])
        messages = [await _read(call), await _read(call)]
    assert [(m.offset, m.value) for m in messages] == [(4, b"v4"), (5, b"v5")]
    call.cancel()


# -- what a delivered message holds ---------------------------------------------------------


async def test_envelope_fields_are_delivered(api: Stub, broker: BrokerProcess) -> None:
    await _create(api, "orders", subject="shop.orders")
    envelope = encode_message(
        api_pb2.Message(key=b"k1", value=b"payload", headers={"h1": b"one", "h2": b""})
    )
    before_ns = time.time_ns()
    async with _nats(broker) as nc:
        await _publish(nc, "shop.orders", [envelope], reply="my.reply")
        await _committed(api, "orders", 0, 0)
    after_ns = time.time_ns()
    call = _subscribe(api, "orders", startPosition=api_pb2.EARLIEST)
    await _handshake(call)
    message = await _read(call)
    call.cancel()
    assert message.offset == 0
    assert (message.key, message.value) == (b"k1", b"payload")
    assert before_ns <= message.timestamp <= after_ns
    assert (message.stream, message.partition) == ("orders", 0)
    assert (message.subject, message.replySubject) == ("shop.orders", "my.reply")
    assert dict(message.headers) == {
        "h1": b"one",
        "h2": b"",
        "subject": b"shop.orders",
        "reply": b"my.reply",
    }


async def test_raw_payload_is_the_value(api: Stub, broker: BrokerProcess) -> None:
    await _create(api, "s", subject="raw.in")
    async with _nats(broker) as nc:
        await _publish(nc, "raw.in", [b"not an envelope", b""])
        await _committed(api, "s", 0, 1)
    call = _subscribe(api, "s", startPosition=api_pb2.EARLIEST)
    await _handshake(call)
    first, second = await _read(call), await _read(call)
    call.cancel()
    assert (first.offset, first.key, first.value) == (0, b"", b"not an envelope")
    assert (second.offset, second.value) == (1, b"")
    assert first.subject == "raw.in"
    assert first.replySubject == ""
    assert dict(first.headers) == {"subject": b"raw.in", "reply": b""}


async def test_second_partition_uses_its_subject(api: Stub, broker: BrokerProcess) -> None:
    await _create(api, "s", subject="multi", partitions=2)
    async with _nats(broker) as nc:
        await _publish(nc, "multi.1", [b"one"])
        await _committed(api, "s", 1, 0)
    call = _subscribe(api, "s", partition=1, startPosition=api_pb2.EARLIEST)
    await _handshake(call)
    message = await _read(call)
    call.cancel()
    assert (message.stream, message.partition, message.offset) == ("s", 1, 0)
    assert (message.subject, message.value) == ("multi.1", b"one")
    empty = _subscribe(api, "s", partition=0, stopPosition=api_pb2.STOP_LATEST)
    await _expect_error(empty, grpc.StatusCode.RESOURCE_EXHAUSTED)


# -- how subscriptions end ------------------------------------------------------------------


async def test_cancelled_subscription_leaves_the_broker_serving(
    api: Stub, broker: BrokerProcess
) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 1)
        for _ in range(3):
            call = _subscribe(api, "s", startPosition=api_pb2.EARLIEST)
            await _handshake(call)
            assert (await _read(call)).value == b"v0"
            call.cancel()
            assert await call.code() is grpc.StatusCode.CANCELLED
        await _fill(api, nc, "s", 1, first=1)
    call = _subscribe(api, "s", startPosition=api_pb2.EARLIEST, stopPosition=api_pb2.STOP_LATEST)
    assert await _stopped_values(call) == _values(0, 1)


async def test_delete_ends_subscription_with_not_found(api: Stub, broker: BrokerProcess) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 1)
    call = _subscribe(api, "s", startPosition=api_pb2.EARLIEST)
    await _handshake(call)
    assert (await _read(call)).value == b"v0"
    await api.DeleteStream(api_pb2.DeleteStreamRequest(name="s"))
    messages, error = await _read_until_end(call)
    assert messages == []
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert "deleted" in (error.details() or "")
    assert _reason(error) == "stream-not-found"


async def test_broker_stop_ends_subscription_with_unavailable(
    api: Stub, broker: BrokerProcess
) -> None:
    await _create(api, "s")
    call = _subscribe(api, "s")
    await _handshake(call)
    stopping = asyncio.create_task(broker.stop())
    messages, error = await _read_until_end(call)
    assert await stopping == 0
    assert messages == []
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    # The broker's own status, not a dropped connection: it carries the reason.
    assert _reason(error) == "unavailable"


async def test_restart_serves_every_message(api: Stub, broker: BrokerProcess) -> None:
    await _create(api, "s")
    async with _nats(broker) as nc:
        await _fill(api, nc, "s", 4)
    assert await broker.stop() == 0
    restarted = await broker.restart()
    try:
        async with _client(restarted.address) as api2:
            call = _subscribe(
                api2, "s", startPosition=api_pb2.EARLIEST, stopPosition=api_pb2.STOP_LATEST
            )
            assert await _stopped_values(call) == _values(0, 3)
    finally:
        await restarted.stop()
