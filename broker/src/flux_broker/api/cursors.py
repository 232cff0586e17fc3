"""SetCursor and FetchCursor: check the request, then hand over to the cursor store.

Semantics (reference ``liftbridge-api.md`` §1.7 and §3, reliability-plan §6 item 28), checked in
this order, nothing stored before every check passed:

====================================================  ==========================================
condition                                             status (row)
====================================================  ==========================================
``cursorId`` or ``stream`` empty (Liftbridge)         INVALID_ARGUMENT
``cursorId`` over 1 KiB or with control characters,   INVALID_ARGUMENT
malformed or reserved ``stream`` name
SetCursor ``offset`` below -1                         INVALID_ARGUMENT
cursors disabled (``cursors.stream.partitions`` 0)    CURSORS_DISABLED (INTERNAL, as Liftbridge
                                                      answers "cursors stream missing")
``stream`` unknown / ``partition`` unknown            STREAM_NOT_FOUND / PARTITION_NOT_FOUND
                                                      (NOT_FOUND; Liftbridge does not check)
this broker does not lead the ``__cursors``           NOT_LEADER (FAILED_PRECONDITION, Liftbridge)
partition of the cursor
SetCursor ``offset`` past the partition's newest      OFFSET_OUT_OF_RANGE (OUT_OF_RANGE: the same
offset + 1                                            request succeeds once the partition grows)
a new cursor while the store is full                  RESOURCE_LIMIT (RESOURCE_EXHAUSTED)
====================================================  ==========================================

**Member-checked commits** (Flux, ``SetCursorRequest.consumer``): the cursor is the group's
(``__group:<groupId>``; an empty ``cursorId`` means it, another one is INVALID_ARGUMENT), and
after the checks above the commit is refused with NOT_GROUP_MEMBER or NOT_PARTITION_OWNER
(FAILED_PRECONDITION) unless the consumer owns the partition (a partition being revoked from it
still counts) and its epoch is not older than its ownership. Ownership cannot move while such a
commit is written. A SetCursor without ``consumer`` is never checked (the Go client commits
that way).

SetCursor may move a cursor backwards (Liftbridge semantics: a consumer may rewind), and offset
-1 clears it, so that FetchCursor answers -1 as for a cursor never set. The upper bound is the
newest offset + 1, not the newest offset, because clients differ on what they store: the Go
client stores the last offset it processed, gufo-liftbridge that offset + 1 (the next to read).
FetchCursor answers -1 for a cursor never set, cleared, or set on an earlier stream of the same
name (deleted and created again since).
"""

from __future__ import annotations

import contextlib
from typing import Final

from flux_broker.api.context import BrokerContext
from flux_broker.api.groups import check_group_id, group_cursor_id
from flux_broker.api.status import FluxStatus
from flux_broker.cursors import (
    CURSOR_ID_MAX_BYTES,
    NO_CURSOR,
    CursorLimitError,
    CursorsDisabledError,
    CursorStore,
    NotCursorsLeaderError,
)
from flux_broker.nats.subjects import rejected_character, shown, validate_stream_name
from flux_broker.streams.manager import LivePartition
from flux_proto import api_pb2

__all__ = ["fetch_cursor", "set_cursor"]

_DISABLED_MESSAGE: Final = (
    "cursors are disabled on this broker: set cursors.stream.partitions above 0 and restart it"
)


def _invalid(message: str) -> FluxStatus:
    return FluxStatus.from_entry("INVALID_ARGUMENT", message)


def _check_cursor_id(cursor_id: str) -> None:
    if not cursor_id:
        raise _invalid("cursorId is empty; a cursor needs an id")
    # Characters first (cheap) so a huge id is refused before it is encoded.
    if len(cursor_id) > CURSOR_ID_MAX_BYTES or len(cursor_id.encode()) > CURSOR_ID_MAX_BYTES:
        raise _invalid(
            f"cursorId {shown(cursor_id)} is over the limit of {CURSOR_ID_MAX_BYTES} bytes"
        )
    if (char := rejected_character(cursor_id)) is not None:
        raise _invalid(
            f"cursorId {shown(cursor_id)} holds the control or format character {char!r}"
        )


def _check_request(cursor_id: str, stream: str) -> None:
    """The checks that need no state, in Liftbridge's order (cursor id, then stream)."""
    _check_cursor_id(cursor_id)
    if not stream:
        raise _invalid("stream is empty; a cursor belongs to a stream's partition")
    validate_stream_name(stream, internal_ok=True)


def _store(broker: BrokerContext) -> CursorStore:
    store = broker.cursors
    if store is None or not store.enabled:
        raise FluxStatus.from_entry("CURSORS_DISABLED", _DISABLED_MESSAGE)
    return store


def _target(broker: BrokerContext, stream: str, partition: int) -> tuple[LivePartition, int]:
    """The partition the cursor is for, and its stream's creation time."""
    live_stream = broker.streams.stream(stream)
    if live_stream is None:
        raise FluxStatus.from_entry("STREAM_NOT_FOUND", f"no stream is named {stream!r}")
    if not 0 <= partition < len(live_stream.partitions):
        raise FluxStatus.from_entry("PARTITION_NOT_FOUND")
    return live_stream.partitions[partition], live_stream.metadata.creation_timestamp_ns


def _store_status(error: Exception) -> FluxStatus:
    if isinstance(error, CursorsDisabledError):
        return FluxStatus.from_entry("CURSORS_DISABLED", _DISABLED_MESSAGE)
    if isinstance(error, NotCursorsLeaderError):
        return FluxStatus.from_entry("NOT_LEADER")
    assert isinstance(error, CursorLimitError), error
    return FluxStatus.from_entry("RESOURCE_LIMIT", str(error))


def _commit_cursor_id(request: api_pb2.SetCursorRequest) -> str:
    """The cursor a SetCursor writes: a member-checked commit may leave ``cursorId`` empty."""
    if not request.HasField("consumer"):
        return request.cursorId
    consumer = request.consumer
    check_group_id(consumer.groupId)
    if not consumer.consumerId:
        raise _invalid("consumer.consumerId is required for a member-checked commit")
    expected = group_cursor_id(consumer.groupId)
    if request.cursorId not in ("", expected):
        raise _invalid(
            f"a member-checked commit writes the group's cursor {shown(expected)}, not "
            f"{shown(request.cursorId)}"
        )
    return expected


def _member_checked(
    broker: BrokerContext, request: api_pb2.SetCursorRequest
) -> contextlib.AbstractAsyncContextManager[None]:
    """Hold the partition's ownership still while a member-checked commit is written."""
    if not request.HasField("consumer"):
        return contextlib.nullcontext()
    if broker.groups is None:
        raise FluxStatus.from_entry("UNAVAILABLE", "consumer groups are not running yet")
    consumer = request.consumer
    return broker.groups.committing(
        consumer.groupId,
        consumer.consumerId,
        (request.stream, request.partition),
        consumer.groupEpoch,
    )


async def set_cursor(
    broker: BrokerContext, request: api_pb2.SetCursorRequest
) -> api_pb2.SetCursorResponse:
    """SetCursor: store ``offset`` as the cursor (see the module docstring for every status).

    Raises:
        FluxStatus: The request's status when it is refused (module docstring).
        flux_broker.nats.subjects.InvalidNameError: ``stream`` is malformed or reserved.
        flux_broker.log.LogError: Storage failed or the broker is stopping; nothing stored.
    """
    cursor_id = _commit_cursor_id(request)
    _check_request(cursor_id, request.stream)
    if request.offset < NO_CURSOR:
        raise _invalid(
            f"offset {request.offset} is negative: use an offset of the partition, or -1 to "
            "clear the cursor"
        )
    store = _store(broker)
    partition, created_ns = _target(broker, request.stream, request.partition)
    newest = partition.newest_offset
    if request.offset > newest + 1:
        raise FluxStatus.from_entry(
            "OFFSET_OUT_OF_RANGE",
            f"offset {request.offset} is past the end of stream {request.stream!r} partition "
            f"{request.partition}: a cursor may point at most at its newest offset + 1 "
            f"({newest + 1})",
        )
    try:
        async with _member_checked(broker, request):
            await store.set(
                cursor_id,
                request.stream,
                request.partition,
                request.offset,
                stream_created_ns=created_ns,
            )
    except (CursorsDisabledError, NotCursorsLeaderError, CursorLimitError) as error:
        raise _store_status(error) from None
    return api_pb2.SetCursorResponse()


async def fetch_cursor(
    broker: BrokerContext, request: api_pb2.FetchCursorRequest
) -> api_pb2.FetchCursorResponse:
    """FetchCursor: the stored offset, or -1 (see the module docstring for every status).

    Raises:
        FluxStatus: The request's status when it is refused (module docstring).
        flux_broker.nats.subjects.InvalidNameError: ``stream`` is malformed or reserved.
        flux_broker.log.LogError: The broker is stopping, or ``__cursors`` cannot be read.
    """
    _check_request(request.cursorId, request.stream)
    store = _store(broker)
    _, created_ns = _target(broker, request.stream, request.partition)
    try:
        offset = await store.fetch(
            request.cursorId, request.stream, request.partition, stream_created_ns=created_ns
        )
    except (CursorsDisabledError, NotCursorsLeaderError) as error:
        raise _store_status(error) from None
    return api_pb2.FetchCursorResponse(offset=offset)
