"""The one place that turns broker errors into gRPC statuses.

Every error status the broker returns comes from a row of the shared error table
(:mod:`flux_proto.errors`): the row's gRPC code (Liftbridge's, where Liftbridge has the
condition), Liftbridge's exact text when the row has one (clients such as gufo-liftbridge match
``no known metadata leader``), and the row's reason in the trailing metadata key
:data:`~flux_proto.errors.REASON_METADATA_KEY` (``flux-reason``), so SDKs never parse messages.

Handlers raise typed errors and are wrapped with :func:`guarded`; a condition that has no typed
error of its own is raised as :class:`FluxStatus`. :func:`status_for` picks the row::

    error                                          row                   gRPC code
    FluxStatus                                     its own               its own
    StreamExistsError                              STREAM_EXISTS         ALREADY_EXISTS
    StreamNotFoundError                            STREAM_NOT_FOUND      NOT_FOUND
    PartitionNotFoundError                         PARTITION_NOT_FOUND   NOT_FOUND
    InvalidNameError for a name starting "__"      STREAM_RESERVED       INVALID_ARGUMENT
    InvalidNameError, InvalidSubjectError,         INVALID_ARGUMENT      INVALID_ARGUMENT
      InvalidCommandError, InvalidBatchError
    RecordTooLargeError, BatchTooLargeError        MESSAGE_TOO_LARGE     INVALID_ARGUMENT
    OffsetOutOfRangeError                          OFFSET_OUT_OF_RANGE   OUT_OF_RANGE
    LogClosedError, MetadataClosedError            UNAVAILABLE           UNAVAILABLE
    DiskFullError                                  DISK_FULL             RESOURCE_EXHAUSTED
    LogWriteError, MetadataStorageError            STORAGE_FAILED        UNAVAILABLE
    CorruptRecordError                             CORRUPT_RECORD        INTERNAL
    anything else                                  INTERNAL              INTERNAL

Errors the client caused carry their own message (it names the offending value, escaped and
cut short by the raiser). Errors of the broker itself (storage, corruption, anything
unexpected) are logged here with their traceback and answered with a fixed text, so file
paths, SQLite messages and exception texts never reach a client.

``grpc.aio.AbortError`` (a handler aborted on its own), other ``grpc.aio.BaseError`` usage
errors and cancellation pass through :func:`guarded` untouched.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, NoReturn, Self, TypeVar, cast, overload

import grpc

from flux_broker.groups.errors import (
    GroupAssignorMismatchError,
    GroupEpochMismatchError,
    GroupFencedError,
    GroupNotEmptyError,
    GroupNotFoundError,
    GroupsFullError,
    NotCoordinatorError,
    NotGroupMemberError,
    NotPartitionOwnerError,
)
from flux_broker.log.errors import (
    BatchTooLargeError,
    CorruptRecordError,
    DiskFullError,
    InvalidBatchError,
    LogClosedError,
    LogWriteError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
    SyncFailedError,
)
from flux_broker.metadata.errors import (
    InvalidCommandError,
    MetadataClosedError,
    MetadataStorageError,
    PartitionNotFoundError,
    StreamExistsError,
    StreamNotFoundError,
)
from flux_broker.nats.subjects import RESERVED_PREFIX, InvalidNameError, InvalidSubjectError
from flux_broker.streams.producers import DuplicateSequenceError, OutOfOrderSequenceError
from flux_proto.errors import REASON_METADATA_KEY, ErrorEntry, by_name

__all__ = [
    "DISK_FULL_MESSAGE",
    "INTERNAL_MESSAGE",
    "STORAGE_FAILED_MESSAGE",
    "UNAVAILABLE_MESSAGE",
    "FluxStatus",
    "abort",
    "guarded",
    "status_for",
]

_logger = logging.getLogger(__name__)

#: Text of an INTERNAL status for an unexpected error; the details go to the broker log only.
INTERNAL_MESSAGE: Final = "internal broker error; the broker log has the details"
#: Text of the UNAVAILABLE status when the log or the metadata store is closed.
UNAVAILABLE_MESSAGE: Final = "the broker is shutting down; retry on another broker"
#: Text of the UNAVAILABLE status when fsync failed after the write (the cause is logged).
SYNC_FAILED_MESSAGE: Final = (
    "the broker wrote the records but could not make them durable (fsync failed); they may be "
    "stored: retry with an idempotent producer, or expect a duplicate"
)
#: Text of the UNAVAILABLE status when storage refused a write (the cause is logged).
STORAGE_FAILED_MESSAGE: Final = "the broker could not write to its storage; nothing was written"
#: Text of the RESOURCE_EXHAUSTED status when the disk is full.
DISK_FULL_MESSAGE: Final = (
    "the broker's disk is full; nothing was written. Retry later: writes resume once space is freed"
)

_Context = grpc.aio.ServicerContext[Any, Any]
_Unary = TypeVar("_Unary", bound=Callable[..., Coroutine[Any, Any, Any]])
_Streaming = TypeVar("_Streaming", bound=Callable[..., AsyncIterator[Any]])


class FluxStatus(Exception):  # noqa: N818 -- it is a status to answer with, not a failure
    """A status to end the RPC with, named by its row of the error table.

    Raise it from a handler wrapped with :func:`guarded` for conditions that have no typed
    broker error of their own (``FluxStatus.from_entry("NOT_LEADER")``).

    Attributes:
        entry: The row of the error table.
        message: The status text sent to the client.
    """

    def __init__(self, entry: ErrorEntry, message: str | None = None) -> None:
        """Build the status; ``message`` defaults as in :meth:`from_entry`."""
        if message is None:
            message = entry.liftbridge_message or entry.description
        super().__init__(f"{entry.name}: {message}")
        self.entry = entry
        self.message = message

    @classmethod
    def from_entry(cls, name: str, message: str | None = None) -> Self:
        """Build the status of the row named ``name``.

        Args:
            name: The row's name (``"NO_METADATA_LEADER"``).
            message: The status text; by default Liftbridge's exact text when the row has one,
                otherwise the row's description.

        Returns:
            The status, ready to raise.

        Raises:
            KeyError: No row has that name (a programming error).
        """
        return cls(by_name(name), message)


@dataclass(frozen=True, slots=True)
class _Rule:
    """How one typed broker error becomes a status.

    Attributes:
        error: The error class (subclasses match too); rules are tried in order.
        entry: The row of the error table.
        message: The status text (or a function of the error giving it), or ``None`` to send
            the error's own message (safe for clients: the raiser escapes and shortens what it
            shows). A row's Liftbridge text wins over all of these.
        logged: Whether this is the broker's own failure, logged with its traceback.
        when: Extra condition on the error, for rows finer than one class.
    """

    error: type[Exception]
    entry: ErrorEntry
    message: str | Callable[[Exception], str] | None = None
    logged: bool = False
    when: Callable[[Exception], bool] | None = None


def _is_reserved_name(error: Exception) -> bool:
    return isinstance(error, InvalidNameError) and error.name.startswith(RESERVED_PREFIX)


def _corrupt_record_text(error: Exception) -> str:
    # The offset helps the client; the segment path and position stay in the broker log.
    assert isinstance(error, CorruptRecordError), error
    return f"corrupt record at offset {error.offset}; the broker log has the details"


_INTERNAL: Final = by_name("INTERNAL")

_RULES: Final[tuple[_Rule, ...]] = (
    # Liftbridge: CreateStream on an existing name is AlreadyExists.
    _Rule(StreamExistsError, by_name("STREAM_EXISTS")),
    # Liftbridge: DeleteStream and friends on an unknown stream are NotFound.
    _Rule(StreamNotFoundError, by_name("STREAM_NOT_FOUND")),
    # Liftbridge: PauseStream / SetStreamReadonly naming a partition the stream lacks are
    # NotFound (ErrNoSuchPartition in the Go client).
    _Rule(PartitionNotFoundError, by_name("PARTITION_NOT_FOUND")),
    # Liftbridge: reserved names are InvalidArgument "Stream is reserved"; Flux reserves `__*`.
    _Rule(InvalidNameError, by_name("STREAM_RESERVED"), when=_is_reserved_name),
    # Liftbridge: bad names and subjects are InvalidArgument; the message names the problem.
    _Rule(InvalidNameError, by_name("INVALID_ARGUMENT")),
    _Rule(InvalidSubjectError, by_name("INVALID_ARGUMENT")),
    _Rule(InvalidCommandError, by_name("INVALID_ARGUMENT")),
    _Rule(InvalidBatchError, by_name("INVALID_ARGUMENT")),
    # Liftbridge: a TOO_LARGE ack is InvalidArgument (never RESOURCE_EXHAUSTED, which
    # Liftbridge clients read as "readonly" or drop the message on).
    _Rule(RecordTooLargeError, by_name("MESSAGE_TOO_LARGE")),
    _Rule(BatchTooLargeError, by_name("MESSAGE_TOO_LARGE")),
    # Idempotent producers (Flux): a gap, or a duplicate whose ack is forgotten.
    _Rule(OutOfOrderSequenceError, by_name("OUT_OF_ORDER_SEQUENCE")),
    _Rule(DuplicateSequenceError, by_name("DUPLICATE_SEQUENCE")),
    # Liftbridge waits or clamps instead; for Flux RPCs reliability-plan §6 asks OUT_OF_RANGE.
    _Rule(OffsetOutOfRangeError, by_name("OFFSET_OUT_OF_RANGE")),
    # Shutting down: UNAVAILABLE is the one code every Liftbridge client retries elsewhere.
    _Rule(LogClosedError, by_name("UNAVAILABLE"), UNAVAILABLE_MESSAGE),
    _Rule(MetadataClosedError, by_name("UNAVAILABLE"), UNAVAILABLE_MESSAGE),
    # A full disk fails cleanly and writes resume once space is freed (DESIGN §4.1): retriable.
    # gRPC's code for "the file system is out of space"; retriable. The log says it once per
    # run of failures (flux_broker.log.commitlog), not once per refused batch.
    _Rule(DiskFullError, by_name("DISK_FULL"), DISK_FULL_MESSAGE),
    # An fsync that failed after the write: the records are in the log and may be served, so
    # "nothing was written" would be false; an idempotent producer's retry is deduplicated.
    _Rule(SyncFailedError, by_name("STORAGE_FAILED"), SYNC_FAILED_MESSAGE, logged=True),
    _Rule(LogWriteError, by_name("STORAGE_FAILED"), STORAGE_FAILED_MESSAGE, logged=True),
    _Rule(MetadataStorageError, by_name("STORAGE_FAILED"), STORAGE_FAILED_MESSAGE, logged=True),
    # Liftbridge answers a failed read with Internal, which its clients resubscribe on (a
    # healthy replica may lead by then); DATA_LOSS would stop Go clients and stall gufo 30 s.
    _Rule(CorruptRecordError, by_name("CORRUPT_RECORD"), _corrupt_record_text, logged=True),
    # Consumer groups: Liftbridge's codes (NotFound, FailedPrecondition), one reason each.
    _Rule(GroupNotFoundError, by_name("GROUP_NOT_FOUND")),
    _Rule(NotGroupMemberError, by_name("NOT_GROUP_MEMBER")),
    _Rule(GroupEpochMismatchError, by_name("GROUP_EPOCH_MISMATCH")),
    _Rule(NotCoordinatorError, by_name("NOT_COORDINATOR")),
    _Rule(NotPartitionOwnerError, by_name("NOT_PARTITION_OWNER")),
    _Rule(GroupFencedError, by_name("GROUP_FENCED")),
    _Rule(GroupNotEmptyError, by_name("GROUP_NOT_EMPTY")),
    _Rule(GroupAssignorMismatchError, by_name("GROUP_ASSIGNOR_MISMATCH")),
    _Rule(GroupsFullError, by_name("RESOURCE_LIMIT")),
)


def status_for(error: BaseException) -> tuple[ErrorEntry, str]:
    """Pick the error-table row and the status text for an error a handler raised.

    Errors of the broker itself (storage, corruption, anything unexpected) are logged here,
    with their traceback; their texts never reach the client.

    Args:
        error: The error.

    Returns:
        The row and the text to send.
    """
    if isinstance(error, FluxStatus):
        return error.entry, error.message
    if isinstance(error, Exception):
        for rule in _RULES:
            if isinstance(error, rule.error) and (rule.when is None or rule.when(error)):
                if rule.logged:
                    _logger.error("answering %s", rule.entry.reason, exc_info=error)
                return rule.entry, _text(rule, error)
    _logger.error("unexpected %s; answering internal", type(error).__name__, exc_info=error)
    return _INTERNAL, INTERNAL_MESSAGE


def _text(rule: _Rule, error: Exception) -> str:
    if rule.entry.liftbridge_message is not None:
        return rule.entry.liftbridge_message
    if rule.message is None:
        return str(error)
    return rule.message if isinstance(rule.message, str) else rule.message(error)


async def abort(context: _Context, entry: ErrorEntry, message: str) -> NoReturn:
    """End the RPC with ``entry``'s status: its code, ``message``, and its reason trailer.

    Trailing metadata the handler set before stays; a ``flux-reason`` it set is replaced.

    Args:
        context: The RPC's servicer context.
        entry: The error-table row.
        message: The status text.

    Raises:
        grpc.aio.AbortError: Always; grpc.aio ends the RPC when it propagates.
    """
    assert entry.grpc_code is not grpc.StatusCode.OK, entry
    kept = tuple(
        (key, value)
        for key, value in context.trailing_metadata() or ()
        if key != REASON_METADATA_KEY
    )
    context.set_trailing_metadata((*kept, (REASON_METADATA_KEY, entry.reason)))
    await context.abort(entry.grpc_code, message)


@overload
def guarded(handler: _Unary) -> _Unary: ...
@overload
def guarded(handler: _Streaming) -> _Streaming: ...
def guarded(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a servicer method so that whatever it raises ends the RPC through the table.

    Works for ``async def`` handlers (unary responses, or streaming through
    ``context.write``) and for async-generator handlers (server streaming: the messages
    yielded before the error reach the client first). The servicer context is the handler's
    last positional argument or its ``context`` keyword, as grpc.aio calls it.

    ``grpc.aio.AbortError`` (the handler aborted on its own), other ``grpc.aio.BaseError``
    usage errors and cancellation propagate untouched.

    Args:
        handler: The servicer method.

    Returns:
        The wrapped method, with the same signature.

    Raises:
        TypeError: ``handler`` is neither a coroutine function nor an async generator
            function.
    """
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def streaming(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:  # noqa: ANN401
            try:
                async with contextlib.aclosing(handler(*args, **kwargs)) as messages:
                    async for message in messages:
                        yield message
            except grpc.aio.BaseError:
                raise
            except Exception as error:  # noqa: BLE001 -- every error becomes a table status
                await abort(_context_of(args, kwargs), *status_for(error))

        return streaming
    if inspect.iscoroutinefunction(handler):

        @functools.wraps(handler)
        async def unary(*args: Any, **kwargs: Any) -> Any:  # noqa: ANN401
            try:
                return await handler(*args, **kwargs)
            except grpc.aio.BaseError:
                raise
            except Exception as error:  # noqa: BLE001 -- every error becomes a table status
                await abort(_context_of(args, kwargs), *status_for(error))

        return unary
    raise TypeError(f"guarded needs an async def or async generator handler, got {handler!r}")


def _context_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Context:
    # grpc.aio's context (a Cython class) is not registered as a grpc.aio.ServicerContext,
    # so isinstance cannot check it; the abort method is what is needed.
    context = kwargs["context"] if "context" in kwargs else args[-1]
    assert callable(getattr(context, "abort", None)), context
    return cast(_Context, context)
