"""CreateStream, DeleteStream, FetchMetadata and FetchPartitionMetadata on a real broker."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import grpc
import nats
import pytest

from flux_proto import api_pb2
from flux_proto.errors import REASON_METADATA_KEY
from flux_testing import wait_for
from flux_testing.broker import BrokerProcess

if TYPE_CHECKING:
    from flux_proto import api_pb2_grpc

    API = api_pb2_grpc.APIAsyncStub


def _reason(error: grpc.aio.AioRpcError) -> str:
    return str(dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY, ""))


async def _status(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


def _tree(broker: BrokerProcess) -> list[str]:
    """Files under streams/, without the broker's internal streams (``__cursors``)."""
    streams = broker.data_dir / "streams"
    return sorted(
        str(path.relative_to(streams))
        for path in streams.rglob("*")
        if not path.relative_to(streams).parts[0].startswith("__")
    )


def _user_streams(response: api_pb2.FetchMetadataResponse) -> list[api_pb2.StreamMetadata]:
    """The streams of a FetchMetadata response, without the internal ones (``__cursors``)."""
    return [stream for stream in response.streamMetadata if not stream.name.startswith("__")]


async def test_create_then_fetch_metadata(api: API, broker: BrokerProcess) -> None:
    await api.CreateStream(
        api_pb2.CreateStreamRequest(subject="orders", name="orders", partitions=3)
    )
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest())
    (me,) = response.brokers
    assert me.id == broker.broker_id
    assert f"{me.host}:{me.port}" == broker.address
    internal = sum(len(s.partitions) for s in response.streamMetadata) - 3
    assert (me.partitionCount, me.leaderCount) == (3 + internal, 3 + internal)
    (stream,) = _user_streams(response)
    assert (stream.name, stream.subject, stream.error) == ("orders", "orders", 0)
    assert stream.creationTimestamp > 0
    assert sorted(stream.partitions) == [0, 1, 2]
    for partition_id, partition in stream.partitions.items():
        assert partition.id == partition_id
        assert partition.leader == broker.broker_id
        assert list(partition.replicas) == [broker.broker_id]
        assert list(partition.isr) == [broker.broker_id]
        assert (partition.highWatermark, partition.newestOffset) == (-1, -1)
    assert [name for name in _tree(broker) if "/" not in name] == ["orders"]
    assert {"orders/0", "orders/1", "orders/2"} <= set(_tree(broker))


async def test_defaults_zero_partitions_and_replication_mean_one(api: API) -> None:
    await api.CreateStream(
        api_pb2.CreateStreamRequest(subject="s", name="s", partitions=0, replicationFactor=-1)
    )
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest(streams=["s"]))
    assert list(response.streamMetadata[0].partitions) == [0]


async def test_unknown_streams_and_groups_are_reported_not_errors(api: API) -> None:
    await api.CreateStream(api_pb2.CreateStreamRequest(subject="a", name="a"))
    response = await api.FetchMetadata(
        api_pb2.FetchMetadataRequest(streams=["nope", "a", "nope"], groups=["g"])
    )
    assert [(s.name, s.error) for s in response.streamMetadata] == [
        ("nope", api_pb2.StreamMetadata.Error.UNKNOWN_STREAM),
        ("a", api_pb2.StreamMetadata.Error.OK),
    ]
    assert [(g.groupId, g.error) for g in response.groupMetadata] == [
        ("g", api_pb2.ConsumerGroupMetadata.Error.UNKNOWN_GROUP)
    ]


async def test_duplicate_name_is_already_exists_whatever_the_subject(api: API) -> None:
    await api.CreateStream(api_pb2.CreateStreamRequest(subject="a", name="a"))
    error = await _status(api.CreateStream(api_pb2.CreateStreamRequest(subject="b", name="a")))
    assert error.code() is grpc.StatusCode.ALREADY_EXISTS
    assert _reason(error) == "stream-exists"
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest())
    assert [(s.name, s.subject) for s in _user_streams(response)] == [("a", "a")]


async def test_fetch_partition_metadata(api: API, broker: BrokerProcess) -> None:
    await api.CreateStream(api_pb2.CreateStreamRequest(subject="p", name="p", partitions=2))
    response = await api.FetchPartitionMetadata(
        api_pb2.FetchPartitionMetadataRequest(stream="p", partition=1)
    )
    assert (response.metadata.id, response.metadata.leader) == (1, broker.broker_id)
    for stream, partition in (("p", 2), ("p", -1), ("q", 0)):
        error = await _status(
            api.FetchPartitionMetadata(
                api_pb2.FetchPartitionMetadataRequest(stream=stream, partition=partition)
            )
        )
        assert error.code() is grpc.StatusCode.NOT_FOUND
        assert error.details() == "No such partition"
        assert _reason(error) == "partition-not-found"


async def test_partition_metadata_always_carries_the_event_timestamps(api: API) -> None:
    # Liftbridge always sets all three messages, and clients read them unconditionally
    # (Liftbridge.Net fails on a missing one): present even on an empty partition.
    await api.CreateStream(api_pb2.CreateStreamRequest(subject="t", name="t", partitions=2))
    listed = await api.FetchMetadata(api_pb2.FetchMetadataRequest(streams=["t"]))
    single = await api.FetchPartitionMetadata(
        api_pb2.FetchPartitionMetadataRequest(stream="t", partition=1)
    )
    everywhere = [*listed.streamMetadata[0].partitions.values(), single.metadata]
    assert len(everywhere) == 3
    for partition in everywhere:
        assert partition.HasField("messagesReceivedTimestamps"), partition.id
        assert partition.HasField("pauseTimestamps"), partition.id
        assert partition.HasField("readonlyTimestamps"), partition.id
        # Never paused, never read-only.
        for never in (partition.pauseTimestamps, partition.readonlyTimestamps):
            assert (never.firstTimestamp, never.latestTimestamp) == (0, 0)
        assert (partition.paused, partition.readonly) == (False, False)


async def test_delete_removes_metadata_and_data(api: API, broker: BrokerProcess) -> None:
    await api.CreateStream(api_pb2.CreateStreamRequest(subject="d", name="d", partitions=2))
    await api.CreateStream(api_pb2.CreateStreamRequest(subject="k", name="keep"))
    await api.DeleteStream(api_pb2.DeleteStreamRequest(name="d"))
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest())
    assert [s.name for s in _user_streams(response)] == ["keep"]
    assert _tree(broker) == ["keep", "keep/0", *_files_of(broker, "keep/0")]
    error = await _status(api.DeleteStream(api_pb2.DeleteStreamRequest(name="d")))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert _reason(error) == "stream-not-found"
    # The name is free again, and the new stream starts empty.
    await api.CreateStream(api_pb2.CreateStreamRequest(subject="d2", name="d"))
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest(streams=["d"]))
    assert response.streamMetadata[0].subject == "d2"


def _files_of(broker: BrokerProcess, partition: str) -> list[str]:
    directory = broker.data_dir / "streams" / partition
    return sorted(f"{partition}/{path.name}" for path in directory.iterdir())


@pytest.mark.parametrize(
    ("request_fields", "expected"),
    [
        ({"subject": "x", "name": ""}, ("INVALID_ARGUMENT", "invalid-argument", "empty")),
        ({"subject": "x", "name": "../x"}, ("INVALID_ARGUMENT", "invalid-argument", "'/'")),
        ({"subject": "x", "name": ".hidden"}, ("INVALID_ARGUMENT", "invalid-argument", "'.'")),
        ({"subject": "x", "name": "__cursors"}, ("INVALID_ARGUMENT", "stream-reserved", "")),
        ({"subject": "", "name": "n"}, ("INVALID_ARGUMENT", "invalid-argument", "empty")),
        ({"subject": "a b", "name": "n"}, ("INVALID_ARGUMENT", "invalid-argument", "subject")),
        ({"subject": "a..b", "name": "n"}, ("INVALID_ARGUMENT", "invalid-argument", "subject")),
        (
            {"subject": "a.>", "name": "n", "partitions": 2},
            ("INVALID_ARGUMENT", "invalid-argument", "single partition"),
        ),
        ({"subject": "x", "name": "n", "partitions": -1}, ("INVALID_ARGUMENT", "", "partitions")),
        ({"subject": "x", "name": "n", "partitions": 5000}, ("INVALID_ARGUMENT", "", "1..1024")),
        (
            {"subject": "x", "name": "n", "replicationFactor": 2},
            ("INVALID_ARGUMENT", "", "1 broker"),
        ),
        ({"subject": "x", "name": "n", "replicationFactor": -2}, ("INVALID_ARGUMENT", "", "-2")),
        ({"subject": "x", "name": "n", "group": "a b"}, ("INVALID_ARGUMENT", "", "group")),
        (
            {"subject": "x", "name": "n", "retentionMaxBytes": api_pb2.NullableInt64(value=-1)},
            ("INVALID_ARGUMENT", "", "retentionMaxBytes"),
        ),
        (
            {"subject": "x", "name": "n", "cleanerInterval": api_pb2.NullableInt64(value=0)},
            ("INVALID_ARGUMENT", "", "cleanerInterval"),
        ),
        (
            {"subject": "x", "name": "n", "minIsr": api_pb2.NullableInt32(value=2)},
            ("INVALID_ARGUMENT", "", "minIsr"),
        ),
        (
            {"subject": "x", "name": "n", "encryption": api_pb2.NullableBool(value=True)},
            ("FAILED_PRECONDITION", "encryption-unavailable", "encryption"),
        ),
    ],
)
async def test_bad_create_requests_change_nothing(
    api: API,
    broker: BrokerProcess,
    request_fields: dict[str, object],
    expected: tuple[str, str, str],
) -> None:
    code, reason, text = expected
    before = _tree(broker)
    error = await _status(api.CreateStream(api_pb2.CreateStreamRequest(**request_fields)))  # type: ignore[arg-type]
    assert error.code() is grpc.StatusCode[code], error.details()
    assert _reason(error) == (reason or "invalid-argument")
    assert text in (error.details() or "")
    assert _tree(broker) == before
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest())
    assert _user_streams(response) == []
    assert not (broker.data_dir.parent / "x").exists()


async def test_overrides_are_accepted(api: API) -> None:
    await api.CreateStream(
        api_pb2.CreateStreamRequest(
            subject="o",
            name="o",
            retentionMaxAge=api_pb2.NullableInt64(value=60_000),
            segmentMaxBytes=api_pb2.NullableInt64(value=1 << 20),
            compactEnabled=api_pb2.NullableBool(value=True),
            minIsr=api_pb2.NullableInt32(value=1),
        )
    )
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest(streams=["o"]))
    assert response.streamMetadata[0].error == api_pb2.StreamMetadata.Error.OK


async def test_a_stream_with_the_longest_name_is_deleted_and_re_created_empty(
    api: API, broker: BrokerProcess
) -> None:
    name = "n" * 249
    await api.CreateStream(api_pb2.CreateStreamRequest(subject="long", name=name))
    async with await nats.connect(broker.nats_url) as nc:
        await nc.publish("long", b"old-secret")
        await nc.flush()

        async def stored() -> bool:
            response = await api.FetchPartitionMetadata(
                api_pb2.FetchPartitionMetadataRequest(stream=name, partition=0)
            )
            return response.metadata.newestOffset == 0

        await wait_for(stored, 10.0, message="the record is stored")
    await api.DeleteStream(api_pb2.DeleteStreamRequest(name=name))
    assert _tree(broker) == []
    await api.CreateStream(api_pb2.CreateStreamRequest(subject="long", name=name))
    response = await api.FetchPartitionMetadata(
        api_pb2.FetchPartitionMetadataRequest(stream=name, partition=0)
    )
    assert response.metadata.newestOffset == -1


async def test_admin_calls_cancelled_by_their_deadline_leave_a_consistent_broker(
    api: API, broker: BrokerProcess
) -> None:
    names = [f"c{i}" for i in range(30)]
    for i, name in enumerate(names):
        request = api_pb2.CreateStreamRequest(subject=name, name=name, partitions=4)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await api.CreateStream(request, timeout=0.001 * (1 + i % 10))
    # Admin operations run in order, and a cancelled one still finishes: once a later one
    # returned, every create either happened completely or not at all.
    await api.CreateStream(api_pb2.CreateStreamRequest(subject="z", name="z"), timeout=10)
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest(), timeout=10)
    created = {stream.name for stream in _user_streams(response)}
    for name in names:
        request = api_pb2.CreateStreamRequest(subject=name, name=name, partitions=4)
        if name in created:
            error = await _status(api.CreateStream(request, timeout=10))
            assert error.code() is grpc.StatusCode.ALREADY_EXISTS
        else:
            await api.CreateStream(request, timeout=10)
    ack = await api.Publish(
        api_pb2.PublishRequest(stream=names[-1], value=b"v", ackPolicy=api_pb2.AckPolicy.ALL),
        timeout=10,
    )
    assert ack.ack.offset == 0  # the broker still hears NATS
    for name in names:
        with contextlib.suppress(grpc.aio.AioRpcError):
            await api.DeleteStream(api_pb2.DeleteStreamRequest(name=name), timeout=0.002)
    await api.DeleteStream(api_pb2.DeleteStreamRequest(name="z"), timeout=10)
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest(), timeout=10)
    left = {stream.name for stream in _user_streams(response)}
    assert sorted(path for path in _tree(broker) if "/" not in path) == sorted(left)
    assert "Traceback" not in broker.output()
