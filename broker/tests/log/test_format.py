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


def _reference_check_and_stamp(data: bytearray, at: fmt.Placement, max_record_bytes: int) -> bytes:
    """check_and_stamp's definition: every record fully checked, then stamped, in turn."""
    view = memoryview(data)
    sizes: list[int] = []
    position = 0
    while position < len(data):
        size = fmt._checked_record_size(view, position, len(sizes), max_record_bytes)
        fmt.HEADER_STAMP.pack_into(
            data, position, at.base_offset + len(sizes), at.timestamp_ns, at.leader_epoch
        )
        sizes.append(size)
        position += size
    if not sizes:
        raise InvalidBatchError(0, "batch holds no records")
    return fmt.index_entries(at, sizes)


def _outcome(check: object, batch: bytearray, max_record_bytes: int = MIB) -> object:
    """What ``check`` does with a copy of ``batch``: stamped bytes and entries, or the error."""
    assert callable(check)
    data = bytearray(batch)
    try:
        entries = check(data, AT, max_record_bytes)
    except InvalidBatchError as error:
        return ("error", error.index, error.reason)
    return (bytes(data), entries)


UNIFORM = fmt._COLUMNS_MIN_RECORDS


@pytest.mark.parametrize("count", [1, UNIFORM - 1, UNIFORM, UNIFORM + 1, 1000])
@pytest.mark.parametrize("value", [None, b"", b"v", bytes(range(128))], ids=repr)
def test_same_size_batches_stamp_exactly_like_frame(count: int, value: bytes | None) -> None:
    records = [fmt.NewRecord(value)] * count
    framed, framed_index = fmt.frame(records, AT, MIB, 64 * MIB)
    batch = _client_batch(records)
    assert fmt.check_and_stamp(batch, AT, MIB) == framed_index
    assert batch == framed


def test_mixed_null_and_empty_values_of_one_size_are_stamped_like_frame() -> None:
    """Same record size, different value lengths: the column-wise path must step aside."""
    records = [fmt.NewRecord(None)] * UNIFORM + [fmt.NewRecord(b"")] * UNIFORM
    framed, framed_index = fmt.frame(records, AT, MIB, MIB)
    batch = _client_batch(records)
    assert fmt.check_and_stamp(batch, AT, MIB) == framed_index
    assert batch == framed


@pytest.mark.parametrize("count", [1, UNIFORM, UNIFORM + 1, 500])
def test_a_different_first_record_before_same_size_ones_is_stamped_like_frame(count: int) -> None:
    """An idempotent batch's shape: the producer header on the first record only."""
    first = fmt.NewRecord(b"v" * 20, headers=(("flux.producer", bytes(20)),))
    records = [first] + [fmt.NewRecord(b"v" * 20)] * count
    framed, framed_index = fmt.frame(records, AT, MIB, 64 * MIB)
    batch = _client_batch(records)
    assert fmt._check_and_stamp_uniform_after_first(bytearray(batch), AT, MIB) is not None or (
        count < UNIFORM
    )
    assert fmt.check_and_stamp(batch, AT, MIB) == framed_index
    assert batch == framed


@given(
    st.integers(UNIFORM, 2 * UNIFORM),
    st.lists(st.tuples(st.integers(0), st.integers(0, 255)), min_size=1, max_size=3),
)
def test_a_damaged_batch_after_a_different_first_record_agrees_with_the_definition(
    count: int, edits: list[tuple[int, int]]
) -> None:
    first = fmt.NewRecord(b"key", key=b"k", headers=(("h", b"x"),))
    batch = _client_batch([first] + [fmt.NewRecord(b"v" * 9)] * count)
    for at, byte in edits:
        batch[at % len(batch)] = byte
    assert _outcome(fmt.check_and_stamp, batch) == _outcome(_reference_check_and_stamp, batch)


@pytest.mark.parametrize("victim", [0, 1, UNIFORM // 2, UNIFORM])
def test_every_flipped_bit_of_a_same_size_batch_is_caught_with_its_index(victim: int) -> None:
    """Exhaustive over one record's body size and body (attributes too: the CRC covers them)."""
    batch = _client_batch([fmt.NewRecord(bytes([i]) * 9) for i in range(UNIFORM + 1)])
    size = len(batch) // (UNIFORM + 1)
    start = victim * size
    for byte in range(start + fmt.BODY_SIZE_AT, start + size):
        for bit in range(8):
            bad = bytearray(batch)
            bad[byte] ^= 1 << bit
            with pytest.raises(InvalidBatchError) as error:
                fmt.check_and_stamp(bad, AT, MIB)
            assert error.value.index == victim, (byte - start, bit)
            assert _outcome(fmt.check_and_stamp, bad) == _outcome(_reference_check_and_stamp, bad)


@given(
    st.integers(1, 3 * UNIFORM),
    st.none() | st.binary(max_size=40),
    st.lists(st.tuples(st.integers(0), st.integers(0, 255)), max_size=3),
    st.integers(0, 200),
)
def test_check_and_stamp_agrees_with_the_record_by_record_definition(
    count: int, value: bytes | None, edits: list[tuple[int, int]], max_record_bytes: int
) -> None:
    """Same stamped bytes and entries, or the same first offending record and reason."""
    batch = _client_batch([fmt.NewRecord(value)] * count)
    for at, byte in edits:
        batch[at % len(batch)] = byte
    assert _outcome(fmt.check_and_stamp, batch, max_record_bytes) == _outcome(
        _reference_check_and_stamp, batch, max_record_bytes
    )


@pytest.mark.parametrize("cut", [1, 50, 100])
def test_check_and_stamp_agrees_with_the_definition_on_cut_and_padded_batches(cut: int) -> None:
    batch = _client_batch([fmt.NewRecord(b"x" * 20)] * (2 * UNIFORM))
    for bad in (batch[:-cut], batch + bytes(cut), batch[cut:]):
        assert _outcome(fmt.check_and_stamp, bad) == _outcome(_reference_check_and_stamp, bad)


@given(st.lists(st.integers(1, 5000), max_size=3 * UNIFORM), st.integers(0, 1 << 40))
def test_index_entries_are_each_records_entry_in_turn(sizes: list[int], base: int) -> None:
    at = fmt.Placement(base + 3, -(1 << 62), 9, base, 1 << 20)
    expected = b"".join(
        fmt.INDEX_ENTRY.pack(3 + i, -(1 << 62), (1 << 20) + sum(sizes[:i]), size)
        for i, size in enumerate(sizes)
    )
    assert fmt.index_entries(at, sizes) == expected
    if sizes and len(sizes) >= UNIFORM:
        assert fmt._uniform_index_entries(at, len(sizes), sizes[0]) == fmt.index_entries(
            at, [sizes[0]] * len(sizes)
        )


@pytest.mark.parametrize("count", [3, UNIFORM - 1, UNIFORM, 100])
def test_index_entries_refuse_positions_past_i32_like_struct(count: int) -> None:
    at = fmt.Placement(0, 0, 0, 0, (1 << 31) - 100)
    with pytest.raises(struct.error):
        fmt.index_entries(at, [60] * count)  # the third record starts past 2**31 - 1
    assert len(fmt.index_entries(at, [60, 60])) == 2 * fmt.INDEX_ENTRY_BYTES
