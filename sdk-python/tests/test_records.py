"""Tests of flux_client._records: the SDK's record codec against the broker's log format.

The SDK does not depend on the broker, but these tests do: the broker's framing
(``flux_broker.log.format``) is the reference the SDK's bytes must match exactly.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import pytest
from crc32c import crc32c
from hypothesis import given
from hypothesis import strategies as st

from flux_broker.log.format import (
    UNPLACED,
    NewRecord,
    Placement,
    check_and_stamp,
    frame,
    iter_decode,
)
from flux_broker.streams.producers import PRODUCER_HEADER, with_producer_header
from flux_client._records import (
    HEADER_BYTES,
    MAX_HEADER_NAME_BYTES,
    MAX_HEADERS,
    RESERVED_HEADER,
    CorruptRecordError,
    DecodedRecord,
    decode_records,
    encode_record,
)

MAX_BYTES = 2**31 - 1
PLACEMENT = Placement(
    base_offset=1_000,
    timestamp_ns=1_700_000_000_123_456_789,
    leader_epoch=7,
    segment_base_offset=0,
    segment_position=0,
)
# Record-relative positions of the broker's layout, spelled out independently of the module.
CRC_AT = HEADER_BYTES
MAGIC_AT = HEADER_BYTES + 4
KEY_LENGTH_AT = HEADER_BYTES + 6
COVERED_FROM = HEADER_BYTES + 4

Header = tuple[str, bytes]

CASES: list[NewRecord] = [
    NewRecord(value=None),
    NewRecord(value=b""),
    NewRecord(value=b"hello"),
    NewRecord(value=None, key=b"k"),
    NewRecord(value=b"", key=b""),
    NewRecord(value=b"v" * 300, key=b"key-1"),
    NewRecord(value=b"v", headers=(("a", b"1"),)),
    NewRecord(value=None, key=None, headers=(("", b""),)),
    NewRecord(value=b"x", key=b"k", headers=(("a", b"1"), ("b", b""), ("a", b"dup"))),
    NewRecord(value=b"\x00\xff", headers=(("é-ñame", b"\x01"), ("日本語", b"v"), ("🦀", b"c"))),
]


def encode(record: NewRecord) -> bytes:
    return encode_record(record.value, record.key, record.headers)


def encode_all(records: Sequence[NewRecord]) -> bytes:
    return b"".join(map(encode, records))


def broker_frame(records: Sequence[NewRecord], at: Placement = UNPLACED) -> bytes:
    data, _ = frame(records, at, MAX_BYTES, MAX_BYTES)
    return bytes(data)


def unstamped(data: bytes) -> bytes:
    """``data`` with every record's offset, timestamp and epoch zeroed (as a client frames)."""
    out = bytearray(data)
    position = 0
    while position < len(out):
        out[position : position + 24] = bytes(24)
        (body_size,) = struct.unpack_from(">I", out, position + 24)
        position += HEADER_BYTES + body_size
    return bytes(out)


def expected(records: Sequence[NewRecord], at: Placement | None = None) -> list[DecodedRecord]:
    """``records`` decoded: placed ``at``, or as a client frames them (all zeros) if ``None``."""
    if at is None:
        return [DecodedRecord(0, 0, 0, r.key, r.value, r.headers) for r in records]
    return [
        DecodedRecord(
            at.base_offset + i, at.timestamp_ns, at.leader_epoch, r.key, r.value, r.headers
        )
        for i, r in enumerate(records)
    ]


def broker_decode(data: bytes) -> list[DecodedRecord]:
    return [DecodedRecord(*record) for record in iter_decode(data)]


def record_positions(data: bytes) -> list[int]:
    positions = []
    position = 0
    while position < len(data):
        positions.append(position)
        (body_size,) = struct.unpack_from(">I", data, position + 24)
        position += HEADER_BYTES + body_size
    return positions


def patched(data: bytes, at: int, new: bytes, *, fix_crc: bool = True) -> bytes:
    """``data`` with ``new`` written at ``at``; the CRC of the record holding it recomputed."""
    out = bytearray(data)
    out[at : at + len(new)] = new
    if fix_crc:
        start = max(p for p in record_positions(data) if p <= at)
        (body_size,) = struct.unpack_from(">I", out, start + 24)
        end = start + HEADER_BYTES + body_size
        struct.pack_into(">I", out, start + CRC_AT, crc32c(bytes(out[start + COVERED_FROM : end])))
    return bytes(out)


# Encoding.


@pytest.mark.parametrize("record", CASES)
def test_encode_matches_the_broker_framing(record: NewRecord) -> None:
    assert encode(record) == broker_frame([record])


def test_a_batch_matches_the_broker_framing_but_for_the_stamped_fields() -> None:
    assert encode_all(CASES) == unstamped(broker_frame(CASES))


def test_the_broker_accepts_and_stamps_an_encoded_batch() -> None:
    data = bytearray(encode_all(CASES))
    check_and_stamp(data, PLACEMENT, MAX_BYTES)
    assert bytes(data) == broker_frame(CASES, PLACEMENT)
    assert decode_records(bytes(data)) == expected(CASES, PLACEMENT)


def test_the_broker_accepts_a_uniform_encoded_batch() -> None:
    records = [NewRecord(value=bytes([i]) * 128) for i in range(20)]
    data = bytearray(encode_all(records))
    check_and_stamp(data, PLACEMENT, MAX_BYTES)
    assert bytes(data) == broker_frame(records, PLACEMENT)


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_encode_accepts_bytes_like(kind: type[bytearray] | type[memoryview]) -> None:
    for record in CASES:
        value = None if record.value is None else kind(record.value)
        key = None if record.key is None else kind(record.key)
        headers = [(name, kind(value)) for name, value in record.headers]
        assert encode_record(value, key, headers) == encode(record)
        assert type(encode_record(value, key, headers)) is bytes


def test_encode_accepts_a_memoryview_of_wider_items() -> None:
    value = memoryview(struct.pack(">4I", 1, 2, 3, 4)).cast("I")
    assert encode_record(value, None, ()) == encode_record(value.tobytes(), None, ())


def test_header_name_limits() -> None:
    longest = "n" * MAX_HEADER_NAME_BYTES
    decoded = decode_records(encode_record(b"v", None, [(longest, b"")]))
    assert decoded[0].headers == ((longest, b""),)
    with pytest.raises(ValueError, match="header name of 32768 UTF-8 bytes"):
        encode_record(b"v", None, [(longest + "n", b"")])
    # The limit is in UTF-8 bytes, not characters: "é" takes two.
    with pytest.raises(ValueError, match="header name of 32768 UTF-8 bytes"):
        encode_record(b"v", None, [("é" * 16_384, b"")])


def test_header_count_limit() -> None:
    most = [("h", b"")] * MAX_HEADERS
    assert len(decode_records(encode_record(None, None, most))[0].headers) == MAX_HEADERS
    with pytest.raises(ValueError, match="at most 32767 headers"):
        encode_record(None, None, [*most, ("h", b"")])


def test_a_header_name_that_is_not_utf8_encodable_is_refused() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        encode_record(b"v", None, [("\udc80", b"")])


@pytest.mark.parametrize("key", [None, b"k"])
def test_the_reserved_header_is_refused(key: bytes | None) -> None:
    assert RESERVED_HEADER == PRODUCER_HEADER
    with pytest.raises(ValueError, match=r"'flux\.producer' is reserved"):
        encode_record(b"v", key, [("a", b""), (RESERVED_HEADER, b"x")])


# Decoding.


def test_decode_nothing() -> None:
    assert decode_records(b"") == []


@pytest.mark.parametrize("verify_crc", [True, False])
def test_round_trip(verify_crc: bool) -> None:
    assert decode_records(encode_all(CASES), verify_crc=verify_crc) == expected(CASES)


@pytest.mark.parametrize("kind", [bytearray, memoryview])
def test_decode_accepts_bytes_like(kind: type[bytearray] | type[memoryview]) -> None:
    decoded = decode_records(kind(encode_all(CASES)))
    assert decoded == expected(CASES)
    assert all(type(r.value) is bytes for r in decoded if r.value is not None)


def test_decode_matches_the_broker_on_stamped_records() -> None:
    data = broker_frame(CASES, PLACEMENT)
    decoded = decode_records(data)
    assert decoded == expected(CASES, PLACEMENT)
    assert decoded == broker_decode(data)
    assert all(type(r) is DecodedRecord for r in decoded)


@pytest.mark.parametrize(
    "record",
    [
        NewRecord(value=b"v" * 128),
        NewRecord(value=b""),
        NewRecord(value=None),
        NewRecord(value=b"v" * 64, key=b"key"),
        NewRecord(value=None, key=b""),
    ],
)
@pytest.mark.parametrize("verify_crc", [True, False])
def test_uniform_batches_decode_like_the_broker(record: NewRecord, verify_crc: bool) -> None:
    # Same-size records without headers: the column-by-column path.
    records = [
        NewRecord(
            value=None if record.value is None else bytes([i]) * len(record.value),
            key=None if record.key is None else bytes([255 - i]) * len(record.key),
        )
        for i in range(12)
    ]
    data = broker_frame(records, PLACEMENT)
    decoded = decode_records(data, verify_crc=verify_crc)
    assert decoded == expected(records, PLACEMENT) == broker_decode(data)
    assert all(type(r) is DecodedRecord for r in decoded)


def test_a_uniform_batch_with_one_record_of_another_shape() -> None:
    # Record 5's key and value lengths differ but its size does not: not uniform after all.
    records = [NewRecord(value=b"v" * 10, key=b"kk") for _ in range(10)]
    records[5] = NewRecord(value=b"v" * 11, key=b"k")
    assert decode_records(encode_all(records)) == expected(records)


def test_the_producer_header_is_dropped() -> None:
    records = [
        NewRecord(value=b"first", key=b"k", headers=(("a", b"1"),)),
        NewRecord(value=b"second"),
    ]
    # As the broker writes an idempotent batch: the header added to the client's first
    # record, then the batch stamped.
    data = bytearray(with_producer_header(encode_all(records), 42, 3, 2))
    check_and_stamp(data, PLACEMENT, MAX_BYTES)
    assert PRODUCER_HEADER.encode() in data
    assert next(iter_decode(data)).headers[-1][0] == PRODUCER_HEADER
    assert decode_records(bytes(data)) == expected(records, PLACEMENT)


def test_the_producer_header_is_dropped_wherever_it_is() -> None:
    headers = (("a", b"1"), (PRODUCER_HEADER, b"x"), ("b", b"2"))
    records = [NewRecord(value=None, headers=headers), NewRecord(value=b"v", headers=headers[1:2])]
    decoded = decode_records(broker_frame(records))
    assert [r.headers for r in decoded] == [(("a", b"1"), ("b", b"2")), ()]


def test_header_names_that_are_not_utf8_decode_as_the_broker_does() -> None:
    data = broker_frame([NewRecord(value=b"v", headers=(("ab", b"x"),))])
    data = patched(data, data.index(b"ab"), b"\xff\xfe")
    assert decode_records(data)[0].headers == (("\ufffd\ufffd", b"x"),)
    assert decode_records(data) == broker_decode(data)


# Corrupt records.

SMALL = [NewRecord(value=b"v" * 5, key=b"k", headers=(("h", b"x"),)) for _ in range(3)]
UNIFORM = [NewRecord(value=b"v" * 128) for _ in range(10)]
MIXED = [NewRecord(value=b"v" * (10 + i)) for i in range(10)]


def assert_corrupt(data: bytes, index: int, reason: str, *, verify_crc: bool = True) -> None:
    with pytest.raises(CorruptRecordError, match=f"^record {index}: {reason}") as caught:
        decode_records(data, verify_crc=verify_crc)
    assert caught.value.index == index
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("records", [SMALL, UNIFORM, MIXED], ids=["small", "uniform", "mixed"])
@pytest.mark.parametrize("index", [0, 2])
def test_a_bad_crc(records: list[NewRecord], index: int) -> None:
    data = encode_all(records)
    at = data.index(b"v", record_positions(data)[index])  # a byte of the value
    corrupt = patched(data, at, bytes([data[at] ^ 1]), fix_crc=False)
    assert_corrupt(corrupt, index, "CRC-32C mismatch")
    # Without the CRC check, the structure is still sound: the flipped byte is payload.
    assert len(decode_records(corrupt, verify_crc=False)) == len(records)


@pytest.mark.parametrize("records", [SMALL, UNIFORM, MIXED], ids=["small", "uniform", "mixed"])
@pytest.mark.parametrize("verify_crc", [True, False])
def test_a_bad_magic(records: list[NewRecord], verify_crc: bool) -> None:
    data = encode_all(records)
    at = record_positions(data)[1] + MAGIC_AT
    for magic in (0, 2, 255):
        assert_corrupt(
            patched(data, at, bytes([magic])), 1, "unknown magic byte", verify_crc=verify_crc
        )


@pytest.mark.parametrize("records", [SMALL, UNIFORM, MIXED], ids=["small", "uniform", "mixed"])
def test_truncated(records: list[NewRecord]) -> None:
    data = encode_all(records)
    last = record_positions(data)[-1]
    index = len(records) - 1
    assert_corrupt(data[:-1], index, "body of .* runs past the end")
    assert_corrupt(data[: last + HEADER_BYTES], index, "body of .* runs past the end")
    assert_corrupt(data[: last + HEADER_BYTES - 1], index, "truncated header")
    assert_corrupt(data[: last + 1], index, "truncated header")
    assert_corrupt(data + b"\x00", len(records), "truncated header")


def test_a_body_shorter_than_the_minimum() -> None:
    data = encode_all(MIXED)
    position = record_positions(data)[-1]
    # The last record's body size says 15; its bytes are cut to match.
    corrupt = patched(data, position + 24, struct.pack(">I", 15), fix_crc=False)
    corrupt = corrupt[: position + HEADER_BYTES + 15]
    assert_corrupt(corrupt, len(MIXED) - 1, "body of 15 bytes is shorter than the minimum 16")


def test_a_body_size_that_swallows_the_next_record() -> None:
    data = encode_all(MIXED)
    second = record_positions(data)[1]
    patched_size = struct.unpack_from(">I", data, second + 24)[0] + 1
    corrupt = patched(data, second + 24, struct.pack(">I", patched_size), fix_crc=False)
    # Record 1 now ends one byte into record 2: its CRC fails, or without the CRC check, it
    # holds a byte after its header count.
    assert_corrupt(corrupt, 1, "CRC-32C mismatch")
    assert_corrupt(corrupt, 1, "1 unexpected bytes after the headers", verify_crc=False)


LENGTH_CASES = [
    # (record, patch position relative to the record, new bytes, reason)
    (NewRecord(value=b"v", key=b"k"), KEY_LENGTH_AT, struct.pack(">i", 100), "key runs past"),
    (NewRecord(value=b"v", key=b"k"), KEY_LENGTH_AT, struct.pack(">i", -2), "negative key"),
    (NewRecord(value=b"v"), KEY_LENGTH_AT + 4, struct.pack(">i", 100), "value runs past"),
    (NewRecord(value=b"v"), KEY_LENGTH_AT + 4, struct.pack(">i", -5), "negative value"),
    (NewRecord(value=b"\0"), KEY_LENGTH_AT + 4, struct.pack(">i", 0), "1 unexpected bytes"),
    (NewRecord(value=b"v"), KEY_LENGTH_AT + 9, struct.pack(">h", 1), "headers run past"),
    (NewRecord(value=b"v"), KEY_LENGTH_AT + 9, struct.pack(">h", -1), "negative header count"),
    (
        NewRecord(value=None, headers=(("n", b"v"),)),
        KEY_LENGTH_AT + 10,
        struct.pack(">h", 50),
        "header name runs past",
    ),
    (
        NewRecord(value=None, headers=(("n", b"v"),)),
        KEY_LENGTH_AT + 10,
        struct.pack(">h", -1),
        "header name runs past",
    ),
    (
        NewRecord(value=None, headers=(("n", b"v"),)),
        KEY_LENGTH_AT + 13,
        struct.pack(">i", 2),
        "header value runs past",
    ),
    (
        NewRecord(value=None, headers=(("n", b"v"),)),
        KEY_LENGTH_AT + 13,
        struct.pack(">i", -1),
        "header value runs past",
    ),
    (
        NewRecord(value=None, headers=(("n", b"v"),)),
        KEY_LENGTH_AT + 13,
        struct.pack(">i", 0),
        "1 unexpected bytes",
    ),
]


@pytest.mark.parametrize(("record", "at", "new", "reason"), LENGTH_CASES)
@pytest.mark.parametrize("count", [3, 10])
def test_lengths_that_do_not_fit_the_body(
    record: NewRecord, at: int, new: bytes, reason: str, count: int
) -> None:
    data = encode_all([record] * count)
    corrupt = patched(data, record_positions(data)[count - 1] + at, new)
    assert_corrupt(corrupt, count - 1, reason)
    assert_corrupt(corrupt, count - 1, reason, verify_crc=False)


# Properties.

names = st.text(max_size=12).filter(lambda name: name != RESERVED_HEADER)
headers = st.lists(st.tuples(names, st.binary(max_size=16)), max_size=4).map(tuple)
records = st.builds(
    NewRecord,
    value=st.none() | st.binary(max_size=64),
    key=st.none() | st.binary(max_size=16),
    headers=st.just(()) | headers,
)


@given(st.lists(records, max_size=12))
def test_encode_matches_the_broker_and_round_trips(batch: list[NewRecord]) -> None:
    data = encode_all(batch)
    assert data == unstamped(broker_frame(batch))
    assert decode_records(data) == expected(batch)
    stamped = bytearray(data)
    if batch:
        check_and_stamp(stamped, PLACEMENT, MAX_BYTES)
        assert decode_records(bytes(stamped)) == expected(batch, PLACEMENT)


@given(
    st.integers(min_value=8, max_value=20),
    st.none() | st.integers(min_value=0, max_value=8),
    st.none() | st.integers(min_value=0, max_value=40),
    st.data(),
)
def test_same_size_batches_round_trip(
    count: int, key_size: int | None, value_size: int | None, data: st.DataObject
) -> None:
    def part(size: int | None) -> bytes | None:
        return None if size is None else data.draw(st.binary(min_size=size, max_size=size))

    batch = [NewRecord(value=part(value_size), key=part(key_size)) for _ in range(count)]
    framed = broker_frame(batch, PLACEMENT)
    assert decode_records(framed) == expected(batch, PLACEMENT)
    assert encode_all(batch) == unstamped(framed)
    assert decode_records(unstamped(framed)) == expected(batch)


def test_uniform_columns_agree_with_the_records() -> None:
    from flux_client._records import uniform_columns  # noqa: PLC0415

    data = b"".join(encode_record(b"%05d" % i, None, ()) for i in range(40))
    columns = uniform_columns(data)
    assert columns is not None
    offsets, timestamps, epochs, keys, values = columns
    rebuilt = list(zip(offsets, timestamps, epochs, keys, values, strict=False))
    assert rebuilt == [
        (r.offset, r.timestamp_ns, r.leader_epoch, r.key, r.value) for r in decode_records(data)
    ]
    assert uniform_columns(data[:-1]) is None  # not a whole number of records
