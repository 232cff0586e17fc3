"""Errors of the commit log.

::

    LogError
    ├── LogClosedError            the log was closed; nothing more can be done with it
    ├── OffsetOutOfRangeError     a read or lookup named an offset the log does not hold
    ├── RecordTooLargeError       one record exceeds the record byte limit
    ├── BatchTooLargeError        a batch exceeds the batch byte limit
    ├── InvalidBatchError         a client-framed batch is malformed (``index`` = first bad record)
    ├── LogWriteError             the write failed (e.g. disk full); the log is unchanged
    │   └── DiskFullError         ... because the filesystem is full (ENOSPC, EDQUOT)
    └── CorruptRecordError        a stored record failed its CRC or length checks on read

Everything but :class:`CorruptRecordError` is raised before the log changes: a failed append
leaves no partial record on disk.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Final

__all__ = [
    "BatchTooLargeError",
    "CorruptRecordError",
    "DiskFullError",
    "InvalidBatchError",
    "LogClosedError",
    "LogError",
    "LogWriteError",
    "OffsetOutOfRangeError",
    "RecordTooLargeError",
    "SyncFailedError",
    "write_failed",
]

#: The errnos of a full filesystem: no space left, or the user's quota used up.
_DISK_FULL_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


class LogError(Exception):
    """Root of the commit log's errors."""


class LogClosedError(LogError):
    """The log (or reader) is closed."""


class OffsetOutOfRangeError(LogError):
    """An offset outside ``[oldest, newest + 1]`` was asked for.

    Attributes:
        offset: The offset asked for.
        oldest: Oldest offset the log holds.
        newest: Newest offset the log holds (-1 when empty).
    """

    def __init__(self, offset: int, oldest: int, newest: int) -> None:
        """Describe an offset outside the log."""
        super().__init__(f"offset {offset} is outside the log [{oldest}, {newest}]")
        self.offset = offset
        self.oldest = oldest
        self.newest = newest


class RecordTooLargeError(LogError):
    """A record is larger than ``record_max_bytes``.

    Attributes:
        index: Position of the record in its batch.
        size_bytes: Its framed size.
        limit_bytes: The limit.
    """

    def __init__(self, index: int, size_bytes: int, limit_bytes: int) -> None:
        """Describe the oversized record."""
        super().__init__(f"record {index} is {size_bytes} bytes, over the {limit_bytes} limit")
        self.index = index
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class BatchTooLargeError(LogError):
    """A batch is larger than ``batch_max_bytes``."""

    def __init__(self, size_bytes: int, limit_bytes: int) -> None:
        """Describe the oversized batch."""
        super().__init__(f"batch is {size_bytes} bytes, over the {limit_bytes} limit")
        self.size_bytes = size_bytes
        self.limit_bytes = limit_bytes


class InvalidBatchError(LogError):
    """A client-framed batch is malformed.

    Attributes:
        index: Position (0-based) of the first offending record in the batch.
        reason: What is wrong with it.
    """

    def __init__(self, index: int, reason: str) -> None:
        """Describe the first offending record."""
        super().__init__(f"record {index} of the batch is invalid: {reason}")
        self.index = index
        self.reason = reason


class LogWriteError(LogError):
    """Writing to the log failed (for example, the disk is full); nothing was appended."""


class SyncFailedError(LogWriteError):
    """fsync failed after the records were written: they are in the file but may not be durable.

    Unlike other write failures, the records were appended and may be served; a client that
    retries without idempotence may store them twice.
    """


class DiskFullError(LogWriteError):
    """The filesystem is full; nothing was appended, and appends work again once space is freed."""


def write_failed(what: str, cause: OSError) -> LogWriteError:
    """The error for a failed write: :class:`DiskFullError` when ``cause`` says the disk is full.

    Args:
        what: What failed, for the broker log (it may name files; clients never see it).
        cause: The ``OSError`` the write raised.
    """
    error_type = DiskFullError if cause.errno in _DISK_FULL_ERRNOS else LogWriteError
    return error_type(f"{what} failed: {cause}")


class CorruptRecordError(LogError):
    """A stored record failed its checks; reads stop before it instead of serving it.

    Attributes:
        offset: Offset the record should have (the reader's next offset).
        path: Segment file holding it.
        position: Byte position in that file.
        reason: Which check failed.
    """

    def __init__(self, offset: int, path: Path, position: int, reason: str) -> None:
        """Describe the corrupt record."""
        super().__init__(f"corrupt record at offset {offset} ({path}@{position}): {reason}")
        self.offset = offset
        self.path = path
        self.position = position
        self.reason = reason
