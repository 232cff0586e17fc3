"""Publish, PublishAsync and PublishToSubject on a real broker process with its real NATS.

What was stored is checked through partition offsets (FetchPartitionMetadata /
FetchMetadata). A check that nothing was stored after a rejected request publishes a valid
message afterwards on the same path and asserts it got offset 0: NATS keeps one connection's
messages in order, so a rejected message that had been published would have come first.

PublishAsync's memory bounds are tens of thousands of messages deep; the last tests drive the
handler in-process instead (real NATS server, real stream manager and logs) with the bounds
lowered, so reaching them takes a handful of messages.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import grpc
import nats
import pytest

from flux_broker.api import publish_async as publish_module
from flux_broker.api.admin import create_stream
from flux_broker.api.context import BrokerContext
from flux_broker.api.status import FluxStatus
from flux_broker.clock import SystemClock
from flux_broker.log import LogConfig, SyncPolicy
from flux_broker.metadata import SqliteMetadataStore
from flux_broker.nats.acks import AckRouter
from flux_broker.nats.envelope import decode_ack, encode_message
from flux_broker.server import SHUTDOWN_GRACE_S
from flux_broker.streams.manager import StreamManager
from flux_proto import api_pb2, api_pb2_grpc
from flux_proto.errors import REASON_METADATA_KEY
from flux_testing import NatsServer, wait_for
from flux_testing.broker import BrokerProcess

pytestmark = pytest.mark.integration

if TYPE_CHECKING:  # the async stub exists only in the type stubs
    API: TypeAlias = api_pb2_grpc.APIAsyncStub
LEADER = api_pb2.AckPolicy.LEADER
ALL = api_pb2.AckPolicy.ALL
NONE = api_pb2.AckPolicy.NONE
Code = api_pb2.PublishAsyncError.Code
#: Deadline of calls that must succeed; a healthy run needs milliseconds.
DEADLINE_S = 10.0
#: The broker's default clustering.replication.max.bytes.
LIMIT_BYTES = 1024 * 1024


def _reason(error: grpc.aio.AioRpcError) -> str:
    return str(dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY, ""))


async def _create(
    api: API, name: str, subject: str, *, partitions: int = 1, group: str = ""
) -> None:
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=name, subject=subject, partitions=partitions, group=group)
    )


async def _newest(api: API, stream: str, partition: int = 0) -> int:
    response = await api.FetchPartitionMetadata(
        api_pb2.FetchPartitionMetadataRequest(stream=stream, partition=partition)
    )
    return response.metadata.newestOffset


async def _wait_newest(api: API, stream: str, expected: int, partition: int = 0) -> None:
    async def reached() -> bool:
        return await _newest(api, stream, partition) == expected

    await wait_for(reached, DEADLINE_S, message=f"{stream}/{partition} newest offset {expected}")


async def _publish(api: API, stream: str = "s", **fields: object) -> api_pb2.PublishResponse:
    request = api_pb2.PublishRequest(stream=stream, **fields)  # type: ignore[arg-type]
    return await api.Publish(request, timeout=DEADLINE_S)


@pytest.fixture
async def stream(api: API) -> None:
    """A one-partition stream ``s`` on subject ``s.subject``."""
    await _create(api, "s", "s.subject")


# -- Publish ------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [LEADER, ALL])
@pytest.mark.usefixtures("stream")
async def test_publish_acks_with_every_field(api: API, policy: int) -> None:
    response = await _publish(
        api, key=b"k", value=b"v", headers={"h": b"1"}, correlationId="c-1", ackPolicy=policy
    )
    ack = response.ack
    assert response.correlationId == "c-1"
    assert (ack.stream, ack.partitionSubject, ack.msgSubject) == ("s", "s.subject", "s.subject")
    assert (ack.offset, ack.correlationId, ack.ackPolicy) == (0, "c-1", policy)
    assert ack.ackError == api_pb2.Ack.Error.OK
    assert ack.ackInbox.startswith("liftbridge-default.ack.")
    assert 0 < ack.receptionTimestamp <= ack.commitTimestamp
    meta = await api.FetchPartitionMetadata(
        api_pb2.FetchPartitionMetadataRequest(stream="s", partition=0)
    )
    assert (meta.metadata.newestOffset, meta.metadata.highWatermark) == (0, 0)


@pytest.mark.usefixtures("stream")
async def test_offsets_increase(api: API) -> None:
    offsets = [(await _publish(api, value=bytes([i]))).ack.offset for i in range(5)]
    assert offsets == [0, 1, 2, 3, 4]
    assert await _newest(api, "s") == 4


@pytest.mark.usefixtures("stream")
async def test_policy_none_returns_empty_and_stores(api: API) -> None:
    response = await _publish(api, value=b"v", correlationId="c", ackPolicy=NONE)
    assert not response.HasField("ack")
    assert response == api_pb2.PublishResponse()
    await _wait_newest(api, "s", 0)


@pytest.mark.usefixtures("stream")
async def test_publish_without_deadline_is_fire_and_forget_yet_stored(api: API) -> None:
    response = await api.Publish(api_pb2.PublishRequest(stream="s", value=b"v", correlationId="c"))
    assert response == api_pb2.PublishResponse()
    await _wait_newest(api, "s", 0)


async def test_partition_n_uses_subject_dot_n(api: API) -> None:
    await _create(api, "p", "p.subject", partitions=3)
    ack = (await _publish(api, "p", partition=2, value=b"v")).ack
    assert (ack.partitionSubject, ack.msgSubject, ack.offset) == ("p.subject.2", "p.subject.2", 0)
    assert [await _newest(api, "p", n) for n in range(3)] == [-1, -1, 0]


@pytest.mark.usefixtures("stream")
async def test_client_ack_inbox_gets_the_ack_too(api: API, broker: BrokerProcess) -> None:
    nc = await nats.connect(broker.nats_url)
    try:
        sub = await nc.subscribe("client.inbox.1")
        await nc.flush()
        response = await _publish(api, value=b"v", ackInbox="client.inbox.1", correlationId="c")
        assert response.ack.ackInbox == "client.inbox.1"
        raw = decode_ack((await sub.next_msg(timeout=DEADLINE_S)).data)
        assert (raw.stream, raw.offset, raw.correlationId) == ("s", 0, "c")
    finally:
        await nc.close()


_INVALID = grpc.StatusCode.INVALID_ARGUMENT
_NOT_FOUND = grpc.StatusCode.NOT_FOUND
#: Bad PublishRequest fields → expected code and reason.
BAD_PUBLISHES: dict[str, tuple[dict[str, object], grpc.StatusCode, str]] = {
    "empty-stream": ({"stream": ""}, _INVALID, "invalid-argument"),
    "unknown-stream": ({"stream": "missing"}, _NOT_FOUND, "stream-not-found"),
    "negative-partition": ({"partition": -1}, _NOT_FOUND, "partition-not-found"),
    "partition-past-count": ({"partition": 1}, _NOT_FOUND, "partition-not-found"),
    "undefined-ack-policy": ({"ackPolicy": 99}, _INVALID, "invalid-argument"),
    "wildcard-ack-inbox": ({"ackInbox": "inbox.*"}, _INVALID, "invalid-argument"),
    "whitespace-ack-inbox": ({"ackInbox": "bad inbox"}, _INVALID, "invalid-argument"),
    "too-large": ({"value": bytes(LIMIT_BYTES)}, _INVALID, "too-large"),
    "too-many-headers": (
        {"headers": {f"h{i}": b"" for i in range(1025)}},
        _INVALID,
        "invalid-argument",
    ),
    "header-name-too-long": ({"headers": {"h" * 1025: b""}}, _INVALID, "invalid-argument"),
}


@pytest.mark.usefixtures("stream")
async def test_bad_publish_is_rejected_and_stores_nothing(
    api: API, subtests: pytest.Subtests
) -> None:
    good = 0
    for name, (fields, code, reason) in BAD_PUBLISHES.items():
        for timeout in (DEADLINE_S, None):  # with a deadline, and fire-and-forget
            with subtests.test(f"{name}, timeout {timeout}"):
                request = api_pb2.PublishRequest(**{"stream": "s", "value": b"bad", **fields})  # type: ignore[arg-type]
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await api.Publish(request, timeout=timeout)
                assert info.value.code() is code
                assert _reason(info.value) == reason
                # Nothing of the rejected request reached the log: the next message is the
                # next good one.
                assert (await _publish(api, value=b"good")).ack.offset == good
            good += 1


@pytest.mark.usefixtures("stream")
async def test_ack_inbox_in_the_brokers_own_inbox_space_is_rejected(api: API) -> None:
    own = (await _publish(api, value=b"v")).ack.ackInbox
    for inbox in (own, own.rsplit(".", 1)[0] + ".guessed"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _publish(api, value=b"v", ackInbox=inbox)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "reserved" in (info.value.details() or "")
    assert await _newest(api, "s") == 0


async def test_ack_error_from_the_leader_becomes_a_status(api: API) -> None:
    # Within the envelope limit, but the stored record (plus the long subject the leader adds
    # as a header) is over the log's record limit: the leader acks TOO_LARGE.
    subject = "big." + "x" * 300
    await _create(api, "big", subject)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _publish(api, "big", value=bytes(LIMIT_BYTES - 200))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(info.value) == "too-large"
    assert "partition leader" in (info.value.details() or "")
    assert await _newest(api, "big") == -1


@pytest.mark.usefixtures("stream")
async def test_a_shared_client_inbox_gives_each_call_its_own_ack(api: API) -> None:
    responses = await asyncio.gather(
        *(
            _publish(api, value=b"v", ackInbox="shared.inbox", correlationId=str(i))
            for i in range(20)
        )
    )
    assert [r.ack.correlationId for r in responses] == [str(i) for i in range(20)]
    assert sorted(r.ack.offset for r in responses) == list(range(20))


async def test_occ_stream_refuses_policy_none(api: API) -> None:
    await api.CreateStream(
        api_pb2.CreateStreamRequest(
            name="occ",
            subject="occ",
            optimisticConcurrencyControl=api_pb2.NullableBool(value=True),
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _publish(api, "occ", value=b"v", ackPolicy=NONE)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "optimistic concurrency" in (info.value.details() or "")
    assert await _newest(api, "occ") == -1


@pytest.mark.usefixtures("stream")
async def test_expired_deadline_publishes_nothing(api: API) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.Publish(api_pb2.PublishRequest(stream="s", value=b"v"), timeout=0.001)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert await _newest(api, "s") == -1


# -- PublishAsync --------------------------------------------------------------------------------


async def _requests(*requests: api_pb2.PublishRequest) -> AsyncIterator[api_pb2.PublishRequest]:
    for request in requests:
        yield request


async def _collect(
    responses: AsyncIterable[api_pb2.PublishResponse], into: list[api_pb2.PublishResponse]
) -> None:
    """Append every response to ``into`` until the call ends (raising, unless it ends OK)."""
    async for response in responses:
        into.append(response)


@pytest.mark.usefixtures("stream")
async def test_publish_async_acks_in_order_with_correlation_ids(api: API) -> None:
    count = 300
    call = api.PublishAsync(
        _requests(
            *(
                api_pb2.PublishRequest(stream="s", value=b"v", correlationId=f"c{i}")
                for i in range(count)
            )
        ),
        timeout=DEADLINE_S * 3,
    )
    responses = [response async for response in call]
    assert await call.code() is grpc.StatusCode.OK
    assert [r.correlationId for r in responses] == [f"c{i}" for i in range(count)]
    assert [r.ack.correlationId for r in responses] == [f"c{i}" for i in range(count)]
    assert [r.ack.offset for r in responses] == list(range(count))
    assert not any(r.HasField("asyncError") for r in responses)
    assert len({r.ack.ackInbox for r in responses}) == 1  # one inbox per call


@pytest.mark.usefixtures("stream")
async def test_publish_async_errors_do_not_end_the_call(api: API) -> None:
    def request(correlation_id: str, **fields: object) -> api_pb2.PublishRequest:
        return api_pb2.PublishRequest(
            **{"stream": "s", "value": b"v", "correlationId": correlation_id, **fields}  # type: ignore[arg-type]
        )

    call = api.PublishAsync(
        _requests(
            request("ok-0"),
            request("missing-stream", stream="missing"),
            request("missing-partition", partition=7),
            request("empty-stream", stream=""),
            request("too-large", value=bytes(LIMIT_BYTES)),
            request("bad-policy", ackPolicy=42),
            request("ok-1", ackPolicy=ALL),
            request("none", ackPolicy=NONE),
            request("ok-2"),
        ),
        timeout=DEADLINE_S,
    )
    responses = {r.correlationId: r async for r in call}
    assert await call.code() is grpc.StatusCode.OK
    errors = {
        "missing-stream": Code.NOT_FOUND,
        "missing-partition": Code.NOT_FOUND,
        "empty-stream": Code.BAD_REQUEST,
        "too-large": Code.BAD_REQUEST,
        "bad-policy": Code.BAD_REQUEST,
    }
    assert set(responses) == {"ok-0", "ok-1", "ok-2", *errors}  # nothing for "none"
    for correlation_id, code in errors.items():
        response = responses[correlation_id]
        assert response.asyncError.code == code, correlation_id
        assert response.asyncError.message
        assert response.HasField("ack")
        assert response.ack == api_pb2.Ack()  # present but empty
    assert [responses[f"ok-{i}"].ack.offset for i in range(3)] == [0, 1, 3]
    assert not any(responses[f"ok-{i}"].HasField("asyncError") for i in range(3))
    await _wait_newest(api, "s", 3)  # ok-0, ok-1, none, ok-2; nothing else


@pytest.mark.usefixtures("stream")
async def test_publish_async_half_close_waits_for_outstanding_acks(api: API) -> None:
    count = 200
    call = api.PublishAsync(timeout=DEADLINE_S * 3)
    for i in range(count):
        await call.write(
            api_pb2.PublishRequest(stream="s", value=b"v", correlationId=str(i), ackPolicy=ALL)
        )
    await call.done_writing()  # half-close before reading a single ack
    responses = [response async for response in call]
    assert await call.code() is grpc.StatusCode.OK
    assert sorted(int(r.ack.correlationId) for r in responses) == list(range(count))
    assert [r.ack.offset for r in responses] == list(range(count))


async def test_publish_async_forwards_ack_errors(api: API) -> None:
    subject = "big." + "x" * 300
    await _create(api, "big", subject)
    call = api.PublishAsync(
        _requests(
            api_pb2.PublishRequest(stream="big", value=bytes(LIMIT_BYTES - 200), correlationId="x"),
            api_pb2.PublishRequest(stream="big", value=b"small", correlationId="y"),
        ),
        timeout=DEADLINE_S,
    )
    responses = {r.correlationId: r async for r in call}
    assert await call.code() is grpc.StatusCode.OK
    too_large = responses["x"]
    assert too_large.ack.ackError == api_pb2.Ack.Error.TOO_LARGE
    assert too_large.ack.correlationId == "x"
    assert too_large.asyncError.code == Code.BAD_REQUEST
    assert responses["y"].ack.offset == 0
    assert not responses["y"].HasField("asyncError")


@pytest.mark.usefixtures("stream")
async def test_publish_async_cancelled_by_the_client_cleans_up(
    api: API, broker: BrokerProcess
) -> None:
    for round_ in range(3):
        call = api.PublishAsync(timeout=DEADLINE_S)
        for i in range(50):
            await call.write(api_pb2.PublishRequest(stream="s", value=b"v", correlationId=str(i)))
        first = await call.read()
        assert isinstance(first, api_pb2.PublishResponse), round_
        call.cancel()
        assert await call.code() is grpc.StatusCode.CANCELLED
    # Requests the broker read before the cancel were published (at least one per round was
    # acked); the rest were dropped with the call. The broker goes on serving.
    after = (await _publish(api, value=b"after")).ack.offset
    assert 3 <= after <= 150
    assert await _newest(api, "s") >= after
    assert "Traceback" not in broker.output()


@pytest.mark.usefixtures("stream")
async def test_publish_async_ends_unavailable_on_shutdown(api: API, broker: BrokerProcess) -> None:
    call = api.PublishAsync(timeout=DEADLINE_S * 3)
    await call.write(api_pb2.PublishRequest(stream="s", value=b"v", correlationId="a"))
    first = await call.read()
    assert isinstance(first, api_pb2.PublishResponse)
    assert first.ack.correlationId == "a"
    broker.process.terminate()  # SIGTERM: graceful shutdown while the call is open
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    assert _reason(info.value) == "unavailable"
    assert await broker.wait_exited() == 0


@pytest.mark.usefixtures("stream")
async def test_publish_async_acks_every_stored_message_at_shutdown(
    api: API, broker: BrokerProcess
) -> None:
    # The broker is told to stop while it is still reading, storing and acking a burst. It
    # reads no more requests, but every message it stored is acked before the call ends, so
    # a client retries only what was not stored (Liftbridge's Go client would otherwise
    # store acked-but-unreported messages twice).
    count = 2000
    call = api.PublishAsync(timeout=DEADLINE_S * 3)
    for i in range(count):
        await call.write(
            api_pb2.PublishRequest(stream="s", value=b"v", correlationId=str(i), ackPolicy=LEADER)
        )
    stopping = asyncio.create_task(broker.stop())  # SIGTERM with acks outstanding
    responses: list[api_pb2.PublishResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await _collect(call, responses)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE, info.value
    assert _reason(info.value) == "unavailable"
    assert await stopping == 0
    restarted = await broker.restart()
    async with grpc.aio.insecure_channel(restarted.address) as channel:
        stored = await _newest(api_pb2_grpc.APIStub(channel), "s") + 1
    assert not any(r.HasField("asyncError") for r in responses)
    # One NATS connection keeps the call's messages in order: the stored ones are the first
    # `stored` requests, request i at offset i, and each was acked exactly once.
    assert len(responses) == stored, f"{len(responses)} acks for {stored} stored of {count}"
    assert sorted(r.ack.offset for r in responses) == list(range(stored))
    assert all(int(r.correlationId) == r.ack.offset for r in responses)


# -- PublishToSubject ----------------------------------------------------------------------------


async def test_publish_to_subject_reaches_every_stream_on_it(api: API) -> None:
    await _create(api, "a", "shared")
    await _create(api, "b", "shared")
    response = await api.PublishToSubject(
        api_pb2.PublishToSubjectRequest(subject="shared", value=b"v", correlationId="c"),
        timeout=DEADLINE_S,
    )
    assert response.ack.stream in {"a", "b"}
    assert (response.ack.msgSubject, response.ack.correlationId) == ("shared", "c")
    await _wait_newest(api, "a", 0)
    await _wait_newest(api, "b", 0)


async def test_publish_to_subject_reaches_a_wildcard_stream(api: API) -> None:
    await _create(api, "w", "events.*")
    response = await api.PublishToSubject(
        api_pb2.PublishToSubjectRequest(subject="events.created", value=b"v"), timeout=DEADLINE_S
    )
    ack = response.ack
    assert (ack.stream, ack.partitionSubject, ack.msgSubject) == ("w", "events.*", "events.created")
    assert await _newest(api, "w") == 0


async def test_publish_to_subject_without_streams_times_out(api: API) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.PublishToSubject(
            api_pb2.PublishToSubjectRequest(subject="nobody.listens", value=b"v"), timeout=0.3
        )
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # The broker answers just before the deadline, so its reason usually arrives first.
    assert _reason(info.value) in {"ack-timeout", ""}


@pytest.mark.usefixtures("stream")
async def test_publish_to_subject_fire_and_forget(api: API) -> None:
    response = await api.PublishToSubject(
        api_pb2.PublishToSubjectRequest(subject="s.subject", value=b"v", ackPolicy=NONE),
        timeout=DEADLINE_S,
    )
    assert not response.HasField("ack")
    await _wait_newest(api, "s", 0)


BAD_PUBLISHES_TO_SUBJECT: dict[str, dict[str, object]] = {
    "empty": {"subject": ""},
    "star": {"subject": "s.*"},
    "full-wildcard": {"subject": "s.>"},
    "empty-token": {"subject": "a..b"},
    "bad-policy": {"ackPolicy": 5},
    "bad-inbox": {"ackInbox": "x.>"},
    "too-large": {"value": bytes(LIMIT_BYTES)},
}


@pytest.mark.usefixtures("stream")
async def test_bad_publish_to_subject_is_rejected(api: API, subtests: pytest.Subtests) -> None:
    for good, (name, fields) in enumerate(BAD_PUBLISHES_TO_SUBJECT.items()):
        with subtests.test(name):
            request = api_pb2.PublishToSubjectRequest(**{"subject": "s.subject", **fields})  # type: ignore[arg-type]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await api.PublishToSubject(request, timeout=DEADLINE_S)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert _reason(info.value) == (
                "too-large" if name == "too-large" else "invalid-argument"
            )
            accepted = await api.PublishToSubject(
                api_pb2.PublishToSubjectRequest(subject="s.subject", value=b"good"),
                timeout=DEADLINE_S,
            )
            assert accepted.ack.offset == good


# -- load-balance groups and raw NATS ------------------------------------------------------------


async def test_group_load_balances_each_message_once(api: API) -> None:
    count = 40
    await _create(api, "g1", "lb", group="workers")
    await _create(api, "g2", "lb", group="workers")
    acks = [
        (
            await api.PublishToSubject(
                api_pb2.PublishToSubjectRequest(subject="lb", value=b"v"), timeout=DEADLINE_S
            )
        ).ack
        for _ in range(count)
    ]
    per_stream = {name: await _newest(api, name) + 1 for name in ("g1", "g2")}
    assert sum(per_stream.values()) == count
    assert all(stored > 0 for stored in per_stream.values())  # 2 in 10**12 to fail by chance
    assert sorted(ack.stream for ack in acks) == sorted(
        name for name, stored in per_stream.items() for _ in range(stored)
    )


@pytest.mark.usefixtures("stream")
async def test_raw_nats_payload_is_stored(api: API, broker: BrokerProcess) -> None:
    nc = await nats.connect(broker.nats_url)
    try:
        await nc.publish("s.subject", b"plain bytes, no envelope")
        await nc.publish("s.subject", b"\xb9\x0e\x43\xb4 broken envelope")
        await nc.flush()
    finally:
        await nc.close()
    await _wait_newest(api, "s", 1)


@pytest.mark.usefixtures("stream")
async def test_envelope_over_nats_gets_a_type_1_ack(api: API, broker: BrokerProcess) -> None:
    inbox = f"direct.{uuid.uuid4().hex}"
    nc = await nats.connect(broker.nats_url)
    try:
        sub = await nc.subscribe(inbox)
        message = api_pb2.Message(
            offset=-1, value=b"v", ackInbox=inbox, correlationId="d-1", ackPolicy=LEADER
        )
        await nc.publish("s.subject", encode_message(message))
        ack = decode_ack((await sub.next_msg(timeout=DEADLINE_S)).data)
    finally:
        await nc.close()
    assert (ack.stream, ack.offset, ack.correlationId, ack.ackInbox) == ("s", 0, "d-1", inbox)
    assert ack.msgSubject == "s.subject"


@pytest.mark.usefixtures("stream")
async def test_concurrent_publishes_share_the_ack_router(api: API) -> None:
    responses = await asyncio.gather(
        *(_publish(api, value=b"v", correlationId=str(i)) for i in range(50))
    )
    assert [r.correlationId for r in responses] == [str(i) for i in range(50)]
    assert [r.ack.correlationId for r in responses] == [str(i) for i in range(50)]
    assert sorted(r.ack.offset for r in responses) == list(range(50))
    assert len({r.ack.ackInbox for r in responses}) == 50


# -- PublishAsync bounds, in-process -------------------------------------------------------------


@pytest.fixture
async def local(nats_server: NatsServer, data_dir: Path) -> AsyncIterator[BrokerContext]:
    """The API context of an in-process broker with a stream ``s``, on the session's NATS."""
    nc = await nats.connect(nats_server.url)
    store = await SqliteMetadataStore.open(data_dir / "metadata.db")
    streams = StreamManager(
        data_dir=data_dir,
        store=store,
        nc=nc,
        broker_id="local",
        namespace=f"ns-{uuid.uuid4().hex}",
        log_config=LogConfig(sync_policy=SyncPolicy.NEVER),
        batch_max_messages=1024,
    )
    context = BrokerContext(
        broker_id="local",
        host="127.0.0.1",
        port=0,
        namespace=streams.namespace,
        record_max_bytes=LIMIT_BYTES,
        streams=streams,
        nc=nc,
        acks=AckRouter(nc, streams.namespace),
        clock=SystemClock(),
    )
    subject = f"local.{uuid.uuid4().hex}"
    await create_stream(context, api_pb2.CreateStreamRequest(name="s", subject=subject))
    try:
        yield context
    finally:
        await streams.close()
        await store.close()
        await nc.close()


class _Requests:
    """PublishAsync requests to stream ``s``; records when each one was taken."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.taken_at: list[float] = []

    async def __call__(self) -> AsyncIterator[api_pb2.PublishRequest]:
        for i in range(self.count):
            self.taken_at.append(time.monotonic())
            yield api_pb2.PublishRequest(stream="s", value=b"v", correlationId=str(i))


async def test_publish_async_stops_reading_at_the_in_flight_bound(
    local: BrokerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The partition leader is stopped: no ack ever comes, so every request stays due. The call
    # reads up to the bound, then waits until the due acks are presumed lost.
    monkeypatch.setattr(publish_module, "PUBLISH_ASYNC_IN_FLIGHT_MAX", 4)
    monkeypatch.setattr(publish_module, "PUBLISH_ASYNC_ACK_LOST_S", 1.0)
    monkeypatch.setattr(publish_module, "PUBLISH_ASYNC_DRAIN_S", 0.2)
    partition = local.streams.partition("s", 0)
    assert partition is not None
    await partition.leader.stop()
    requests = _Requests(6)
    responses = [
        response
        async for response in publish_module.publish_async(local, requests(), asyncio.Event())
    ]
    assert responses == []
    assert len(requests.taken_at) == 6
    # Requests 1-4 are published at once; the 5th is taken and waits for room.
    assert requests.taken_at[4] - requests.taken_at[0] < 1.0
    # Room came only when the 4 due acks were presumed lost.
    assert requests.taken_at[5] - requests.taken_at[4] >= 1.0


async def test_publish_async_ends_slow_consumer_when_responses_pile_up(
    local: BrokerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publish_module, "PUBLISH_ASYNC_BUFFERED_MAX", 3)
    router = local.acks
    responses = publish_module.publish_async(local, _Requests(10)(), asyncio.Event())
    try:
        first = await anext(responses)
        assert first.ack.correlationId == "0"
        # The client reads nothing more while every other ack arrives.
        await wait_for(lambda: router.stats.routed >= 10, 10.0, message="10 acks routed")
        with pytest.raises(FluxStatus) as info:
            await anext(responses)
        assert info.value.entry.name == "SLOW_CONSUMER"
    finally:
        await responses.aclose()
    assert router.routes == 0  # the call's inbox is gone


async def test_publish_async_during_shutdown_ends_with_unavailable(local: BrokerContext) -> None:
    closing = asyncio.Event()
    closing.set()
    requests = _Requests(1)
    with pytest.raises(FluxStatus) as info:
        async for _ in publish_module.publish_async(local, requests(), closing):
            pass  # pragma: no cover
    assert info.value.entry.name == "UNAVAILABLE"
    assert requests.taken_at == []


class _ThenShutDown:
    """Requests to stream ``s``; after the last, the broker shuts down and the client waits."""

    def __init__(self, count: int, closing: asyncio.Event) -> None:
        self.count = count
        self.closing = closing
        self.closed_at = 0.0
        self.reading_stopped = False  # the call stopped waiting for the next request

    async def __call__(self) -> AsyncIterator[api_pb2.PublishRequest]:
        for i in range(self.count):
            yield api_pb2.PublishRequest(stream="s", value=b"v", correlationId=str(i))
        # Taken as soon as the last message went to NATS: its ack, at least, is still due.
        self.closing.set()
        self.closed_at = time.monotonic()
        try:
            await asyncio.Event().wait()  # the client sends nothing more
        except asyncio.CancelledError:
            self.reading_stopped = True
            raise
        yield api_pb2.PublishRequest()  # pragma: no cover -- never reached


async def test_publish_async_shutdown_sends_the_acks_still_due(local: BrokerContext) -> None:
    closing = asyncio.Event()
    requests = _ThenShutDown(3, closing)
    responses: list[api_pb2.PublishResponse] = []
    with pytest.raises(FluxStatus) as info:
        await _collect(publish_module.publish_async(local, requests(), closing), responses)
    assert info.value.entry.name == "UNAVAILABLE"
    assert [(r.correlationId, r.ack.offset) for r in responses] == [("0", 0), ("1", 1), ("2", 2)]
    assert requests.reading_stopped
    assert local.acks.routes == 0


async def test_publish_async_shutdown_waits_for_due_acks_only_so_long(
    local: BrokerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The partition leader is stopped: the acks due never come.
    monkeypatch.setattr(publish_module, "PUBLISH_ASYNC_SHUTDOWN_DRAIN_S", 0.3)
    partition = local.streams.partition("s", 0)
    assert partition is not None
    await partition.leader.stop()
    closing = asyncio.Event()
    requests = _ThenShutDown(2, closing)
    with pytest.raises(FluxStatus) as info:
        async for _ in publish_module.publish_async(local, requests(), closing):
            pass  # pragma: no cover
    waited = time.monotonic() - requests.closed_at
    assert info.value.entry.name == "UNAVAILABLE"
    assert requests.reading_stopped
    assert 0.29 <= waited < DEADLINE_S


def test_publish_async_shutdown_drain_ends_within_the_servers_grace() -> None:
    # Past the grace the server cancels the call, and the client gets neither the last acks
    # nor UNAVAILABLE.
    assert publish_module.PUBLISH_ASYNC_SHUTDOWN_DRAIN_S < SHUTDOWN_GRACE_S
