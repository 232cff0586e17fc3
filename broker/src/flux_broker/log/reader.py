"""Readers over a :class:`~flux_broker.log.commitlog.FileCommitLog`.

A forward reader remembers its segment and file position, so sequential reads never touch the
index; it waits for data on an :class:`asyncio.Event` that the log replaces each time it wakes
its waiters (no polling, no lost wake-ups: the event is taken before the log is checked). A
reverse reader walks the index backwards, one byte-bounded run of records at a time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from flux_broker.log.contract import RecordBatch
from flux_broker.log.errors import CorruptRecordError, LogClosedError

if TYPE_CHECKING:
    from flux_broker.log.commitlog import FileCommitLog
    from flux_broker.log.segment import Segment

__all__ = ["ForwardReader", "ReverseReader"]


class ForwardReader:
    """Reads from an offset towards the end of the log, waiting at the end for more."""

    def __init__(self, log: FileCommitLog, start_offset: int, *, committed: bool) -> None:
        """Start at ``start_offset``; use :meth:`FileCommitLog.reader`."""
        self._log = log
        self._next_offset = start_offset
        self._committed = committed
        self._segment: Segment | None = None
        self._position = 0
        self._closed = False
        self._generation = log.generation

    @property
    def next_offset(self) -> int:
        """Offset of the next record to return."""
        return self._next_offset

    def close(self) -> None:
        """Stop the reader; a pending :meth:`read` raises ``LogClosedError``."""
        self._closed = True
        self._log.wake_readers()

    async def read(self, max_bytes: int | None = None) -> RecordBatch:
        """Wait for and return the next batch (see :class:`~flux_broker.log.contract.LogReader`)."""
        budget = max_bytes if max_bytes is not None else self._log.config.read_max_bytes
        while True:
            self._check_open()
            event = self._log.data_event(committed=self._committed)
            batch = self.read_nowait(budget)
            if batch is not None:
                return batch
            await event.wait()

    def _check_open(self) -> None:
        if self._closed:
            raise LogClosedError("reader closed")
        if self._log.closed:
            raise LogClosedError("log closed")

    def read_nowait(self, max_bytes: int) -> RecordBatch | None:
        """Return the next batch if a record is readable now, else ``None``."""
        self._check_open()
        log = self._log
        if self._generation != log.generation:
            # The log was truncated: offsets from the cut on were (or will be) written again.
            cut = log.truncated_since(self._generation)
            self._generation = log.generation
            self._segment = None
            if cut is not None:
                self._next_offset = min(self._next_offset, cut)
        bound = log.high_watermark if self._committed else log.newest_offset
        repaired = False
        # A bounded walk: each pass returns, or moves to a later segment, or repairs an index
        # once.
        for _ in range(len(log.segments) + 2):
            if self._next_offset > bound:
                return None
            self._next_offset = max(self._next_offset, log.oldest_offset)
            segment = self._segment
            located_entry = -1
            if (
                segment is None
                or not log.holds(segment)
                or self._next_offset >= segment.next_offset
            ):
                segment = log.segment_for(self._next_offset)
                log.check_not_corrupt(segment, self._next_offset)
                located = log.locate(segment, self._next_offset)
                if located is None:  # past this segment's records: go on with the next one
                    following = log.segment_after(segment)
                    if following is None:
                        return None
                    self._segment = None
                    self._next_offset = max(self._next_offset, following.base_offset)
                    continue
                self._segment = segment
                located_entry, self._position, self._next_offset = located
            elif not segment.active:
                log.touch(segment)  # reading a cached sealed segment: keep the LRU honest
            try:
                result = segment.read(self._position, self._next_offset, bound, max_bytes)
            except CorruptRecordError as error:
                if (
                    located_entry >= 0
                    and not repaired
                    and not segment.index_agrees_around(located_entry)
                ):
                    # The index, not the record, is damaged: rebuild it and retry.
                    log.rebuild_index(segment)
                    self._segment = None
                    repaired = True
                    continue
                log.report_corruption(error)
                raise
            if result.count == 0:
                return None
            self._position = result.next_position
            self._next_offset = result.last_offset + 1
            return RecordBatch(result.data, result.first_offset, result.last_offset, result.count)
        return None


class ReverseReader:
    """Reads from an offset back to the oldest offset, newest records first."""

    def __init__(self, log: FileCommitLog, start_offset: int, *, committed: bool) -> None:
        """Start at ``start_offset`` (inclusive); use :meth:`FileCommitLog.reverse_reader`."""
        self._log = log
        self._next_offset = start_offset
        self._committed = committed
        self._closed = False

    @property
    def next_offset(self) -> int:
        """Offset of the next (older) record to return; below the oldest when done."""
        return self._next_offset

    def close(self) -> None:
        """Stop the reader."""
        self._closed = True

    async def read(self, max_bytes: int | None = None) -> RecordBatch | None:
        """Return the next batch going backwards, or ``None`` past the oldest offset.

        Raises:
            CorruptRecordError: The next (older) record failed its checks. Every record newer
                than it has been returned first.
        """
        if self._closed or self._log.closed:
            raise LogClosedError("reader closed" if self._closed else "log closed")
        budget = max_bytes if max_bytes is not None else self._log.config.read_max_bytes
        log = self._log
        # The bound is checked at every read: a truncation may have lowered it since.
        bound = log.high_watermark if self._committed else log.newest_offset
        self._next_offset = min(self._next_offset, bound)
        while self._next_offset >= max(log.oldest_offset, 0):
            segment = log.segment_for(self._next_offset)
            log.check_not_corrupt(segment, self._next_offset)
            index = segment.index
            high = index.find_offset(self._next_offset - segment.base_offset + 1)
            high = index.count if high is None else high  # entries [.., high) are <= next
            if high == 0:
                self._next_offset = segment.base_offset - 1
                continue
            top = index.entry(high - 1)
            top_offset = segment.base_offset + top.relative_offset
            end = top.position + top.size
            low = _first_entry_at_or_after(segment, end - budget, high - 1)
            batch = self._read_window(segment, low, top_offset, end)
            self._next_offset = batch.first_offset - 1
            return batch
        return None

    def _read_window(self, segment: Segment, low: int, top_offset: int, end: int) -> RecordBatch:
        """Read index entries from ``low`` up to ``top_offset``.

        Around a bad record, the part above it (newer) is returned first; the bad record
        itself raises.
        """
        index = segment.index
        while True:
            entry = index.entry(low)
            first_offset = segment.base_offset + entry.relative_offset
            try:
                result = segment.read(
                    entry.position, first_offset, top_offset, end - entry.position
                )
            except CorruptRecordError as error:
                bad, failure = first_offset, error
            else:
                if result.last_offset == top_offset:
                    return RecordBatch(
                        result.data, first_offset, top_offset, result.count, descending=True
                    )
                bad = result.last_offset + 1
                failure = CorruptRecordError(
                    bad, segment.log_path, result.next_position, "bad record"
                )
            following = index.find_offset(bad + 1 - segment.base_offset)
            if bad >= top_offset or following is None:
                self._log.report_corruption(failure)
                raise failure
            low = following


def _first_entry_at_or_after(segment: Segment, position: int, last: int) -> int:
    """Smallest entry index ``<= last`` whose record starts at or after ``position``."""
    index = segment.index
    low, high = 0, last
    while low < high:
        middle = (low + high) // 2
        if index.entry(middle).position < position:
            low = middle + 1
        else:
            high = middle
    return low
