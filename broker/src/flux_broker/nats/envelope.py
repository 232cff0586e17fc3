"""Liftbridge's NATS envelope: the header that marks a NATS payload as a Liftbridge message.

Every byte of the envelope is defined here and nowhere else. It is Liftbridge's envelope
protocol (``server/protocol/envelope.go``), so Liftbridge clients that publish straight to a
stream's NATS subject, and the acks they wait for, work against Flux unchanged. All integers
are big-endian::

    offset  size  field      value
    0       4     magic      B9 0E 43 B4 (chosen to be invalid UTF-8)
    4       1     version    0 (the only version; anything else is rejected)
    5       1     headerLen  where the payload starts: 8, or 12 when a CRC is present
    6       1     flags      bit 0 (0x01) = CRC-32C present; other bits unused
    7       1     msgType    MessageType: 0 PUBLISH (a Message), 1 ACK (an Ack), 2-14 internal
    8       4     CRC-32C    only with flag bit 0: Castagnoli CRC of data[headerLen:]
    headerLen     payload    the protobuf-serialized message

Semantics (DESIGN.md §4.2, reference ``liftbridge-api.md`` §2):

- A partition leader receives every NATS message on its partition subject. If the data is a
  type-0 envelope, key, value, headers, ack inbox, correlation id, ack policy and ``offset``
  (the expected offset for optimistic concurrency control, -1 = no check) come from the
  :class:`~flux_proto.api_pb2.Message` in it. Anything else -- a plain NATS payload -- is
  stored raw as the value, with no key, no headers and no ack. Either way the NATS subject
  and reply subject are recorded (headers ``subject`` and ``reply``).
- Acks are type-1 envelopes holding an :class:`~flux_proto.api_pb2.Ack`, published to the
  message's ack inbox when it is non-empty.
- Writers (Liftbridge's and Flux's by default) emit headerLen 8 and flags 0: no CRC.

Decoding follows Liftbridge's ``checkEnvelope`` and is stricter only where Liftbridge would
misread or crash: a headerLen below 8 (Liftbridge would read the header as payload) and a
headerLen past the end of the data (Liftbridge would panic) are errors. Like Liftbridge, a
headerLen above 8 without the CRC flag is accepted and the bytes between are skipped, and
unused flag bits are ignored, so a future header extension does not turn publishes into raw
values.

Liftbridge itself stores *any* payload that fails to decode as a publish envelope raw
(``getMessage`` returns nil on every error). :func:`decode_message` tells the two apart: it
returns ``None`` for data without the magic, and raises :class:`EnvelopeError` for data with
the magic whose envelope or protobuf is broken, so the caller can count and log it; an ingest
path that wants Liftbridge's behaviour stores the raw payload in both cases.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, TypeVar

from crc32c import crc32c
from google.protobuf.message import DecodeError

from flux_proto import api_pb2

__all__ = [
    "CRC_BYTES",
    "CRC_FLAG",
    "FLAGS_BYTES",
    "HEADER_BYTES",
    "HEADER_LENGTH_BYTES",
    "HEADER_WITH_CRC_BYTES",
    "MAGIC",
    "MAGIC_BYTES",
    "MESSAGE_TYPE_BYTES",
    "VERSION",
    "VERSION_BYTES",
    "EnvelopeError",
    "EnvelopeErrorReason",
    "MessageType",
    "decode",
    "decode_ack",
    "decode_message",
    "encode",
    "encode_ack",
    "encode_message",
]

# Header fields, in order.
MAGIC_BYTES: Final = 4
VERSION_BYTES: Final = 1
HEADER_LENGTH_BYTES: Final = 1
FLAGS_BYTES: Final = 1
MESSAGE_TYPE_BYTES: Final = 1
#: The fixed header, without the optional CRC: the smallest valid envelope.
HEADER_BYTES: Final = (
    MAGIC_BYTES + VERSION_BYTES + HEADER_LENGTH_BYTES + FLAGS_BYTES + MESSAGE_TYPE_BYTES
)
CRC_BYTES: Final = 4
HEADER_WITH_CRC_BYTES: Final = HEADER_BYTES + CRC_BYTES

MAGIC: Final = b"\xb9\x0e\x43\xb4"
VERSION: Final = 0
CRC_FLAG: Final = 0x01  # flag bit 0

# Positions of the one-byte fields after the magic.
VERSION_AT: Final = MAGIC_BYTES
HEADER_LENGTH_AT: Final = VERSION_AT + VERSION_BYTES
FLAGS_AT: Final = HEADER_LENGTH_AT + HEADER_LENGTH_BYTES
MESSAGE_TYPE_AT: Final = FLAGS_AT + FLAGS_BYTES

HEADER: Final = struct.Struct(">4sBBBB")  # magic, version, headerLen, flags, msgType
CRC: Final = struct.Struct(">I")

_M = TypeVar("_M", api_pb2.Message, api_pb2.Ack)

assert HEADER.size == HEADER_BYTES
assert CRC.size == CRC_BYTES


class MessageType(enum.IntEnum):
    """What an envelope's payload is (the ``msgType`` byte).

    Only ``PUBLISH`` and ``ACK`` are client-facing; the rest are Liftbridge's internal
    server-to-server requests, listed so their numbers are never reused.
    """

    PUBLISH = 0
    ACK = 1
    REPLICATION_REQUEST = 2
    REPLICATION_RESPONSE = 3
    RAFT_JOIN_REQUEST = 4
    RAFT_JOIN_RESPONSE = 5
    LEADER_EPOCH_OFFSET_REQUEST = 6
    LEADER_EPOCH_OFFSET_RESPONSE = 7
    PROPAGATED_REQUEST = 8
    PROPAGATED_RESPONSE = 9
    SERVER_INFO_REQUEST = 10
    SERVER_INFO_RESPONSE = 11
    PARTITION_STATUS_REQUEST = 12
    PARTITION_STATUS_RESPONSE = 13
    PARTITION_NOTIFICATION = 14


class EnvelopeErrorReason(enum.StrEnum):
    """Why bytes are not a valid envelope: a closed set, for counters and log fields."""

    TOO_SHORT = "too-short"
    BAD_MAGIC = "bad-magic"
    UNSUPPORTED_VERSION = "unsupported-version"
    BAD_HEADER_LENGTH = "bad-header-length"
    HEADER_BEYOND_DATA = "header-beyond-data"
    WRONG_TYPE = "wrong-type"
    CRC_MISMATCH = "crc-mismatch"
    BAD_PAYLOAD = "bad-payload"


class EnvelopeError(ValueError):
    """Data is not a valid envelope of the expected type.

    Attributes:
        reason: Which check failed.
        detail: A human-readable description (never the raw data).
    """

    def __init__(self, reason: EnvelopeErrorReason, detail: str = "") -> None:
        """Describe the failed check."""
        super().__init__(f"invalid envelope ({reason}): {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def encode(msg_type: MessageType, payload: bytes, *, crc: bool = False) -> bytes:
    """Wrap ``payload`` in an envelope of type ``msg_type``.

    Args:
        msg_type: What the payload is.
        payload: The serialized message.
        crc: Add a CRC-32C of the payload (headerLen 12, flag bit 0). Liftbridge's writers
            never do; its readers check it when present.

    Returns:
        The envelope: header, optional CRC, payload.
    """
    if not crc:
        return HEADER.pack(MAGIC, VERSION, HEADER_BYTES, 0, msg_type) + payload
    header = HEADER.pack(MAGIC, VERSION, HEADER_WITH_CRC_BYTES, CRC_FLAG, msg_type)
    return header + CRC.pack(crc32c(payload)) + payload


def decode(data: bytes | bytearray | memoryview, expected: MessageType) -> bytes:
    """Check the envelope around ``data`` and return its payload.

    Args:
        data: A whole NATS message payload.
        expected: The message type the caller can handle.

    Returns:
        The payload bytes (``data[headerLen:]``), not yet parsed.

    Raises:
        EnvelopeError: ``data`` is shorter than the header, lacks the magic, has another
            version, a headerLen below 8 or past the end of the data, another message type,
            the CRC flag with a headerLen other than 12, or a CRC that does not match.
    """
    size = len(data)
    if size < HEADER_BYTES:
        raise EnvelopeError(
            EnvelopeErrorReason.TOO_SHORT,
            f"{size} bytes, shorter than the {HEADER_BYTES}-byte header",
        )
    magic, version, header_length, flags, msg_type = HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise EnvelopeError(EnvelopeErrorReason.BAD_MAGIC, f"magic is {magic.hex(' ')}")
    if version != VERSION:
        raise EnvelopeError(
            EnvelopeErrorReason.UNSUPPORTED_VERSION, f"version {version}, only {VERSION} exists"
        )
    if header_length < HEADER_BYTES:
        raise EnvelopeError(
            EnvelopeErrorReason.BAD_HEADER_LENGTH,
            f"headerLen {header_length} is below the {HEADER_BYTES}-byte header",
        )
    if header_length > size:
        raise EnvelopeError(
            EnvelopeErrorReason.HEADER_BEYOND_DATA,
            f"headerLen {header_length} is past the end of {size} bytes",
        )
    if msg_type != expected:
        raise EnvelopeError(
            EnvelopeErrorReason.WRONG_TYPE, f"message type {msg_type}, expected {expected:d}"
        )
    payload = bytes(data[header_length:])
    if flags & CRC_FLAG:
        if header_length != HEADER_WITH_CRC_BYTES:
            raise EnvelopeError(
                EnvelopeErrorReason.BAD_HEADER_LENGTH,
                f"CRC flag set but headerLen is {header_length}, not {HEADER_WITH_CRC_BYTES}",
            )
        (stored,) = CRC.unpack_from(data, HEADER_BYTES)
        actual = crc32c(payload)
        if actual != stored:
            raise EnvelopeError(
                EnvelopeErrorReason.CRC_MISMATCH,
                f"CRC-32C is {actual:#010x}, the header says {stored:#010x}",
            )
    return payload


def encode_message(message: api_pb2.Message, *, crc: bool = False) -> bytes:
    """Serialize ``message`` into a PUBLISH (type 0) envelope.

    Args:
        message: The message; ``offset`` is the expected offset (-1 = no OCC check).
        crc: Add a CRC-32C of the payload.

    Returns:
        The envelope bytes to publish on a stream's NATS subject.
    """
    return encode(MessageType.PUBLISH, message.SerializeToString(), crc=crc)


def decode_message(data: bytes | bytearray | memoryview) -> api_pb2.Message | None:
    """Read a PUBLISH envelope, telling a plain NATS payload apart from a broken envelope.

    Args:
        data: A whole NATS message payload received on a partition subject.

    Returns:
        The message, or ``None`` when ``data`` does not start with the envelope magic (a
        plain NATS payload, stored raw as the value).

    Raises:
        EnvelopeError: ``data`` starts with the magic but is not a valid PUBLISH envelope,
            or its payload is not a ``Message`` (reason ``bad-payload``).
    """
    if data[:MAGIC_BYTES] != MAGIC:
        return None
    return _parse(api_pb2.Message(), decode(data, MessageType.PUBLISH))


def encode_ack(ack: api_pb2.Ack, *, crc: bool = False) -> bytes:
    """Serialize ``ack`` into an ACK (type 1) envelope.

    Args:
        ack: The ack.
        crc: Add a CRC-32C of the payload.

    Returns:
        The envelope bytes to publish on the message's ack inbox.
    """
    return encode(MessageType.ACK, ack.SerializeToString(), crc=crc)


def decode_ack(data: bytes | bytearray | memoryview) -> api_pb2.Ack:
    """Read an ACK envelope.

    Args:
        data: A whole NATS message payload received on an ack inbox.

    Returns:
        The ack.

    Raises:
        EnvelopeError: ``data`` is not a valid ACK envelope, or its payload is not an ``Ack``
            (reason ``bad-payload``).
    """
    return _parse(api_pb2.Ack(), decode(data, MessageType.ACK))


def _parse(message: _M, payload: bytes) -> _M:
    """Parse ``payload`` into ``message``; a protobuf error becomes an EnvelopeError."""
    try:
        message.ParseFromString(payload)
    except DecodeError as error:
        raise EnvelopeError(EnvelopeErrorReason.BAD_PAYLOAD, str(error)) from None
    return message
