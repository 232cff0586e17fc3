"""CreateStream, DeleteStream, FetchMetadata and FetchPartitionMetadata on a real broker."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import pytest

from flux_proto import api_pb2
from flux_proto.errors import REASON_METADATA_KEY
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
    streams = broker.data_dir / "streams"
    return sorted(str(path.relative_to(streams)) for path in streams.rglob("*"))


async def test_create_then_fetch_metadata(api: API, broker: BrokerProcess) -> None:
    await api.CreateStream(
        api_pb2.CreateStreamRequest(subject="orders", name="orders", partitions=3)
    )
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest())
    (me,) = response.brokers
    assert me.id == broker.broker_id
    assert f"{me.host}:{me.port}" == broker.address
    assert (me.partitionCount, me.leaderCount) == (3, 3)
    (stream,) = response.streamMetadata
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
    assert [(s.name, s.subject) for s in response.streamMetadata] == [("a", "a")]


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


async def test_delete_removes_metadata_and_data(api: API, broker: BrokerProcess) -> None:
    await api.CreateStream(api_pb2.CreateStreamRequest(subject="d", name="d", partitions=2))
    await api.CreateStream(api_pb2.CreateStreamRequest(subject="k", name="keep"))
    await api.DeleteStream(api_pb2.DeleteStreamRequest(name="d"))
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest())
    assert [s.name for s in response.streamMetadata] == ["keep"]
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
    assert list(response.streamMetadata) == []
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


async def test_features_of_later_issues_answer_unimplemented(api: API) -> None:
    error = await _status(api.PauseStream(api_pb2.PauseStreamRequest(name="x")))
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED
    assert _reason(error) == "unimplemented"
