"""The producer's per-partition state: batches filling, waiting, in flight; their numbers.

No I/O here: :class:`PartitionQueue` is the bookkeeping the producer's sender drives, kept
apart so that the sequence rules can be read (and tested) in one place.

**Sequences (idempotent producers).** Batches to a partition are numbered when first sent,
consecutively. The broker writes a batch only if its number is the next one it expects, repeats
the original ack for a number it already holds, and refuses a number beyond the next. Answers
come back in sending order. So:

- an ack confirms the number it was sent with (``last_seq``);
- a refusal leaves the number unused, so every later batch in flight will be refused too
  (out-of-order); they are collected for a resend;
- a lost connection leaves the outcome of the batches in flight unknown: they are resent with
  the same numbers — a written one is answered as a duplicate, never written twice;
- once nothing is in flight any more (:meth:`PartitionQueue.resync`), the batches to resend go
  out first, in their original order, numbered from ``last_seq + 1`` — for batches whose
  outcome was unknown that is the number they had;
- but once a connection was lost with batches in flight, their requests may still reach the
  broker late. From then on, under the same producer id, no sent batch changes its number and
  no number once sent goes to another batch (a late request could be the broker's next number
  and be written twice, or in another batch's place): when a refusal would require either,
  the partition continues under a fresh producer id from 0, where every old number is out of
  order forever.

Until the broker has confirmed one number (after the first batch, and again after any failure)
only one batch is in flight: a broker that does not know the producer accepts any first number,
so a second batch must not overtake a first one that may be refused. After that, up to
:data:`MAX_IN_FLIGHT` batches are in flight — the number of acks the broker remembers per
producer, so a resent duplicate is always answered with its ack.

**Delivery timeout.** A batch that was never sent can simply be dropped when it expires (its
records were certainly not written). One that was sent stays in the sequence until the broker
answers for it; its senders are answered with a timeout at once and it travels on as a *ghost*.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Final, overload

from flux_client._errors import AckTimeoutError, FluxError
from flux_client._types import RecordMetadata

__all__ = ["MAX_IN_FLIGHT", "AckedRun", "Batch", "PartitionQueue", "Waiter"]

#: Batches in flight per partition once the broker knows the producer (= the acks it
#: remembers per producer and partition, so every resent duplicate gets its original ack).
MAX_IN_FLIGHT: Final = 5


class AckedRun(Sequence[RecordMetadata]):
    """Metadata of ``count`` consecutive records acked together, made on access.

    ``send_batch`` answers with these instead of one object per record: at a million records
    a second, building a million ``RecordMetadata`` nobody reads costs more than the send.
    """

    __slots__ = ("first_offset", "length", "partition", "stream", "timestamp")

    def __init__(
        self, stream: str, partition: int, first_offset: int, count: int, timestamp: int
    ) -> None:
        self.stream = stream
        self.partition = partition
        self.first_offset = first_offset
        self.length = count
        self.timestamp = timestamp

    def __len__(self) -> int:
        return self.length

    @overload
    def __getitem__(self, index: int) -> RecordMetadata: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[RecordMetadata]: ...
    def __getitem__(self, index: int | slice) -> RecordMetadata | Sequence[RecordMetadata]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.length))]
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError("record index out of range")
        offset = self.first_offset + index if self.first_offset >= 0 else -1
        return RecordMetadata(self.stream, self.partition, offset, self.timestamp)

    def __iter__(self) -> Iterator[RecordMetadata]:
        new, stream, partition, timestamp = (
            tuple.__new__,
            self.stream,
            self.partition,
            self.timestamp,
        )
        if self.first_offset < 0:
            offsets: Iterable[int] = repeat(-1, self.length)
        else:
            offsets = range(self.first_offset, self.first_offset + self.length)
        for offset in offsets:
            yield new(RecordMetadata, (stream, partition, offset, timestamp))

    def __repr__(self) -> str:
        return (
            f"AckedRun(stream={self.stream!r}, partition={self.partition}, "
            f"offsets={self.first_offset}..{self.first_offset + self.length - 1})"
        )


@dataclass(slots=True)
class Waiter:
    """Who is waiting for records of a batch: records ``[first, first + count)`` of it.

    A single send has ``single`` set and gets one :class:`RecordMetadata`; a ``send_batch``
    chunk gets an :class:`AckedRun`.
    """

    future: asyncio.Future[object]
    first: int
    count: int
    single: bool


class Batch:
    """Framed records for one partition, sent and answered as a unit."""

    __slots__ = (
        "count",
        "created_s",
        "deadline_s",
        "done",
        "expected_offset",
        "ghost",
        "lost",
        "parts",
        "sent",
        "seq",
        "size",
        "waiters",
    )

    def __init__(
        self, created_s: float, deadline_s: float, expected_offset: int | None = None
    ) -> None:
        self.parts: list[bytes] = []
        #: Bytes of framed records.
        self.size = 0
        self.count = 0
        self.waiters: list[Waiter] = []
        self.created_s = created_s
        self.deadline_s = deadline_s
        self.expected_offset = expected_offset
        self.seq: int | None = None
        self.sent = False
        #: Sent on a connection lost before its answer: that request may still be written.
        self.lost = False
        self.ghost = False
        self.done = False

    def payload(self) -> bytes:
        """The framed records as one ``bytes`` (joined once, kept for resends)."""
        if len(self.parts) != 1:
            self.parts = [b"".join(self.parts)]
        return self.parts[0]

    def add(self, record: bytes, waiter_future: asyncio.Future[object] | None) -> None:
        """Append one framed record; ``waiter_future`` (a single send) gets its metadata."""
        if waiter_future is not None:
            self.waiters.append(Waiter(waiter_future, self.count, 1, single=True))
        self.parts.append(record)
        self.size += len(record)
        self.count += 1

    def add_many(self, framed: bytes, count: int, waiter_future: asyncio.Future[object]) -> None:
        """Append ``count`` framed records answered together (a ``send_batch`` chunk)."""
        self.waiters.append(Waiter(waiter_future, self.count, count, single=False))
        self.parts.append(framed)
        self.size += len(framed)
        self.count += count

    def resolve(self, stream: str, partition: int, base_offset: int, timestamp: int) -> None:
        """Answer every waiter with where its records were written (offset -1: no ack)."""
        self.done = True
        for waiter in self.waiters:
            if waiter.future.done():
                continue
            if waiter.single:
                offset = base_offset + waiter.first if base_offset >= 0 else -1
                waiter.future.set_result(RecordMetadata(stream, partition, offset, timestamp))
            else:
                first = base_offset + waiter.first if base_offset >= 0 else -1
                waiter.future.set_result(
                    AckedRun(stream, partition, first, waiter.count, timestamp)
                )
        self.waiters = []

    def fail(self, make_error: Callable[[], FluxError]) -> None:
        """Answer every waiter with an error (a new one each: an exception is raised once)."""
        self.done = True
        self.abandon(make_error)

    def abandon(self, make_error: Callable[[], FluxError]) -> None:
        """Answer the waiters with an error but keep the batch in its sequence (a ghost)."""
        for waiter in self.waiters:
            if not waiter.future.done():
                waiter.future.set_exception(make_error())
        self.waiters = []
        self.ghost = True


class PartitionQueue:
    """Batches for one partition of one stream, from filling to the broker's answer."""

    def __init__(self, stream: str, partition: int, *, idempotent: bool) -> None:
        self.stream = stream
        self.partition = partition
        self.idempotent = idempotent
        #: The batch being filled by ``send``; sealed by the sender when it may go.
        self.open: Batch | None = None
        #: Sealed batches waiting to be sent, in order.
        self.sealed: deque[Batch] = deque()
        #: Sent batches waiting for their answer, in sending order.
        self.in_flight: deque[Batch] = deque()
        #: Sent batches that must be sent again once nothing is in flight.
        self.resend: list[Batch] = []
        self.resyncing = False
        #: The last number the broker confirmed for our producer id, if any.
        self.last_seq: int | None = None
        #: Whether the broker acked a batch since the last failure (a full window only then).
        self.confirmed = False
        #: Whether a connection was lost with batches in flight under the current producer id:
        #: their requests may still reach the broker, late.
        self.lost_since_id = False
        #: Whether a number sent once was given up (its batch refused for good) since the
        #: last resync.
        self.freed = False
        #: Batches given up with an unknown outcome; the producer fails them and clears this.
        self.unknown: list[Batch] = []
        self.next_seq = 0
        #: A producer id of this partition's own, after the broker lost track of the shared
        #: one (0: use the producer's).
        self.producer_id = 0
        self.needs_new_producer_id = False
        #: Earliest time (monotonic seconds) the next batch may go, after a retriable refusal.
        self.not_before_s = 0.0
        self.address: str | None = None

    # -- filling -----------------------------------------------------------------------------

    @property
    def window(self) -> int:
        """How many batches may be in flight now."""
        if not self.idempotent:
            return MAX_IN_FLIGHT
        return MAX_IN_FLIGHT if self.confirmed and not self.resyncing else 1

    def idle(self) -> bool:
        """Nothing is waiting or in flight."""
        return self.open is None and not self.sealed and not self.in_flight and not self.resend

    def seal_open(self) -> None:
        """Close the batch being filled; it waits to be sent."""
        if self.open is not None:
            self.sealed.append(self.open)
            self.open = None

    def batches(self) -> list[Batch]:
        """Every batch not yet answered."""
        found = [*self.unknown, *self.resend, *self.in_flight, *self.sealed]
        if self.open is not None:
            found.append(self.open)
        return found

    # -- sending -----------------------------------------------------------------------------

    def next_to_send(self, now_s: float, linger_s: float, flushing: bool) -> Batch | None:
        """The batch to send now, sealed and numbered, or None.

        The open batch is sealed only when it may go at once (the window has room): while
        the window is full, sends keep filling it — the batching that load brings.
        """
        if not self.ready(now_s, linger_s, flushing):
            return None
        if not self.sealed:
            self.seal_open()
        batch = self.sealed.popleft()
        if self.idempotent and batch.seq is None:
            batch.seq = self.next_seq
            self.next_seq += 1
        batch.sent = True
        self.in_flight.append(batch)
        return batch

    def ready(self, now_s: float, linger_s: float, flushing: bool) -> bool:
        """Whether :meth:`next_to_send` would return a batch now."""
        if self.resyncing or now_s < self.not_before_s or len(self.in_flight) >= self.window:
            return False
        if self.sealed:
            return True
        return (
            self.open is not None
            and self.open.count > 0
            and (flushing or now_s >= self.open.created_s + linger_s)
        )

    # -- answers -----------------------------------------------------------------------------

    def _answered(self, batch: Batch) -> None:
        if batch in self.in_flight:
            self.in_flight.remove(batch)

    def acked(self, batch: Batch) -> None:
        """The broker wrote ``batch`` (or had written it: a duplicate)."""
        self._answered(batch)
        if batch.seq is not None:
            self.last_seq = batch.seq
            self.confirmed = True

    def refused(self, batch: Batch, *, resend: bool, seq_used: bool = False) -> None:
        """The broker did not write ``batch``; ``resend`` it, or it failed for good.

        Args:
            batch: The refused batch.
            resend: Send it again (a retriable refusal, or out-of-order behind another).
            seq_used: The broker holds the number anyway (a duplicate too old to repeat).
        """
        self._answered(batch)
        if seq_used and batch.seq is not None:
            self.last_seq = batch.seq
        elif not resend and batch.seq is not None:
            self.freed = True
        if resend:
            self.resend.append(batch)
        if self.idempotent:
            self.resyncing = True
            self.confirmed = False

    def out_of_order(self, batch: Batch) -> None:
        """The broker refused ``batch``'s number as beyond the next one.

        Behind an earlier refusal that is expected; otherwise the broker's view of this
        producer differs from ours (it lost or never had our last batches), and this
        partition continues under a fresh producer id from number 0. Either way ``batch``
        was not written and is sent again.
        """
        expected = self.resyncing
        self.refused(batch, resend=True)
        if not expected:
            self.needs_new_producer_id = True

    def connection_lost(self, batch: Batch) -> bool:
        """The connection carrying ``batch`` broke before its answer.

        Returns:
            True if it will be sent again (idempotent); False if its outcome stays unknown
            and the caller must fail it.
        """
        self._answered(batch)
        if not self.idempotent:
            return False
        batch.lost = True
        self.resend.append(batch)
        self.resyncing = True
        self.confirmed = False
        self.lost_since_id = True
        self.address = None
        return True

    def resync(self) -> bool:
        """Once nothing is in flight after a failure: renumber and queue the batches to resend.

        Returns:
            True when the queue is ready to send again (False: answers are still pending, or
            a new producer id must be set first).
        """
        if not self.resyncing or self.in_flight or self.needs_new_producer_id:
            return not self.resyncing
        # Sending order: the batches just answered or lost, then those numbered by an earlier
        # resync and not sent since (they wait at the front of ``sealed``). Every number from
        # last_seq + 1 on is reassigned, so no two batches can ever share one.
        numbered = [batch for batch in self.sealed if batch.seq is not None]
        ordered = [*self.resend, *numbered]
        if self.last_seq is not None:
            base = self.last_seq + 1
        else:
            seqs = [b.seq for b in ordered if b.seq is not None]
            base = min(seqs) if seqs else self.next_seq
        renumbered = any(
            b.sent and b.seq is not None and b.seq != base + i for i, b in enumerate(ordered)
        )
        if self.lost_since_id and (renumbered or self.freed):
            # A number sent once would go to another batch, or a sent batch would get another
            # number, while requests of a lost connection may still reach the broker: one of
            # them could become the next number expected and be written (twice, or in place
            # of another batch). So the partition continues under a fresh producer id, under
            # which every old number is out of order forever. The batches whose requests may
            # still arrive cannot move to it (the broker could then write them twice): their
            # outcome is unknown, and the producer says so.
            self.unknown += [b for b in ordered if b.lost]
            self.resend = [b for b in self.resend if not b.lost]
            self.sealed = deque(b for b in self.sealed if not b.lost)
            self.needs_new_producer_id = True
            return False
        self.freed = False
        if numbered:
            self.sealed = deque(batch for batch in self.sealed if batch.seq is None)
        for index, batch in enumerate(ordered):
            batch.seq = base + index
        # Numbers of the unsent batches come after the resent ones.
        self.next_seq = base + len(ordered)
        self.sealed.extendleft(reversed(ordered))
        self.resend = []
        self.resyncing = False
        return True

    def use_producer_id(self, producer_id: int) -> None:
        """Continue under ``producer_id`` (unknown to the broker): numbers start again at 0."""
        self.producer_id = producer_id
        self.needs_new_producer_id = False
        self.last_seq = None
        self.confirmed = False
        self.lost_since_id = False
        self.freed = False
        for batch in (*self.resend, *self.sealed):
            batch.seq = None
        self.next_seq = 0
        self.resync()

    # -- expiry ------------------------------------------------------------------------------

    def expire(self, now_s: float, make_error: Callable[[bool], AckTimeoutError]) -> list[Batch]:
        """Answer the senders of batches past their delivery deadline with a timeout.

        Batches never sent are dropped (``make_error(True)``: certainly not written); sent
        ones stay in their sequence as ghosts (``make_error(False)``).

        Returns:
            The batches dropped, whose buffer space the caller releases.
        """
        dropped: list[Batch] = []
        for batch in self.batches():
            if batch.ghost or batch.deadline_s > now_s:
                continue
            if batch.sent:
                batch.abandon(lambda: make_error(False))
            else:
                batch.fail(lambda: make_error(True))
                dropped.append(batch)
        if dropped:
            gone = set(map(id, dropped))
            self.sealed = deque(b for b in self.sealed if id(b) not in gone)
            if self.open is not None and id(self.open) in gone:
                self.open = None
        return dropped
