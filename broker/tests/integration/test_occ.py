"""Optimistic concurrency control: an expected offset must be the offset the message gets."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import pytest

from flux_proto import api_pb2
from flux_proto.errors import REASON_METADATA_KEY

if TYPE_CHECKING:
    from flux_proto import api_pb2_grpc

    API = api_pb2_grpc.APIAsyncStub

ALL = api_pb2.AckPolicy.ALL


async def _occ_stream(api: API, name: str) -> None:
    await api.CreateStream(
        api_pb2.CreateStreamRequest(
            subject=name,
            name=name,
            optimisticConcurrencyControl=api_pb2.NullableBool(value=True),
        )
    )


async def _publish(api: API, stream: str, expected: int, value: bytes) -> api_pb2.PublishResponse:
    return await api.Publish(
        api_pb2.PublishRequest(stream=stream, value=value, expectedOffset=expected, ackPolicy=ALL),
        timeout=10,
    )


async def _newest(api: API, stream: str) -> int:
    response = await api.FetchPartitionMetadata(
        api_pb2.FetchPartitionMetadataRequest(stream=stream, partition=0)
    )
    return response.metadata.newestOffset


async def test_expected_offsets_must_match_and_minus_one_skips_the_check(api: API) -> None:
    await _occ_stream(api, "occ")
    assert (await _publish(api, "occ", 0, b"a")).ack.offset == 0
    assert (await _publish(api, "occ", -1, b"b")).ack.offset == 1
    for wrong in (1, 5, 0):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _publish(api, "occ", wrong, b"wrong")
        assert info.value.code() is grpc.StatusCode.UNKNOWN
        reason = dict(info.value.trailing_metadata() or ()).get(REASON_METADATA_KEY)
        assert reason == "incorrect-offset"
    assert (await _publish(api, "occ", 2, b"c")).ack.offset == 2
    assert await _newest(api, "occ") == 2  # the refused messages were not stored


async def test_publish_async_reports_incorrect_offset_as_an_async_error(api: API) -> None:
    await _occ_stream(api, "occa")

    async def requests() -> AsyncIterator[api_pb2.PublishRequest]:
        for i, expected in enumerate((0, 1, 7, 2)):
            yield api_pb2.PublishRequest(
                stream="occa", value=b"v", expectedOffset=expected, correlationId=str(i)
            )

    call = api.PublishAsync(requests())
    responses = {response.correlationId: response async for response in call}
    assert {k: r.ack.offset for k, r in responses.items() if not r.HasField("asyncError")} == {
        "0": 0,
        "1": 1,
        "3": 2,
    }
    refused = responses["2"]
    assert refused.asyncError.code == api_pb2.PublishAsyncError.Code.INCORRECT_OFFSET
    assert refused.ack.ackError == api_pb2.Ack.Error.INCORRECT_OFFSET


async def test_without_occ_the_expected_offset_is_ignored(api: API) -> None:
    await api.CreateStream(api_pb2.CreateStreamRequest(subject="free", name="free"))
    assert (await _publish(api, "free", 42, b"a")).ack.offset == 0
