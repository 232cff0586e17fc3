"""FetchMetadata and FetchPartitionMetadata, answered from the stream manager's memory.

Liftbridge semantics (reference ``liftbridge-api.md`` §1.5): the brokers list carries the
address clients should dial (``--host``/``--port``, not the bind address); a requested stream
that does not exist is an entry with ``UNKNOWN_STREAM``, not an error; an empty request lists
every stream. Requested consumer groups are reported ``UNKNOWN_GROUP`` until groups exist.
"""

from __future__ import annotations

from flux_broker.api.context import BrokerContext
from flux_broker.api.status import FluxStatus
from flux_broker.streams.manager import LivePartition, LiveStream
from flux_proto import api_pb2

__all__ = ["fetch_metadata", "fetch_partition_metadata", "partition_metadata"]


def partition_metadata(partition: LivePartition) -> api_pb2.PartitionMetadata:
    """The ``PartitionMetadata`` of a partition: assignment, offsets and event times."""
    meta = partition.metadata
    stats = partition.leader.stats
    return api_pb2.PartitionMetadata(
        id=partition.id,
        leader=meta.leader,
        replicas=meta.replicas,
        isr=meta.isr,
        highWatermark=partition.log.high_watermark,
        newestOffset=partition.log.newest_offset,
        paused=False,
        readonly=False,
        messagesReceivedTimestamps=api_pb2.PartitionEventTimestamps(
            firstTimestamp=stats.first_received_ns,
            latestTimestamp=stats.latest_received_ns,
        ),
    )


def _stream_metadata(stream: LiveStream) -> api_pb2.StreamMetadata:
    meta = stream.metadata
    return api_pb2.StreamMetadata(
        name=meta.name,
        subject=meta.subject,
        error=api_pb2.StreamMetadata.Error.OK,
        partitions={partition.id: partition_metadata(partition) for partition in stream.partitions},
        creationTimestamp=meta.creation_timestamp_ns,
    )


async def fetch_metadata(
    broker: BrokerContext, request: api_pb2.FetchMetadataRequest
) -> api_pb2.FetchMetadataResponse:
    """FetchMetadata: this broker, and the requested (default: all) streams."""
    streams = broker.streams
    leaders = sum(
        1
        for stream in streams.streams()
        for partition in stream.partitions
        if partition.metadata.leader == broker.broker_id
    )
    response = api_pb2.FetchMetadataResponse(
        brokers=[
            api_pb2.Broker(
                id=broker.broker_id,
                host=broker.host,
                port=broker.port,
                partitionCount=streams.partition_count(),
                leaderCount=leaders,
            )
        ]
    )
    if request.streams:
        for name in dict.fromkeys(request.streams):  # each requested stream once, in order
            live = streams.stream(name)
            if live is None:
                response.streamMetadata.append(
                    api_pb2.StreamMetadata(
                        name=name, error=api_pb2.StreamMetadata.Error.UNKNOWN_STREAM
                    )
                )
            else:
                response.streamMetadata.append(_stream_metadata(live))
    else:
        response.streamMetadata.extend(_stream_metadata(live) for live in streams.streams())
    for group in dict.fromkeys(request.groups):
        response.groupMetadata.append(
            api_pb2.ConsumerGroupMetadata(
                groupId=group, error=api_pb2.ConsumerGroupMetadata.Error.UNKNOWN_GROUP
            )
        )
    return response


async def fetch_partition_metadata(
    broker: BrokerContext, request: api_pb2.FetchPartitionMetadataRequest
) -> api_pb2.FetchPartitionMetadataResponse:
    """FetchPartitionMetadata: one partition, as its leader (this broker) knows it.

    Raises:
        FluxStatus: PARTITION_NOT_FOUND for an unknown stream or partition.
    """
    partition = broker.streams.partition(request.stream, request.partition)
    if partition is None:
        raise FluxStatus.from_entry("PARTITION_NOT_FOUND")
    return api_pb2.FetchPartitionMetadataResponse(metadata=partition_metadata(partition))
