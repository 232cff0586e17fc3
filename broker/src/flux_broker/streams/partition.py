"""The leader of one partition: NATS messages on its subject in, records and acks out.

This is Liftbridge's leader write path (reference ``liftbridge-server.md`` §2.2) for a cluster
of one (DESIGN.md §4.3)::

    NATS ──(queue subscription: <subject>[.N], group)──▶ _on_message ──▶ bounded queue
         ──▶ ingest task: take what is there (≤ batch_max_messages, ≤ the log's batch bytes)
         ──▶ decode each message ─▶ ONE log.append() ─▶ HW := newest ─▶ acks to ack inboxes

Per NATS message (reference ``liftbridge-api.md`` §1.4, §1.6, §2):

- A type-0 envelope gives key, value and headers; its ack inbox, correlation id and ack policy
  stay in memory, only for the ack. Anything else is stored raw as the value, without key,
  headers or ack. A payload that starts with the envelope magic but is broken is stored raw
  too, as Liftbridge does, and counted in :attr:`PartitionStats.malformed_envelopes`.
- Either way the headers ``subject`` and ``reply`` (NATS subject and reply subject, the reply
  possibly empty) are added, replacing user headers of those names as Liftbridge's map does.
- A message whose NATS payload exceeds ``record_max_bytes`` (Liftbridge's
  ``clustering.replication.max.bytes``) is not stored; when it has an ack inbox it gets an ack
  with ``ackError=TOO_LARGE`` whatever its policy. So does a message whose *record* (payload plus
  the ``subject``/``reply`` headers and framing) would exceed the log's own record limit, which
  would otherwise fail the whole batch.
- On a stream with optimistic concurrency control, an envelope whose ``offset`` (the expected
  offset) is not -1 and not the offset the record would get is not stored; it gets an ack
  with ``ackError=INCORRECT_OFFSET`` whatever its policy. (The proto default 0 is a check,
  as in Liftbridge: clients that never set it can only write offset 0.)
- After the append returns (durable per the log's sync policy) the HW moves to the newest
  offset -- the ISR is this broker alone -- and every message with an ack inbox and policy
  LEADER or ALL gets one success ack, in offset order. NONE gets none.
- While the partition is read-only (:attr:`Partition.readonly`, Liftbridge's read-only log
  that rejects ``Append``), messages are not stored and get no ack, success or error; they are
  counted in :attr:`PartitionStats.readonly_rejected`. Publishers through gRPC are refused
  before anything reaches NATS; raw NATS publishers and racing publishes time out.
- If the append fails (:class:`~flux_broker.log.errors.LogError`, e.g. a full disk), no success
  ack is sent for that batch, the failure is logged and counted, and ingest goes on with the
  next batch: publishers time out and retry, as with Liftbridge.

Limits: the queue between NATS and the ingest task holds at most ``queue_max_messages``
messages and about ``queue_max_bytes`` bytes. When it is full, the NATS callback waits, so
messages pile up in nats-py's per-subscription pending queue, limited to
:data:`PENDING_MSGS_LIMIT` messages and :data:`PENDING_BYTES_LIMIT` bytes; past those nats-py
drops messages and reports a slow consumer to the connection's error callback. Dropped
messages were never acked, so publishers that wait for acks retry them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from flux_broker.clock import Clock, SystemClock
from flux_broker.log.commitlog import FileCommitLog
from flux_broker.log.contract import AppendResult
from flux_broker.log.errors import LogError
from flux_broker.log.format import (
    MAX_HEADER_KEY_BYTES,
    MAX_HEADERS,
    Headers,
    NewRecord,
    record_bytes,
)
from flux_broker.nats.connection import round_trip
from flux_broker.nats.envelope import EnvelopeError, decode_message, encode_ack
from flux_broker.nats.subjects import (
    InvalidSubjectError,
    partition_subject,
    validate_literal_subject,
)
from flux_proto import api_pb2

__all__ = [
    "BATCH_MAX_MESSAGES",
    "NO_EXPECTED_OFFSET",
    "PENDING_BYTES_LIMIT",
    "PENDING_MSGS_LIMIT",
    "QUEUE_MAX_BYTES",
    "QUEUE_MAX_MESSAGES",
    "REPLY_HEADER",
    "STOP_TIMEOUT_S",
    "SUBJECT_HEADER",
    "Partition",
    "PartitionStats",
]

_logger = logging.getLogger(__name__)

MIB: Final = 1024 * 1024

#: Messages per append at most (Liftbridge's ``batch.max.messages`` default).
BATCH_MAX_MESSAGES: Final = 1024
#: Messages waiting for the ingest task at most: eight default batches, enough to keep the
#: task fed while an fsync runs, small enough that a stop drains it in well under a second.
QUEUE_MAX_MESSAGES: Final = 8 * BATCH_MAX_MESSAGES
#: Payload bytes waiting for the ingest task at most (one message may pass it), so large
#: messages cannot fill memory before the message bound is reached.
QUEUE_MAX_BYTES: Final = 64 * MIB
#: nats-py's pending limits for the partition subscription, used once the queue above is full.
#: Liftbridge sets none; Flux keeps Liftbridge's channel size (64 Ki messages) as the message
#: bound and caps the bytes, so a burst costs at most ~64 MiB more before nats-py drops.
PENDING_MSGS_LIMIT: Final = 64 * 1024
PENDING_BYTES_LIMIT: Final = 64 * MIB
#: How long :meth:`Partition.stop` waits for the in-flight messages and acks by default.
STOP_TIMEOUT_S: Final = 10.0

#: The expected offset that asks for no optimistic-concurrency check.
NO_EXPECTED_OFFSET: Final = -1

#: Header names the broker adds to every record stored from NATS (Liftbridge's).
SUBJECT_HEADER: Final = "subject"
REPLY_HEADER: Final = "reply"

_BROKER_HEADERS: Final = frozenset({SUBJECT_HEADER, REPLY_HEADER})
#: Ack inboxes remembered as valid: a publisher reuses one inbox for many messages, and
#: checking it is a visible share of the per-message cost (profiled).
_VALID_INBOXES_MAX: Final = 4096

_SUCCESS_ACK_POLICIES: Final = frozenset({api_pb2.AckPolicy.LEADER, api_pb2.AckPolicy.ALL})


@dataclass(slots=True)
class PartitionStats:
    """Counters of one partition's ingest path, exported as metrics.

    Attributes:
        received: NATS messages received on the partition subject.
        appended: Records appended to the log.
        appends: Calls to ``log.append`` (batches written).
        append_failures: Appends that failed; their messages got no ack.
        acks_sent: Acks published, success and error acks together.
        ack_failures: Acks that could not be published (e.g. the NATS connection closed).
        too_large: Messages rejected as too large (not stored; TOO_LARGE ack if they had an
            ack inbox), including messages with more headers, or longer header names, than the
            record format holds.
        malformed_envelopes: Payloads starting with the envelope magic that were not valid
            PUBLISH envelopes; stored raw.
        first_received_ns: When the first message since start arrived (Unix ns; 0 = none), for
            ``PartitionMetadata.messagesReceivedTimestamps``.
        latest_received_ns: When the latest message arrived (Unix ns; 0 = none).
        incorrect_offset: Messages refused by optimistic concurrency control (not stored;
            INCORRECT_OFFSET ack if they had an ack inbox).
        ingest_failures: Batches that failed for an unexpected reason (a bug; logged with its
            traceback); their messages got no ack.
        readonly_rejected: Messages not stored because the partition is read-only (no ack).
    """

    received: int = 0
    appended: int = 0
    appends: int = 0
    append_failures: int = 0
    acks_sent: int = 0
    ack_failures: int = 0
    too_large: int = 0
    malformed_envelopes: int = 0
    first_received_ns: int = 0
    latest_received_ns: int = 0
    ingest_failures: int = 0
    incorrect_offset: int = 0
    readonly_rejected: int = 0


@dataclass(frozen=True, slots=True)
class _Arrival:
    """A NATS message and when the broker received it."""

    msg: Msg
    received_ns: int


@dataclass(frozen=True, slots=True)
class _AckTo:
    """What an ack needs about its message; held in memory only, never stored."""

    inbox: str
    correlation_id: str
    policy: api_pb2.AckPolicy.ValueType
    msg_subject: str
    received_ns: int


class Partition:
    """One partition this broker leads: its NATS subscription, ingest task and acks.

    Use :meth:`start` once and :meth:`stop` once. The partition does not own the log or the
    NATS connection: the caller opens and closes both.
    """

    def __init__(
        self,
        *,
        stream: str,
        partition_id: int,
        subject: str,
        group: str,
        log: FileCommitLog,
        nc: Client,
        namespace: str,
        record_max_bytes: int,
        batch_max_messages: int = BATCH_MAX_MESSAGES,
        clock: Clock | None = None,
        queue_max_messages: int = QUEUE_MAX_MESSAGES,
        queue_max_bytes: int = QUEUE_MAX_BYTES,
        optimistic_concurrency: bool = False,
        readonly: bool = False,
        stats: PartitionStats | None = None,
    ) -> None:
        """Describe the partition (arguments by keyword); nothing happens until :meth:`start`.

        Args:
            stream: Stream name.
            partition_id: Partition id, from 0.
            subject: The stream's (validated) subject; the partition listens on
                ``partition_subject(subject, partition_id)``.
            group: The stream's load-balance group, used as NATS queue group ("" = none).
            log: The partition's open commit log.
            nc: A connected NATS client, used to subscribe and to publish acks.
            namespace: The broker's NATS namespace (``clustering.namespace``), for the
                subjects the broker derives.
            record_max_bytes: Largest NATS payload accepted
                (``clustering.replication.max.bytes``); larger ones get a TOO_LARGE ack.
            batch_max_messages: Most messages appended with one write.
            clock: Source of reception and commit timestamps (default: the system clock).
            queue_max_messages: Bound of the queue feeding the ingest task, in messages.
            queue_max_bytes: Bound of the same queue, in payload bytes.
            optimistic_concurrency: The stream's ``optimisticConcurrencyControl``: a message
                whose expected offset (the envelope's ``offset``) is not -1 and not the offset
                it would get is not stored and gets an INCORRECT_OFFSET ack.
            readonly: Start read-only (see :attr:`readonly`).
            stats: Counters to add to (a resumed partition keeps its earlier ones); default:
                new ones.

        Raises:
            ValueError: ``partition_id`` is negative or a limit is not positive.
        """
        for name, value in {
            "record_max_bytes": record_max_bytes,
            "batch_max_messages": batch_max_messages,
            "queue_max_messages": queue_max_messages,
            "queue_max_bytes": queue_max_bytes,
        }.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        self.stream = stream
        self.partition_id = partition_id
        self.subject = partition_subject(subject, partition_id)
        self.group = group
        self.namespace = namespace
        self.record_max_bytes = record_max_bytes
        self.batch_max_messages = batch_max_messages
        self.optimistic_concurrency = optimistic_concurrency
        #: While true, received messages are dropped unstored and unacked; the caller sets it.
        self.readonly = readonly
        self.stats = PartitionStats() if stats is None else stats
        self._log = log
        self._nc = nc
        self._clock: Clock = clock or SystemClock()
        self._queue: asyncio.Queue[_Arrival | None] = asyncio.Queue(maxsize=queue_max_messages)
        self._queue_max_bytes = queue_max_bytes
        self._queued_bytes = 0
        self._room = asyncio.Event()  # set when the queue is below its byte bound
        self._room.set()
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    @property
    def log(self) -> FileCommitLog:
        """The partition's commit log (owned by the caller)."""
        return self._log

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe to the partition subject with the queue group and start ingesting.

        Raises:
            nats.errors.Error: The subscription failed (e.g. the connection is closed).
        """
        assert self._task is None, "a Partition starts once"
        assert not self._stopped, "a stopped Partition cannot start again"
        self._task = asyncio.create_task(self._ingest_loop(), name=f"ingest-{self._name()}")
        self._task.add_done_callback(self._on_task_done)
        try:
            self._subscription = await self._nc.subscribe(
                self.subject,
                queue=self.group,
                cb=self._on_message,
                pending_msgs_limit=PENDING_MSGS_LIMIT,
                pending_bytes_limit=PENDING_BYTES_LIMIT,
            )
            # Round trip, so the server has the subscription before start() returns: a
            # message published after it is received (a test lost the first message about
            # once in 40 runs before round_trip wrote nats-py's queue ahead of its PING).
            await round_trip(self._nc)
        except BaseException:
            self._task.cancel()
            raise

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop receiving, finish the messages already received (acks sent), end the task.

        Messages the server already delivered are appended and acked; the subscription is
        drained first so no more arrive. After ``timeout_s`` the ingest task is cancelled:
        messages not yet appended then get no ack (nothing acked is ever lost). The caller
        closes the log afterwards. Idempotent.

        Args:
            timeout_s: Bound on the whole stop.
        """
        if self._stopped:
            return
        self._stopped = True
        task = self._task
        try:
            async with asyncio.timeout(timeout_s):
                await self._drain_subscription()
                await self._queue.put(None)  # after every message: the task ends there
                if task is not None:
                    await asyncio.shield(task)
                await round_trip(self._nc)  # the last acks reach the server
        except TimeoutError:
            _logger.warning(
                "%s: stop did not finish in %gs; unacked messages are abandoned",
                self._name(),
                timeout_s,
            )
        except nats.errors.Error as error:
            _logger.warning("%s: NATS error while stopping: %s", self._name(), error)
        finally:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _drain_subscription(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is None:
            return
        try:
            # Unsubscribe, round trip, then wait until every message nats-py holds has been
            # handed to _on_message (which waits for room in the queue).
            await subscription.drain()  # type: ignore[no-untyped-call]  # nats-py is untyped here
        except nats.errors.Error as error:
            _logger.warning("%s: could not drain the subscription: %s", self._name(), error)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            _logger.error(
                "%s: ingest task died; the partition no longer ingests",
                self._name(),
                exc_info=task.exception(),
            )

    def _name(self) -> str:
        return f"stream {self.stream!r} partition {self.partition_id}"

    # -- receiving ---------------------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        """nats-py callback: stamp the reception time and queue the message."""
        received_ns = self._clock.now_ns()
        stats = self.stats
        stats.received += 1
        if not stats.first_received_ns:
            stats.first_received_ns = received_ns
        stats.latest_received_ns = received_ns
        while self._queued_bytes >= self._queue_max_bytes:
            self._room.clear()
            await self._room.wait()
        self._queued_bytes += len(msg.data)
        await self._queue.put(_Arrival(msg, received_ns))

    def _take_batch(self, first: _Arrival) -> tuple[list[_Arrival], bool]:
        """``first`` plus what is queued right now, up to the batch bound; and whether to stop."""
        batch = [first]
        stop = False
        while len(batch) < self.batch_max_messages and not self._queue.empty():
            arrival = self._queue.get_nowait()
            if arrival is None:
                stop = True
                break
            batch.append(arrival)
        self._queued_bytes -= sum(len(arrival.msg.data) for arrival in batch)
        self._room.set()
        return batch, stop

    # -- ingesting -----------------------------------------------------------------------------

    async def _ingest_loop(self) -> None:
        while True:
            first = await self._queue.get()
            if first is None:
                return
            batch, stop = self._take_batch(first)
            try:
                await self._ingest(batch)
            except Exception:
                # A bug must cost one batch (unacked, so publishers retry), never the partition.
                self.stats.ingest_failures += 1
                _logger.exception(
                    "%s: could not ingest %d messages; they are not acked",
                    self._name(),
                    len(batch),
                )
            if stop:
                return

    async def _ingest(self, batch: Sequence[_Arrival]) -> None:
        """Turn ``batch`` into records, append them (one write per byte-limited chunk), ack."""
        if self.readonly:
            self.stats.readonly_rejected += len(batch)
            return
        record_limit = self._log.config.record_max_bytes
        batch_limit = self._log.config.batch_max_bytes
        records: list[NewRecord] = []
        acks: list[_AckTo | None] = []
        chunk_bytes = 0
        for arrival in batch:
            record, ack_to, expected_offset = self._to_record(arrival)
            size = record_bytes(record) if record is not None else 0
            if record is None or size > record_limit:
                self.stats.too_large += 1
                if ack_to is not None:
                    await self._send_error_ack(ack_to, api_pb2.Ack.Error.TOO_LARGE)
                continue
            if (
                self.optimistic_concurrency
                and expected_offset != NO_EXPECTED_OFFSET
                # The offset this record would get: the log's next one, after those pending.
                and expected_offset != self._log.newest_offset + 1 + len(records)
            ):
                self.stats.incorrect_offset += 1
                if ack_to is not None:
                    await self._send_error_ack(ack_to, api_pb2.Ack.Error.INCORRECT_OFFSET)
                continue
            if chunk_bytes + size > batch_limit:
                # Only when a batch of big messages passes the log's batch limit.
                await self._append_and_ack(records, acks)
                records, acks, chunk_bytes = [], [], 0
            records.append(record)
            acks.append(ack_to)
            chunk_bytes += size
        if records:
            await self._append_and_ack(records, acks)

    def _to_record(self, arrival: _Arrival) -> tuple[NewRecord | None, _AckTo | None, int]:
        """The record for a NATS message (``None`` if too large), its ack target, its offset.

        The offset is the envelope's expected offset (:data:`NO_EXPECTED_OFFSET` for raw
        payloads), checked when the stream uses optimistic concurrency control.
        """
        msg = arrival.msg
        data = msg.data
        try:
            message = decode_message(data)
        except EnvelopeError as error:
            # Liftbridge stores any payload that is not a valid envelope raw; count it so that
            # a misbehaving publisher shows up in the metrics.
            self.stats.malformed_envelopes += 1
            _logger.debug("%s: storing a malformed envelope raw: %s", self._name(), error)
            message = None
        ack_to: _AckTo | None = None
        if message is not None and message.ackInbox:
            ack_to = _AckTo(
                inbox=message.ackInbox,
                correlation_id=message.correlationId,
                policy=message.ackPolicy,
                msg_subject=msg.subject,
                received_ns=arrival.received_ns,
            )
        expected = NO_EXPECTED_OFFSET if message is None else message.offset
        if len(data) > self.record_max_bytes:
            return None, ack_to, expected
        broker_headers = (
            (SUBJECT_HEADER, msg.subject.encode()),
            (REPLY_HEADER, (msg.reply or "").encode()),
        )
        if message is None:
            return NewRecord(value=bytes(data), headers=broker_headers), ack_to, expected
        user_headers = (
            tuple(
                (name, value)
                for name, value in message.headers.items()
                if name not in _BROKER_HEADERS
            )
            if message.headers
            else ()
        )
        headers = user_headers + broker_headers
        if not _storable_headers(headers):
            return None, ack_to, expected  # beyond the record format's header fields
        record = NewRecord(
            value=message.value,
            # proto3 cannot tell an empty key from none; no key is the null key.
            key=message.key or None,
            headers=headers,
        )
        return record, ack_to, expected

    async def _append_and_ack(self, records: list[NewRecord], acks: list[_AckTo | None]) -> None:
        try:
            result = await self._log.append(records)
        except LogError:
            self.stats.append_failures += 1
            _logger.exception(
                "%s: append of %d records failed; they are not acked",
                self._name(),
                len(records),
            )
            return
        self.stats.appends += 1
        self.stats.appended += result.count
        # A cluster of one: the ISR is this broker, so what it wrote is committed.
        self._log.set_high_watermark(result.last_offset)
        await self._send_success_acks(result, acks)

    # -- acking --------------------------------------------------------------------------------

    async def _send_success_acks(self, result: AppendResult, acks: list[_AckTo | None]) -> None:
        commit_ns = self._clock.now_ns()
        for offset, ack_to in enumerate(acks, start=result.base_offset):
            if ack_to is not None and ack_to.policy in _SUCCESS_ACK_POLICIES:
                await self._publish_ack(self._ack(ack_to, offset=offset, commit_ns=commit_ns))

    async def _send_error_ack(self, ack_to: _AckTo, error: api_pb2.Ack.Error.ValueType) -> None:
        # Not stored, so there is no offset (left at the proto default) and no commit time.
        await self._publish_ack(self._ack(ack_to, ack_error=error))

    def _ack(
        self,
        ack_to: _AckTo,
        *,
        offset: int = 0,
        commit_ns: int = 0,
        ack_error: api_pb2.Ack.Error.ValueType = api_pb2.Ack.Error.OK,
    ) -> api_pb2.Ack:
        return api_pb2.Ack(
            stream=self.stream,
            partitionSubject=self.subject,
            msgSubject=ack_to.msg_subject,
            offset=offset,
            ackInbox=ack_to.inbox,
            correlationId=ack_to.correlation_id,
            ackPolicy=ack_to.policy,
            receptionTimestamp=ack_to.received_ns,
            commitTimestamp=commit_ns,
            ackError=ack_error,
        )

    async def _publish_ack(self, ack: api_pb2.Ack) -> None:
        try:
            # The inbox comes from the publisher: a wildcard or malformed one must not reach
            # the server as a publish subject.
            _validate_inbox(ack.ackInbox)
            await self._nc.publish(ack.ackInbox, encode_ack(ack))
        except (InvalidSubjectError, nats.errors.Error) as error:
            self.stats.ack_failures += 1
            _logger.warning(
                "%s: could not send an ack to %r: %s", self._name(), ack.ackInbox, error
            )
        else:
            self.stats.acks_sent += 1


def _storable_headers(headers: Headers) -> bool:
    """Whether the record format can hold ``headers`` (an i16 count and i16 name lengths)."""
    if len(headers) > MAX_HEADERS:
        return False
    return all(
        len(name) <= MAX_HEADER_KEY_BYTES // 4 or len(name.encode()) <= MAX_HEADER_KEY_BYTES
        for name, _ in headers
    )


@functools.lru_cache(maxsize=_VALID_INBOXES_MAX)
def _validate_inbox(inbox: str) -> None:
    """:func:`validate_literal_subject`, remembered for inboxes that passed (errors are not)."""
    validate_literal_subject(inbox)
