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
  end with NOT_FOUND), rename the stream's directory to ``.deleted-<nuid>`` (one atomic step)
  and remove it. A create never adopts a directory left under its name: it removes it first,
  so a stream created again starts empty.
- **Recover** (start-up): remove leftover ``.deleted-*`` directories; move the directory of a
  stream the metadata does not know to ``<data.dir>/orphans/`` with an error in the log (never
  delete it: a lost or restored ``metadata.db`` must not become silent data loss); open every
  partition's log (crash recovery of the log itself is :mod:`flux_broker.log.recovery`), set
  the HW to the recovered newest offset (the ISR is this broker alone) and the leader epoch
  from the metadata, and only once every log of a stream is open start its leaders.

Admin operations are serialised by one lock; they are rare and each is a few milliseconds. Each
runs as a task of the manager that the RPC awaits through :func:`asyncio.shield`, so a client
that gives up (a deadline) never leaves one half done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from nats.aio.client import Client
from nats.nuid import NUID

from flux_broker.clock import Clock, SystemClock
from flux_broker.log.commitlog import FileCommitLog
from flux_broker.log.config import LogConfig
from flux_broker.metadata import (
    CreateStream,
    DeleteStream,
    MetadataClosedError,
    MetadataError,
    MetadataStore,
    Partition,
    Stream,
    StreamConfig,
)
from flux_broker.streams.partition import Partition as PartitionLeader

__all__ = [
    "DELETED_PREFIX",
    "ORPHANS_DIR",
    "STREAMS_DIR",
    "LivePartition",
    "LiveStream",
    "StreamManager",
]

_logger = logging.getLogger(__name__)
_T = TypeVar("_T")

#: The directory under ``data.dir`` holding one directory per stream.
STREAMS_DIR: Final = "streams"
#: Prefix of a deleted stream's directory while it is being removed. Stream names cannot start
#: with ``.``, so it never clashes with a stream.
DELETED_PREFIX: Final = ".deleted-"
#: The directory under ``data.dir`` where start-up moves stream data the metadata does not know.
ORPHANS_DIR: Final = "orphans"

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
        self._admin_tasks: set[asyncio.Task[Any]] = set()
        self._orphans_dir = data_dir / ORPHANS_DIR
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
        await asyncio.to_thread(self._sweep, {stream.name for stream in streams})
        for stream in streams:
            self._streams[stream.name] = await self._open_stream(stream)
        return self.partition_count()

    def _sweep(self, known: set[str]) -> None:
        """Finish interrupted deletes; move data no stream owns aside, never delete it."""
        for entry in sorted(self._streams_dir.iterdir()):
            if entry.name in known or not entry.is_dir():
                continue
            if entry.name.startswith(DELETED_PREFIX):
                _logger.info("removing %s, left by a delete that did not finish", entry)
                shutil.rmtree(entry)
                continue
            # Deleting it would turn a lost or rolled-back metadata.db into silent data loss.
            target = self._orphans_dir / f"{entry.name}-{_unique()}"
            _logger.error(
                "%s holds data of stream %r, which the metadata does not know: moved to %s "
                "(a lost or restored metadata.db, or another broker's directory?)",
                entry,
                entry.name,
                target,
            )
            self._orphans_dir.mkdir(exist_ok=True)
            entry.rename(target)

    async def _open_stream(self, stream: Stream) -> LiveStream:
        """Open every partition's log, then start the leaders (none acks before all opened)."""
        live = LiveStream(stream)
        config = stream_log_config(self.log_config, stream.config)
        try:
            for meta in stream.partitions:
                live.partitions.append(await self._open_partition(stream, meta, config))
            for partition in live.partitions:
                await partition.leader.start()
        except BaseException:
            await self._close_stream(live)
            raise
        return live

    async def _open_partition(
        self, stream: Stream, meta: Partition, config: LogConfig
    ) -> LivePartition:
        directory = self._streams_dir / stream.name / str(meta.id)
        log = await FileCommitLog.open(directory, config, self._clock)
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
            optimistic_concurrency=bool(stream.config.optimistic_concurrency_control),
        )
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

        The caller validated the request; the store checks the rest. The work runs as a task
        of the manager: cancelling the caller (a client's deadline) does not stop it halfway,
        so the metadata and the running partitions never disagree.

        Returns:
            The new stream.

        Raises:
            flux_broker.metadata.StreamExistsError: A stream of that name exists.
            flux_broker.metadata.MetadataError: The store failed; nothing was created.
            OSError: The logs could not be opened; the stream was deleted again.
        """
        return await self._run(self._create_stream(command), f"create-stream-{command.name}")

    async def delete_stream(self, name: str) -> None:
        """Delete a stream: metadata first, then leaders, logs and data (a task, as create).

        Raises:
            flux_broker.metadata.StreamNotFoundError: No stream of that name.
            flux_broker.metadata.MetadataError: The store failed; nothing was deleted.
        """
        await self._run(self._delete_stream(name), f"delete-stream-{name}")

    async def _run(self, work: Coroutine[Any, Any, _T], name: str) -> _T:
        task = asyncio.create_task(work, name=name)
        self._admin_tasks.add(task)
        task.add_done_callback(self._admin_tasks.discard)
        # The task finishes even if the caller is cancelled; its outcome is logged then.
        task.add_done_callback(_log_unobserved_failure)
        return await asyncio.shield(task)

    async def _create_stream(self, command: CreateStream) -> LiveStream:
        async with self._lock:
            self._check_open()
            await self._store.apply(command)
            stream = await self._store.get_stream(command.name)
            assert stream is not None, command.name
            try:
                # A directory under the new name can only be a leftover (a delete that could
                # not remove it): a new stream never adopts old records.
                await asyncio.to_thread(self._remove_directory, stream.name)
                live = await self._open_stream(stream)
            except BaseException:
                _logger.exception("stream %r: could not open its logs; deleting it", command.name)
                await self._undo_create(command.name)
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

    async def _delete_stream(self, name: str) -> None:
        async with self._lock:
            self._check_open()
            await self._store.apply(DeleteStream(name))
            live = self._streams.pop(name, None)
            if live is not None:
                for partition in live.partitions:
                    partition.deleted = True
                await self._close_stream(live)
            try:
                await asyncio.to_thread(self._remove_directory, name)
            except OSError:
                # The metadata says deleted; a create of the name removes what is left.
                _logger.exception("stream %r: deleted, but its data could not be removed", name)
            _logger.info("deleted stream %r", name)

    def _remove_directory(self, name: str) -> None:
        """Remove a stream's directory: one atomic rename out of the way, then the files."""
        directory = self._streams_dir / name
        if not directory.exists():
            return
        # Not named after the stream: a 249-character name plus a suffix would pass NAME_MAX.
        doomed = self._streams_dir / f"{DELETED_PREFIX}{_unique()}"
        directory.rename(doomed)
        _fsync_directory(self._streams_dir)
        shutil.rmtree(doomed)

    def _check_open(self) -> None:
        if self._closed:
            # The same condition as a closed store: the broker is shutting down.
            raise MetadataClosedError("the broker is shutting down")

    # -- shutdown ------------------------------------------------------------------------

    async def _close_stream(self, live: LiveStream) -> None:
        await _close_partitions(live.partitions)

    async def close(self) -> None:
        """Stop every leader (in-flight appends and acks finish), then close every log.

        Admin operations in progress finish first. A partition that fails to stop or close is
        logged; the others are closed regardless.
        """
        async with self._lock:
            self._closed = True
            streams, self._streams = list(self._streams.values()), {}
        await _close_partitions([partition for live in streams for partition in live.partitions])


async def _close_partitions(partitions: Sequence[LivePartition]) -> None:
    stops = await asyncio.gather(
        *(partition.leader.stop() for partition in partitions), return_exceptions=True
    )
    closes = await asyncio.gather(
        *(partition.log.close() for partition in partitions), return_exceptions=True
    )
    for partition, stop, close in zip(partitions, stops, closes, strict=True):
        for what, outcome in (("stop its leader", stop), ("close its log", close)):
            if isinstance(outcome, BaseException):
                _logger.error(
                    "stream %r partition %d: could not %s",
                    partition.stream,
                    partition.id,
                    what,
                    exc_info=outcome,
                )


def _log_unobserved_failure(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    error = task.exception()  # retrieved, so asyncio does not report it as lost
    if error is not None and not isinstance(error, MetadataError):
        _logger.debug("%s failed: %r", task.get_name(), error)


def _unique() -> str:
    return NUID().next().decode()


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
