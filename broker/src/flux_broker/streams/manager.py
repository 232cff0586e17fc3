"""The stream manager: metadata, logs on disk and partition leaders kept in step.

A stream exists when the metadata store says so. For each of its partitions this broker leads
(all of them, in a cluster of one: DESIGN.md §4.3) the manager holds a
:class:`~flux_broker.streams.live.LivePartition`: while active, the open commit log in
``<data.dir>/streams/<stream>/<partition>/`` and the leader that feeds it from NATS. The gRPC
handlers find partitions here, without touching SQLite.

Order of effects, so that a crash at any point leaves a state start-up repairs:

- **Create**: apply ``CreateStream`` (durable), then open the logs and start the leaders. If
  that fails, the stream is deleted again and the error is raised. A crash in between is
  repaired by :meth:`StreamManager.recover`, which opens every stream the metadata names.
- **Delete**: apply ``DeleteStream`` (durable), stop the leaders, close the logs (subscribers
  end with NOT_FOUND), rename the stream's directory to ``.deleted-<nuid>`` (one atomic step)
  and remove it. A create never adopts a directory left under its name: it removes it first,
  so a stream created again starts empty.
- **Pause**: apply ``PauseStream`` (durable), mark the partitions paused (from then on a
  gRPC publish resumes them before it publishes), stop their leaders -- draining the NATS
  subscription, so what NATS delivered before is stored and acked -- and close their logs
  (subscribers end with PARTITION_PAUSED). A crash in between leaves them paused in the
  metadata, and start-up does not open them.
- **Resume**: apply ``ResumeStream``, open the logs (HW = newest, leader epoch from the
  metadata), start the leaders (subscribed before the resume returns, so a publish that
  follows is received), then mark them active. If a log cannot be opened the partitions are
  paused again and the error raised.
- **Read-only**: apply ``SetStreamReadonly``; the leaders drop new messages from then on and
  waiting subscribers are woken to find the end.
- **Recover** (start-up): remove leftover ``.deleted-*`` directories; move the directory of a
  stream the metadata does not know to ``<data.dir>/orphans/`` with an error in the log (never
  delete it: a lost or restored ``metadata.db`` must not become silent data loss); open every
  partition's log that is not paused (crash recovery of the log itself is
  :mod:`flux_broker.log.recovery`), set the HW to the recovered newest offset (the ISR is this
  broker alone) and the leader epoch from the metadata, and only once every log of a stream is
  open start its leaders. A paused partition stays closed; its offsets are read from its HW
  checkpoint.

Admin operations (pause and resume included) are serialised by one lock; they are rare and
each is a few milliseconds. Each runs as a task of the manager that the caller awaits through
:func:`asyncio.shield`, so a client that gives up (a deadline) never leaves one half done.
Auto-pause (:mod:`flux_broker.streams.auto_pause`) runs one timer task per active partition.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from nats.aio.client import Client

from flux_broker.clock import Clock, SystemClock
from flux_broker.log.config import LogConfig
from flux_broker.logs import partition_fields
from flux_broker.metadata import (
    AppliedCommand,
    Command,
    CreateStream,
    DeleteStream,
    MetadataClosedError,
    MetadataError,
    MetadataStore,
    PartitionNotFoundError,
    PauseStream,
    ResumeStream,
    SetStreamReadonly,
    StreamNotFoundError,
)
from flux_broker.streams.auto_pause import AutoPause
from flux_broker.streams.live import LivePartition, LiveStream, PartitionState
from flux_broker.streams.runner import PartitionRunner
from flux_broker.streams.storage import (
    DELETED_PREFIX,
    ORPHANS_DIR,
    STREAMS_DIR,
    remove_directory,
    stream_log_config,
    sweep,
)

if TYPE_CHECKING:
    from flux_broker.metrics import BrokerMetrics

__all__ = [
    "DELETED_PREFIX",
    "ORPHANS_DIR",
    "STREAMS_DIR",
    "LivePartition",
    "LiveStream",
    "PartitionState",
    "StreamManager",
    "stream_log_config",
]

_logger = logging.getLogger(__name__)
_T = TypeVar("_T")

#: An empty partition list: every partition of the stream.
_ALL: Final[tuple[int, ...]] = ()


class StreamManager:
    """Streams and their partitions: created, recovered, paused, looked up, deleted, closed."""

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
        auto_pause_time_s: float = 0.0,
        auto_pause_disable_if_subscribers: bool = False,
        metrics: BrokerMetrics | None = None,
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
            auto_pause_time_s: ``streams.auto.pause.time`` (0 = off); streams override it.
            auto_pause_disable_if_subscribers: ``streams.auto.pause.disable.if.subscribers``.
            metrics: The broker's metrics (recovery, acks); default: none.
        """
        self.broker_id = broker_id
        self.namespace = namespace
        self.log_config = log_config
        self._streams_dir = data_dir / STREAMS_DIR
        self._orphans_dir = data_dir / ORPHANS_DIR
        self._store = store
        self._clock: Clock = clock or SystemClock()
        self._runner = PartitionRunner(
            streams_dir=self._streams_dir,
            nc=nc,
            namespace=namespace,
            log_config=log_config,
            batch_max_messages=batch_max_messages,
            clock=self._clock,
            auto_pause_time_s=auto_pause_time_s,
            auto_pause_disable_if_subscribers=auto_pause_disable_if_subscribers,
            pauser=self._auto_pauser,
            metrics=metrics,
        )
        self._streams: dict[str, LiveStream] = {}
        self._lock = asyncio.Lock()
        self._admin_tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._applied_listeners: list[Callable[[AppliedCommand], None]] = []

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
        """Open every stream the metadata names and start the leaders of the unpaused partitions.

        Returns:
            The number of partitions recovered, paused ones included.

        Raises:
            OSError: A partition directory cannot be used.
            flux_broker.metadata.MetadataError: The store failed.
        """
        self._streams_dir.mkdir(parents=True, exist_ok=True)
        streams = await self._store.list_streams()
        known = {stream.name for stream in streams}
        await asyncio.to_thread(sweep, self._streams_dir, self._orphans_dir, known)
        for stream in streams:
            self._streams[stream.name] = await self._runner.open_stream(stream)
        return self.partition_count()

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

    async def pause(
        self, name: str, partitions: tuple[int, ...] = _ALL, *, resume_all: bool = False
    ) -> None:
        """Pause partitions of a stream (all when ``partitions`` is empty); a task, as create.

        Args:
            name: The stream.
            partitions: Partition ids without duplicates; empty means all.
            resume_all: Remembered on the stream: resuming one partition later resumes all.

        Raises:
            flux_broker.metadata.StreamNotFoundError: No stream of that name.
            flux_broker.metadata.PartitionNotFoundError: An id is not one of its partitions.
            flux_broker.metadata.MetadataError: The store failed; nothing was paused.
        """
        await self._run(self._pause(name, partitions, resume_all), f"pause-stream-{name}")

    async def resume(self, name: str, partition_id: int) -> None:
        """Resume a paused partition, or every paused one if the stream was paused so.

        Publishing and subscribing with ``resume`` call this; when the partition is not paused
        (any more) it returns at once. When it returns, the resumed leaders are subscribed.

        Raises:
            flux_broker.metadata.StreamNotFoundError: No stream of that name.
            flux_broker.metadata.PartitionNotFoundError: No partition with that id.
            flux_broker.metadata.MetadataError: The store failed; nothing was resumed.
            OSError: A log could not be opened; the partitions stay paused.
        """
        await self._run(self._resume(name, partition_id), f"resume-stream-{name}")

    async def set_readonly(
        self, name: str, partitions: tuple[int, ...] = _ALL, *, readonly: bool
    ) -> None:
        """Set or clear the read-only flag of partitions (all when empty); a task, as create.

        Raises:
            flux_broker.metadata.StreamNotFoundError: No stream of that name.
            flux_broker.metadata.PartitionNotFoundError: An id is not one of its partitions.
            flux_broker.metadata.MetadataError: The store failed; nothing changed.
        """
        await self._run(self._set_readonly(name, partitions, readonly), f"readonly-{name}")

    def on_applied(self, listener: Callable[[AppliedCommand], None]) -> None:
        """Call ``listener`` after each metadata command the manager applies.

        The activity publisher uses it to wake up. It runs on the event loop and must neither
        block nor raise.
        """
        self._applied_listeners.append(listener)

    def notify_applied(self, applied: AppliedCommand) -> None:
        """Tell the listeners of :meth:`on_applied` about a command applied elsewhere.

        The group coordinator stores its own commands and calls this, so the activity
        publisher wakes for joins and leaves too.
        """
        for listener in self._applied_listeners:
            listener(applied)

    async def _apply(self, command: Command) -> AppliedCommand:
        applied = await self._store.apply(command)
        self.notify_applied(applied)
        return applied

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
            await self._apply(command)
            stream = await self._store.get_stream(command.name)
            assert stream is not None, command.name
            try:
                # A directory under the new name can only be a leftover (a delete that could
                # not remove it): a new stream never adopts old records.
                await asyncio.to_thread(remove_directory, self._streams_dir, stream.name)
                live = await self._runner.open_stream(stream)
            except BaseException:
                _logger.exception(
                    "stream %r: could not open its logs; deleting it",
                    command.name,
                    extra=partition_fields(command.name),
                )
                await self._undo_create(command.name)
                raise
            self._streams[stream.name] = live
            _logger.info(
                "created stream %r on subject %r with %d partition(s)",
                stream.name,
                stream.subject,
                len(stream.partitions),
                extra=partition_fields(stream.name),
            )
            return live

    async def _undo_create(self, name: str) -> None:
        try:
            await self._apply(DeleteStream(name))
            await asyncio.to_thread(remove_directory, self._streams_dir, name)
        except Exception:
            _logger.exception(
                "stream %r: could not undo its creation", name, extra=partition_fields(name)
            )

    async def _delete_stream(self, name: str) -> None:
        async with self._lock:
            self._check_open()
            await self._apply(DeleteStream(name))
            live = self._streams.pop(name, None)
            if live is not None:
                await self._runner.deactivate(live.partitions, PartitionState.DELETED)
            try:
                await asyncio.to_thread(remove_directory, self._streams_dir, name)
            except OSError:
                # The metadata says deleted; a create of the name removes what is left.
                _logger.exception(
                    "stream %r: deleted, but its data could not be removed",
                    name,
                    extra=partition_fields(name),
                )
            _logger.info("deleted stream %r", name, extra=partition_fields(name))

    # -- pause, resume, read-only --------------------------------------------------------

    async def _refresh(self, name: str) -> LiveStream:
        """Take the stream's metadata, just applied, into its live objects."""
        stream = await self._store.get_stream(name)
        live = self._streams.get(name)
        assert stream is not None, name
        assert live is not None, name
        live.metadata = stream
        for meta in stream.partitions:
            live.partitions[meta.id].metadata = meta
        return live

    async def _pause(
        self,
        name: str,
        partitions: tuple[int, ...],
        resume_all: bool,
        still_due: Callable[[], bool] | None = None,
    ) -> None:
        async with self._lock:
            self._check_open()
            if still_due is not None and not still_due():
                return  # an auto-pause whose partition got busy meanwhile
            await self._apply(
                PauseStream(
                    name=name,
                    partitions=partitions,
                    resume_all=resume_all,
                    timestamp_ns=self._clock.now_ns(),
                )
            )
            live = await self._refresh(name)
            doomed = [
                p for p in live.partitions if p.metadata.paused and p.state is PartitionState.ACTIVE
            ]
            for partition in doomed:
                partition.pauses += 1
            # Marked paused before anything is awaited: a gRPC publish that sees the mark
            # resumes the partition first (after this pause); one that did not see it published
            # on the broker's connection before the drain's unsubscribe, so the leader gets it.
            await self._runner.deactivate(doomed, PartitionState.PAUSED)
            if doomed:
                _logger.info(
                    "paused stream %r partition(s) %s",
                    name,
                    ", ".join(str(p.id) for p in doomed),
                    extra=partition_fields(name),
                )

    async def _resume(self, name: str, partition_id: int) -> None:
        async with self._lock:
            self._check_open()
            live = self._streams.get(name)
            if live is None:
                raise StreamNotFoundError(name)
            if not 0 <= partition_id < len(live.partitions):
                raise PartitionNotFoundError(name, partition_id, len(live.partitions))
            if not live.partitions[partition_id].paused:
                return  # resumed meanwhile (another publish won the race)
            ids: tuple[int, ...] = (partition_id,)
            if live.metadata.resume_all:
                ids = tuple(p.id for p in live.partitions if p.paused)
            command = ResumeStream(name=name, partitions=ids, timestamp_ns=self._clock.now_ns())
            await self._apply(command)
            live = await self._refresh(name)
            targets = [live.partitions[i] for i in ids]
            try:
                await self._runner.activate(live, targets)
            except BaseException:
                _logger.exception(
                    "stream %r: could not resume partition(s) %s",
                    name,
                    ids,
                    extra=partition_fields(name),
                )
                await self._undo_resume(live, targets)
                raise
            _logger.info(
                "resumed stream %r partition(s) %s",
                name,
                ", ".join(map(str, ids)),
                extra=partition_fields(name),
            )

    async def _undo_resume(self, live: LiveStream, targets: list[LivePartition]) -> None:
        await self._runner.deactivate(targets, PartitionState.PAUSED)
        try:
            await self._apply(
                PauseStream(
                    name=live.metadata.name,
                    partitions=tuple(p.id for p in targets),
                    resume_all=live.metadata.resume_all,
                    timestamp_ns=self._clock.now_ns(),
                )
            )
            await self._refresh(live.metadata.name)
        except Exception:
            _logger.exception(
                "stream %r: could not record the failed resume",
                live.metadata.name,
                extra=partition_fields(live.metadata.name),
            )

    async def _set_readonly(self, name: str, partitions: tuple[int, ...], readonly: bool) -> None:
        async with self._lock:
            self._check_open()
            command = SetStreamReadonly(
                name=name,
                partitions=partitions,
                readonly=readonly,
                timestamp_ns=self._clock.now_ns(),
            )
            await self._apply(command)
            before = {p.id: p.readonly for p in self._streams[name].partitions}
            live = await self._refresh(name)
            for partition in live.partitions:
                if partition.readonly == before[partition.id]:
                    continue
                if partition.state is PartitionState.ACTIVE:
                    partition.leader.readonly = partition.readonly
                partition.notify()  # waiting subscribers re-check for the read-only end

    def _auto_pauser(
        self, partition: LivePartition, policy: AutoPause
    ) -> Callable[[], Coroutine[Any, Any, None]]:
        """The auto-pause timer's way to ask for a pause, re-checked under the lock."""
        pauses = partition.pauses

        def still_due() -> bool:
            return (
                partition.state is PartitionState.ACTIVE
                and partition.pauses == pauses
                and policy.due(partition, self._clock)
            )

        async def pause() -> None:
            work = self._pause(partition.stream, (partition.id,), False, still_due)
            await self._run(work, f"auto-pause-{partition.stream}-{partition.id}")

        return pause

    def _check_open(self) -> None:
        if self._closed:
            # The same condition as a closed store: the broker is shutting down.
            raise MetadataClosedError("the broker is shutting down")

    # -- shutdown ------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every leader (in-flight appends and acks finish), then close every log.

        Admin operations in progress finish first. A partition that fails to stop or close is
        logged; the others are closed regardless.
        """
        async with self._lock:
            self._closed = True
            streams, self._streams = list(self._streams.values()), {}
        partitions = [partition for live in streams for partition in live.partitions]
        timers = [p.auto_pause for p in partitions if p.auto_pause is not None]
        await self._runner.deactivate(partitions, PartitionState.CLOSED)
        await asyncio.gather(*timers, return_exceptions=True)


def _log_unobserved_failure(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    error = task.exception()  # retrieved, so asyncio does not report it as lost
    if error is not None and not isinstance(error, MetadataError):
        _logger.debug("%s failed: %r", task.get_name(), error)
