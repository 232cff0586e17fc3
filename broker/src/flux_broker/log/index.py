"""The dense offset index of one segment: one 20-byte entry per record.

Entries (layout in :mod:`flux_broker.log.format`) are buffered in memory and written in chunks
(at most :data:`PENDING_MAX_BYTES` behind), and read back with ``pread`` or from the buffer. A
lagging index is harmless: recovery rebuilds any index that does not describe its log, and the
log flushes it at every roll and close. Lookups binary-search the file, so they cost a few
system calls and no memory: the log needs them only to position a reader, never per record.
Relative offsets and timestamps both increase along the file (the log never stamps a timestamp
older than the previous one), which is what makes both searches valid.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple

from flux_broker.log.format import INDEX_ENTRY, INDEX_ENTRY_BYTES

__all__ = ["PENDING_MAX_BYTES", "IndexEntry", "IndexFile"]

#: Index bytes kept in memory before they are written (one write per this many bytes).
PENDING_MAX_BYTES = 64 * 1024


class IndexEntry(NamedTuple):
    """One index entry."""

    relative_offset: int
    timestamp_ns: int
    position: int
    size: int


class IndexFile:
    """An open ``.index`` file; ``count`` is the number of valid entries."""

    def __init__(self, path: Path, fd: int, count: int) -> None:
        """Wrap an open file; use :meth:`open` or :meth:`create`."""
        self.path = path
        self._fd = fd
        self.count = count
        self._written = count  # entries on disk; the rest are in _pending
        self._pending = bytearray()

    @classmethod
    def open(cls, path: Path) -> IndexFile:
        """Open (or create) ``path``; entries past the last whole one are ignored."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(fd).st_size
        return cls(path, fd, size // INDEX_ENTRY_BYTES)

    @classmethod
    def write_new(cls, path: Path, entries: bytes | bytearray) -> IndexFile:
        """Atomically replace ``path`` with exactly ``entries`` and open it."""
        tmp = path.with_name(path.name + ".rebuild")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, entries)
        finally:
            os.close(fd)
        tmp.replace(path)
        return cls.open(path)

    def append(self, entries: bytes | bytearray) -> None:
        """Append whole entries (buffered; written once enough are pending)."""
        self._pending += entries
        self.count += len(entries) // INDEX_ENTRY_BYTES
        if len(self._pending) >= PENDING_MAX_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the pending entries.

        Raises:
            OSError: The write failed (a full disk); the file is cut back to the entries
                written before, and the pending ones stay pending, whole.
        """
        if self._pending:
            try:
                _write_all(self._fd, self._pending)
            except OSError:
                # Part of the entries may have reached the file: cut them, or the next flush
                # would append them again after the part and shift every later entry.
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._written * INDEX_ENTRY_BYTES)
                raise
            self._pending.clear()
            self._written = self.count

    def truncate(self, count: int) -> None:
        """Keep only the first ``count`` entries.

        Writes nothing (pending entries past ``count`` are dropped, not flushed first), so it
        works on a full disk too: it is how a failed append takes its entries back.
        """
        if count >= self._written:
            del self._pending[(count - self._written) * INDEX_ENTRY_BYTES :]
        else:
            self._pending.clear()
            self._written = count
        self.count = count
        # Also drops whatever a failed flush left past the entries written.
        os.ftruncate(self._fd, self._written * INDEX_ENTRY_BYTES)

    def entry(self, i: int) -> IndexEntry:
        """Return entry ``i`` (0-based)."""
        if i >= self._written:
            return IndexEntry(
                *INDEX_ENTRY.unpack_from(self._pending, (i - self._written) * INDEX_ENTRY_BYTES)
            )
        data = os.pread(self._fd, INDEX_ENTRY_BYTES, i * INDEX_ENTRY_BYTES)
        return IndexEntry(*INDEX_ENTRY.unpack(data))

    def read_all(self) -> bytes:
        """All valid entries' bytes (for consistency checks of small indexes and tests)."""
        self.flush()
        return os.pread(self._fd, self.count * INDEX_ENTRY_BYTES, 0)

    def find_offset(self, relative_offset: int) -> int | None:
        """Index of the entry with the smallest relative offset ``>= relative_offset``."""
        low, high = 0, self.count
        # Dense segments hold offset base+i at entry i: try that before searching.
        if (
            low <= relative_offset < high
            and self.entry(relative_offset).relative_offset == relative_offset
        ):
            return relative_offset
        while low < high:
            middle = (low + high) // 2
            if self.entry(middle).relative_offset < relative_offset:
                low = middle + 1
            else:
                high = middle
        return low if low < self.count else None

    def find_timestamp(self, timestamp_ns: int) -> int | None:
        """Index of the first entry whose timestamp is ``>= timestamp_ns``."""
        low, high = 0, self.count
        while low < high:
            middle = (low + high) // 2
            if self.entry(middle).timestamp_ns < timestamp_ns:
                low = middle + 1
            else:
                high = middle
        return low if low < self.count else None

    def fileno(self) -> int:
        """The file descriptor, with pending entries written first (for fsync)."""
        self.flush()
        return self._fd

    def close(self) -> None:
        """Write pending entries and close the file (idempotent)."""
        if self._fd >= 0:
            try:
                self.flush()
            finally:
                os.close(self._fd)
                self._fd = -1


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
