"""Byte layout of the commit log: records, framed batches and index entries.

Every byte format of ``flux_broker.log`` is defined here and nowhere else (mirrored in
``docs/internals/log-format.md``). It is Liftbridge's layout, so a Liftbridge data directory's
segments stay readable. All integers are big-endian.

A **record** is a 28-byte header followed by a body::

    header  offset u64 | timestamp i64 (Unix ns) | leader epoch u64 | body size u32
    body    CRC-32C u32 (over the rest of the body) | magic i8 | attributes i8
            | key i32 length + bytes (-1 = null) | value i32 length + bytes (-1 = null)
            | header count i16 | per header: key i16 length + UTF-8, value i32 length + bytes

The CRC covers the body only, so the broker can stamp offset, timestamp and leader epoch into
the header of a client-framed record without recomputing it. A **framed batch** is records
back to back -- exactly the bytes of a segment file, so an append is one write.

An **index entry** is 20 bytes: relative offset i32 | timestamp i64 | position i32 | size i32
(size includes the header).
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from crc32c import crc32c

from flux_broker.log.errors import BatchTooLargeError, InvalidBatchError, RecordTooLargeError

# Header fields.
OFFSET_BYTES: Final = 8
TIMESTAMP_BYTES: Final = 8
LEADER_EPOCH_BYTES: Final = 8
BODY_SIZE_BYTES: Final = 4
HEADER_BYTES: Final = OFFSET_BYTES + TIMESTAMP_BYTES + LEADER_EPOCH_BYTES + BODY_SIZE_BYTES
HEADER: Final = struct.Struct(">QqQI")
HEADER_STAMP: Final = struct.Struct(">QqQ")  # the fields the broker stamps: offset, time, epoch
BODY_SIZE_AT: Final = HEADER_BYTES - BODY_SIZE_BYTES

# Body fields.
CRC_BYTES: Final = 4
MAGIC_BYTES: Final = 1
ATTRIBUTES_BYTES: Final = 1
LENGTH_BYTES: Final = 4  # key and value lengths, header value lengths
HEADER_COUNT_BYTES: Final = 2
HEADER_KEY_LENGTH_BYTES: Final = 2
CRC: Final = struct.Struct(">I")
BODY_PREFIX: Final = struct.Struct(">Ibbi")  # crc, magic, attributes, key length
LENGTH: Final = struct.Struct(">i")
HEADER_COUNT: Final = struct.Struct(">h")
HEADER_KEY_LENGTH: Final = struct.Struct(">h")
#: Smallest body: CRC, magic, attributes, two lengths and a header count.
MIN_BODY_BYTES: Final = (
    CRC_BYTES + MAGIC_BYTES + ATTRIBUTES_BYTES + 2 * LENGTH_BYTES + HEADER_COUNT_BYTES
)
MAGIC: Final = 1  # the only record version; Liftbridge writes 1
NULL_LENGTH: Final = -1
MAX_HEADERS: Final = 0x7FFF  # i16 count
MAX_HEADER_KEY_BYTES: Final = 0x7FFF  # i16 length

# Index entries.
INDEX_ENTRY: Final = struct.Struct(">iqii")
INDEX_ENTRY_BYTES: Final = INDEX_ENTRY.size

_NULL_KEY_PREFIX: Final = struct.pack(">bbi", MAGIC, 0, NULL_LENGTH)
_NULL_KEY_VALUE_LENGTH: Final = struct.Struct(">bbii")
_NO_HEADERS: Final = HEADER_COUNT.pack(0)
_NULL_KEY_NULL_VALUE_NO_HEADERS: Final = (
    _NULL_KEY_VALUE_LENGTH.pack(MAGIC, 0, NULL_LENGTH, NULL_LENGTH) + _NO_HEADERS
)
# A header followed by the CRC, packed together when framing.
HEADER_AND_CRC: Final = struct.Struct(">QqQII")
# A header and the fixed body prefix (CRC, magic, attributes, key length), read together.
RECORD_PREFIX: Final = struct.Struct(">QqQIIbbi")
# The same plus the value length, at a fixed position when the key is null.
_FAST_RECORD_PREFIX: Final = struct.Struct(">QqQIIbbii")
_CRC_COVERED_FROM: Final = HEADER_BYTES + CRC_BYTES  # record-relative start of what the CRC covers
_TIME_AND_EPOCH: Final = struct.Struct(">qQ")
#: Record-relative bytes that must match the first record's in a uniform batch: body size,
#: magic, key length and value length (the CRC is checked separately; attributes are free).
_UNIFORM_COLUMNS: Final = (
    *range(BODY_SIZE_AT, HEADER_BYTES),
    _CRC_COVERED_FROM,
    *range(_CRC_COVERED_FROM + MAGIC_BYTES + ATTRIBUTES_BYTES, _FAST_RECORD_PREFIX.size),
)
#: Fewest records for which filling fields column by column (``data[k::row_bytes]``) pays off.
_COLUMNS_MIN_RECORDS: Final = 16
_INDEX_RELATIVE_AT: Final = 0
_INDEX_POSITION_AT: Final = 4 + 8
_INDEX_SIZE_AT: Final = 4 + 8 + 4

Headers = tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class NewRecord:
    """A record to append: the parts a producer chooses.

    Attributes:
        value: Payload; ``None`` is a null value (a tombstone for compaction), distinct from
            ``b""``.
        key: Key for partitioning and compaction; ``None`` is a null key.
        headers: Ordered (name, value) pairs; names are UTF-8, at most 32,767 bytes.
    """

    value: bytes | None
    key: bytes | None = None
    headers: Headers = ()


class Record(NamedTuple):
    """A record as stored: the producer's parts plus what the broker assigned."""

    offset: int
    timestamp_ns: int
    leader_epoch: int
    key: bytes | None
    value: bytes | None
    headers: Headers


def encode_rest(record: NewRecord) -> bytes:
    """The body of ``record`` after its CRC (what the CRC covers)."""
    key, value, headers = record.key, record.value, record.headers
    if key is None and not headers:
        # The common shape, in one pack: magic, attributes, null key, value length.
        if value is None:
            return _NULL_KEY_NULL_VALUE_NO_HEADERS
        return _NULL_KEY_VALUE_LENGTH.pack(MAGIC, 0, NULL_LENGTH, len(value)) + value + _NO_HEADERS
    parts: list[bytes] = [
        _NULL_KEY_PREFIX if key is None else struct.pack(">bbi", MAGIC, 0, len(key))
    ]
    if key is not None:
        parts.append(key)
    if value is None:
        parts.append(LENGTH.pack(NULL_LENGTH))
    else:
        parts += (LENGTH.pack(len(value)), value)
    parts.append(HEADER_COUNT.pack(len(headers)))
    for name, header_value in headers:
        encoded = name.encode("utf-8")
        parts += (
            HEADER_KEY_LENGTH.pack(len(encoded)),
            encoded,
            LENGTH.pack(len(header_value)),
            header_value,
        )
    return b"".join(parts)


def encode_body(record: NewRecord) -> bytes:
    """Return the body of ``record`` (CRC first), as stored after the 28-byte header."""
    rest = encode_rest(record)
    return CRC.pack(crc32c(rest)) + rest


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a batch goes: the offsets, time and epoch it gets and where it lands.

    Attributes:
        base_offset: Offset of the batch's first record.
        timestamp_ns: Broker timestamp of every record of the batch.
        leader_epoch: Leader epoch of every record of the batch.
        segment_base_offset: Base offset of the segment receiving the batch (index entries
            hold offsets relative to it).
        segment_position: Byte position in that segment where the batch starts.
    """

    base_offset: int
    timestamp_ns: int
    leader_epoch: int
    segment_base_offset: int
    segment_position: int


#: A placement for bytes that are only checked or framed for a client, never written: the log
#: stamps the real offsets, time and epoch when it appends them.
UNPLACED: Final = Placement(0, 0, 0, 0, 0)


def frame(
    records: Sequence[NewRecord], at: Placement, max_record_bytes: int, max_batch_bytes: int
) -> tuple[bytearray, bytes]:
    """Frame ``records`` as consecutive log records placed ``at``.

    Returns:
        The framed batch (the bytes to append to the segment) and its index entries.

    Raises:
        RecordTooLargeError: A framed record exceeds ``max_record_bytes``.
        BatchTooLargeError: The framed batch exceeds ``max_batch_bytes``.
    """
    data = bytearray()
    sizes: list[int] = []
    pack_head = HEADER_AND_CRC.pack
    offset, timestamp_ns, epoch = at.base_offset, at.timestamp_ns, at.leader_epoch
    for record in records:
        rest = encode_rest(record)
        body_size = CRC_BYTES + len(rest)
        data += pack_head(offset, timestamp_ns, epoch, body_size, crc32c(rest))
        data += rest
        sizes.append(HEADER_BYTES + body_size)
        offset += 1
    # Limits are checked once the batch is framed: nothing has been written yet.
    if max(sizes, default=0) > max_record_bytes:
        i = next(i for i, size in enumerate(sizes) if size > max_record_bytes)
        raise RecordTooLargeError(i, sizes[i], max_record_bytes)
    if len(data) > max_batch_bytes:
        raise BatchTooLargeError(len(data), max_batch_bytes)
    return data, index_entries(at, sizes)


def index_entries(at: Placement, sizes: Sequence[int]) -> bytes:
    """The index entries of a batch of records of ``sizes`` bytes placed ``at``."""
    count = len(sizes)
    relative = at.base_offset - at.segment_base_offset
    positions = itertools.accumulate(sizes, initial=at.segment_position)
    if count < _COLUMNS_MIN_RECORDS:
        return b"".join(
            map(
                INDEX_ENTRY.pack,
                range(relative, relative + count),
                itertools.repeat(at.timestamp_ns, count),
                positions,
                sizes,
            )
        )
    entries = bytearray(INDEX_ENTRY.pack(0, at.timestamp_ns, 0, 0) * count)
    _fill_columns(entries, _INDEX_RELATIVE_AT, _pack_i32s(range(relative, relative + count)))
    _fill_columns(entries, _INDEX_POSITION_AT, _pack_i32s(itertools.islice(positions, count)))
    _fill_columns(entries, _INDEX_SIZE_AT, _pack_i32s(sizes))
    return bytes(entries)


def _uniform_index_entries(at: Placement, count: int, size: int) -> bytes:
    """:func:`index_entries` for ``count`` (at least 16) records of ``size`` bytes each."""
    relative = at.base_offset - at.segment_base_offset
    position = at.segment_position
    entries = bytearray(INDEX_ENTRY.pack(0, at.timestamp_ns, 0, size) * count)
    _fill_columns(entries, _INDEX_RELATIVE_AT, _pack_i32s(range(relative, relative + count)))
    positions = range(position, position + count * size, size)
    _fill_columns(entries, _INDEX_POSITION_AT, _pack_i32s(positions))
    return bytes(entries)


def _pack_i32s(values: Iterable[int]) -> bytes:
    """``values`` as consecutive big-endian i32s (struct.error if one does not fit)."""
    packed = tuple(values)
    return struct.pack(f">{len(packed)}i", *packed)


def _fill_columns(
    rows: bytearray, at: int, packed: bytes, row_bytes: int = INDEX_ENTRY_BYTES, width: int = 4
) -> None:
    """Write the ``width``-byte fields ``packed`` at byte ``at`` of consecutive rows of ``rows``.

    ``rows[k::row_bytes]`` is byte ``k`` of every row, so one strided assignment per byte of
    the field fills it in every row, however many rows there are.
    """
    for k in range(width):
        rows[at + k :: row_bytes] = packed[k::width]


def _check_body(body: memoryview) -> str | None:  # noqa: PLR0911, PLR0912 -- one check per field
    """Return why ``body`` is not a well-formed record body, or ``None`` if it is."""
    size = len(body)
    if size < MIN_BODY_BYTES:
        return f"body of {size} bytes is shorter than the minimum {MIN_BODY_BYTES}"
    crc, magic, _attributes, key_length = BODY_PREFIX.unpack_from(body, 0)
    if crc32c(body[CRC_BYTES:]) != crc:
        return "CRC-32C mismatch"
    if magic != MAGIC:
        return f"unknown magic byte {magic}"
    position = BODY_PREFIX.size
    if key_length > 0:
        position += key_length
    elif key_length < NULL_LENGTH:
        return f"negative key length {key_length}"
    if position + LENGTH_BYTES + HEADER_COUNT_BYTES > size:
        return "key runs past the end of the body"
    (value_length,) = LENGTH.unpack_from(body, position)
    position += LENGTH_BYTES
    if value_length > 0:
        position += value_length
    elif value_length < NULL_LENGTH:
        return f"negative value length {value_length}"
    if position + HEADER_COUNT_BYTES > size:
        return "value runs past the end of the body"
    (count,) = HEADER_COUNT.unpack_from(body, position)
    position += HEADER_COUNT_BYTES
    if count < 0:
        return f"negative header count {count}"
    for _ in range(count):
        if position + HEADER_KEY_LENGTH_BYTES > size:
            return "headers run past the end of the body"
        (name_length,) = HEADER_KEY_LENGTH.unpack_from(body, position)
        position += HEADER_KEY_LENGTH_BYTES + max(name_length, 0)
        if name_length < 0 or position + LENGTH_BYTES > size:
            return "header name runs past the end of the body"
        (value_length,) = LENGTH.unpack_from(body, position)
        position += LENGTH_BYTES + max(value_length, 0)
        if value_length < 0 or position > size:
            return "header value runs past the end of the body"
    if position != size:
        return f"{size - position} unexpected bytes after the headers"
    return None


def check_and_stamp(data: bytearray, at: Placement, max_record_bytes: int) -> bytes:
    """Validate a client-framed batch and stamp offsets, timestamp and epoch into it.

    Each record's body is checked (length, CRC-32C, magic, and that key, value and headers
    fill it exactly) but never re-encoded; only header fields outside the CRC are written, in
    place. The offsets, timestamps and epochs a client wrote are ignored. On error ``data``
    may be partly stamped: pass a copy the caller can drop.

    Args:
        data: The batch.
        at: Where the batch goes.
        max_record_bytes: Largest allowed record, header included.

    Returns:
        The batch's index entries.

    Raises:
        InvalidBatchError: The batch is empty or a record is malformed; ``index`` names the
            first offending record.
    """
    entries = _check_and_stamp_uniform(data, at, max_record_bytes)
    if entries is None:
        entries = _check_and_stamp_uniform_after_first(data, at, max_record_bytes)
    if entries is not None:
        return entries
    total = len(data)
    sizes: list[int] = []
    add_size = sizes.append
    unpack_prefix = _FAST_RECORD_PREFIX.unpack_from
    pack_stamp = HEADER_STAMP.pack_into
    prefix_bytes = _FAST_RECORD_PREFIX.size
    offset, timestamp_ns, epoch = at.base_offset, at.timestamp_ns, at.leader_epoch
    view = memoryview(data)
    position = 0
    while position < total:
        if position + prefix_bytes <= total:
            _o, _t, _e, body_size, crc, magic, _attributes, key_length, value_length = (
                unpack_prefix(data, position)
            )
            end = position + HEADER_BYTES + body_size
            # Fast path: a null key and no headers, the shape most producers send. The header
            # count must end the body exactly, which also makes the body at least
            # MIN_BODY_BYTES long and puts the value length inside it.
            if (
                key_length == NULL_LENGTH
                and magic == MAGIC
                and value_length >= NULL_LENGTH
                and end <= total
                and end - position <= max_record_bytes
                and position
                + prefix_bytes
                + (value_length if value_length > 0 else 0)
                + HEADER_COUNT_BYTES
                == end
                and data[end - 2] == 0
                and data[end - 1] == 0
                and crc32c(data[position + _CRC_COVERED_FROM : end]) == crc
            ):
                pack_stamp(data, position, offset, timestamp_ns, epoch)
                add_size(end - position)
                offset += 1
                position = end
                continue
        size = _checked_record_size(view, position, len(sizes), max_record_bytes)
        pack_stamp(data, position, offset, timestamp_ns, epoch)
        add_size(size)
        offset += 1
        position += size
    if not sizes:
        raise InvalidBatchError(0, "batch holds no records")
    return index_entries(at, sizes)


def _check_and_stamp_uniform(data: bytearray, at: Placement, max_record_bytes: int) -> bytes | None:
    """:func:`check_and_stamp` for a batch of same-size fast-path records, field by field.

    When the first record has a null key and no headers and the batch is a whole number of
    records of its size, each field is checked for every record at once: ``data[k::size]``
    holds byte ``k`` of every record, so a field is right everywhere when each of its byte
    columns equals the first record's byte repeated. Every record's CRC is still computed
    over its whole body and compared with the one it carries.

    Returns:
        The index entries, ``data`` stamped; or ``None``, ``data`` untouched, when the batch
        is not of that shape or any record fails a check (:func:`check_and_stamp` then finds
        and reports the first offending record).
    """
    total = len(data)
    prefix_bytes = _FAST_RECORD_PREFIX.size
    if total < prefix_bytes:
        return None
    _o, _t, _e, body_size, _crc, magic, _attributes, key_length, value_length = (
        _FAST_RECORD_PREFIX.unpack_from(data, 0)
    )
    size = HEADER_BYTES + body_size
    count, rest = divmod(total, size)
    if (
        count < _COLUMNS_MIN_RECORDS
        or rest
        or size > max_record_bytes
        or key_length != NULL_LENGTH
        or magic != MAGIC
        or value_length < NULL_LENGTH
        or prefix_bytes + max(value_length, 0) + HEADER_COUNT_BYTES != size
    ):
        return None
    # Structure: body size, magic, key length, value length and header count of every record
    # equal those of the first, which are sound (checked above, header count just below).
    last = size - 1
    for k in (*_UNIFORM_COLUMNS, last - 1, last):
        if data[k::size] != data[k : k + 1] * count:
            return None
    if data[last - 1] or data[last]:
        return None
    # CRC: computed over each record's body after the CRC; compared column by column with
    # the CRCs the records carry.
    computed = itertools.starmap(
        crc32c, struct.iter_unpack(f">{_CRC_COVERED_FROM}x{size - _CRC_COVERED_FROM}s", data)
    )
    crcs = struct.pack(f">{count}I", *computed)
    for k in range(CRC_BYTES):
        if data[HEADER_BYTES + k :: size] != crcs[k::CRC_BYTES]:
            return None
    # Stamp, column by column: the offsets differ per record, timestamp and epoch do not.
    offsets = struct.pack(f">{count}Q", *range(at.base_offset, at.base_offset + count))
    _fill_columns(data, 0, offsets, size, OFFSET_BYTES)
    time_and_epoch = _TIME_AND_EPOCH.pack(at.timestamp_ns, at.leader_epoch)
    for k, byte in enumerate(time_and_epoch, OFFSET_BYTES):
        data[k::size] = bytes((byte,)) * count
    return _uniform_index_entries(at, count, size)


def _check_and_stamp_uniform_after_first(
    data: bytearray, at: Placement, max_record_bytes: int
) -> bytes | None:
    """:func:`_check_and_stamp_uniform` for a batch whose records after the first are uniform.

    An idempotent producer's batch has that shape: the broker's ``flux.producer`` header makes
    its first record different from the rest. The first record is checked on its own, the
    rest column by column (on a copy, written back only when every record passed).

    Returns:
        The index entries, ``data`` stamped; or ``None``, ``data`` untouched.
    """
    if len(data) < HEADER_BYTES:
        return None
    (body_size,) = CRC.unpack_from(data, BODY_SIZE_AT)
    first = HEADER_BYTES + body_size
    if first >= len(data) or first > max_record_bytes:
        return None
    with memoryview(data) as view:
        if _check_body(view[HEADER_BYTES:first]) is not None:
            return None
    rest = bytearray(data[first:])
    rest_at = Placement(
        at.base_offset + 1,
        at.timestamp_ns,
        at.leader_epoch,
        at.segment_base_offset,
        at.segment_position + first,
    )
    rest_entries = _check_and_stamp_uniform(rest, rest_at, max_record_bytes)
    if rest_entries is None:
        return None
    HEADER_STAMP.pack_into(data, 0, at.base_offset, at.timestamp_ns, at.leader_epoch)
    data[first:] = rest
    return index_entries(at, (first,)) + rest_entries


def _checked_record_size(view: memoryview, position: int, i: int, max_record_bytes: int) -> int:
    """Fully check record ``i`` at ``position``; return its size or raise InvalidBatchError."""
    total = len(view)
    if position + HEADER_BYTES > total:
        raise InvalidBatchError(i, "batch ends inside a record header")
    body_size: int = CRC.unpack_from(view, position + BODY_SIZE_AT)[0]
    size = HEADER_BYTES + body_size
    if position + size > total:
        raise InvalidBatchError(i, f"record body of {body_size} bytes runs past the batch")
    if size > max_record_bytes:
        raise InvalidBatchError(i, f"record of {size} bytes exceeds {max_record_bytes}")
    reason = _check_body(view[position + HEADER_BYTES : position + size])
    if reason is not None:
        raise InvalidBatchError(i, reason)
    return size


def verify_record(data: memoryview, position: int) -> str | None:
    """Check the record at ``position`` of ``data`` (size and body); ``None`` when it is sound."""
    if position + HEADER_BYTES > len(data):
        return "truncated header"
    (body_size,) = CRC.unpack_from(data, position + BODY_SIZE_AT)
    end = position + HEADER_BYTES + body_size
    if end > len(data):
        return "truncated body"
    return _check_body(data[position + HEADER_BYTES : end])


def decode(data: bytes | bytearray | memoryview, position: int = 0) -> tuple[Record, int]:
    """Decode the record at ``position`` of ``data``; return it and the next position.

    The record must already have been verified (:func:`verify_record`); decoding trusts the
    lengths.
    """
    offset, timestamp_ns, leader_epoch, body_size = HEADER.unpack_from(data, position)
    body_start = position + HEADER_BYTES
    _crc, _magic, _attributes, key_length = BODY_PREFIX.unpack_from(data, body_start)
    cursor = body_start + BODY_PREFIX.size
    key: bytes | None = None
    if key_length >= 0:
        key = bytes(data[cursor : cursor + key_length])
        cursor += key_length
    (value_length,) = LENGTH.unpack_from(data, cursor)
    cursor += LENGTH_BYTES
    value: bytes | None = None
    if value_length >= 0:
        value = bytes(data[cursor : cursor + value_length])
        cursor += value_length
    (count,) = HEADER_COUNT.unpack_from(data, cursor)
    cursor += HEADER_COUNT_BYTES
    headers: list[tuple[str, bytes]] = []
    for _ in range(count):
        (name_length,) = HEADER_KEY_LENGTH.unpack_from(data, cursor)
        cursor += HEADER_KEY_LENGTH_BYTES
        name = bytes(data[cursor : cursor + name_length]).decode("utf-8", errors="replace")
        cursor += name_length
        (header_length,) = LENGTH.unpack_from(data, cursor)
        cursor += LENGTH_BYTES
        headers.append((name, bytes(data[cursor : cursor + header_length])))
        cursor += header_length
    record = Record(offset, timestamp_ns, leader_epoch, key, value, tuple(headers))
    return record, body_start + body_size


def iter_decode(data: bytes | bytearray | memoryview) -> Iterator[Record]:
    """Decode every record of verified framed bytes, in order."""
    position = 0
    while position < len(data):
        record, position = decode(data, position)
        yield record


def record_bytes(record: NewRecord) -> int:
    """Size of ``record`` once framed, header included."""
    size = MIN_BODY_BYTES + HEADER_BYTES
    size += len(record.key) if record.key is not None else 0
    size += len(record.value) if record.value is not None else 0
    for name, value in record.headers:
        size += HEADER_KEY_LENGTH_BYTES + len(name.encode("utf-8")) + LENGTH_BYTES + len(value)
    return size
