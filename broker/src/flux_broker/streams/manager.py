"""The stream manager: metadata, logs on disk and partition leaders kept in step.

A stream exists when the metadata store says so. For each of its partitions this broker leads
(all of them, in a cluster of one: DESIGN.md §4.3) the manager holds a :class:`LivePartition`:
the open commit log in ``<data.dir>/streams/<stream>/<partition>/`` and the leader that feeds
it from NATS. The gRPC handlers find partitions here, without touching SQLite.

Order of effects, so that a crash at any point leaves a state start-up repairs:

- **Create**: apply ``CreateStream`` (durable), then open the logs and start the leaders. If
  that fails, the stream is deleted again and the error is raised. A crash in between is
  repaired by :meth:`StreamManager.recover`, which opens every stream the metadata names.
- **Delete**: apply ``DeleteStream`` (durable), stop the leaders, close the logs (subscribers
  end with NOT_FOUND), rename the stream's directory to ``.deleted-<stream>-<n>`` (one atomic
  step, so a stream created again under that name starts empty) and remove it. Start-up
  removes leftover ``.deleted-*`` directories and directories of streams the metadata does not
  know (a crash between the apply and the rename).
- **Recover** (start-up): open every partition's log (crash recovery of the log itself is
  :mod:`flux_broker.log.recovery`), set the HW to the recovered newest offset (the ISR is this
  broker alone) and the leader epoch from the metadata, then start the leaders.

Admin operations are serialised by one lock; they are rare and each is a few milliseconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from nats.aio.client import Client

from flux_broker.clock import Clock, SystemClock
from flux_broker.log.commitlog import FileCommitLog
from flux_broker.log.config import LogConfig
from flux_broker.metadata import (
    CreateStream,
    DeleteStream,
    MetadataClosedError,
    MetadataStore,
    Partition,
    Stream,
    StreamConfig,
)
from flux_broker.streams.partition import Partition as PartitionLeader

__all__ = ["DELETED_PREFIX", "STREAMS_DIR", "LivePartition", "LiveStream", "StreamManager"]

_logger = logging.getLogger(__name__)

#: The directory under ``data.dir`` holding one directory per stream.
STREAMS_DIR: Final = "streams"
#: Prefix of a deleted stream's directory while it is being removed. Stream names cannot start
#: with ``.``, so it never clashes with a stream.
DELETED_PREFIX: Final = ".deleted-"

_MS_PER_S: Final = 1000.0


def stream_log_config(server: LogConfig, overrides: StreamConfig) -> LogConfig:
    """The commit-log settings of a stream: the server's, with the stream's overrides.

    Args:
        server: The server-wide settings (the ``streams.*`` keys).
        overrides: What the stream's CreateStreamRequest set (durations in ms).

    Returns:
        The stream's settings.

    Raises:
        ValueError: An override is out of the log's range (for example a zero cleaner
            interval); the message names the setting.
    """
    changes: dict[str, object] = {}
    if overrides.retention_max_bytes is not None:
        changes["retention_max_bytes"] = overrides.retention_max_bytes
    if overrides.retention_max_messages is not None:
        changes["retention_max_messages"] = overrides.retention_max_messages
    if overrides.retention_max_age_ms is not None:
        changes["retention_max_age_s"] = overrides.retention_max_age_ms / _MS_PER_S
    if overrides.cleaner_interval_ms is not None:
        changes["cleaner_interval_s"] = overrides.cleaner_interval_ms / _MS_PER_S
    if overrides.segment_max_bytes is not None:
        changes["segment_max_bytes"] = overrides.segment_max_bytes
    if overrides.segment_max_age_ms is not None:
        changes["segment_max_age_s"] = overrides.segment_max_age_ms / _MS_PER_S
    if overrides.compact_enabled is not None:
        changes["compact_enabled"] = overrides.compact_enabled
    return dataclasses.replace(server, **changes)  # type: ignore[arg-type]  # checked by LogConfig


@dataclass(slots=True, eq=False)
class LivePartition:
    """A partition this broker serves: metadata, open log and leader.

    Attributes:
        stream: The stream's name.
        id: The partition id.
        subject: The partition's NATS subject.
        metadata: Its metadata (leader, replicas, ISR, epochs) as last applied.
        log: Its open commit log.
        leader: The NATS ingest of the partition.
        deleted: Set when the stream is deleted; readers that end then answer NOT_FOUND.
    """

    stream: str
    id: int
    subject: str
    metadata: Partition
    log: FileCommitLog
    leader: PartitionLeader
    deleted: bool = False


@dataclass(slots=True, eq=False)
class LiveStream:
    """A stream this broker serves.

    Attributes:
        metadata: The stream's metadata as last applied.
        partitions: Its partitions, by id.
    """

    metadata: Stream
    partitions: list[LivePartition] = field(default_factory=list)


class StreamManager:
    """Streams and their partitions: created, recovered, looked up, deleted, closed."""

    def __init__(
        self,
        *,
        data_dir: Path,
        store: MetadataStore,
        nc: Client,
        broker_id: str,
        namespace: str,
        log_config: LogConfig,
        batch_max_messages: int,
        clock: Clock | None = None,
    ) -> None:
        """Describe the manager; call :meth:`recover` before serving.

        Args:
            data_dir: The broker's data directory (``data.dir``).
            store: The open metadata store.
            nc: The broker's connected NATS client.
            broker_id: This broker's id (``clustering.server.id``).
            namespace: The NATS namespace (``clustering.namespace``).
            log_config: Server-wide commit-log settings; streams override some.
            batch_max_messages: Most NATS messages appended with one write.
            clock: Time source (default: the system clock).
        """
        self.broker_id = broker_id
        self.namespace = namespace
        self.log_config = log_config
        self._streams_dir = data_dir / STREAMS_DIR
        self._store = store
        self._nc = nc
        self._batch_max_messages = batch_max_messages
        self._clock: Clock = clock or SystemClock()
        self._streams: dict[str, LiveStream] = {}
        self._lock = asyncio.Lock()
        self._deleted_serial = itertools.count()
        self._closed = False

    # -- lookups -------------------------------------------------------------------------

    def stream(self, name: str) -> LiveStream | None:
        """The stream called ``name``, or ``None``."""
        return self._streams.get(name)

    def streams(self) -> Iterator[LiveStream]:
        """Every stream, ordered by name."""
        for name in sorted(self._streams):
            yield self._streams[name]

    def partition(self, stream: str, partition_id: int) -> LivePartition | None:
        """One partition, or ``None`` if the stream or the partition does not exist."""
        live = self._streams.get(stream)
        if live is None or not 0 <= partition_id < len(live.partitions):
            return None
        return live.partitions[partition_id]

    def partition_count(self) -> int:
        """Partitions this broker holds, over all streams."""
        return sum(len(stream.partitions) for stream in self._streams.values())

    # -- start-up ------------------------------------------------------------------------

    async def recover(self) -> int:
        """Open every stream the metadata names and start its leaders.

        Returns:
            The number of partitions recovered.

        Raises:
            OSError: A partition directory cannot be used.
            flux_broker.metadata.MetadataError: The store failed.
        """
        self._streams_dir.mkdir(parents=True, exist_ok=True)
        streams = await self._store.list_streams()
        await asyncio.to_thread(self._remove_orphans, {stream.name for stream in streams})
        for stream in streams:
            self._streams[stream.name] = await self._open_stream(stream)
        return self.partition_count()

    def _remove_orphans(self, known: set[str]) -> None:
        for entry in sorted(self._streams_dir.iterdir()):
            if entry.name in known or not entry.is_dir():
                continue
            _logger.warning(
                "removing %s: no stream of that name in the metadata (left by a delete that "
                "did not finish)",
                entry,
            )
            shutil.rmtree(entry)

    async def _open_stream(self, stream: Stream) -> LiveStream:
        live = LiveStream(stream)
        config = stream_log_config(self.log_config, stream.config)
        try:
            for meta in stream.partitions:
                live.partitions.append(await self._open_partition(stream, meta, config))
        except BaseException:
            await self._close_stream(live)
            raise
        return live

    async def _open_partition(
        self, stream: Stream, meta: Partition, config: LogConfig
    ) -> LivePartition:
        directory = self._streams_dir / stream.name / str(meta.id)
        log = await FileCommitLog.open(directory, config, self._clock)
        try:
            # A cluster of one: everything written is on the whole ISR, so it is committed.
            log.set_high_watermark(log.newest_offset)
            if meta.leader_epoch > log.leader_epoch:
                log.set_leader_epoch(meta.leader_epoch)
            leader = PartitionLeader(
                stream=stream.name,
                partition_id=meta.id,
                subject=stream.subject,
                group=stream.group,
                log=log,
                nc=self._nc,
                namespace=self.namespace,
                record_max_bytes=config.record_max_bytes,
                batch_max_messages=self._batch_max_messages,
                clock=self._clock,
            )
            await leader.start()
        except BaseException:
            await log.close()
            raise
        return LivePartition(
            stream=stream.name,
            id=meta.id,
            subject=leader.subject,
            metadata=meta,
            log=log,
            leader=leader,
        )

    # -- admin ---------------------------------------------------------------------------

    async def create_stream(self, command: CreateStream) -> LiveStream:
        """Apply ``command``, then open the new stream's logs and start its leaders.

        The caller validated the request; the store checks the rest.

        Returns:
            The new stream.

        Raises:
            flux_broker.metadata.StreamExistsError: A stream of that name exists.
            flux_broker.metadata.MetadataError: The store failed; nothing was created.
            OSError: The logs could not be opened; the stream was deleted again.
        """
        async with self._lock:
            self._check_open()
            await self._store.apply(command)
            stream = await self._store.get_stream(command.name)
            assert stream is not None, command.name
            try:
                live = await self._open_stream(stream)
            except BaseException:
                _logger.exception("stream %r: could not open its logs; deleting it", command.name)
                await asyncio.shield(self._undo_create(command.name))
                raise
            self._streams[stream.name] = live
            _logger.info(
                "created stream %r on subject %r with %d partition(s)",
                stream.name,
                stream.subject,
                len(stream.partitions),
            )
            return live

    async def _undo_create(self, name: str) -> None:
        try:
            await self._store.apply(DeleteStream(name))
            await asyncio.to_thread(self._remove_directory, name)
        except Exception:
            _logger.exception("stream %r: could not undo its creation", name)

    async def delete_stream(self, name: str) -> None:
        """Delete a stream: metadata first, then leaders, logs and data.

        Raises:
            flux_broker.metadata.StreamNotFoundError: No stream of that name.
            flux_broker.metadata.MetadataError: The store failed; nothing was deleted.
        """
        async with self._lock:
            self._check_open()
            await self._store.apply(DeleteStream(name))
            live = self._streams.pop(name, None)
            if live is not None:
                for partition in live.partitions:
                    partition.deleted = True
                await self._close_stream(live)
            await asyncio.to_thread(self._remove_directory, name)
            _logger.info("deleted stream %r", name)

    def _remove_directory(self, name: str) -> None:
        directory = self._streams_dir / name
        if not directory.exists():
            return
        serial = next(self._deleted_serial)
        doomed = self._streams_dir / f"{DELETED_PREFIX}{name}-{os.getpid()}-{serial}"
        directory.rename(doomed)
        _fsync_directory(self._streams_dir)
        shutil.rmtree(doomed)

    def _check_open(self) -> None:
        if self._closed:
            # The same condition as a closed store: the broker is shutting down.
            raise MetadataClosedError("the broker is shutting down")

    # -- shutdown ------------------------------------------------------------------------

    async def _close_stream(self, live: LiveStream) -> None:
        await asyncio.gather(*(partition.leader.stop() for partition in live.partitions))
        await asyncio.gather(*(partition.log.close() for partition in live.partitions))

    async def close(self) -> None:
        """Stop every leader (in-flight appends and acks finish), then close every log."""
        async with self._lock:
            self._closed = True
            streams, self._streams = list(self._streams.values()), {}
        partitions = [partition for live in streams for partition in live.partitions]
        await asyncio.gather(*(partition.leader.stop() for partition in partitions))
        await asyncio.gather(*(partition.log.close() for partition in partitions))


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
