"""The client's metadata cache: which broker leads which partition, refreshed on demand.

Routing needs two facts per partition: its leader's broker id and that broker's address. They
come from ``FetchMetadata`` and stay cached until a call says they are stale (not-leader, a
lost connection, an unknown partition), when :meth:`MetadataCache.refresh` asks again. One
refresh per stream runs at a time; callers that need it meanwhile wait for the same answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from flux_client._errors import PartitionNotFoundError, StreamNotFoundError
from flux_client._types import BrokerMetadata, Metadata, PartitionMetadata, StreamMetadata
from flux_proto import api_pb2

__all__ = ["MetadataCache", "to_metadata", "to_partition"]


def to_partition(stream: str, partition: api_pb2.PartitionMetadata) -> PartitionMetadata:
    """The SDK's view of a partition's protobuf metadata."""
    return PartitionMetadata(
        stream=stream,
        id=partition.id,
        leader=partition.leader,
        replicas=tuple(partition.replicas),
        isr=tuple(partition.isr),
        high_watermark=partition.highWatermark,
        newest_offset=partition.newestOffset,
        paused=partition.paused,
        readonly=partition.readonly,
    )


def to_metadata(response: api_pb2.FetchMetadataResponse) -> Metadata:
    """The SDK's view of a ``FetchMetadata`` answer (streams that do not exist are left out)."""
    streams = {
        stream.name: StreamMetadata(
            name=stream.name,
            subject=stream.subject,
            partitions={
                pid: to_partition(stream.name, partition)
                for pid, partition in sorted(stream.partitions.items())
            },
            creation_timestamp=stream.creationTimestamp,
        )
        for stream in response.streamMetadata
        if stream.error == api_pb2.StreamMetadata.OK
    }
    brokers = tuple(BrokerMetadata(b.id, b.host, b.port) for b in response.brokers)
    return Metadata(brokers=brokers, streams=streams)


Fetch = Callable[[Iterable[str]], Awaitable[api_pb2.FetchMetadataResponse]]


class MetadataCache:
    """Streams and brokers as last fetched.

    Args:
        fetch: Sends ``FetchMetadata`` for some streams (none = all) to any broker.
    """

    def __init__(self, fetch: Fetch) -> None:
        self._fetch = fetch
        self._streams: dict[str, StreamMetadata] = {}
        self._brokers: dict[str, BrokerMetadata] = {}
        self._refreshing: dict[str, asyncio.Future[None]] = {}

    def update(self, response: api_pb2.FetchMetadataResponse) -> Metadata:
        """Take in a ``FetchMetadata`` answer; streams reported unknown are forgotten."""
        metadata = to_metadata(response)
        for broker in metadata.brokers:
            self._brokers[broker.id] = broker
        for stream in response.streamMetadata:
            if stream.error != api_pb2.StreamMetadata.OK:
                self._streams.pop(stream.name, None)
        self._streams.update(metadata.streams)
        return metadata

    def forget(self, stream: str) -> None:
        """Drop what is known about ``stream`` (after it was deleted or changed)."""
        self._streams.pop(stream, None)

    @property
    def broker_addresses(self) -> list[str]:
        """Addresses of every known broker."""
        return [broker.address for broker in self._brokers.values()]

    async def refresh(self, stream: str) -> StreamMetadata:
        """Fetch ``stream``'s metadata again.

        Raises:
            StreamNotFoundError: The stream does not exist.
        """
        pending = self._refreshing.get(stream)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._refreshing[stream] = pending
            try:
                self.update(await self._fetch([stream]))
                pending.set_result(None)
            except BaseException as error:
                pending.set_exception(error)
                raise
            finally:
                del self._refreshing[stream]
                # Nobody else may be waiting; do not let the future log "never retrieved".
                if pending.done() and not pending.cancelled():
                    pending.exception()
        else:
            await asyncio.shield(pending)
        found = self._streams.get(stream)
        if found is None:
            raise StreamNotFoundError(f"no stream named {stream!r}")
        return found

    async def stream(self, stream: str) -> StreamMetadata:
        """``stream``'s metadata, from the cache or fetched."""
        found = self._streams.get(stream)
        return found if found is not None else await self.refresh(stream)

    async def partition_count(self, stream: str) -> int:
        """How many partitions ``stream`` has."""
        return len((await self.stream(stream)).partitions)

    async def leader_address(self, stream: str, partition: int) -> str | None:
        """Address of the broker leading ``stream``/``partition``; None when it has no leader.

        Raises:
            StreamNotFoundError: The stream does not exist.
            PartitionNotFoundError: The stream has no such partition.
        """
        metadata = await self.stream(stream)
        found = metadata.partitions.get(partition)
        if found is None:
            metadata = await self.refresh(stream)
            found = metadata.partitions.get(partition)
            if found is None:
                raise PartitionNotFoundError(
                    f"stream {stream!r} has no partition {partition} "
                    f"(it has {len(metadata.partitions)})"
                )
        broker = self._brokers.get(found.leader)
        return broker.address if broker is not None else None
