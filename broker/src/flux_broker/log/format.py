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
from collections.abc import Iterator, Sequence
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
    return b"".join(
        map(
            INDEX_ENTRY.pack,
            range(relative, relative + count),
            itertools.repeat(at.timestamp_ns, count),
            positions,
            sizes,
        )
    )


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
    place, as each record passes. The offsets, timestamps and epochs a client wrote are
    ignored. On error ``data`` may be partly stamped: pass a copy the caller can drop.

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
    view = memoryview(data)
    total = len(data)
    sizes: list[int] = []
    unpack_prefix = RECORD_PREFIX.unpack_from
    unpack_length = LENGTH.unpack_from
    pack_stamp = HEADER_STAMP.pack_into
    prefix_bytes = RECORD_PREFIX.size
    offset, timestamp_ns, epoch = at.base_offset, at.timestamp_ns, at.leader_epoch
    position = 0
    while position < total:
        end = -1
        if position + prefix_bytes <= total:
            _o, _t, _e, body_size, crc, magic, _attributes, key_length = unpack_prefix(
                data, position
            )
            end = position + HEADER_BYTES + body_size
            # Fast path: a null key (-1) and no headers, the shape most producers send.
            if (
                key_length == NULL_LENGTH
                and magic == MAGIC
                and body_size >= MIN_BODY_BYTES
                and end <= total
            ):
                value_at = position + prefix_bytes
                (value_length,) = unpack_length(data, value_at)
                count_at = value_at + LENGTH_BYTES + max(value_length, 0)
                if (
                    value_length >= NULL_LENGTH
                    and count_at + HEADER_COUNT_BYTES == end
                    and data[count_at] == 0
                    and data[count_at + 1] == 0
                    and end - position <= max_record_bytes
                    and crc32c(view[position + HEADER_BYTES + CRC_BYTES : end]) == crc
                ):
                    pack_stamp(data, position, offset, timestamp_ns, epoch)
                    sizes.append(end - position)
                    offset += 1
                    position = end
                    continue
        size = _checked_record_size(view, position, len(sizes), max_record_bytes)
        pack_stamp(data, position, offset, timestamp_ns, epoch)
        sizes.append(size)
        offset += 1
        position += size
    if not sizes:
        raise InvalidBatchError(0, "batch holds no records")
    return index_entries(at, sizes)


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
