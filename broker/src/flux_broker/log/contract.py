"""The commit-log contract: what the rest of the broker may assume about a partition's log.

Terms (Kafka's and Liftbridge's, with Liftbridge's "newest" convention):

- **offset**: position of a record in the partition, from 0, assigned by the log on append and
  never reused; offsets only grow.
- **oldest offset**: the first offset the log still holds (0 until retention deletes segments).
- **newest offset**: the *last written* offset, -1 when the log is empty (Kafka's LEO minus 1).
- **high watermark (HW)**: the last *committed* offset (-1 when nothing is committed). Committed
  readers never see past it. The log only stores it; the partition decides when it moves (the
  ISR's minimum; with an ISR of one broker, the newest offset).
- **leader epoch**: the epoch of the leader that wrote a record, stamped on every record.
- **timestamp**: Unix nanoseconds assigned by the log at append, never lower than the previous
  record's, so timestamp lookups are exact.

Errors (see :mod:`flux_broker.log.errors`): every method may raise ``LogClosedError`` after
:meth:`CommitLog.close`; appends raise the validation errors before changing anything and
``LogWriteError`` when the disk refuses the write (nothing is appended then either).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from flux_broker.log.format import NewRecord, Record, iter_decode

__all__ = ["AppendGuard", "AppendResult", "CommitLog", "LogReader", "RecordBatch", "Traffic"]


@dataclass(slots=True)
class Traffic:
    """Records and their bytes (as stored: framed) that passed one point, for the metrics.

    Writers add whole batches, never one record at a time: two additions per batch.

    Attributes:
        records: How many records.
        bytes: Their framed size in bytes.
    """

    records: int = 0
    bytes: int = 0


@dataclass(frozen=True, slots=True)
class AppendResult:
    """Where an appended batch landed.

    Attributes:
        base_offset: Offset of its first record.
        last_offset: Offset of its last record.
        timestamp_ns: Broker timestamp stamped on all its records.
    """

    base_offset: int
    last_offset: int
    timestamp_ns: int

    @property
    def count(self) -> int:
        """Number of records appended."""
        return self.last_offset - self.base_offset + 1


class AppendGuard(Protocol):
    """Checks a writer runs atomically with its append (optimistic concurrency, idempotence).

    Both methods run under the log's append lock, with no await between them and the write,
    so no other append can come in between: :meth:`check` sees the offset the batch will get,
    and :meth:`written` records the outcome before any other writer's :meth:`check` runs.
    """

    def check(self, base_offset: int) -> None:
        """Raise to refuse the append (nothing is written); ``base_offset`` is its first offset."""
        ...

    def written(self, result: AppendResult) -> None:
        """The batch was written (not necessarily durable yet) at ``result``. Must not raise."""
        ...


@dataclass(frozen=True, slots=True)
class RecordBatch:
    """Records returned by a reader, as the verified bytes stored in the log.

    Attributes:
        data: Framed records (the log format), ready to send as they are.
        first_offset: Offset of the first record in ``data``.
        last_offset: Offset of the last record in ``data``.
        count: Number of records.
        descending: True for a reverse reader's batch: :meth:`records` then yields newest
            first (``data`` itself is always in log order).
    """

    data: bytes
    first_offset: int
    last_offset: int
    count: int
    descending: bool = False

    def records(self) -> Iterator[Record]:
        """Decode the records, in reading order."""
        if self.descending:
            return reversed(list(iter_decode(self.data)))
        return iter_decode(self.data)


class LogReader(Protocol):
    """A cursor over a log; each :meth:`read` returns the next batch."""

    @property
    def next_offset(self) -> int:
        """Offset the next batch starts at (or, reversed, ends at)."""
        ...

    async def read(self, max_bytes: int | None = None) -> RecordBatch | None:
        """Return the next batch, at most ``max_bytes`` (the config's budget if ``None``).

        A forward reader waits, without polling, until a record is readable: up to the HW
        for a committed reader, up to the newest offset for an uncommitted one. A reverse
        reader never waits and returns ``None`` once it has passed the oldest offset.

        Raises:
            LogClosedError: The log or the reader was closed.
            CorruptRecordError: The next record failed its checks; it is not returned.
        """
        ...

    def close(self) -> None:
        """Stop the reader; a pending :meth:`read` raises ``LogClosedError``."""
        ...


class CommitLog(Protocol):
    """The append-only, segmented log of one partition."""

    @property
    def oldest_offset(self) -> int:
        """First offset held (see module docstring)."""
        ...

    @property
    def newest_offset(self) -> int:
        """Last written offset; -1 when empty."""
        ...

    @property
    def high_watermark(self) -> int:
        """Last committed offset; -1 when nothing is committed."""
        ...

    @property
    def leader_epoch(self) -> int:
        """Epoch stamped on appended records."""
        ...

    def set_leader_epoch(self, epoch: int) -> None:
        """Stamp ``epoch`` on records appended from now on.

        Raises:
            ValueError: ``epoch`` is lower than the current epoch (epochs only grow).
        """
        ...

    def set_high_watermark(self, offset: int) -> None:
        """Move the HW forward to ``offset`` and wake committed readers.

        A lower value than the current HW is ignored (the HW only moves forward).

        Raises:
            ValueError: ``offset`` is beyond the newest offset.
        """
        ...

    async def append(
        self, records: Sequence[NewRecord], *, guard: AppendGuard | None = None
    ) -> AppendResult:
        """Frame and append ``records`` with one write; durable per the sync policy on return.

        ``guard`` (see :class:`AppendGuard`) runs atomically with the write; whatever its
        ``check`` raises propagates and nothing is written.

        Raises:
            ValueError: ``records`` is empty.
            RecordTooLargeError, BatchTooLargeError: A limit was exceeded.
            LogWriteError: The disk refused the write or the fsync.
        """
        ...

    async def append_framed(
        self, data: bytes | bytearray, *, guard: AppendGuard | None = None
    ) -> AppendResult:
        """Append a batch already in the log's record format (e.g. framed by a client).

        Bodies are verified (CRC-32C and structure) and stored as they are; the log stamps
        offsets, its timestamp and the leader epoch into the headers. ``guard`` as in
        :meth:`append` (its ``check`` runs before the records are verified).

        Raises:
            InvalidBatchError: A record is malformed (``index`` names the first).
            BatchTooLargeError: The batch exceeds the batch limit.
            LogWriteError: The disk refused the write or the fsync.
        """
        ...

    def offset_for_timestamp(self, timestamp_ns: int) -> int:
        """Earliest offset whose timestamp is ``>= timestamp_ns``; newest + 1 if none."""
        ...

    def reader(self, start_offset: int, *, committed: bool = True) -> LogReader:
        """A forward reader from ``start_offset`` (clamped into ``[oldest, newest + 1]``)."""
        ...

    def reverse_reader(
        self, start_offset: int | None = None, *, committed: bool = True
    ) -> LogReader:
        """A reader from ``start_offset`` (default: the HW, or newest) back to the oldest."""
        ...

    async def close(self) -> None:
        """Sync, checkpoint the HW, mark a clean shutdown and release every file."""
        ...
