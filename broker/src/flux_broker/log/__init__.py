"""The commit log: segmented, append-only storage of one partition.

Start with :mod:`flux_broker.log.contract` (the terms and the :class:`CommitLog` Protocol);
:class:`FileCommitLog` implements it; :mod:`flux_broker.log.format` holds every byte layout.
"""

from flux_broker.log.commitlog import FileCommitLog, LogStats
from flux_broker.log.config import LogConfig, SyncPolicy
from flux_broker.log.contract import AppendResult, CommitLog, LogReader, RecordBatch
from flux_broker.log.errors import (
    BatchTooLargeError,
    CorruptRecordError,
    InvalidBatchError,
    LogClosedError,
    LogError,
    LogWriteError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
)
from flux_broker.log.format import NewRecord, Record

__all__ = [
    "AppendResult",
    "BatchTooLargeError",
    "CommitLog",
    "CorruptRecordError",
    "FileCommitLog",
    "InvalidBatchError",
    "LogClosedError",
    "LogConfig",
    "LogError",
    "LogReader",
    "LogStats",
    "LogWriteError",
    "NewRecord",
    "OffsetOutOfRangeError",
    "Record",
    "RecordBatch",
    "RecordTooLargeError",
    "SyncPolicy",
]
