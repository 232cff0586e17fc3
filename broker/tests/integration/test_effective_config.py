"""FetchMetadata reports each stream's effective settings (Flux extension, field 1000)."""

from __future__ import annotations

import grpc

from flux_proto import api_pb2, api_pb2_grpc
from flux_testing.pytest_plugin import BrokerFactory

HOUR_MS = 3_600_000


async def test_overrides_win_over_broker_defaults(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(
        env={"FLUX_STREAMS_RETENTION_MAX_AGE": "48h", "FLUX_STREAMS_SEGMENT_MAX_BYTES": "65536"}
    )
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await api.CreateStream(api_pb2.CreateStreamRequest(subject="plain", name="plain"))
        await api.CreateStream(
            api_pb2.CreateStreamRequest(
                subject="tuned",
                name="tuned",
                retentionMaxAge=api_pb2.NullableInt64(value=HOUR_MS),
                compactEnabled=api_pb2.NullableBool(value=True),
                retentionMaxMessages=api_pb2.NullableInt64(value=0),
            )
        )
        response = await api.FetchMetadata(
            api_pb2.FetchMetadataRequest(streams=["plain", "tuned", "missing"])
        )
    plain, tuned, missing = response.streamMetadata
    assert plain.effectiveConfig.retentionMaxAge == 48 * HOUR_MS
    assert plain.effectiveConfig.segmentMaxBytes == 65536
    assert not plain.effectiveConfig.compactEnabled
    assert plain.effectiveConfig.minIsr == 1
    assert tuned.effectiveConfig.retentionMaxAge == HOUR_MS
    assert tuned.effectiveConfig.compactEnabled
    assert tuned.effectiveConfig.segmentMaxBytes == 65536  # not overridden: the default
    assert tuned.effectiveConfig.retentionMaxMessages == 0
    assert not missing.HasField("effectiveConfig")
