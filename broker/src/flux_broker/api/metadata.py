"""FetchMetadata and FetchPartitionMetadata, answered from the stream manager's memory.

Liftbridge semantics (reference ``liftbridge-api.md`` §1.5): the brokers list carries the
address clients should dial (``--host``/``--port``, not the bind address); a requested stream
that does not exist is an entry with ``UNKNOWN_STREAM``, not an error; an empty request lists
every stream. A requested consumer group is described by its coordinator and epoch while it
has members, and reported ``UNKNOWN_GROUP`` otherwise (Liftbridge deletes a group when its last
member leaves; Flux keeps its positions for describe and reset, but not in metadata).

Every ``PartitionMetadata`` carries all three event-timestamp messages, as Liftbridge's does:
clients read them unconditionally (Liftbridge.Net converts each one and fails on a missing
message); an event that never happened has both timestamps zero. A paused partition is listed
like any other (its leader too), with ``paused`` set, the offsets it had when it was paused,
and the reception times of messages since the broker started.
"""

from __future__ import annotations

from flux_broker.api.context import BrokerContext
from flux_broker.api.status import FluxStatus
from flux_broker.streams.effective_config import effective_config
from flux_broker.streams.manager import LivePartition, LiveStream
from flux_proto import api_pb2

__all__ = ["fetch_metadata", "fetch_partition_metadata", "partition_metadata"]


def _timestamps(first_ns: int, latest_ns: int) -> api_pb2.PartitionEventTimestamps:
    """Event timestamps, explicitly present even when both are zero (never happened)."""
    return api_pb2.PartitionEventTimestamps(firstTimestamp=first_ns, latestTimestamp=latest_ns)


def partition_metadata(partition: LivePartition) -> api_pb2.PartitionMetadata:
    """The ``PartitionMetadata`` of a partition: assignment, offsets, flags and event times."""
    meta = partition.metadata
    stats = partition.stats
    return api_pb2.PartitionMetadata(
        id=partition.id,
        leader=meta.leader,
        replicas=meta.replicas,
        isr=meta.isr,
        highWatermark=partition.high_watermark,
        newestOffset=partition.newest_offset,
        paused=partition.paused,
        readonly=meta.readonly,
        messagesReceivedTimestamps=_timestamps(stats.first_received_ns, stats.latest_received_ns),
        pauseTimestamps=_timestamps(meta.pause_first_ns, meta.pause_latest_ns),
        readonlyTimestamps=_timestamps(meta.readonly_first_ns, meta.readonly_latest_ns),
    )


def _stream_metadata(broker: BrokerContext, stream: LiveStream) -> api_pb2.StreamMetadata:
    meta = stream.metadata
    return api_pb2.StreamMetadata(
        name=meta.name,
        subject=meta.subject,
        error=api_pb2.StreamMetadata.Error.OK,
        partitions={partition.id: partition_metadata(partition) for partition in stream.partitions},
        creationTimestamp=meta.creation_timestamp_ns,
        effectiveConfig=effective_config(broker.stream_defaults, meta.config),
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
                response.streamMetadata.append(_stream_metadata(broker, live))
    else:
        response.streamMetadata.extend(_stream_metadata(broker, live) for live in streams.streams())
    for group_id in dict.fromkeys(request.groups):
        state = None if broker.groups is None else broker.groups.group(group_id)
        if state is None or state.empty:
            response.groupMetadata.append(
                api_pb2.ConsumerGroupMetadata(
                    groupId=group_id, error=api_pb2.ConsumerGroupMetadata.Error.UNKNOWN_GROUP
                )
            )
        else:
            response.groupMetadata.append(
                api_pb2.ConsumerGroupMetadata(
                    groupId=group_id, coordinator=state.coordinator, epoch=state.epoch
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
