"""Record framing, verification and decoding (flux_broker.log.format)."""

from __future__ import annotations

import struct

import pytest
from crc32c import crc32c
from hypothesis import given
from hypothesis import strategies as st

from flux_broker.log import format as fmt
from flux_broker.log.errors import BatchTooLargeError, InvalidBatchError, RecordTooLargeError

AT = fmt.Placement(
    base_offset=10, timestamp_ns=123, leader_epoch=7, segment_base_offset=4, segment_position=100
)
MIB = 1 << 20

headers_st = st.lists(st.tuples(st.text(max_size=8), st.binary(max_size=8)), max_size=3).map(tuple)
record_st = st.builds(
    fmt.NewRecord,
    value=st.none() | st.binary(max_size=64),
    key=st.none() | st.binary(max_size=16),
    headers=headers_st,
)


def test_layout_constants_match_the_spec() -> None:
    assert fmt.HEADER_BYTES == 28
    assert fmt.INDEX_ENTRY_BYTES == 20
    assert fmt.MIN_BODY_BYTES == 4 + 1 + 1 + 4 + 4 + 2


def test_body_bytes_follow_the_documented_layout() -> None:
    body = fmt.encode_body(fmt.NewRecord(b"val", key=b"k", headers=(("h", b"xy"),)))
    rest = body[4:]
    assert struct.unpack(">I", body[:4])[0] == crc32c(rest)
    expected = (
        struct.pack(">bbi", 1, 0, 1) + b"k" + struct.pack(">i", 3) + b"val"
        + struct.pack(">hh", 1, 1) + b"h" + struct.pack(">i", 2) + b"xy"
    )  # fmt: skip
    assert rest == expected


def test_null_and_empty_are_distinct() -> None:
    null = fmt.encode_body(fmt.NewRecord(None))
    empty = fmt.encode_body(fmt.NewRecord(b""))
    assert null[6:10] == struct.pack(">i", -1)  # null key
    assert null[10:14] == struct.pack(">i", -1)  # null value
    assert empty[10:14] == struct.pack(">i", 0)


@given(st.lists(record_st, min_size=1, max_size=20))
def test_frame_then_decode_round_trips(records: list[fmt.NewRecord]) -> None:
    data, index = fmt.frame(records, AT, MIB, 8 * MIB)
    decoded = list(fmt.iter_decode(data))
    assert [r.offset for r in decoded] == list(range(10, 10 + len(records)))
    for record, got in zip(records, decoded, strict=True):
        assert (got.key, got.value, got.headers) == (record.key, record.value, record.headers)
        assert (got.timestamp_ns, got.leader_epoch) == (123, 7)
    entries = list(fmt.INDEX_ENTRY.iter_unpack(index))
    assert [e[0] for e in entries] == list(range(6, 6 + len(records)))  # relative to segment 4
    assert entries[0][2] == 100  # position continues the segment
    assert sum(e[3] for e in entries) == len(data)
    assert [fmt.record_bytes(r) for r in records] == [e[3] for e in entries]


def test_frame_enforces_limits_before_returning() -> None:
    with pytest.raises(RecordTooLargeError) as too_large:
        fmt.frame([fmt.NewRecord(b"x"), fmt.NewRecord(b"y" * 100)], AT, 100, MIB)
    assert too_large.value.index == 1
    with pytest.raises(BatchTooLargeError):
        fmt.frame([fmt.NewRecord(b"y" * 50)] * 10, AT, MIB, 300)


def _client_batch(records: list[fmt.NewRecord]) -> bytearray:
    batch = bytearray()
    for record in records:
        body = fmt.encode_body(record)
        batch += fmt.HEADER.pack(999, -5, 42, len(body)) + body
    return batch


@given(st.lists(record_st, min_size=1, max_size=20))
def test_check_and_stamp_accepts_well_formed_batches(records: list[fmt.NewRecord]) -> None:
    batch = _client_batch(records)
    original = bytes(batch)
    index = fmt.check_and_stamp(batch, AT, MIB)
    assert len(index) == fmt.INDEX_ENTRY_BYTES * len(records)
    decoded = list(fmt.iter_decode(batch))
    # Bodies are stored as the client sent them; only the header stamps changed.
    position = 0
    for _, _, _, size in fmt.INDEX_ENTRY.iter_unpack(index):
        body = slice(position + fmt.HEADER_BYTES, position + size)
        assert batch[body] == original[body]
        position += size
    assert [r.offset for r in decoded] == list(range(10, 10 + len(records)))
    assert {(r.timestamp_ns, r.leader_epoch) for r in decoded} == {(123, 7)}


@given(st.lists(record_st, min_size=1, max_size=5), st.data())
def test_any_flipped_body_byte_is_caught_with_its_record_index(
    records: list[fmt.NewRecord], data: st.DataObject
) -> None:
    batch = _client_batch(records)
    layout = [
        (entry[2], entry[3])
        for entry in fmt.INDEX_ENTRY.iter_unpack(
            fmt.check_and_stamp(bytearray(batch), fmt.Placement(0, 0, 0, 0, 0), MIB)
        )
    ]
    victim = data.draw(st.integers(0, len(records) - 1))
    position, size = layout[victim]
    byte = data.draw(st.integers(position + fmt.HEADER_BYTES, position + size - 1))
    batch[byte] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(InvalidBatchError) as bad:
        fmt.check_and_stamp(batch, AT, MIB)
    assert bad.value.index == victim


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b[:-1], "runs past the batch"),
        (lambda b: b[:10], "inside a record header"),
        (lambda b: bytearray(), "no records"),
    ],
    ids=["truncated-body", "truncated-header", "empty"],
)
def test_check_and_stamp_rejects_truncation(mutate: object, reason: str) -> None:
    batch = _client_batch([fmt.NewRecord(b"value")])
    assert callable(mutate)
    with pytest.raises(InvalidBatchError, match=reason):
        fmt.check_and_stamp(bytearray(mutate(batch)), AT, MIB)


def test_check_and_stamp_rejects_consistent_crc_but_bad_structure() -> None:
    """A body whose CRC matches but whose lengths lie is still refused (client bugs)."""
    rest = struct.pack(">bbi", 1, 0, 50) + b"short" + struct.pack(">ih", 0, 0)
    body = struct.pack(">I", crc32c(rest)) + rest
    batch = bytearray(fmt.HEADER.pack(0, 0, 0, len(body)) + body)
    with pytest.raises(InvalidBatchError, match="key runs past"):
        fmt.check_and_stamp(batch, AT, MIB)


def test_check_and_stamp_rejects_unknown_magic_and_oversized_records() -> None:
    rest = struct.pack(">bbi", 2, 0, -1) + struct.pack(">ih", -1, 0)
    body = struct.pack(">I", crc32c(rest)) + rest
    with pytest.raises(InvalidBatchError, match="magic"):
        fmt.check_and_stamp(bytearray(fmt.HEADER.pack(0, 0, 0, len(body)) + body), AT, MIB)
    with pytest.raises(InvalidBatchError, match="exceeds 40"):
        fmt.check_and_stamp(_client_batch([fmt.NewRecord(b"x" * 20)]), AT, 40)
