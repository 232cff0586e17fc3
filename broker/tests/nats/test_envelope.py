"""Liftbridge's NATS envelope (flux_broker.nats.envelope).

The golden envelopes below are written out byte by byte from the layout table of
``reference/liftbridge-api.md`` §2 and the protobuf wire format (tag = field << 3 | wire
type), not produced by the codec, so they check the codec against the spec.
"""

from __future__ import annotations

import struct

import pytest
from crc32c import crc32c
from hypothesis import given
from hypothesis import strategies as st

from flux_broker.nats import envelope as env
from flux_broker.nats.envelope import EnvelopeError, EnvelopeErrorReason, MessageType
from flux_proto import api_pb2

Reason = EnvelopeErrorReason

MAGIC = bytes([0xB9, 0x0E, 0x43, 0xB4])

GOLDEN_MESSAGE = api_pb2.Message(
    offset=-1,
    key=b"k",
    value=b"hello",
    headers={"h": b"v"},
    ackInbox="inbox",
    correlationId="c1",
    ackPolicy=api_pb2.AckPolicy.ALL,
)
GOLDEN_MESSAGE_ENVELOPE = (
    MAGIC + bytes([0x00, 0x08, 0x00, 0x00])  # version 0, headerLen 8, no flags, PUBLISH
    + bytes([0x08]) + b"\xff" * 9 + b"\x01"  # 1 offset: varint -1 (ten bytes)
    + bytes([0x12, 1]) + b"k"  # 2 key
    + bytes([0x1A, 5]) + b"hello"  # 3 value
    + bytes([0x4A, 6, 0x0A, 1]) + b"h" + bytes([0x12, 1]) + b"v"  # 9 headers: one map entry
    + bytes([0x52, 5]) + b"inbox"  # 10 ackInbox
    + bytes([0x5A, 2]) + b"c1"  # 11 correlationId
    + bytes([0x60, 1])  # 12 ackPolicy ALL
)  # fmt: skip

GOLDEN_ACK = api_pb2.Ack(
    stream="s",
    partitionSubject="foo.1",
    msgSubject="foo.1",
    offset=42,
    ackInbox="inbox",
    correlationId="c1",
    receptionTimestamp=1,
    commitTimestamp=2,
    ackError=api_pb2.Ack.Error.TOO_LARGE,
)
GOLDEN_ACK_ENVELOPE = (
    MAGIC + bytes([0x00, 0x08, 0x00, 0x01])  # version 0, headerLen 8, no flags, ACK
    + bytes([0x0A, 1]) + b"s"  # 1 stream
    + bytes([0x12, 5]) + b"foo.1"  # 2 partitionSubject
    + bytes([0x1A, 5]) + b"foo.1"  # 3 msgSubject
    + bytes([0x20, 42])  # 4 offset
    + bytes([0x2A, 5]) + b"inbox"  # 5 ackInbox
    + bytes([0x32, 2]) + b"c1"  # 6 correlationId
    # 7 ackPolicy LEADER is the default (0): not on the wire.
    + bytes([0x40, 1])  # 8 receptionTimestamp
    + bytes([0x48, 2])  # 9 commitTimestamp
    + bytes([0x50, 3])  # 10 ackError TOO_LARGE
)  # fmt: skip


def header(*, version: int = 0, header_len: int = 8, flags: int = 0, msg_type: int = 0) -> bytes:
    """An envelope header with the given fields, built by hand."""
    return MAGIC + bytes([version, header_len, flags, msg_type])


def test_layout_constants_match_the_spec() -> None:
    assert env.MAGIC == MAGIC
    assert env.HEADER_BYTES == 8
    assert env.HEADER_WITH_CRC_BYTES == 12
    assert (env.VERSION_AT, env.HEADER_LENGTH_AT, env.FLAGS_AT, env.MESSAGE_TYPE_AT) == (4, 5, 6, 7)
    assert env.CRC_FLAG == 0x01
    assert env.VERSION == 0


def test_message_types_match_the_reference() -> None:
    assert [(t.value, t.name) for t in MessageType] == [
        (0, "PUBLISH"),
        (1, "ACK"),
        (2, "REPLICATION_REQUEST"),
        (3, "REPLICATION_RESPONSE"),
        (4, "RAFT_JOIN_REQUEST"),
        (5, "RAFT_JOIN_RESPONSE"),
        (6, "LEADER_EPOCH_OFFSET_REQUEST"),
        (7, "LEADER_EPOCH_OFFSET_RESPONSE"),
        (8, "PROPAGATED_REQUEST"),
        (9, "PROPAGATED_RESPONSE"),
        (10, "SERVER_INFO_REQUEST"),
        (11, "SERVER_INFO_RESPONSE"),
        (12, "PARTITION_STATUS_REQUEST"),
        (13, "PARTITION_STATUS_RESPONSE"),
        (14, "PARTITION_NOTIFICATION"),
    ]


def test_publish_envelope_matches_golden_bytes() -> None:
    assert env.encode_message(GOLDEN_MESSAGE) == GOLDEN_MESSAGE_ENVELOPE
    assert env.decode_message(GOLDEN_MESSAGE_ENVELOPE) == GOLDEN_MESSAGE


def test_ack_envelope_matches_golden_bytes() -> None:
    assert env.encode_ack(GOLDEN_ACK) == GOLDEN_ACK_ENVELOPE
    assert env.decode_ack(GOLDEN_ACK_ENVELOPE) == GOLDEN_ACK


def test_crc_envelope_layout_and_round_trip() -> None:
    payload = GOLDEN_MESSAGE.SerializeToString()
    data = env.encode_message(GOLDEN_MESSAGE, crc=True)
    assert data == header(header_len=12, flags=0x01) + struct.pack(">I", crc32c(payload)) + payload
    assert env.decode(data, MessageType.PUBLISH) == payload
    assert env.decode_message(data) == GOLDEN_MESSAGE
    ack = env.encode_ack(GOLDEN_ACK, crc=True)
    assert ack[:8] == header(header_len=12, flags=0x01, msg_type=1)
    assert env.decode_ack(ack) == GOLDEN_ACK


@pytest.mark.parametrize("at", [8, 12, 20, -1])
def test_crc_detects_a_flipped_bit(at: int) -> None:
    """A bit flipped in the stored CRC (8) or anywhere in the payload fails the check."""
    data = bytearray(env.encode_message(GOLDEN_MESSAGE, crc=True))
    data[at] ^= 0x10
    with pytest.raises(EnvelopeError) as caught:
        env.decode(bytes(data), MessageType.PUBLISH)
    assert caught.value.reason is Reason.CRC_MISMATCH
    with pytest.raises(EnvelopeError):
        env.decode_message(bytes(data))


def test_empty_payload_is_an_empty_message() -> None:
    """Liftbridge's server accepts an 8-byte envelope: all fields default."""
    assert env.decode(header(), MessageType.PUBLISH) == b""
    assert env.decode_message(header()) == api_pb2.Message()
    assert env.encode(MessageType.ACK, b"") == header(msg_type=1)


@pytest.mark.parametrize(
    ("data", "expected", "reason"),
    [
        pytest.param(b"", MessageType.PUBLISH, Reason.TOO_SHORT, id="empty"),
        pytest.param(MAGIC + b"\x00\x08\x00", MessageType.PUBLISH, Reason.TOO_SHORT, id="7-bytes"),
        pytest.param(b"\xb9\x0e\x43\xb5" + bytes(4), MessageType.PUBLISH, Reason.BAD_MAGIC,
                     id="bad-magic"),
        pytest.param(b"hello, world", MessageType.PUBLISH, Reason.BAD_MAGIC, id="plain-text"),
        pytest.param(header(version=1), MessageType.PUBLISH, Reason.UNSUPPORTED_VERSION,
                     id="version-1"),
        pytest.param(header(version=0xFF), MessageType.PUBLISH, Reason.UNSUPPORTED_VERSION,
                     id="version-255"),
        pytest.param(header(msg_type=1), MessageType.PUBLISH, Reason.WRONG_TYPE,
                     id="ack-where-publish-expected"),
        pytest.param(header(msg_type=0), MessageType.ACK, Reason.WRONG_TYPE,
                     id="publish-where-ack-expected"),
        pytest.param(header(msg_type=200), MessageType.PUBLISH, Reason.WRONG_TYPE,
                     id="unknown-type"),
        pytest.param(header(flags=0x01) + bytes(8), MessageType.PUBLISH,
                     Reason.BAD_HEADER_LENGTH, id="crc-flag-with-header-len-8"),
        pytest.param(header(header_len=13, flags=0x01) + bytes(8), MessageType.PUBLISH,
                     Reason.BAD_HEADER_LENGTH, id="crc-flag-with-header-len-13"),
        pytest.param(header(header_len=4), MessageType.PUBLISH, Reason.BAD_HEADER_LENGTH,
                     id="header-len-below-8"),
        pytest.param(header(header_len=0), MessageType.PUBLISH, Reason.BAD_HEADER_LENGTH,
                     id="header-len-0"),
        pytest.param(header(header_len=12, flags=0x01) + b"\x00\x00", MessageType.PUBLISH,
                     Reason.HEADER_BEYOND_DATA, id="crc-cut-short"),
        pytest.param(header(header_len=255), MessageType.PUBLISH, Reason.HEADER_BEYOND_DATA,
                     id="header-len-255"),
        pytest.param(header(header_len=12, flags=0x01) + bytes(4) + b"\x08\x01",
                     MessageType.PUBLISH, Reason.CRC_MISMATCH, id="crc-mismatch"),
    ],
)  # fmt: skip
def test_decode_rejects(data: bytes, expected: MessageType, reason: EnvelopeErrorReason) -> None:
    with pytest.raises(EnvelopeError) as caught:
        env.decode(data, expected)
    assert caught.value.reason is reason
    assert reason in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_header_len_above_8_without_crc_skips_the_extra_bytes() -> None:
    """As in Liftbridge: the payload starts at headerLen, room for future header fields."""
    data = header(header_len=10) + b"??" + b"\x08\x05"
    assert env.decode(data, MessageType.PUBLISH) == b"\x08\x05"
    assert env.decode_message(data) == api_pb2.Message(offset=5)


def test_unused_flag_bits_are_ignored() -> None:
    assert env.decode(header(flags=0xFE) + b"x", MessageType.PUBLISH) == b"x"


@pytest.mark.parametrize(
    "data",
    [b"", b"x", b"\xb9\x0e\x43", b"hello, world", b"\xb9\x0e\x43\xb5" + bytes(8), bytes(100)],
)
def test_decode_message_returns_none_without_magic(data: bytes) -> None:
    """Not an envelope at all: the caller stores the raw payload as the value."""
    assert env.decode_message(data) is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (MAGIC, Reason.TOO_SHORT),
        (header(version=1), Reason.UNSUPPORTED_VERSION),
        (header(msg_type=1), Reason.WRONG_TYPE),
        (header() + b"\xff", Reason.BAD_PAYLOAD),  # a truncated varint tag
        (header() + b"\x2a\x02\xff\xfe", Reason.BAD_PAYLOAD),  # stream: invalid UTF-8
        (header() + b"\x1a\x05ab", Reason.BAD_PAYLOAD),  # value longer than the data
    ],
)
def test_decode_message_raises_for_a_broken_envelope(data: bytes, reason: Reason) -> None:
    with pytest.raises(EnvelopeError) as caught:
        env.decode_message(data)
    assert caught.value.reason is reason


def test_decode_ack_raises_for_a_broken_envelope() -> None:
    with pytest.raises(EnvelopeError) as caught:
        env.decode_ack(b"plain text")
    assert caught.value.reason is Reason.BAD_MAGIC
    with pytest.raises(EnvelopeError) as caught:
        env.decode_ack(header(msg_type=1) + b"\x0a\x09s")
    assert caught.value.reason is Reason.BAD_PAYLOAD


def test_decode_accepts_bytearray_and_memoryview() -> None:
    data = env.encode_message(GOLDEN_MESSAGE, crc=True)
    assert env.decode_message(bytearray(data)) == GOLDEN_MESSAGE
    assert env.decode_message(memoryview(data)) == GOLDEN_MESSAGE
    assert env.decode_message(memoryview(b"raw")) is None


def test_error_message_never_echoes_the_data() -> None:
    data = header(msg_type=1) + b"secret\n\x1b[31m"
    with pytest.raises(EnvelopeError) as caught:
        env.decode(data, MessageType.PUBLISH)
    assert "secret" not in str(caught.value)
    assert caught.value.detail == "message type 1, expected 0"


# Hypothesis strategies.
headers_st = st.dictionaries(st.text(max_size=10), st.binary(max_size=10), max_size=4)
message_st = st.builds(
    api_pb2.Message,
    offset=st.sampled_from([-1, 0, 1, 2**63 - 1, -(2**63)]) | st.integers(-(2**63), 2**63 - 1),
    key=st.binary(max_size=32),
    value=st.binary(max_size=256),
    timestamp=st.integers(-(2**63), 2**63 - 1),
    stream=st.text(max_size=20),
    partition=st.integers(-(2**31), 2**31 - 1),
    subject=st.text(max_size=20),
    replySubject=st.text(max_size=20),
    headers=headers_st,
    ackInbox=st.text(max_size=20),
    correlationId=st.text(max_size=20),
    ackPolicy=st.sampled_from(list(api_pb2.AckPolicy.values())),
)
ack_st = st.builds(
    api_pb2.Ack,
    stream=st.text(max_size=20),
    partitionSubject=st.text(max_size=20),
    msgSubject=st.text(max_size=20),
    offset=st.integers(-(2**63), 2**63 - 1),
    ackInbox=st.text(max_size=20),
    correlationId=st.text(max_size=20),
    ackPolicy=st.sampled_from(list(api_pb2.AckPolicy.values())),
    receptionTimestamp=st.integers(-(2**63), 2**63 - 1),
    commitTimestamp=st.integers(-(2**63), 2**63 - 1),
    ackError=st.sampled_from(list(api_pb2.Ack.Error.values())),
)
# Arbitrary bytes, and bytes that get past the magic (and often the header) so the deeper
# checks are exercised too.
envelope_like_st = st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(lambda rest: MAGIC + rest),
    st.builds(
        lambda version, header_len, flags, msg_type, rest: (
            header(version=version, header_len=header_len, flags=flags, msg_type=msg_type) + rest
        ),
        st.sampled_from([0, 0, 0, 1]),
        st.sampled_from([8, 8, 12, 12]) | st.integers(0, 255),
        st.integers(0, 255),
        st.integers(0, 255) | st.sampled_from([0, 1]),
        st.binary(max_size=64),
    ),
)


@given(message_st, st.booleans())
def test_message_round_trips(message: api_pb2.Message, crc: bool) -> None:
    data = env.encode_message(message, crc=crc)
    assert data[:4] == MAGIC
    assert data[5] == (12 if crc else 8)
    decoded = env.decode_message(data)
    assert decoded == message
    assert decoded is not None
    assert dict(decoded.headers) == dict(message.headers)
    assert decoded.offset == message.offset


@given(ack_st, st.booleans())
def test_ack_round_trips(ack: api_pb2.Ack, crc: bool) -> None:
    assert env.decode_ack(env.encode_ack(ack, crc=crc)) == ack


@given(st.sampled_from(list(MessageType)), st.binary(max_size=128), st.booleans())
def test_encode_then_decode_returns_the_payload(
    msg_type: MessageType, payload: bytes, crc: bool
) -> None:
    data = env.encode(msg_type, payload, crc=crc)
    assert data[7] == msg_type
    assert env.decode(data, msg_type) == payload


@given(envelope_like_st, st.sampled_from(list(MessageType)))
def test_decode_only_returns_or_raises_envelope_error(data: bytes, expected: MessageType) -> None:
    try:
        payload = env.decode(data, expected)
    except EnvelopeError as error:
        reason = error.reason
    else:
        assert data.endswith(payload)
        assert len(payload) <= len(data) - 8
        return
    assert reason in set(Reason)


@given(envelope_like_st)
def test_decode_message_only_returns_or_raises_envelope_error(data: bytes) -> None:
    try:
        message = env.decode_message(data)
    except EnvelopeError:
        assert data.startswith(MAGIC)
    else:
        assert (message is None) == (not data.startswith(MAGIC))


@given(envelope_like_st)
def test_decode_ack_only_returns_or_raises_envelope_error(data: bytes) -> None:
    try:
        ack = env.decode_ack(data)
    except EnvelopeError:
        pass
    else:
        assert isinstance(ack, api_pb2.Ack)
