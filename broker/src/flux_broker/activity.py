"""The activity stream ``__activity``: every stream metadata change, as a message.

Liftbridge's activity stream (reference ``liftbridge-api.md`` §1.9, ``liftbridge-server.md``
§4.2): with ``activity.stream.enabled``, the broker creates the internal stream ``__activity``
(one partition, subject ``<namespace>.activity``) and appends one serialized
``ActivityStreamEvent`` per stream change -- CREATE_STREAM, DELETE_STREAM, PAUSE_STREAM,
RESUME_STREAM, SET_STREAM_READONLY -- as the value of a record. Anyone can subscribe to it like
any stream; the consumer-group events come with consumer groups.

**How an event gets there.** The metadata store writes each event into its outbox in the
same transaction as the change (:mod:`flux_broker.metadata.activity`), with the change's
metadata index as the event id. :class:`ActivityPublisher` runs as one task: woken after each
change (and every :data:`POLL_INTERVAL_S` regardless), it appends the pending events in id
order, in batches of up to :data:`BATCH_EVENTS`, straight to the ``__activity`` log, then
applies ``ActivityPublished`` so the store forgets them. The guarantees follow:

- *at least once*: an event leaves the outbox only after its append returned, i.e. after the
  log's sync policy was met; a crash in between appends it again after the restart;
- *ids strictly increasing, never reused*: they are metadata indexes;
- *in order*: one task publishes, oldest first. Consumers drop duplicates by id.

A failed append (a full disk, say) is logged and retried with a bounded exponential backoff;
the metadata changes themselves never wait for the activity stream.

The ack policy and timeout of Liftbridge's publisher (``activity.stream.publish.*``) are
accepted: this broker appends to its own log, so every policy means "written by the leader,
which is the whole ISR", and the timeout bounds each append.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from flux_broker.clock import Clock, SystemClock
from flux_broker.log.format import NewRecord
from flux_broker.metadata import (
    ActivityEvent,
    ActivityOp,
    ActivityPublished,
    AppliedCommand,
    CreateStream,
    MetadataStore,
    PartitionAssignment,
    StreamConfig,
)
from flux_broker.nats.subjects import ACTIVITY_STREAM, InvalidSubjectError, validate_subject
from flux_broker.streams.live import PartitionState
from flux_broker.streams.manager import StreamManager
from flux_proto import api_pb2

__all__ = [
    "ACTIVITY_SUBJECT_SUFFIX",
    "BATCH_EVENTS",
    "POLL_INTERVAL_S",
    "ActivityPublisher",
    "encode_event",
    "ensure_activity_stream",
]

_logger = logging.getLogger(__name__)

#: ``__activity`` listens on ``<namespace>.activity`` (Liftbridge's subject).
ACTIVITY_SUBJECT_SUFFIX: Final = "activity"
#: Most events appended with one write.
BATCH_EVENTS: Final = 256
#: The publisher looks for pending events at least this often, woken or not.
POLL_INTERVAL_S: Final = 5.0
#: First and longest wait before retrying a failed publish.
RETRY_INITIAL_S: Final = 0.1
RETRY_MAX_S: Final = 10.0

_OPS: Final = {
    ActivityOp.CREATE_STREAM: api_pb2.CREATE_STREAM,
    ActivityOp.DELETE_STREAM: api_pb2.DELETE_STREAM,
    ActivityOp.PAUSE_STREAM: api_pb2.PAUSE_STREAM,
    ActivityOp.RESUME_STREAM: api_pb2.RESUME_STREAM,
    ActivityOp.SET_STREAM_READONLY: api_pb2.SET_STREAM_READONLY,
    ActivityOp.JOIN_CONSUMER_GROUP: api_pb2.JOIN_CONSUMER_GROUP,
    ActivityOp.LEAVE_CONSUMER_GROUP: api_pb2.LEAVE_CONSUMER_GROUP,
}


def encode_event(event: ActivityEvent) -> bytes:
    """The serialized ``ActivityStreamEvent`` of ``event``: the value of its record."""
    message = api_pb2.ActivityStreamEvent(id=event.id, op=_OPS[event.op])
    partitions = list(event.partitions)
    match event.op:
        case ActivityOp.CREATE_STREAM:
            message.createStreamOp.stream = event.stream
            message.createStreamOp.partitions.extend(partitions)
        case ActivityOp.DELETE_STREAM:
            message.deleteStreamOp.stream = event.stream
        case ActivityOp.PAUSE_STREAM:
            message.pauseStreamOp.stream = event.stream
            message.pauseStreamOp.partitions.extend(partitions)
            message.pauseStreamOp.resumeAll = event.resume_all
        case ActivityOp.RESUME_STREAM:
            message.resumeStreamOp.stream = event.stream
            message.resumeStreamOp.partitions.extend(partitions)
        case ActivityOp.SET_STREAM_READONLY:
            message.setStreamReadonlyOp.stream = event.stream
            message.setStreamReadonlyOp.partitions.extend(partitions)
            message.setStreamReadonlyOp.readonly = event.readonly
        case ActivityOp.JOIN_CONSUMER_GROUP:
            message.joinConsumerGroupOp.groupId = event.group
            message.joinConsumerGroupOp.consumerId = event.consumer
            message.joinConsumerGroupOp.streams.extend(event.streams)
        case ActivityOp.LEAVE_CONSUMER_GROUP:
            message.leaveConsumerGroupOp.groupId = event.group
            message.leaveConsumerGroupOp.consumerId = event.consumer
            message.leaveConsumerGroupOp.expired = event.expired
    return message.SerializeToString()


async def ensure_activity_stream(
    streams: StreamManager, *, enabled: bool, clock: Clock | None = None
) -> bool:
    """Create ``__activity`` if it is enabled and missing; return whether it is enabled.

    A ``__activity`` left from an earlier run with the stream enabled is kept when it is
    disabled now (its history stays readable); nothing is appended to it.

    Raises:
        ValueError: The namespace makes no valid subject; the message names the key.
    """
    if not enabled:
        if streams.stream(ACTIVITY_STREAM) is not None:
            _logger.info(
                "activity.stream.enabled is false: %s is kept but gets no new events",
                ACTIVITY_STREAM,
            )
        return False
    if streams.stream(ACTIVITY_STREAM) is not None:
        return True
    subject = f"{streams.namespace}.{ACTIVITY_SUBJECT_SUFFIX}"
    try:
        validate_subject(subject, partitions=1)
    except InvalidSubjectError as error:
        raise ValueError(f"clustering.namespace cannot name {ACTIVITY_STREAM}: {error}") from None
    await streams.create_stream(
        CreateStream(
            name=ACTIVITY_STREAM,
            subject=subject,
            replication_factor=1,
            partitions=(PartitionAssignment.single(streams.broker_id),),
            creation_timestamp_ns=(clock or SystemClock()).now_ns(),
            # The publisher appends to the log directly: it must stay open.
            config=StreamConfig(auto_pause_time_ms=0),
        )
    )
    return True


class ActivityPublisher:
    """The task that moves activity events from the metadata outbox to ``__activity``."""

    def __init__(
        self,
        store: MetadataStore,
        streams: StreamManager,
        *,
        append_timeout_s: float,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        """Describe the publisher; :meth:`start` runs it.

        Args:
            store: The metadata store, opened to record activity.
            streams: The stream manager holding ``__activity``.
            append_timeout_s: Bound on one append (``activity.stream.publish.timeout``).
            poll_interval_s: Longest sleep between looks at the outbox.
        """
        self._store = store
        self._streams = streams
        self._append_timeout_s = append_timeout_s
        self._poll_interval_s = poll_interval_s
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start publishing; pending events from before a restart go first."""
        self._streams.on_applied(self.wake)
        self._task = asyncio.create_task(self._run(), name="activity-publisher")

    def wake(self, _applied: AppliedCommand | None = None) -> None:
        """Look at the outbox now (a metadata change was applied)."""
        self._wake.set()

    async def close(self) -> None:
        """Stop the task; events not yet published stay in the outbox for the next start."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        retry_s = RETRY_INITIAL_S
        while True:
            try:
                while await self._publish_pending():
                    pass
                retry_s = RETRY_INITIAL_S
            except Exception as error:  # noqa: BLE001 - any failure is retried, never fatal
                _logger.warning(
                    "%s: could not publish activity events (%s); retrying in %.1fs",
                    ACTIVITY_STREAM,
                    str(error) or type(error).__name__,
                    retry_s,
                )
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, RETRY_MAX_S)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_interval_s)
            self._wake.clear()

    async def _publish_pending(self) -> bool:
        """Publish one batch of pending events; return whether there was any."""
        events = await self._store.pending_activity(BATCH_EVENTS)
        if not events:
            return False
        live = self._streams.partition(ACTIVITY_STREAM, 0)
        if live is None or live.state is not PartitionState.ACTIVE:
            raise RuntimeError(f"{ACTIVITY_STREAM} partition 0 is not open")
        log = live.log
        records = [NewRecord(value=encode_event(event)) for event in events]
        # Shielded: an append is never abandoned halfway. After a timeout it may still land,
        # and the retry appends the events again -- a duplicate, which at-least-once allows.
        result = await asyncio.wait_for(asyncio.shield(log.append(records)), self._append_timeout_s)
        # A cluster of one: what the leader wrote is on the whole ISR, so committed.
        log.set_high_watermark(result.last_offset)
        await self._store.apply(ActivityPublished(through_id=events[-1].id))
        return True
