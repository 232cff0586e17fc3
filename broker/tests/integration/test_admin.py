"""CreateStream, DeleteStream, FetchMetadata and FetchPartitionMetadata on a real broker."""

from __future__ import annotations

import grpc
import pytest

from flux_proto import api_pb2, api_pb2_grpc
from flux_proto.errors import REASON_METADATA_KEY
from flux_testing.broker import BrokerProcess


def _reason(error: grpc.aio.AioRpcError) -> str:
    return dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY, "")


async def test_create_then_metadata(api: api_pb2_grpc.APIAsyncStub, broker: BrokerProcess) -> None:
    await api.CreateStream(api_pb2.CreateStreamRequest(subject="orders", name="orders", partitions=3))
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest())
    assert [b.id for b in response.brokers] == [broker.broker_id]
    assert f"{response.brokers[0].host}:{response.brokers[0].port}" == broker.address
    (stream,) = response.streamMetadata
    assert stream.name == "orders"
    assert sorted(stream.partitions) == [0, 1, 2]
    p = stream.partitions[1]
    assert (p.id, p.leader, list(p.isr), p.highWatermark, p.newestOffset) == (1, broker.broker_id, [broker.broker_id], -1, -1)


async def test_duplicate_is_already_exists(api: api_pb2_grpc.APIAsyncStub) -> None:
    request = api_pb2.CreateStreamRequest(subject="a", name="a")
    await api.CreateStream(request)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await api.CreateStream(request)
    assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS
    assert _reason(info.value) == "stream-exists"
