"""The error tree of flux_client, one class per code of the shared error table.

Every error the SDK raises is a :class:`FluxError`. Its ``code`` is one name of the closed set
``flux_proto.errors.ERROR_CODES`` (the broker rows of the table, then the client rows), the same
set the TypeScript SDK uses; ``reason`` is the broker's machine-readable reason (the
``flux-reason`` trailing metadata, DESIGN.md §4) or the client row's reason; ``retriable`` says
whether the same call may succeed if repeated; ``cause`` is the underlying exception, if any::

    FluxError
    ├── InvalidArgumentError, StreamReservedError, MessageTooLargeError
    ├── StreamExistsError, StreamNotFoundError, PartitionNotFoundError
    ├── NotLeaderError, PartitionPausedError, ReadonlyError
    ├── ReadonlyEndError, StopReachedError, StreamEmptyError
    ├── IncorrectOffsetError, OutOfOrderSequenceError, DuplicateSequenceError
    ├── EncryptionFailedError, EncryptionUnavailableError
    ├── AckTimeoutError (also a TimeoutError; ``retry_safe`` says if an idempotent retry is safe)
    ├── AckFailedError, NoMetadataLeaderError, SlowConsumerError, UnavailableError
    ├── ResourceLimitError, OffsetOutOfRangeError, StorageFailedError, DiskFullError
    ├── CorruptRecordError
    ├── CursorsDisabledError, UnimplementedError, InternalError
    ├── GroupNotFoundError, NotGroupMemberError, GroupEpochMismatchError, NotCoordinatorError
    ├── NotPartitionOwnerError, GroupFencedError, GroupNotEmptyError, GroupAssignorMismatchError
    └── client side: ClosedError, BufferFullError, CallTimeoutError (also a TimeoutError),
        ConnectionFailedError (also a ConnectionError), UnknownError

Mapping a gRPC status: the reason in the trailing metadata picks the row; a status without one
(a transport failure, or a plain Liftbridge server) is matched by Liftbridge's fixed text, then
by its code.
"""

from __future__ import annotations

from typing import ClassVar, Final

import grpc

from flux_proto.errors import (
    CLIENT_ERRORS,
    ERRORS,
    REASON_METADATA_KEY,
    ClientErrorEntry,
    ErrorEntry,
)

__all__ = [
    "AckFailedError",
    "AckTimeoutError",
    "BufferFullError",
    "CallTimeoutError",
    "ClosedError",
    "ConnectionFailedError",
    "CorruptRecordError",
    "CursorsDisabledError",
    "DiskFullError",
    "DuplicateSequenceError",
    "EncryptionFailedError",
    "EncryptionUnavailableError",
    "FluxError",
    "GroupAssignorMismatchError",
    "GroupEpochMismatchError",
    "GroupFencedError",
    "GroupNotEmptyError",
    "GroupNotFoundError",
    "IncorrectOffsetError",
    "InternalError",
    "InvalidArgumentError",
    "MessageTooLargeError",
    "NoMetadataLeaderError",
    "NotCoordinatorError",
    "NotGroupMemberError",
    "NotLeaderError",
    "NotPartitionOwnerError",
    "OffsetOutOfRangeError",
    "OutOfOrderSequenceError",
    "PartitionNotFoundError",
    "PartitionPausedError",
    "ReadonlyEndError",
    "ReadonlyError",
    "ResourceLimitError",
    "SlowConsumerError",
    "StopReachedError",
    "StorageFailedError",
    "StreamEmptyError",
    "StreamExistsError",
    "StreamNotFoundError",
    "StreamReservedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "error_class",
    "from_batch_error",
    "from_rpc_error",
]

_ROWS: Final[tuple[ErrorEntry | ClientErrorEntry, ...]] = (*ERRORS, *CLIENT_ERRORS)
_REASON_OF: Final = {row.name: row.reason for row in _ROWS}
_RETRIABLE_OF: Final = {row.name: row.retriable for row in _ROWS}


class FluxError(Exception):
    """Root of every error flux_client raises.

    Attributes:
        code: The condition: a name from the shared error table (``STREAM_EXISTS``, ``CLOSED``).
        reason: Machine-readable reason (``stream-exists``), as the broker sends it.
        retriable: Whether repeating the same call may succeed.
        grpc_code: The gRPC status the broker answered with, when there was one.
    """

    code: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        retriable: bool | None = None,
        grpc_code: grpc.StatusCode | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason: str = reason if reason is not None else _REASON_OF[self.code]
        self.retriable: bool = retriable if retriable is not None else _RETRIABLE_OF[self.code]
        self.grpc_code = grpc_code

    @property
    def cause(self) -> BaseException | None:
        """The exception this error was raised from (``__cause__``), if any."""
        return self.__cause__

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, reason={self.reason!r}, {self.message!r})"
        )


class InvalidArgumentError(FluxError):
    """The request is malformed or a field is out of range; nothing was changed."""

    code = "INVALID_ARGUMENT"


class StreamReservedError(FluxError):
    """The stream name belongs to an internal stream."""

    code = "STREAM_RESERVED"


class StreamExistsError(FluxError):
    """A stream with this name already exists."""

    code = "STREAM_EXISTS"


class StreamNotFoundError(FluxError):
    """No stream has this name."""

    code = "STREAM_NOT_FOUND"


class PartitionNotFoundError(FluxError):
    """The stream has no partition with this id."""

    code = "PARTITION_NOT_FOUND"


class NotLeaderError(FluxError):
    """The broker does not lead the partition (metadata is refreshed before a retry)."""

    code = "NOT_LEADER"


class PartitionPausedError(FluxError):
    """The partition is paused."""

    code = "PARTITION_PAUSED"


class ReadonlyError(FluxError):
    """The partition is read-only and refuses publishes."""

    code = "READONLY"


class ReadonlyEndError(FluxError):
    """A subscription reached the end of a read-only partition."""

    code = "READONLY_END"


class StopReachedError(FluxError):
    """A subscription delivered its stop position (flux_client ends the iteration instead)."""

    code = "STOP_REACHED"


class StreamEmptyError(FluxError):
    """A subscription stopping at the latest offset found the partition empty."""

    code = "STREAM_EMPTY"


class IncorrectOffsetError(FluxError):
    """The expected offset (optimistic concurrency) did not match; nothing was written."""

    code = "INCORRECT_OFFSET"


class OutOfOrderSequenceError(FluxError):
    """An idempotent batch skipped a number; nothing was written."""

    code = "OUT_OF_ORDER_SEQUENCE"


class DuplicateSequenceError(FluxError):
    """An idempotent batch was written before, but its ack is too old to be repeated."""

    code = "DUPLICATE_SEQUENCE"


class MessageTooLargeError(FluxError):
    """The record or batch is larger than the broker's maximum."""

    code = "MESSAGE_TOO_LARGE"


class EncryptionFailedError(FluxError):
    """Encryption at rest failed."""

    code = "ENCRYPTION_FAILED"


class EncryptionUnavailableError(FluxError):
    """Encryption at rest was requested, but the broker has none configured."""

    code = "ENCRYPTION_UNAVAILABLE"


class AckTimeoutError(FluxError, TimeoutError):
    """No ack arrived in time: the record may or may not have been written.

    Attributes:
        retry_safe: True when the send was idempotent, so sending it again cannot write it
            twice; False when a retry may duplicate it.
    """

    code = "ACK_TIMEOUT"

    def __init__(
        self,
        message: str,
        *,
        retry_safe: bool = False,
        reason: str | None = None,
        retriable: bool | None = None,
        grpc_code: grpc.StatusCode | None = None,
    ) -> None:
        super().__init__(message, reason=reason, retriable=retriable, grpc_code=grpc_code)
        self.retry_safe = retry_safe


class AckFailedError(FluxError):
    """The leader answered with an ack error Flux has no specific code for."""

    code = "ACK_FAILED"


class NoMetadataLeaderError(FluxError):
    """No metadata leader was known in time; the change was not applied."""

    code = "NO_METADATA_LEADER"


class SlowConsumerError(FluxError):
    """The broker disconnected a subscriber that did not keep up."""

    code = "SLOW_CONSUMER"


class UnavailableError(FluxError):
    """The broker is shutting down or cannot serve the request right now."""

    code = "UNAVAILABLE"


class ResourceLimitError(FluxError):
    """A documented broker limit would be exceeded."""

    code = "RESOURCE_LIMIT"


class OffsetOutOfRangeError(FluxError):
    """The offset is outside the partition."""

    code = "OFFSET_OUT_OF_RANGE"


class StorageFailedError(FluxError):
    """The broker could not write to its storage (e.g. a full disk)."""

    code = "STORAGE_FAILED"


class DiskFullError(FluxError):
    """The broker's disk is full; nothing was written, and writes resume once space is freed."""

    code = "DISK_FULL"


class CorruptRecordError(FluxError):
    """A record failed its checks (CRC, structure)."""

    code = "CORRUPT_RECORD"


class CursorsDisabledError(FluxError):
    """Cursors are disabled on the broker."""

    code = "CURSORS_DISABLED"


class GroupNotFoundError(FluxError):
    """No consumer group has this id."""

    code = "GROUP_NOT_FOUND"


class NotGroupMemberError(FluxError):
    """The consumer is not (or no longer) a member of the group."""

    code = "NOT_GROUP_MEMBER"


class GroupEpochMismatchError(FluxError):
    """The request's group epoch is not the current one."""

    code = "GROUP_EPOCH_MISMATCH"


class NotCoordinatorError(FluxError):
    """The broker is not the group's coordinator (or the report is stale)."""

    code = "NOT_COORDINATOR"


class NotPartitionOwnerError(FluxError):
    """A member-checked commit for a partition the member does not own."""

    code = "NOT_PARTITION_OWNER"


class GroupFencedError(FluxError):
    """A group subscription with an equal or newer epoch holds the partition."""

    code = "GROUP_FENCED"


class GroupNotEmptyError(FluxError):
    """The operation needs a consumer group without members."""

    code = "GROUP_NOT_EMPTY"


class GroupAssignorMismatchError(FluxError):
    """The join names another assignor than the group's."""

    code = "GROUP_ASSIGNOR_MISMATCH"


class UnimplementedError(FluxError):
    """The broker does not implement this call."""

    code = "UNIMPLEMENTED"


class InternalError(FluxError):
    """The broker failed internally; its log has the details."""

    code = "INTERNAL"


class ClosedError(FluxError):
    """The client, producer or subscription was closed before the call completed."""

    code = "CLOSED"


class BufferFullError(FluxError):
    """The producer's buffer stayed full for ``max_block_ms``; the record was not sent."""

    code = "BUFFER_FULL"


class CallTimeoutError(FluxError, TimeoutError):
    """A call did not complete within its timeout; a change may or may not have been applied."""

    code = "TIMEOUT"


class ConnectionFailedError(FluxError, ConnectionError):
    """No broker could be reached, or a connection was lost."""

    code = "CONNECTION_FAILED"


class UnknownError(FluxError):
    """The broker answered with a status or reason this SDK does not know."""

    code = "UNKNOWN"


_CLASSES: Final[dict[str, type[FluxError]]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        StreamReservedError,
        StreamExistsError,
        StreamNotFoundError,
        PartitionNotFoundError,
        NotLeaderError,
        PartitionPausedError,
        ReadonlyError,
        ReadonlyEndError,
        StopReachedError,
        StreamEmptyError,
        IncorrectOffsetError,
        OutOfOrderSequenceError,
        DuplicateSequenceError,
        MessageTooLargeError,
        EncryptionFailedError,
        EncryptionUnavailableError,
        AckTimeoutError,
        AckFailedError,
        NoMetadataLeaderError,
        SlowConsumerError,
        UnavailableError,
        ResourceLimitError,
        OffsetOutOfRangeError,
        StorageFailedError,
        DiskFullError,
        CorruptRecordError,
        CursorsDisabledError,
        GroupNotFoundError,
        NotGroupMemberError,
        GroupEpochMismatchError,
        NotCoordinatorError,
        NotPartitionOwnerError,
        GroupFencedError,
        GroupNotEmptyError,
        GroupAssignorMismatchError,
        UnimplementedError,
        InternalError,
        ClosedError,
        BufferFullError,
        CallTimeoutError,
        ConnectionFailedError,
        UnknownError,
    )
}
_BY_REASON: Final = {row.reason: row.name for row in ERRORS}
_BY_TEXT: Final = {
    (row.grpc_code, row.liftbridge_message): row.name for row in ERRORS if row.liftbridge_message
}
#: The row a status without a reason stands for, by its code (plain Liftbridge servers).
_BY_CODE: Final = {
    grpc.StatusCode.INVALID_ARGUMENT: "INVALID_ARGUMENT",
    grpc.StatusCode.ALREADY_EXISTS: "STREAM_EXISTS",
    grpc.StatusCode.NOT_FOUND: "STREAM_NOT_FOUND",
    grpc.StatusCode.OUT_OF_RANGE: "OFFSET_OUT_OF_RANGE",
    grpc.StatusCode.UNIMPLEMENTED: "UNIMPLEMENTED",
    grpc.StatusCode.INTERNAL: "INTERNAL",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "RESOURCE_LIMIT",
    # No reason on these means the transport failed, not the broker.
    grpc.StatusCode.UNAVAILABLE: "CONNECTION_FAILED",
    grpc.StatusCode.CANCELLED: "CONNECTION_FAILED",
}


def error_class(code: str) -> type[FluxError]:
    """The class of the errors with ``code``.

    Raises:
        KeyError: ``code`` is not in the error table.
    """
    return _CLASSES[code]


def _reason_of(error: grpc.aio.AioRpcError) -> str | None:
    for key, value in error.trailing_metadata() or ():
        if key == REASON_METADATA_KEY:
            return value.decode() if isinstance(value, bytes) else value
    return None


def from_rpc_error(
    error: grpc.aio.AioRpcError, *, publish: bool = False, retry_safe: bool = False
) -> FluxError:
    """The :class:`FluxError` for a failed gRPC call (raise it ``from error``).

    Args:
        error: The failed call.
        publish: The call published records, so a deadline means an unknown outcome
            (:class:`AckTimeoutError`) rather than a :class:`CallTimeoutError`.
        retry_safe: For a publish: an idempotent retry of it cannot write twice.
    """
    code, details = error.code(), error.details() or ""
    reason = _reason_of(error)
    name = _BY_REASON.get(reason) if reason else None
    if name is None:
        name = _BY_TEXT.get((code, details))
    if name is None and code is grpc.StatusCode.DEADLINE_EXCEEDED:
        name = "ACK_TIMEOUT" if publish else "TIMEOUT"
    if name is None:
        name = _BY_CODE.get(code, "UNKNOWN")
    message = f"{details} ({code.name})" if details else code.name
    return _make(name, message, code, retry_safe)


def from_batch_error(code: int, reason: str, message: str, *, retry_safe: bool) -> FluxError:
    """The :class:`FluxError` for a ``PublishBatchError`` (code, reason and message)."""
    status = next((s for s in grpc.StatusCode if s.value[0] == code), grpc.StatusCode.UNKNOWN)
    name = _BY_REASON.get(reason) or _BY_CODE.get(status, "UNKNOWN")
    return _make(name, message or reason, status, retry_safe)


def _make(name: str, message: str, code: grpc.StatusCode, retry_safe: bool) -> FluxError:
    cls = _CLASSES[name]
    if cls is AckTimeoutError:
        return AckTimeoutError(message, grpc_code=code, retry_safe=retry_safe)
    return cls(message, grpc_code=code)
