"""What the three Liftbridge publish paths share: request checks, ack errors, NATS failures.

**Checks** come first and change nothing; a request that fails one publishes nothing. In
order: stream named (INVALID_ARGUMENT), stream exists (STREAM_NOT_FOUND), partition exists
(PARTITION_NOT_FOUND), partition not read-only (READONLY: FAILED_PRECONDITION / asyncError
READONLY), ``ackPolicy`` is a defined value (proto3 keeps unknown numbers), an OCC
stream is not published to with policy NONE, a client-chosen ``ackInbox`` is a literal subject
outside the broker's own inbox space, headers within the broker's limits (count, name and
total bytes: :mod:`flux_broker.api.limits`), and the encoded envelope within ``record_max_bytes``
(``clustering.replication.max.bytes``, MESSAGE_TOO_LARGE): the partition leader would refuse it
anyway, and NATS refuses payloads over its ``max_payload``. A failed check is a
:class:`RejectedError`: a status for the unary RPCs, an ``asyncError`` response for
PublishAsync.

**Resuming.** Publish and PublishAsync then resume a paused partition (every paused partition
of its stream when it was paused with ``resumeAll``), as Liftbridge does after its checks, and
publish only once the partition's leader is subscribed again. A stream deleted meanwhile is
STREAM_NOT_FOUND; a resume that fails otherwise is STORAGE_FAILED (the metadata store),
UNAVAILABLE (the broker is shutting down) or INTERNAL (a log that cannot be opened).
PublishToSubject never resumes: like a raw NATS publish, it only reaches partitions that are
running.

**Ack errors** map as Liftbridge maps them: TOO_LARGE → MESSAGE_TOO_LARGE / BAD_REQUEST,
INCORRECT_OFFSET → INCORRECT_OFFSET (UNKNOWN) / INCORRECT_OFFSET, ENCRYPTION →
ENCRYPTION_FAILED, anything else → ACK_FAILED (UNKNOWN) / UNKNOWN.

**NATS failures** (connection closed, reconnect buffer full) answer UNAVAILABLE: the message
may or may not have reached NATS, and UNAVAILABLE is the code Liftbridge clients retry.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Final

import nats.errors

from flux_broker.api.context import BrokerContext
from flux_broker.api.limits import HEADER_NAME_MAX_BYTES, MESSAGE_HEADERS_MAX_COUNT, Limits
from flux_broker.api.status import STORAGE_FAILED_MESSAGE, UNAVAILABLE_MESSAGE, FluxStatus
from flux_broker.logs import partition_fields
from flux_broker.metadata import (
    MetadataClosedError,
    MetadataStorageError,
    PartitionNotFoundError,
    StreamNotFoundError,
)
from flux_broker.nats.acks import AckRouterFullError
from flux_broker.nats.envelope import encode_message
from flux_broker.nats.subjects import (
    InvalidSubjectError,
    shown,
    validate_literal_subject,
)
from flux_broker.streams.manager import LivePartition
from flux_proto import api_pb2

__all__ = [
    "ACK_ERRORS",
    "HEADERS_MAX",
    "HEADER_NAME_MAX_BYTES",
    "NONE",
    "OTHER_ACK_ERROR",
    "AckError",
    "Code",
    "RejectedError",
    "ack_error_text",
    "bad_request",
    "check_ack",
    "check_ack_inbox",
    "check_ack_policy",
    "check_headers",
    "encoded",
    "message_of",
    "nats_failures",
    "resume",
    "resumed_target",
    "target",
]

_logger = logging.getLogger(__name__)

#: Headers one message may carry by default (``limits.message.headers.max.count``).
HEADERS_MAX: Final = MESSAGE_HEADERS_MAX_COUNT
Code = api_pb2.PublishAsyncError.Code
AckError = api_pb2.Ack.Error
NONE: Final = api_pb2.AckPolicy.NONE
_ACK_POLICIES: Final = frozenset(api_pb2.AckPolicy.values())
_RESUME_FAILED_MESSAGE: Final = (
    "the paused partition could not be resumed; nothing was published (the broker log has "
    "the details)"
)
_NATS_FAILED_MESSAGE: Final = (
    "the broker could not reach NATS; the message may or may not have been published"
)
#: Ack error → (error-table row for a unary status, PublishAsync code), as Liftbridge maps them.
ACK_ERRORS: Final[dict[AckError.ValueType, tuple[str, Code.ValueType]]] = {
    AckError.TOO_LARGE: ("MESSAGE_TOO_LARGE", Code.BAD_REQUEST),
    AckError.INCORRECT_OFFSET: ("INCORRECT_OFFSET", Code.INCORRECT_OFFSET),
    AckError.ENCRYPTION: ("ENCRYPTION_FAILED", Code.ENCRYPTION_FAILED),
}
OTHER_ACK_ERROR: Final[tuple[str, Code.ValueType]] = ("ACK_FAILED", Code.UNKNOWN)
_ACK_ERROR_TEXTS: Final[dict[AckError.ValueType, str]] = {
    AckError.TOO_LARGE: "the partition leader refused the message as too large "
    "(clustering.replication.max.bytes); nothing was written",
    AckError.INCORRECT_OFFSET: "the expected offset is not the offset the message would get "
    "(optimistic concurrency control); nothing was written",
    AckError.ENCRYPTION: "the partition leader could not encrypt the message; nothing was written",
}


# -- checks ------------------------------------------------------------------------------------


class RejectedError(Exception):
    """A request failed a check: a unary status, or a PublishAsync error response."""

    def __init__(self, row: str, code: Code.ValueType, detail: str) -> None:
        """Name the error-table row, the PublishAsync code and what was wrong."""
        super().__init__(detail)
        self.row = row
        self.code = code
        self.detail = detail

    def status(self) -> FluxStatus:
        """The unary status (Liftbridge's text when the row has one, else the detail)."""
        status = FluxStatus.from_entry(self.row)
        if status.entry.liftbridge_message is None:
            status = FluxStatus.from_entry(self.row, self.detail)
        return status

    def response(self, correlation_id: str) -> api_pb2.PublishResponse:
        """The PublishAsync response: async error, correlation id, empty ack."""
        return api_pb2.PublishResponse(
            correlationId=correlation_id,
            asyncError=api_pb2.PublishAsyncError(code=self.code, message=self.detail),
            ack=api_pb2.Ack(),  # present but empty: Liftbridge's shim for older clients
        )


def bad_request(detail: str) -> RejectedError:
    """An INVALID_ARGUMENT / BAD_REQUEST rejection."""
    return RejectedError("INVALID_ARGUMENT", Code.BAD_REQUEST, detail)


def target(broker: BrokerContext, request: api_pb2.PublishRequest) -> LivePartition:
    """The partition a PublishRequest goes to, after every check but the ack inbox and size."""
    if not request.stream:
        raise bad_request("stream is empty: name the stream to publish to")
    stream = broker.streams.stream(request.stream)
    if stream is None:
        raise RejectedError(
            "STREAM_NOT_FOUND", Code.NOT_FOUND, f"no stream {shown(request.stream)}"
        )
    count = len(stream.partitions)
    if not 0 <= request.partition < count:
        raise RejectedError(
            "PARTITION_NOT_FOUND",
            Code.NOT_FOUND,
            f"stream {shown(request.stream)} has no partition {request.partition} "
            f"(its partitions are 0..{count - 1})",
        )
    partition = stream.partitions[request.partition]
    if partition.readonly:
        raise RejectedError(
            "READONLY",
            Code.READONLY,
            f"stream {shown(request.stream)} partition {request.partition} is read-only",
        )
    check_ack_policy(request.ackPolicy)
    if stream.metadata.config.optimistic_concurrency_control and request.ackPolicy == NONE:
        raise bad_request(
            f"stream {shown(request.stream)} uses optimistic concurrency control: "
            "ackPolicy NONE is not allowed"
        )
    check_headers(request.headers, broker.limits)
    return partition


async def resumed_target(broker: BrokerContext, request: api_pb2.PublishRequest) -> LivePartition:
    """:func:`target`, resumed if it is paused (see the module docstring)."""
    partition = target(broker, request)
    await resume(broker, partition)
    return partition


async def resume(broker: BrokerContext, partition: LivePartition) -> None:
    """Resume ``partition`` if it is paused (see the module docstring); raise RejectedError."""
    if partition.paused:
        try:
            await broker.streams.resume(partition.stream, partition.id)
        except (StreamNotFoundError, PartitionNotFoundError):
            raise RejectedError(
                "STREAM_NOT_FOUND", Code.NOT_FOUND, f"no stream {shown(partition.stream)}"
            ) from None
        except MetadataClosedError:
            raise RejectedError("UNAVAILABLE", Code.INTERNAL, UNAVAILABLE_MESSAGE) from None
        except MetadataStorageError:
            _logger.exception(
                "publish: could not record the resume of %r",
                partition.stream,
                extra=partition_fields(partition.stream, partition.id),
            )
            raise RejectedError("STORAGE_FAILED", Code.INTERNAL, STORAGE_FAILED_MESSAGE) from None
        except Exception:
            _logger.exception(
                "publish: could not resume stream %r partition %d",
                partition.stream,
                partition.id,
                extra=partition_fields(partition.stream, partition.id),
            )
            raise RejectedError("INTERNAL", Code.INTERNAL, _RESUME_FAILED_MESSAGE) from None


def check_ack_policy(policy: int) -> None:
    """Reject an ``ackPolicy`` number the enum does not define."""
    if policy not in _ACK_POLICIES:
        raise bad_request(f"ackPolicy {policy} is not defined: use LEADER (0), ALL (1) or NONE (2)")


def check_ack_inbox(broker: BrokerContext, inbox: str) -> None:
    """Reject a client-chosen ack inbox that is not literal or lies in the broker's inboxes."""
    if not inbox:
        return
    try:
        validate_literal_subject(inbox)
    except InvalidSubjectError as error:
        raise bad_request(f"ackInbox: {error}") from None
    if broker.acks.owns(inbox):
        raise bad_request(f"ackInbox {shown(inbox)} is reserved for broker-generated inboxes")


def check_headers(headers: Mapping[str, bytes], limits: Limits) -> None:
    """Reject headers over ``limits``: too many, a name too long, or too many bytes in all."""
    problem = limits.headers_problem(headers)
    if problem is not None:
        raise bad_request(problem)


def encoded(message: api_pb2.Message, limit_bytes: int) -> bytes:
    """The envelope of ``message``, if it is within the broker's message size limit."""
    data = encode_message(message)
    if len(data) > limit_bytes:
        raise RejectedError(
            "MESSAGE_TOO_LARGE",
            Code.BAD_REQUEST,
            f"the message is {len(data)} bytes as a NATS envelope, over the limit of "
            f"{limit_bytes} (clustering.replication.max.bytes)",
        )
    return data


def message_of(request: api_pb2.PublishRequest) -> api_pb2.Message:
    """The envelope's ``Message`` for a PublishRequest (its expected offset as ``offset``)."""
    return api_pb2.Message(
        offset=request.expectedOffset,
        key=request.key,
        value=request.value,
        headers=request.headers,
        correlationId=request.correlationId,
        ackPolicy=request.ackPolicy,
    )


# -- acks and NATS --------------------------------------------------------------------------


@contextlib.contextmanager
def nats_failures() -> Iterator[None]:
    """Turn NATS failures into statuses: the message may or may not have been published."""
    try:
        yield
    except nats.errors.MaxPayloadError:
        raise FluxStatus.from_entry(
            "MESSAGE_TOO_LARGE", "the message is over the NATS server's max_payload"
        ) from None
    except AckRouterFullError:
        raise FluxStatus.from_entry(
            "UNAVAILABLE", "too many publishes are waiting for acks on this broker; retry later"
        ) from None
    except nats.errors.Error as error:
        _logger.warning("publish: NATS failed: %r", error)
        raise FluxStatus.from_entry("UNAVAILABLE", _NATS_FAILED_MESSAGE) from None


def check_ack(ack: api_pb2.Ack) -> None:
    """Raise the status of an ack that carries an error."""
    if ack.ackError == AckError.OK:
        return
    row, _ = ACK_ERRORS.get(ack.ackError, OTHER_ACK_ERROR)
    raise FluxStatus.from_entry(row, ack_error_text(ack.ackError))


def ack_error_text(error: AckError.ValueType) -> str:
    """What an ack error means, for a status or an ``asyncError`` message."""
    text = _ACK_ERROR_TEXTS.get(error)
    if text is not None:
        return text
    name = AckError.Name(error) if error in AckError.values() else str(error)
    return f"the partition leader could not store the message (ack error {name})"
