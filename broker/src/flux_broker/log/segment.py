"""One segment of a commit log: a ``.log`` file of framed records and its ``.index``.

Segments are named by their base offset in 20 digits (``00000000000000000042.log``). Only the
newest segment (the *active* one) is appended to; the others are *sealed*. A sealed segment's
file handles may be closed to respect the open-handle limit and are reopened on demand.

Recovery (:meth:`Segment.recover`) trusts an index only when it is consistent with its log;
otherwise it rescans the log, verifying every record (length, CRC-32C, body structure,
increasing offsets), and rebuilds the index from what it found. In the active segment a torn
or corrupt tail is cut off; in a sealed one the first bad record is remembered
(``corrupt_from``) so that readers stop before it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from flux_broker.log.errors import CorruptRecordError, LogWriteError, write_failed
from flux_broker.log.format import (
    BODY_SIZE_AT,
    CRC,
    HEADER,
    HEADER_BYTES,
    INDEX_ENTRY,
    INDEX_ENTRY_BYTES,
    MIN_BODY_BYTES,
    verify_record,
)
from flux_broker.log.index import IndexFile

__all__ = [
    "INDEX_SUFFIX",
    "LOG_SUFFIX",
    "HandleCache",
    "ReadResult",
    "ScanResult",
    "Segment",
    "segment_name",
]

LOG_SUFFIX: Final = ".log"
INDEX_SUFFIX: Final = ".index"
NAME_DIGITS: Final = 20
SCAN_CHUNK_BYTES: Final = 4 * 1024 * 1024

_log = logging.getLogger(__name__)


def segment_name(base_offset: int) -> str:
    """File stem of the segment starting at ``base_offset``."""
    return f"{base_offset:0{NAME_DIGITS}d}"


@dataclass(slots=True)
class ScanResult:
    """What a log scan found: the valid prefix and why it ended."""

    entries: bytearray = field(default_factory=bytearray)
    count: int = 0
    end_position: int = 0
    next_offset: int = 0
    first_timestamp_ns: int | None = None
    last_timestamp_ns: int | None = None
    stop_reason: str | None = None  # None: the whole file is valid


@dataclass(frozen=True, slots=True)
class ReadResult:
    """Records read from one segment.

    Attributes:
        data: Verified framed records.
        count: How many.
        first_offset: Offset of the first one (-1 if none); in a compacted segment it may be
            above the offset the read asked for.
        last_offset: Offset of the last one (-1 if none).
        next_position: File position just after them.
    """

    data: bytes
    count: int
    first_offset: int
    last_offset: int
    next_position: int


def scan(fd: int, base_offset: int, file_size: int, *, dense: bool = True) -> ScanResult:
    """Verify the records of a log file from its start; stop at the first bad one.

    In a ``dense`` segment (every segment until compaction exists) offsets must be exactly
    consecutive from ``base_offset``; otherwise they must only increase.
    """
    result = ScanResult(next_offset=base_offset)
    buffer = b""
    view = memoryview(buffer)
    buffer_start = 0  # file position of buffer[0]
    position = 0
    while position < file_size:
        if position + HEADER_BYTES > buffer_start + len(buffer):
            buffer, buffer_start = _refill(fd, position, file_size, HEADER_BYTES)
            view = memoryview(buffer)
        local = position - buffer_start
        if local + HEADER_BYTES > len(buffer):
            result.stop_reason = f"torn header at byte {position}"
            break
        (body_size,) = CRC.unpack_from(buffer, local + BODY_SIZE_AT)
        record_bytes = HEADER_BYTES + body_size
        if position + record_bytes > file_size:
            result.stop_reason = f"record at byte {position} runs past the end of the file"
            break
        if local + record_bytes > len(buffer):
            buffer, buffer_start = _refill(fd, position, file_size, record_bytes)
            view = memoryview(buffer)
            local = 0
        reason = verify_record(view, local)
        offset, timestamp_ns, _epoch, _size = HEADER.unpack_from(buffer, local)
        if reason is None and (
            offset < result.next_offset or (dense and offset != result.next_offset)
        ):
            reason = f"offset {offset} where {result.next_offset} was expected"
        if reason is not None:
            result.stop_reason = f"bad record at byte {position}: {reason}"
            break
        result.entries += INDEX_ENTRY.pack(
            offset - base_offset, timestamp_ns, position, record_bytes
        )
        result.count += 1
        if result.first_timestamp_ns is None:
            result.first_timestamp_ns = timestamp_ns
        result.last_timestamp_ns = timestamp_ns
        result.next_offset = offset + 1
        position += record_bytes
    result.end_position = position
    return result


def _write_rest(fd: int, rest: memoryview) -> None:
    """Write what a short write left, raising the ``OSError`` that stops it."""
    while rest:
        written = os.write(fd, rest)
        if written == 0:
            raise OSError(errno.EIO, "write wrote nothing")
        rest = rest[written:]


def _refill(fd: int, position: int, file_size: int, at_least: int) -> tuple[bytes, int]:
    size = min(max(SCAN_CHUNK_BYTES, at_least), file_size - position)
    return os.pread(fd, size, position), position


class HandleCache:
    """Bounds how many sealed segments of one log have open file handles.

    The least recently used are closed first. Every sealed segment registers here whenever its
    handles open, however they were opened, so the bound cannot be bypassed.
    """

    def __init__(self, max_open: int) -> None:
        """Allow at most ``max_open`` sealed segments open at once."""
        self.max_open = max_open
        self._open: OrderedDict[int, Segment] = OrderedDict()

    def used(self, segment: Segment) -> None:
        """Record a use of ``segment`` (opened or read); close the least recently used extras."""
        self._open[segment.base_offset] = segment
        self._open.move_to_end(segment.base_offset)
        while len(self._open) > self.max_open:
            _base, evicted = self._open.popitem(last=False)
            evicted.close_handles()

    def closed(self, segment: Segment) -> None:
        """Forget ``segment`` (its handles were closed)."""
        if self._open.get(segment.base_offset) is segment:
            del self._open[segment.base_offset]

    @property
    def open_count(self) -> int:
        """Sealed segments with open handles."""
        return len(self._open)


class Segment:
    """A segment's files and what the log keeps in memory about them.

    Attributes:
        base_offset: Offset the segment starts at (its name).
        next_offset: Offset after its last record (``base_offset`` when empty).
        size_bytes: Bytes of valid records in the log file.
        first_timestamp_ns: Timestamp of its first record (``None`` when empty).
        last_timestamp_ns: Timestamp of its last record.
        corrupt_from: Offset of the first record known to be corrupt, if any.
    """

    def __init__(
        self,
        directory: Path,
        base_offset: int,
        *,
        next_offset: int,
        size_bytes: int,
        first_timestamp_ns: int | None,
        last_timestamp_ns: int | None,
        corrupt_from: int | None = None,
    ) -> None:
        """Describe a segment whose files exist; handles open lazily."""
        self.directory = directory
        self.base_offset = base_offset
        self.next_offset = next_offset
        self.size_bytes = size_bytes
        self.first_timestamp_ns = first_timestamp_ns
        self.last_timestamp_ns = last_timestamp_ns
        self.corrupt_from = corrupt_from
        # Dense: offsets are exactly consecutive (true until compaction rewrites a segment).
        self.dense = True
        self.active = False
        # Bytes from the start of the log that this process framed, checked or scanned.
        self.verified_bytes = 0
        self.records = 0  # record count, kept in memory (retention counts without I/O)
        self.rebuilt_index = False  # set by recover(): the index was rebuilt from the log
        self.cut_bytes = 0  # set by recover(): bytes cut off a torn or corrupt tail
        # A failed write could not be undone: appends are refused until the log is reopened.
        self.unwritable = False
        self._log_fd = -1
        self._index: IndexFile | None = None
        self.handle_cache: HandleCache | None = None

    # -- files ---------------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        """The ``.log`` file."""
        return self.directory / (segment_name(self.base_offset) + LOG_SUFFIX)

    @property
    def index_path(self) -> Path:
        """The ``.index`` file."""
        return self.directory / (segment_name(self.base_offset) + INDEX_SUFFIX)

    @property
    def is_open(self) -> bool:
        """Whether the file handles are open."""
        return self._log_fd >= 0

    @property
    def index(self) -> IndexFile:
        """The open index (opening the handles if needed)."""
        self.open_handles()
        assert self._index is not None
        return self._index

    def log_fd(self) -> int:
        """The open log file descriptor (opening the handles if needed)."""
        self.open_handles()
        return self._log_fd

    def open_handles(self) -> None:
        """Open the log (append mode when active) and the index."""
        if self._log_fd >= 0:
            return
        flags = os.O_RDWR | os.O_APPEND if self.active else os.O_RDONLY
        self._log_fd = os.open(self.log_path, flags)
        self._index = IndexFile.open(self.index_path)
        if self.handle_cache is not None and not self.active:
            self.handle_cache.used(self)

    def close_handles(self) -> None:
        """Close the file handles; they reopen on the next use."""
        if self.handle_cache is not None:
            self.handle_cache.closed(self)
        if self._log_fd >= 0:
            os.close(self._log_fd)
            self._log_fd = -1
        if self._index is not None:
            self._index.close()
            self._index = None

    @classmethod
    def create(cls, directory: Path, base_offset: int) -> Segment:
        """Create the empty files of a new active segment (the caller fsyncs the directory).

        Raises:
            OSError: A file could not be created (a full disk, say); whatever was created is
                removed again, so a later attempt starts from nothing.
        """
        segment = cls(
            directory,
            base_offset,
            next_offset=base_offset,
            size_bytes=0,
            first_timestamp_ns=None,
            last_timestamp_ns=None,
        )
        os.close(os.open(segment.log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        try:
            segment.index_path.unlink(missing_ok=True)
            IndexFile.write_new(segment.index_path, b"").close()
            segment.active = True
            segment.open_handles()
        except OSError:
            segment.discard()
            raise
        return segment

    def discard(self) -> None:
        """Remove a segment that never held a record, as far as possible (never raises)."""
        try:
            self.delete_files()
        except OSError:
            _log.exception("%s: could not remove an unused segment", self.log_path)

    @classmethod
    def recover(cls, directory: Path, base_offset: int, *, active: bool, trust: bool) -> Segment:
        """Open an existing segment after a restart, repairing what a crash can leave behind.

        Args:
            directory: The partition directory.
            base_offset: The segment's base offset.
            active: Whether it is the newest segment (its tail may be cut).
            trust: Whether the index may be used without a scan when it is consistent
                (false for the active segment after an unclean shutdown).
        """
        segment = cls(
            directory,
            base_offset,
            next_offset=base_offset,
            size_bytes=0,
            first_timestamp_ns=None,
            last_timestamp_ns=None,
        )
        segment.active = active
        log_fd = os.open(segment.log_path, os.O_RDWR)
        try:
            file_size = os.fstat(log_fd).st_size
            if trust and segment._adopt_index(file_size):
                return segment
            # The active segment is never compacted, so its offsets must be consecutive -- unless
            # its index shows gaps (a crash in the middle of truncating a compacted segment).
            dense = active and not segment.index_shows_gaps()
            result = scan(log_fd, base_offset, file_size, dense=dense)
            segment.rebuilt_index = True
            if result.stop_reason is not None:
                if active:
                    segment.cut_bytes = file_size - result.end_position
                    _log.warning(
                        "%s: cutting %d bytes at the end of the active segment (%s)",
                        segment.log_path,
                        file_size - result.end_position,
                        result.stop_reason,
                    )
                    os.ftruncate(log_fd, result.end_position)
                    os.fsync(log_fd)
                else:
                    segment.corrupt_from = result.next_offset
                    _log.error(
                        "%s: sealed segment is corrupt from offset %d (%s); reads stop there",
                        segment.log_path,
                        result.next_offset,
                        result.stop_reason,
                    )
            IndexFile.write_new(segment.index_path, result.entries).close()
        finally:
            os.close(log_fd)
        segment.next_offset = result.next_offset
        segment.size_bytes = result.end_position
        segment.verified_bytes = result.end_position
        segment.records = result.count
        segment.dense = result.count == result.next_offset - base_offset
        segment.first_timestamp_ns = result.first_timestamp_ns
        segment.last_timestamp_ns = result.last_timestamp_ns
        return segment

    def index_shows_gaps(self) -> bool:
        """Whether the index on disk (however damaged) skips offsets, as after compaction."""
        try:
            index = IndexFile.open(self.index_path)
        except OSError:
            return False
        try:
            if index.count == 0:
                return False
            last = index.entry(index.count - 1)
            return index.entry(0).relative_offset != 0 or last.relative_offset >= index.count
        finally:
            index.close()

    def _adopt_index(self, file_size: int) -> bool:
        """Use the index as it is if it describes the log exactly; report whether it did."""
        try:
            index_size = self.index_path.stat().st_size
        except FileNotFoundError:
            return False
        if index_size % INDEX_ENTRY_BYTES:
            return False
        index = IndexFile.open(self.index_path)
        try:
            if index.count == 0:
                return file_size == 0
            first, last = index.entry(0), index.entry(index.count - 1)
            consistent = (
                first.position == 0
                and first.relative_offset >= 0
                and last.relative_offset >= index.count - 1
                and last.position + last.size == file_size
                and last.timestamp_ns >= first.timestamp_ns
            )
            if consistent:
                self.records = index.count
                self.dense = first.relative_offset == 0 and last.relative_offset == index.count - 1
                self.next_offset = self.base_offset + last.relative_offset + 1
                self.size_bytes = file_size
                self.first_timestamp_ns = first.timestamp_ns
                self.last_timestamp_ns = last.timestamp_ns
            return consistent
        finally:
            index.close()

    # -- writing -------------------------------------------------------------------------

    def append(
        self, data: bytes | bytearray, entries: bytes, next_offset: int, timestamp_ns: int
    ) -> None:
        """Append a framed batch with one write, then its index entries.

        Raises:
            LogWriteError: The write failed (:class:`DiskFullError` when the filesystem is
                full); the log file and the index are cut back to their previous sizes so no
                partial record or entry remains, and nothing in memory changed.
        """
        if self.unwritable:
            # Bytes of a failed write may still follow the last record: a new write would land
            # after them while the index points before them.
            raise LogWriteError(
                f"append to {self.log_path} refused: an earlier failed write could not be "
                "undone; restart the broker to recover the partition"
            )
        fd = self.log_fd()
        try:
            written = os.write(fd, data)
            if written != len(data):
                # A short write is how a filling disk first shows; writing the rest tells
                # why (ENOSPC, EDQUOT, EFBIG), or succeeds if space came back meanwhile.
                _write_rest(fd, memoryview(data)[written:])
        except OSError as exc:
            self._cut_back(fd)
            raise write_failed(f"append to {self.log_path}", exc) from exc
        try:
            self.index.append(entries)
        except OSError as exc:
            self._cut_back(fd)
            try:
                self.index.truncate(self.records)
            except OSError:
                self.unwritable = True
                _log.exception("%s: could not cut a failed index append back", self.index_path)
            raise write_failed(f"index append to {self.index_path}", exc) from exc
        if self.verified_bytes == self.size_bytes:
            self.verified_bytes += len(data)  # framed or checked before the write
        self.records += len(entries) // INDEX_ENTRY_BYTES
        self.size_bytes += len(data)
        self.next_offset = next_offset
        if self.first_timestamp_ns is None:
            self.first_timestamp_ns = timestamp_ns
        self.last_timestamp_ns = timestamp_ns

    def _cut_back(self, fd: int) -> None:
        """Undo a failed write; if that fails too, refuse every later append (see ``append``)."""
        for _ in range(2):
            with contextlib.suppress(OSError):
                os.ftruncate(fd, self.size_bytes)
                if os.fstat(fd).st_size == self.size_bytes:
                    return
        self.unwritable = True
        _log.error(
            "%s: could not cut a failed write back to %d bytes; appends to this partition are "
            "refused until the broker restarts (recovery then cuts the unacked tail)",
            self.log_path,
            self.size_bytes,
        )

    def epoch_starts(self) -> list[tuple[int, int]]:
        """``(leader epoch, offset)`` wherever the epoch changes along this segment's records.

        Walks the record headers only (no checks): used to rebuild a lost epoch cache.
        """
        starts: list[tuple[int, int]] = []
        fd = self.log_fd()
        position = 0
        while position + HEADER_BYTES <= self.size_bytes:
            chunk = os.pread(fd, min(SCAN_CHUNK_BYTES, self.size_bytes - position), position)
            cursor = 0
            while cursor + HEADER_BYTES <= len(chunk):
                offset, _ts, epoch, body_size = HEADER.unpack_from(chunk, cursor)
                if not starts or epoch > starts[-1][0]:
                    starts.append((epoch, offset))
                cursor += HEADER_BYTES + body_size
            position += cursor  # the next record's start, even if this chunk ended inside it
        return starts

    def truncate_to(self, offset: int) -> None:
        """Remove the records at and after ``offset`` (in place: cut the log, then the index).

        A crash between the two cuts leaves an index longer than its log, which recovery
        notices and rebuilds.
        """
        located = self.position_of(offset)
        if located is None:
            return
        entry, position, _found = located
        fd = self.log_fd()
        os.ftruncate(fd, position)
        os.fsync(fd)
        self.index.truncate(entry)
        self.records = entry
        self.size_bytes = position
        self.verified_bytes = min(self.verified_bytes, position)
        if entry:
            last = self.index.entry(entry - 1)
            self.next_offset = self.base_offset + last.relative_offset + 1
            self.last_timestamp_ns = last.timestamp_ns
        else:
            self.next_offset = self.base_offset
            self.first_timestamp_ns = self.last_timestamp_ns = None

    def delete_files(self) -> None:
        """Close the handles and delete both files (the caller fsyncs the directory)."""
        self.close_handles()
        self.log_path.unlink(missing_ok=True)
        self.index_path.unlink(missing_ok=True)

    def rebuild_index(self) -> None:
        """Rebuild the index from the log (found inconsistent while reading).

        A record that fails its checks ends the index there and marks the segment corrupt
        from that offset; nothing is cut while the log is open.
        """
        result = scan(self.log_fd(), self.base_offset, self.size_bytes, dense=self.dense)
        self.close_handles()
        IndexFile.write_new(self.index_path, result.entries).close()
        self.open_handles()
        self.verified_bytes = max(self.verified_bytes, result.end_position)
        self.records = result.count
        if result.stop_reason is not None:
            self.corrupt_from = result.next_offset
            _log.error(
                "%s: corrupt from offset %d (%s); reads stop there",
                self.log_path,
                result.next_offset,
                result.stop_reason,
            )

    def seal(self) -> None:
        """Stop appending: reopen the handles read-only."""
        self.close_handles()
        self.active = False

    # -- reading -------------------------------------------------------------------------

    def position_of(self, offset: int) -> tuple[int, int, int] | None:
        """``(entry, position, offset)`` of the first record at or after ``offset``, or ``None``.

        ``entry`` is the index entry's number, ``position`` the record's byte position.
        """
        i = self.index.find_offset(offset - self.base_offset)
        if i is None:
            return None
        entry = self.index.entry(i)
        return i, entry.position, self.base_offset + entry.relative_offset

    def index_agrees_around(self, i: int) -> bool:
        """Whether index entry ``i`` fits its neighbours (positions and sizes chain up).

        When a record fails its checks where the index sent a reader, this tells a damaged
        index (rebuild it) from a damaged record (report it).
        """
        index = self.index
        entry = index.entry(i)
        if i > 0:
            before = index.entry(i - 1)
            if before.position + before.size != entry.position:
                return False
        if i + 1 < index.count:
            return entry.position + entry.size == index.entry(i + 1).position
        return entry.position + entry.size == self.size_bytes

    def read(  # noqa: PLR0912 -- one loop, one check per way a record can be bad
        self, position: int, expected_offset: int, max_offset: int, max_bytes: int
    ) -> ReadResult:
        """Read verified records from ``position`` up to ``max_offset`` within ``max_bytes``.

        At least one record is returned when one is available, even if it alone exceeds
        ``max_bytes`` (otherwise a reader could never move past it). Bytes this process
        framed, checked or scanned (below ``verified_bytes``) are not checked again; offsets
        and lengths always are.

        Raises:
            CorruptRecordError: The first record at ``position`` fails its checks; nothing
                after a bad record is ever returned.
        """
        if self.corrupt_from is not None and expected_offset >= self.corrupt_from:
            raise CorruptRecordError(expected_offset, self.log_path, position, "found by recovery")
        available = self.size_bytes - position
        if available <= 0:
            return ReadResult(b"", 0, -1, -1, position)
        fd = self.log_fd()
        data = os.pread(fd, min(available, max(max_bytes, HEADER_BYTES)), position)
        view = memoryview(data)
        verified = self.verified_bytes - position  # data[:verified] needs no CRC check
        dense = self.dense
        unpack_header = HEADER.unpack_from
        cursor = 0
        count = 0
        first_offset = last_offset = -1
        while cursor + HEADER_BYTES <= len(data):
            offset, _ts, _epoch, body_size = unpack_header(data, cursor)
            end = cursor + HEADER_BYTES + body_size
            if count and (offset > max_offset or end > len(data)):
                break
            if count == 0 and offset <= max_offset and end > len(data) and end <= available:
                data = os.pread(fd, end, position)  # one record larger than the budget
                view = memoryview(data)
            if offset != expected_offset and (dense or offset < expected_offset):
                reason: str | None = f"offset {offset} where {expected_offset} was expected"
            elif end <= verified and body_size >= MIN_BODY_BYTES:
                reason = None
            else:
                reason = verify_record(view, cursor)
            if reason is not None:
                if count:
                    break  # serve the good records; the next read reports the bad one
                raise CorruptRecordError(expected_offset, self.log_path, position, reason)
            if offset > max_offset:
                break
            if not count:
                first_offset = offset
            count += 1
            last_offset = offset
            expected_offset = offset + 1
            cursor = end
        if position <= self.verified_bytes < position + cursor:
            self.verified_bytes = position + cursor
        return ReadResult(data[:cursor], count, first_offset, last_offset, position + cursor)
