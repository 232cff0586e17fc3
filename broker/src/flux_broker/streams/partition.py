"""The leader of one partition: NATS messages on its subject in, records and acks out.

This is Liftbridge's leader write path (reference ``liftbridge-server.md`` §2.2) for a cluster
of one (DESIGN.md §4.3)::

    NATS ──(raw queue subscription: <subject>[.N], group)──▶ _on_message ──▶ bounded buffer
         ──▶ ingest task: take what is there (≤ batch_max_messages, ≤ the log's batch bytes)
         ──▶ decode each message ─▶ ONE log.append() ─▶ HW := newest
         ──▶ one Ack envelope per message, all of them handed to NATS at once

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
  as in Liftbridge: clients that never set it can only write offset 0.) The checks assume the
  offsets the batch will get; another writer (the batched publish appends straight to the
  log) may append first, so the append carries a guard that refuses it, atomically with the
  write, unless it lands where the checks assumed. A refused batch is not stored and gets no
  success ack, as after a failed append (publishers time out and retry); it is counted in
  :attr:`PartitionStats.occ_conflicts` and logged at debug level. Its error acks still go out:
  a rejected message wrote nothing, so it was rightly rejected when it was checked.
- After the append returns (durable per the log's sync policy) the HW moves to the newest
  offset -- the ISR is this broker alone -- and every message with an ack inbox and policy
  LEADER or ALL gets one success ack. NONE gets none. Acks, success and error alike, go out
  in the order the messages arrived, so success acks are in offset order.
- While the partition is read-only (:attr:`Partition.readonly`, Liftbridge's read-only log
  that rejects ``Append``), messages are not stored and get no ack, success or error; they are
  counted in :attr:`PartitionStats.readonly_rejected`. Publishers through gRPC are refused
  before anything reaches NATS; raw NATS publishers and racing publishes time out.
- If the append fails (:class:`~flux_broker.log.errors.LogError`, e.g. a full disk), no success
  ack is sent for that batch, the failure is logged and counted, and ingest goes on with the
  next batch: publishers time out and retry, as with Liftbridge.

**Speed** (one record per NATS message, DESIGN.md §5). The subscription is a raw one
(:func:`~flux_broker.nats.connection.subscribe_raw`): nats-py's read loop hands each message's
subject, reply and payload straight to :meth:`Partition._on_message`, which stamps and
buffers it and wakes the ingest task -- no ``Msg`` object, no per-subscription queue and task.
The ingest task takes the whole buffer at once. A PUBLISH envelope with the plain 8-byte
header is parsed in place; any other envelope goes through the full checks of
:func:`~flux_broker.nats.envelope.decode_message`. Acks are serialized from a cached prefix
(stream, partition and message subjects) plus the per-message fields -- byte for byte what
``encode_ack`` makes -- and a batch's acks are published with
:func:`~flux_broker.nats.connection.publish_many`: one buffer append and one flush.

**Flow control.** Memory is bounded at every step:

- Between NATS and the ingest task the buffer holds at most ``queue_max_messages`` messages
  and about ``queue_max_bytes`` payload bytes (one message may pass the byte bound). The
  handler runs in the connection's read loop and cannot wait, so past those bounds it drops
  the message, as nats-py drops past its pending limits (a "slow consumer"): it is counted in
  :attr:`PartitionStats.dropped` and a warning is logged once per episode (until the ingest
  task has emptied the buffer). Dropped messages were never acked: publishers that wait for
  acks retry them. Blocking the read loop instead would stall every subscription of the
  broker's connection and let the NATS server cut the connection as a slow consumer.
- Publishers that wait for acks are slowed down by the acks themselves: an ack leaves only
  after its batch is appended, so a publisher keeping N messages unacked never has more than
  N in the broker.
- Acks go through nats-py's outbound buffer; when that is over its bound the ingest task
  waits for the socket (:func:`~flux_broker.nats.connection.publish_many`), and the buffer
  above absorbs, then drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeAlias

import nats.errors
from google.protobuf.message import DecodeError
from nats.aio.client import Client

from flux_broker.clock import Clock, SystemClock
from flux_broker.log.commitlog import FileCommitLog
from flux_broker.log.contract import AppendResult
from flux_broker.log.errors import LogError, LogWriteError, SyncFailedError
from flux_broker.log.format import (
    MAX_HEADER_KEY_BYTES,
    MAX_HEADERS,
    Headers,
    NewRecord,
    record_bytes,
)
from flux_broker.nats.connection import (
    RawSubscription,
    publish_many,
    round_trip,
    subscribe_raw,
)
from flux_broker.nats.envelope import (
    MAGIC,
    EnvelopeError,
    MessageType,
    decode_message,
    encode,
    encode_ack,
)
from flux_broker.nats.subjects import (
    InvalidSubjectError,
    partition_subject,
    validate_literal_subject,
)
from flux_proto import api_pb2

if TYPE_CHECKING:
    from flux_broker.metrics import PublishMetrics

__all__ = [
    "BATCH_MAX_MESSAGES",
    "NO_EXPECTED_OFFSET",
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
#: Messages waiting for the ingest task at most: Liftbridge's channel size (64 Ki). A stop
#: drains a full buffer in about a second (measured: ~50k messages/s).
QUEUE_MAX_MESSAGES: Final = 64 * 1024
#: Payload bytes waiting for the ingest task at most (one message may pass it), so large
#: messages cannot fill memory before the message bound is reached.
QUEUE_MAX_BYTES: Final = 64 * MIB
#: How long :meth:`Partition.stop` waits for the in-flight messages and acks by default.
STOP_TIMEOUT_S: Final = 10.0

#: The expected offset that asks for no optimistic-concurrency check.
NO_EXPECTED_OFFSET: Final = -1

#: Header names the broker adds to every record stored from NATS (Liftbridge's).
SUBJECT_HEADER: Final = "subject"
REPLY_HEADER: Final = "reply"

_BROKER_HEADERS: Final = frozenset({SUBJECT_HEADER, REPLY_HEADER})
#: Ack inboxes remembered as valid, per partition (see Partition._inbox_subject).
_VALID_INBOXES_MAX: Final = 4096
#: At most one warning about unusable ack inboxes per this many seconds (forged envelopes
#: must not flood the log; reliability-plan §6 item 21).
_BAD_INBOX_LOG_INTERVAL_S: Final = 10.0
#: Ack prefixes remembered, by message subject (one for a stream without wildcards).
_ACK_PREFIXES_MAX: Final = 1024

_SUCCESS_ACK_POLICIES: Final = frozenset({api_pb2.AckPolicy.LEADER, api_pb2.AckPolicy.ALL})
_LEADER: Final = api_pb2.AckPolicy.LEADER

#: The header of a PUBLISH envelope as Liftbridge's and Flux's writers make it (headerLen 8, no
#: CRC): such a payload is parsed in place; any other envelope goes through decode_message.
_PLAIN_PUBLISH_HEADER: Final = encode(MessageType.PUBLISH, b"")
_PLAIN_PUBLISH_HEADER_BYTES: Final = len(_PLAIN_PUBLISH_HEADER)
#: The header of every ack envelope the partition sends (no CRC, as Liftbridge's).
_ACK_HEADER: Final = encode(MessageType.ACK, b"")
#: Framed size of a record with a null key, an empty value and empty broker headers: a
#: record with only broker headers is this plus its key, value, subject and reply bytes.
_BROKER_HEADERS_RECORD_BYTES: Final = record_bytes(
    NewRecord(value=b"", headers=((SUBJECT_HEADER, b""), (REPLY_HEADER, b"")))
)

_parse_message = api_pb2.Message.FromString

#: A received message: NATS subject, reply subject (``b""`` if none), payload, reception time.
_Arrival: TypeAlias = tuple[bytes, bytes, bytes, int]
#: What a success ack needs: the decoded envelope, the NATS subject, the reception time.
_AckTo: TypeAlias = tuple[api_pb2.Message, bytes, int]
#: An error ack ready to go: its place among the chunk's records, inbox subject, envelope.
_ErrorAck: TypeAlias = tuple[int, bytes, bytes]


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
        occ_conflicts: Appends refused because another writer appended between the
            optimistic-concurrency checks and the write (see the module docstring); their
            messages were not stored and got no success ack.
        ingest_failures: Batches that failed for an unexpected reason (a bug; logged with its
            traceback); their messages got no ack.
        readonly_rejected: Messages not stored because the partition is read-only (no ack).
        dropped: Messages dropped on arrival because the buffer before the ingest task was
            full (a slow consumer; not stored, no ack).
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
    occ_conflicts: int = 0
    readonly_rejected: int = 0
    dropped: int = 0


class _OffsetsMovedError(Exception):
    """The log's next offset is not the one the optimistic-concurrency checks assumed."""

    def __init__(self, assumed: int, actual: int) -> None:
        super().__init__(f"the checks assumed base offset {assumed}, the log is at {actual}")


@dataclass(frozen=True, slots=True)
class _AssumedBaseGuard:
    """An :class:`~flux_broker.log.contract.AppendGuard`: append only at ``base_offset``."""

    base_offset: int

    def check(self, base_offset: int) -> None:
        if base_offset != self.base_offset:
            raise _OffsetsMovedError(self.base_offset, base_offset)

    def written(self, result: AppendResult) -> None:
        pass


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
        metrics: PublishMetrics | None = None,
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
            queue_max_messages: Bound of the buffer feeding the ingest task, in messages.
            queue_max_bytes: Bound of the same buffer, in payload bytes.
            optimistic_concurrency: The stream's ``optimisticConcurrencyControl``: a message
                whose expected offset (the envelope's ``offset``) is not -1 and not the offset
                it would get is not stored and gets an INCORRECT_OFFSET ack.
            readonly: Start read-only (see :attr:`readonly`).
            stats: Counters to add to (a resumed partition keeps its earlier ones); default:
                new ones.
            metrics: The broker's acks and publish-to-ack latency, updated once per acked
                batch (default: none).

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
        self._metrics = metrics
        self._log = log
        self._nc = nc
        self._clock: Clock = clock or SystemClock()
        self._queue_max_messages = queue_max_messages
        self._queue_max_bytes = queue_max_bytes
        self._arrivals: list[_Arrival] = []  # the buffer, oldest first
        self._queued_bytes = 0
        self._dropping = False  # a drop was logged; reset once the buffer is emptied
        self._wake = asyncio.Event()  # set when the buffer gets a message or stop() begins
        self._closing = False  # no more messages will come: the task ends once idle
        self._subscription: RawSubscription | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._ack_prefixes: dict[bytes, bytes] = {}  # by message subject
        self._valid_inboxes: dict[str, bytes] = {}  # inbox -> the subject to publish to
        self._bad_inbox_logged_at = -_BAD_INBOX_LOG_INTERVAL_S
        self._bad_inboxes_unlogged = 0
        self._ack_fields = api_pb2.Ack()  # reused: fields 4-8 of each success ack

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
            self._subscription = await subscribe_raw(
                self._nc, self.subject, self._on_message, queue=self.group
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
                self._closing = True  # after every message: the task ends once they are in
                self._wake.set()
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
            # Unsubscribe, then a round trip: every message the server sent is buffered.
            await subscription.drain()
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

    def _on_message(self, subject: bytes, reply: bytes, payload: bytes) -> None:
        """Raw handler, in the NATS read loop: stamp the reception time, buffer the message."""
        received_ns = self._clock.now_ns()
        stats = self.stats
        stats.received += 1
        if not stats.first_received_ns:
            stats.first_received_ns = received_ns
        stats.latest_received_ns = received_ns
        arrivals = self._arrivals
        if len(arrivals) >= self._queue_max_messages or self._queued_bytes >= self._queue_max_bytes:
            self._drop()
            return
        arrivals.append((subject, reply, payload, received_ns))
        self._queued_bytes += len(payload)
        if len(arrivals) == 1:
            self._wake.set()

    def _drop(self) -> None:
        self.stats.dropped += 1
        if not self._dropping:
            self._dropping = True
            _logger.warning(
                "%s: ingest is behind (%d messages, %d bytes buffered); dropping messages "
                "until it catches up (they get no ack)",
                self._name(),
                len(self._arrivals),
                self._queued_bytes,
            )

    def _take_batch(self) -> list[_Arrival]:
        """The oldest buffered messages, up to the batch bound (the buffer is not empty)."""
        arrivals = self._arrivals
        if len(arrivals) <= self.batch_max_messages:
            self._arrivals = []
            self._queued_bytes = 0
            self._dropping = False
            return arrivals
        batch = arrivals[: self.batch_max_messages]
        del arrivals[: self.batch_max_messages]
        self._queued_bytes -= sum(len(payload) for _s, _r, payload, _t in batch)
        return batch

    # -- ingesting -----------------------------------------------------------------------------

    async def _ingest_loop(self) -> None:
        wake = self._wake
        while True:
            if not self._arrivals:
                if self._closing:
                    return
                wake.clear()
                await wake.wait()
                continue
            batch = self._take_batch()
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

    async def _ingest(self, batch: Sequence[_Arrival]) -> None:  # noqa: PLR0912, PLR0915
        """Turn ``batch`` into records, append them (one write per byte-limited chunk), ack.

        The loop is the per-message cost of the NATS ingest path: it is written flat, with
        the common shapes (a plain envelope, no user headers) first.
        """
        stats = self.stats
        if self.readonly:
            stats.readonly_rejected += len(batch)
            return
        log = self._log
        record_limit = log.config.record_max_bytes
        batch_limit = log.config.batch_max_bytes
        payload_limit = self.record_max_bytes
        occ = self.optimistic_concurrency
        records: list[NewRecord] = []
        acks: list[_AckTo | None] = []
        errors: list[_ErrorAck] = []
        chunk_bytes = 0
        # The offset the chunk's first record will get, as the OCC checks assume it.
        base = log.newest_offset + 1
        checked = False  # whether a record of the chunk was checked against ``base``
        for subject, reply, data, received_ns in batch:
            message: api_pb2.Message | None = None
            if data.startswith(_PLAIN_PUBLISH_HEADER):
                try:
                    message = _parse_message(data[_PLAIN_PUBLISH_HEADER_BYTES:])
                except DecodeError as error:
                    self._malformed(error)
            elif data.startswith(MAGIC):
                try:
                    message = decode_message(data)
                except EnvelopeError as error:
                    self._malformed(error)
            if message is None:
                # Stored raw, without ack.
                if len(data) > payload_limit:
                    stats.too_large += 1
                    continue
                record = NewRecord(
                    value=data, headers=((SUBJECT_HEADER, subject), (REPLY_HEADER, reply))
                )
                size = _BROKER_HEADERS_RECORD_BYTES + len(data) + len(subject) + len(reply)
                ack_to: _AckTo | None = None
                if size > record_limit:
                    stats.too_large += 1
                    continue
            else:
                ack_to = (message, subject, received_ns) if message.ackInbox else None
                if len(data) > payload_limit:
                    self._reject(ack_to, subject, api_pb2.Ack.Error.TOO_LARGE, errors, records)
                    continue
                key = message.key or None  # proto3 cannot tell an empty key from none
                value = message.value
                if message.headers:
                    headers = _with_broker_headers(message.headers, subject, reply)
                    if headers is None:  # beyond the record format's header fields
                        self._reject(ack_to, subject, api_pb2.Ack.Error.TOO_LARGE, errors, records)
                        continue
                    record = NewRecord(value=value, key=key, headers=headers)
                    size = record_bytes(record)
                else:
                    record = NewRecord(
                        value=value,
                        key=key,
                        headers=((SUBJECT_HEADER, subject), (REPLY_HEADER, reply)),
                    )
                    size = _BROKER_HEADERS_RECORD_BYTES + len(value) + len(subject) + len(reply)
                    if key is not None:
                        size += len(key)
                if size > record_limit:
                    self._reject(ack_to, subject, api_pb2.Ack.Error.TOO_LARGE, errors, records)
                    continue
            if chunk_bytes + size > batch_limit and records:
                # Only when a batch of big messages passes the log's batch limit.
                await self._append_and_ack(records, acks, errors, base, guarded=checked)
                records, acks, errors, chunk_bytes, checked = [], [], [], 0, False
                base = log.newest_offset + 1
            if occ and message is not None and message.offset != NO_EXPECTED_OFFSET:
                # The offset this record would get: the chunk's base, after those pending.
                if message.offset != base + len(records):
                    stats.incorrect_offset += 1
                    self._reject(
                        ack_to, subject, api_pb2.Ack.Error.INCORRECT_OFFSET, errors, records
                    )
                    continue
                checked = True
            records.append(record)
            acks.append(ack_to)
            chunk_bytes += size
        if records or errors:
            await self._append_and_ack(records, acks, errors, base, guarded=checked)

    def _malformed(self, error: Exception) -> None:
        # Liftbridge stores any payload that is not a valid envelope raw; count it so that a
        # misbehaving publisher shows up in the metrics.
        self.stats.malformed_envelopes += 1
        _logger.debug("%s: storing a malformed envelope raw: %s", self._name(), error)

    def _reject(
        self,
        ack_to: _AckTo | None,
        subject: bytes,
        error: api_pb2.Ack.Error.ValueType,
        errors: list[_ErrorAck],
        records: Sequence[NewRecord],
    ) -> None:
        """Count a message not stored, and queue its error ack (if it has an inbox)."""
        if error == api_pb2.Ack.Error.TOO_LARGE:
            self.stats.too_large += 1
        if ack_to is None:
            return
        message, _subject, received_ns = ack_to
        inbox = self._inbox_subject(message.ackInbox)
        if inbox is None:
            return
        # Not stored, so there is no offset (left at the proto default) and no commit time.
        ack = api_pb2.Ack(
            stream=self.stream,
            partitionSubject=self.subject,
            msgSubject=subject.decode(errors="replace"),
            ackInbox=message.ackInbox,
            correlationId=message.correlationId,
            ackPolicy=message.ackPolicy,
            receptionTimestamp=received_ns,
            ackError=error,
        )
        errors.append((len(records), inbox, encode_ack(ack)))

    async def _append_and_ack(
        self,
        records: list[NewRecord],
        acks: list[_AckTo | None],
        errors: list[_ErrorAck],
        base: int,
        *,
        guarded: bool,
    ) -> None:
        """Append one chunk and send its acks: success acks only if the append worked."""
        result: AppendResult | None = None
        if records:
            try:
                result = await self._log.append(
                    records, guard=_AssumedBaseGuard(base) if guarded else None
                )
            except _OffsetsMovedError as error:
                self.stats.occ_conflicts += 1
                _logger.debug(
                    "%s: %d records not appended, another writer came first (%s); "
                    "they are not acked",
                    self._name(),
                    len(records),
                    error,
                )
            except SyncFailedError as error:
                # Unlike a refused write, the records are in the log (and will be served once
                # a later batch commits); their publishers get no ack and may retry.
                self.stats.append_failures += 1
                _logger.warning(
                    "%s: %d records were written but fsync failed (%s); they are not acked and "
                    "may be stored twice if their publishers retry",
                    self._name(),
                    len(records),
                    error,
                )
            except LogWriteError as error:
                # A full disk fails every batch until space is freed: the log has said so
                # once, with the cause; each refused batch is only counted and noted here.
                self.stats.append_failures += 1
                _logger.debug(
                    "%s: append of %d records failed (%s); they are not acked",
                    self._name(),
                    len(records),
                    error,
                )
            except LogError:
                self.stats.append_failures += 1
                _logger.exception(
                    "%s: append of %d records failed; they are not acked",
                    self._name(),
                    len(records),
                )
            else:
                self.stats.appends += 1
                self.stats.appended += result.count
                # A cluster of one: the ISR is this broker, so what it wrote is committed.
                self._log.set_high_watermark(result.last_offset)
        leader_acks = 0
        if result is None:
            outgoing = [(inbox, payload) for _at, inbox, payload in errors]
        else:
            outgoing, leader_acks = self._acks_in_order(result, acks, errors)
        sent = await self._publish(outgoing)
        success_acks = len(outgoing) - len(errors)
        if sent and result is not None and success_acks and self._metrics is not None:
            # Once per batch: the oldest message that may have asked for an ack (usually the
            # first), for the latency.
            received_ns = next(ack_to[2] for ack_to in acks if ack_to is not None)
            self._metrics.acked(
                leader_acks, success_acks - leader_acks, received_ns, self._clock.now_ns()
            )

    # -- acking --------------------------------------------------------------------------------

    def _acks_in_order(
        self, result: AppendResult, acks: list[_AckTo | None], errors: list[_ErrorAck]
    ) -> tuple[list[tuple[bytes, bytes]], int]:
        """Success acks of an appended chunk, with its error acks where their messages were.

        Returns:
            The acks to send, and how many of the success acks are for policy LEADER.
        """
        outgoing: list[tuple[bytes, bytes]] = []
        leader_acks = 0
        append = outgoing.append
        base = result.base_offset
        # Error acks are rare: the offset before which the next one goes (the end: after all).
        end = base + len(acks)
        next_error = 0
        error_at = base + errors[0][0] if errors else end
        # Fields 9 and 10 of every success ack of the chunk: the commit time, no error.
        commit = api_pb2.Ack(commitTimestamp=self._clock.now_ns()).SerializeToString()
        fields = self._ack_fields
        serialize = fields.SerializeToString
        prefixes = self._ack_prefixes
        inboxes = self._valid_inboxes
        for offset, ack_to in enumerate(acks, start=base):
            while offset >= error_at:
                append(errors[next_error][1:])
                next_error += 1
                error_at = base + errors[next_error][0] if next_error < len(errors) else end
            if ack_to is None:
                continue
            message, subject, received_ns = ack_to
            policy = message.ackPolicy
            if policy not in _SUCCESS_ACK_POLICIES:
                continue
            inbox = message.ackInbox
            inbox_subject = inboxes.get(inbox)
            if inbox_subject is None:
                inbox_subject = self._inbox_subject(inbox)
                if inbox_subject is None:
                    continue
            prefix = prefixes.get(subject)
            if prefix is None:
                prefix = self._ack_prefix(subject)
            # Every field of 4-8 is set each time: nothing of the previous ack remains.
            fields.offset = offset
            fields.ackInbox = inbox
            fields.correlationId = message.correlationId
            fields.ackPolicy = policy
            fields.receptionTimestamp = received_ns
            # Fields in number order, as SerializeToString writes them: 1-3, 4-8, 9 (and 10).
            append((inbox_subject, prefix + serialize() + commit))
            if policy == _LEADER:
                leader_acks += 1
        outgoing.extend(error[1:] for error in errors[next_error:])
        return outgoing, leader_acks

    def _ack_prefix(self, subject: bytes) -> bytes:
        """The ack envelope header and fields 1-3 (stream, partition and message subjects)."""
        if len(self._ack_prefixes) >= _ACK_PREFIXES_MAX:
            self._ack_prefixes.clear()
        fields = api_pb2.Ack(
            stream=self.stream,
            partitionSubject=self.subject,
            msgSubject=subject.decode(errors="replace"),
        )
        prefix = _ACK_HEADER + fields.SerializeToString()
        self._ack_prefixes[subject] = prefix
        return prefix

    def _inbox_subject(self, inbox: str) -> bytes | None:
        """``inbox`` as a subject to publish to; ``None`` (counted, logged) if it is not one.

        The inbox comes from the publisher: a wildcard or malformed one must not reach the
        server as a publish subject. Valid ones are remembered (a publisher reuses one inbox
        for many messages, and checking it is a visible share of the per-message cost).
        """
        subject = self._valid_inboxes.get(inbox)
        if subject is not None:
            return subject
        try:
            validate_literal_subject(inbox)
        except InvalidSubjectError as error:
            self.stats.ack_failures += 1
            now = time.monotonic()
            if now - self._bad_inbox_logged_at < _BAD_INBOX_LOG_INTERVAL_S:
                self._bad_inboxes_unlogged += 1
                return None
            _logger.warning(
                "%s: could not send an ack to %r: %s (%d more unusable inbox(es) since the "
                "last warning)",
                self._name(),
                inbox,
                error,
                self._bad_inboxes_unlogged,
            )
            self._bad_inbox_logged_at, self._bad_inboxes_unlogged = now, 0
            return None
        if len(self._valid_inboxes) >= _VALID_INBOXES_MAX:
            self._valid_inboxes.clear()
        subject = self._valid_inboxes[inbox] = inbox.encode()
        return subject

    async def _publish(self, outgoing: list[tuple[bytes, bytes]]) -> bool:
        """Send the acks; whether they were handed to NATS."""
        if not outgoing:
            return False
        try:
            await publish_many(self._nc, outgoing)
        except nats.errors.Error as error:
            self.stats.ack_failures += len(outgoing)
            _logger.warning(
                "%s: could not send %d acks: %s",
                self._name(),
                len(outgoing),
                str(error) or type(error).__name__,
            )
            return False
        self.stats.acks_sent += len(outgoing)
        return True


def _with_broker_headers(
    user_headers: Mapping[str, bytes], subject: bytes, reply: bytes
) -> Headers | None:
    """The user's headers, without those named like the broker's, then the broker's.

    ``None`` when the record format cannot hold them (an i16 count and i16 name lengths).
    """
    headers = tuple(
        (name, value) for name, value in user_headers.items() if name not in _BROKER_HEADERS
    )
    headers += ((SUBJECT_HEADER, subject), (REPLY_HEADER, reply))
    if len(headers) > MAX_HEADERS:
        return None
    if not all(
        len(name) <= MAX_HEADER_KEY_BYTES // 4 or len(name.encode()) <= MAX_HEADER_KEY_BYTES
        for name, _ in headers
    ):
        return None
    return headers
