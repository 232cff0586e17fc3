"""Errors of the metadata store.

::

    MetadataError
    ├── MetadataClosedError       the store was closed; nothing more can be done with it
    ├── InvalidCommandError       a command is malformed on its own (``field`` names the culprit)
    ├── StaleIndexError           an explicit metadata index is not above the applied index
    ├── StreamExistsError         CreateStream named a stream that already exists
    ├── StreamNotFoundError       a command named a stream that does not exist
    ├── PartitionNotFoundError    a command named a partition id its stream does not have
    ├── UnsupportedSchemaError    the database was written by a newer Flux (schema too new)
    └── MetadataStorageError      SQLite failed (I/O error, full disk, constraint, not a database)

Every error :meth:`~flux_broker.metadata.contract.MetadataStore.apply` raises leaves the
database exactly as it was: the command's transaction is rolled back and the applied index does
not move. None of them is retriable as is, except :class:`MetadataStorageError` once the cause
(for example a full disk) is gone.
"""

from __future__ import annotations

__all__ = [
    "InvalidCommandError",
    "MetadataClosedError",
    "MetadataError",
    "MetadataStorageError",
    "PartitionNotFoundError",
    "StaleIndexError",
    "StreamExistsError",
    "StreamNotFoundError",
    "UnsupportedSchemaError",
]


class MetadataError(Exception):
    """Root of the metadata store's errors."""


class MetadataClosedError(MetadataError):
    """The store is closed."""


class InvalidCommandError(MetadataError):
    """A command is malformed regardless of the current state; nothing was applied.

    Attributes:
        field: The offending field, as a dotted path (``"partitions[1].leader"``).
        reason: What is wrong with it.
    """

    def __init__(self, field: str, reason: str) -> None:
        """Describe the offending field."""
        super().__init__(f"invalid command: {field}: {reason}")
        self.field = field
        self.reason = reason


class StaleIndexError(MetadataError):
    """An explicit metadata index is not above the last applied one; nothing was applied.

    Attributes:
        index: The index the command was to be applied at.
        applied_index: The store's last applied index.
    """

    def __init__(self, index: int, applied_index: int) -> None:
        """Describe the stale index."""
        super().__init__(f"metadata index {index} is not above the applied index {applied_index}")
        self.index = index
        self.applied_index = applied_index


class StreamExistsError(MetadataError):
    """A stream of that name already exists.

    Attributes:
        name: The stream's name.
    """

    def __init__(self, name: str) -> None:
        """Name the existing stream."""
        super().__init__(f"stream {name!r} already exists")
        self.name = name


class StreamNotFoundError(MetadataError):
    """No stream of that name exists.

    Attributes:
        name: The name asked for.
    """

    def __init__(self, name: str) -> None:
        """Name the missing stream."""
        super().__init__(f"stream {name!r} does not exist")
        self.name = name


class PartitionNotFoundError(MetadataError):
    """The stream exists but has no partition with that id (Liftbridge's ErrNoSuchPartition).

    Attributes:
        stream: The stream's name.
        partition: The partition id asked for.
        count: How many partitions the stream has (ids 0 to ``count - 1``).
    """

    def __init__(self, stream: str, partition: int, count: int) -> None:
        """Name the missing partition."""
        super().__init__(
            f"stream {stream!r} has no partition {partition} (its partitions are 0..{count - 1})"
        )
        self.stream = stream
        self.partition = partition
        self.count = count


class UnsupportedSchemaError(MetadataError):
    """The database's schema is newer than this Flux understands; it is left untouched.

    Attributes:
        found: The database's schema version.
        supported: The newest version this Flux knows.
    """

    def __init__(self, found: int, supported: int) -> None:
        """Describe the version mismatch."""
        super().__init__(
            f"metadata schema version {found} is newer than the supported {supported}; "
            "upgrade Flux to open this data directory"
        )
        self.found = found
        self.supported = supported


class MetadataStorageError(MetadataError):
    """SQLite refused an operation; for :meth:`apply`, nothing was applied.

    The underlying :class:`sqlite3.Error` is the ``__cause__``.
    """
