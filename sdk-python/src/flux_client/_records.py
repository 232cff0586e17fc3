"""Encoding and decoding of Flux log records, the bytes of the batched RPCs.

``PublishBatchRequest.records`` and ``RecordBatch.records`` carry records in the broker's log
format, which this module mirrors (``docs/internals/log-format.md`` is the reference; the SDK
does not import the broker). All integers are big-endian. A record is a 28-byte header followed
by a body::

    header  offset u64 | timestamp i64 (Unix ns) | leader epoch u64 | body size u32
    body    CRC-32C u32 (over the rest of the body) | magic i8 (1) | attributes i8 (0)
            | key i32 length + bytes (-1 = null) | value i32 length + bytes (-1 = null)
            | header count i16 | per header: name i16 length + UTF-8, value i32 length + bytes

A batch is records back to back. A client writes zeros for offset, timestamp and leader epoch;
the broker stamps them without touching the body, which is why the CRC covers the body only.

Decoding is on the consumer's hot path, so :func:`decode_records` has two fast paths besides
the general one: a batch of same-shape records without key or headers is unpacked column by
column in C (``struct.iter_unpack``), and any record with a null key and no headers is read with
one precompiled unpack.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterable, Sequence
from typing import Final, NamedTuple

from crc32c import crc32c

BytesLike = bytes | bytearray | memoryview

# Header fields.
OFFSET_BYTES: Final = 8
TIMESTAMP_BYTES: Final = 8
LEADER_EPOCH_BYTES: Final = 8
BODY_SIZE_BYTES: Final = 4
HEADER_BYTES: Final = OFFSET_BYTES + TIMESTAMP_BYTES + LEADER_EPOCH_BYTES + BODY_SIZE_BYTES

# Body fields.
CRC_BYTES: Final = 4
MAGIC_BYTES: Final = 1
ATTRIBUTES_BYTES: Final = 1
LENGTH_BYTES: Final = 4  # key and value lengths, header value lengths
HEADER_COUNT_BYTES: Final = 2
HEADER_NAME_LENGTH_BYTES: Final = 2
#: Smallest body: CRC, magic, attributes, key and value lengths and a header count.
MIN_BODY_BYTES: Final = (
    CRC_BYTES + MAGIC_BYTES + ATTRIBUTES_BYTES + 2 * LENGTH_BYTES + HEADER_COUNT_BYTES
)
MAGIC: Final = 1  # the only record version
NULL_LENGTH: Final = -1
MAX_HEADERS: Final = 0x7FFF  # i16 count
MAX_HEADER_NAME_BYTES: Final = 0x7FFF  # i16 length

#: Header the broker adds to the first record of an idempotent batch (the producer's id and
#: sequence). It refuses client records that carry it, and decoding drops it.
RESERVED_HEADER: Final = "flux.producer"

# Record-relative positions.
_BODY_AT: Final = HEADER_BYTES
_CRC_COVERED_FROM: Final = HEADER_BYTES + CRC_BYTES
_KEY_LENGTH_AT: Final = _CRC_COVERED_FROM + MAGIC_BYTES + ATTRIBUTES_BYTES
_KEY_AT: Final = _KEY_LENGTH_AT + LENGTH_BYTES

_HEADER_AND_CRC: Final = struct.Struct(">QqQII")
# Magic, attributes, key length and value length: the start of what the CRC covers.
_NULL_KEY_REST_PREFIX: Final = struct.Struct(">bbii")
_KEY_REST_PREFIX: Final = struct.Struct(">bbi")
_LENGTH: Final = struct.Struct(">i")
_HEADER_COUNT: Final = struct.Struct(">h")
_HEADER_NAME_LENGTH: Final = struct.Struct(">h")
_BODY_SIZE: Final = struct.Struct(">I")
#: Header, CRC, magic, attributes, key length and, when the key is null, the value length.
_RECORD_PREFIX: Final = struct.Struct(">QqQIIbbii")
_HEADER_AND_BODY_PREFIX: Final = struct.Struct(">QqQIIbbi")
_NO_HEADERS: Final = _HEADER_COUNT.pack(0)
_NULL_VALUE_RECORD: Final = (
    _HEADER_AND_CRC.pack(
        0,
        0,
        0,
        MIN_BODY_BYTES,
        crc32c(_NULL_KEY_REST_PREFIX.pack(MAGIC, 0, NULL_LENGTH, NULL_LENGTH) + _NO_HEADERS),
    )
    + _NULL_KEY_REST_PREFIX.pack(MAGIC, 0, NULL_LENGTH, NULL_LENGTH)
    + _NO_HEADERS
)
#: Fewest records for which a uniform batch is decoded column by column.
_COLUMNS_MIN_RECORDS: Final = 8


class CorruptRecordError(ValueError):
    """Bytes that are not well-formed records.

    Attributes:
        index: Position in the batch of the first malformed record (0-based).
        reason: What is wrong with it.
    """

    def __init__(self, index: int, reason: str) -> None:
        """Name the malformed record and what is wrong with it."""
        super().__init__(f"record {index}: {reason}")
        self.index = index
        self.reason = reason


class DecodedRecord(NamedTuple):
    """A record as the broker stored it: the producer's parts plus what the broker stamped.

    ``key`` and ``value`` are ``None`` when null, distinct from ``b""``. ``headers`` never holds
    the broker's ``flux.producer`` header.
    """

    offset: int
    timestamp_ns: int
    leader_epoch: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]


def encode_record(
    value: BytesLike | None,
    key: BytesLike | None,
    headers: Sequence[tuple[str, BytesLike]],
) -> bytes:
    """Frame one record for ``PublishBatchRequest.records``.

    Offset, timestamp and leader epoch are written as zeros (the broker stamps them).

    Args:
        value: Payload; ``None`` is a null value (a tombstone), distinct from ``b""``.
        key: Key; ``None`` is a null key.
        headers: Ordered (name, value) pairs.

    Raises:
        ValueError: More than 32,767 headers, a header name longer than 32,767 UTF-8 bytes
            (or not encodable as UTF-8), a header named ``flux.producer``, or a record too
            large for its length fields.
    """
    if value is not None and type(value) is not bytes:
        value = bytes(value)
    if key is None and not headers:
        if value is None:
            return _NULL_VALUE_RECORD
        try:
            rest = (
                _NULL_KEY_REST_PREFIX.pack(MAGIC, 0, NULL_LENGTH, len(value)) + value + _NO_HEADERS
            )
            return _HEADER_AND_CRC.pack(0, 0, 0, CRC_BYTES + len(rest), crc32c(rest)) + rest
        except struct.error:
            raise ValueError(f"a value of {len(value)} bytes is too large for a record") from None
    if key is not None and type(key) is not bytes:
        key = bytes(key)
    try:
        rest = _encode_rest(value, key, headers)
        return _HEADER_AND_CRC.pack(0, 0, 0, CRC_BYTES + len(rest), crc32c(rest)) + rest
    except struct.error:
        raise ValueError("the record is too large for its length fields") from None


def _encode_rest(
    value: bytes | None, key: bytes | None, headers: Sequence[tuple[str, BytesLike]]
) -> bytes:
    """The body of a record after its CRC (what the CRC covers)."""
    if len(headers) > MAX_HEADERS:
        raise ValueError(f"a record holds at most {MAX_HEADERS} headers, not {len(headers)}")
    parts: list[bytes]
    if key is None:
        value_length = NULL_LENGTH if value is None else len(value)
        parts = [_NULL_KEY_REST_PREFIX.pack(MAGIC, 0, NULL_LENGTH, value_length)]
        if value is not None:
            parts.append(value)
    else:
        parts = [_KEY_REST_PREFIX.pack(MAGIC, 0, len(key)), key]
        if value is None:
            parts.append(_LENGTH.pack(NULL_LENGTH))
        else:
            parts += (_LENGTH.pack(len(value)), value)
    parts.append(_HEADER_COUNT.pack(len(headers)))
    for name, header_value in headers:
        if name == RESERVED_HEADER:
            raise ValueError(f"the header name {RESERVED_HEADER!r} is reserved for the broker")
        encoded = name.encode("utf-8")
        if len(encoded) > MAX_HEADER_NAME_BYTES:
            raise ValueError(
                f"header name of {len(encoded)} UTF-8 bytes exceeds {MAX_HEADER_NAME_BYTES}"
            )
        raw = header_value if type(header_value) is bytes else bytes(header_value)
        parts += (_HEADER_NAME_LENGTH.pack(len(encoded)), encoded, _LENGTH.pack(len(raw)), raw)
    return b"".join(parts)


def decode_records(data: BytesLike, *, verify_crc: bool = True) -> list[DecodedRecord]:
    """Decode every record of ``data`` (records back to back), in order.

    Args:
        data: Framed records, e.g. ``RecordBatch.records``.
        verify_crc: Check each record's CRC-32C. Structure is always checked.

    Returns:
        The records; the broker's ``flux.producer`` header is left out of their headers.

    Raises:
        CorruptRecordError: A record is truncated, fails its CRC, has a magic byte other
            than 1, or its key, value and headers do not fill its body exactly.
    """
    if type(data) is not bytes:
        data = bytes(data)
    uniform = _decode_uniform(data, verify_crc)
    if uniform is not None:
        return uniform
    total = len(data)
    records: list[DecodedRecord] = []
    add = records.append
    new_record = tuple.__new__
    unpack_prefix = _RECORD_PREFIX.unpack_from
    prefix_bytes = _RECORD_PREFIX.size
    view = memoryview(data)
    position = 0
    while position < total:
        if position + prefix_bytes <= total:
            offset, timestamp_ns, epoch, body_size, crc, magic, _a, key_length, value_length = (
                unpack_prefix(data, position)
            )
            end = position + HEADER_BYTES + body_size
            # Fast path: a null key and no headers. The header count must end the body exactly.
            if (
                key_length == NULL_LENGTH
                and magic == MAGIC
                and end <= total
                and data[end - 2] == 0
                and data[end - 1] == 0
                and (
                    (value_length >= 0 and position + prefix_bytes + value_length + 2 == end)
                    or (value_length == NULL_LENGTH and position + prefix_bytes + 2 == end)
                )
                and (not verify_crc or crc32c(view[position + _CRC_COVERED_FROM : end]) == crc)
            ):
                value = None if value_length < 0 else data[position + prefix_bytes : end - 2]
                add(new_record(DecodedRecord, (offset, timestamp_ns, epoch, None, value, ())))
                position = end
                continue
        record, position = _decode_one(data, view, position, len(records), verify_crc)
        add(record)
    return records


def _decode_uniform(data: bytes, verify_crc: bool) -> list[DecodedRecord] | None:
    """:func:`uniform_columns` as records."""
    columns = uniform_columns(data, verify_crc)
    if columns is None:
        return None
    offsets, timestamps, epochs, keys, values = columns
    fields = zip(offsets, timestamps, epochs, keys, values, itertools.repeat(()), strict=False)
    return list(map(tuple.__new__, itertools.repeat(DecodedRecord), fields))


#: Columns of a uniform batch: offsets, timestamps, leader epochs, keys, values (keys and
#: values an endless repeat of ``None`` when null).
Columns = tuple[
    Sequence[int], Sequence[int], Sequence[int], Iterable[bytes | None], Iterable[bytes | None]
]


def uniform_columns(data: BytesLike, verify_crc: bool = True) -> Columns | None:
    """Decode a batch of same-size records without headers, column by column.

    When the first record has no headers and ``data`` is a whole number of at least eight
    records of its size, every record is unpacked by one ``struct.iter_unpack`` and each field
    checked for all records at once: every record's body size, magic, lengths and header count
    must equal the first's, and every CRC must match.

    A consumer can build its own objects from the columns without a tuple per record in
    between.

    Returns:
        The columns; or ``None`` when the batch is not of that shape or a record fails a
        check (:func:`decode_records` then names the first bad record).
    """
    if type(data) is not bytes:
        data = bytes(data)
    shape = _uniform_shape(data)
    if shape is None:
        return None
    size, key_length, value_length = shape
    count = len(data) // size
    # Structure: ``data[k::size]`` is byte ``k`` of every record, so a field is the same in
    # every record when each of its byte columns is the first record's byte repeated.
    value_length_at = _KEY_AT + max(key_length, 0)
    for k in (
        *range(HEADER_BYTES - BODY_SIZE_BYTES, HEADER_BYTES),
        _CRC_COVERED_FROM,  # magic
        *range(_KEY_LENGTH_AT, _KEY_AT),
        *range(value_length_at, value_length_at + LENGTH_BYTES),
        size - 2,  # header count
        size - 1,
    ):
        if data[k::size] != data[k : k + 1] * count:
            return None
    # Then one unpack per record, of exactly the fields that differ: offset, timestamp,
    # leader epoch, CRC, and key and value unless null.
    key_field = f"{key_length}s" if key_length >= 0 else ""
    value_field = f"{value_length}s" if value_length >= 0 else ""
    row = f">QqQ{BODY_SIZE_BYTES}xI{_KEY_AT - _CRC_COVERED_FROM}x{key_field}{LENGTH_BYTES}x"
    rows = struct.iter_unpack(f"{row}{value_field}{HEADER_COUNT_BYTES}x", data)
    columns = tuple(zip(*rows, strict=True))
    if verify_crc:
        covered = struct.iter_unpack(f">{_CRC_COVERED_FROM}x{size - _CRC_COVERED_FROM}s", data)
        if tuple(itertools.starmap(crc32c, covered)) != columns[3]:
            return None
    none = itertools.repeat(None)
    keys: Iterable[bytes | None] = columns[4] if key_length >= 0 else none
    values: Iterable[bytes | None] = columns[-1] if value_length >= 0 else none
    return columns[0], columns[1], columns[2], keys, values


def _uniform_shape(data: bytes) -> tuple[int, int, int] | None:
    """Size, key length and value length of ``data``'s first record, if it suits the columns.

    ``None`` unless the first record is well formed but for its CRC (magic 1, key and value
    filling the body), has no headers, and ``data`` is a whole number of at least eight
    records of its size.
    """
    total = len(data)
    if total < _RECORD_PREFIX.size:
        return None
    _o, _t, _e, body_size, _crc, magic, _a, key_length = _HEADER_AND_BODY_PREFIX.unpack_from(data)
    size = HEADER_BYTES + body_size
    count, rest = divmod(total, size)
    value_length_at = _KEY_AT + max(key_length, 0)
    if (
        count < _COLUMNS_MIN_RECORDS
        or rest
        or magic != MAGIC
        or key_length < NULL_LENGTH
        or value_length_at + LENGTH_BYTES + HEADER_COUNT_BYTES > size
        or data[size - 2]
        or data[size - 1]
    ):
        return None
    (value_length,) = _LENGTH.unpack_from(data, value_length_at)
    if value_length < NULL_LENGTH or (
        value_length_at + LENGTH_BYTES + max(value_length, 0) + HEADER_COUNT_BYTES != size
    ):
        return None
    return size, key_length, value_length


def _decode_one(
    data: bytes, view: memoryview, position: int, index: int, verify_crc: bool
) -> tuple[DecodedRecord, int]:
    """Decode and fully check record ``index`` at ``position``; return it and where it ends."""
    total = len(data)
    if position + HEADER_BYTES > total:
        raise CorruptRecordError(index, "truncated header")
    (body_size,) = _BODY_SIZE.unpack_from(data, position + HEADER_BYTES - BODY_SIZE_BYTES)
    end = position + HEADER_BYTES + body_size
    if end > total:
        raise CorruptRecordError(index, f"body of {body_size} bytes runs past the end of the data")
    if body_size < MIN_BODY_BYTES:
        raise CorruptRecordError(
            index, f"body of {body_size} bytes is shorter than the minimum {MIN_BODY_BYTES}"
        )
    offset, timestamp_ns, epoch, _size, crc, magic, _a, key_length = (
        _HEADER_AND_BODY_PREFIX.unpack_from(data, position)
    )
    if verify_crc and crc32c(view[position + _CRC_COVERED_FROM : end]) != crc:
        raise CorruptRecordError(index, "CRC-32C mismatch")
    if magic != MAGIC:
        raise CorruptRecordError(index, f"unknown magic byte {magic}")
    cursor = position + _KEY_AT
    key, cursor = _read_bytes(data, cursor, key_length, end - LENGTH_BYTES, index=index, what="key")
    (value_length,) = _LENGTH.unpack_from(data, cursor)
    cursor += LENGTH_BYTES
    value, cursor = _read_bytes(data, cursor, value_length, end, index=index, what="value")
    (count,) = _HEADER_COUNT.unpack_from(data, cursor)
    cursor += HEADER_COUNT_BYTES
    if count < 0:
        raise CorruptRecordError(index, f"negative header count {count}")
    headers: list[tuple[str, bytes]] = []
    for _ in range(count):
        if cursor + HEADER_NAME_LENGTH_BYTES > end:
            raise CorruptRecordError(index, "headers run past the end of the body")
        (name_length,) = _HEADER_NAME_LENGTH.unpack_from(data, cursor)
        cursor += HEADER_NAME_LENGTH_BYTES
        if name_length < 0 or cursor + name_length + LENGTH_BYTES > end:
            raise CorruptRecordError(index, "header name runs past the end of the body")
        # Names are decoded as the broker does: bytes that are not UTF-8 become U+FFFD.
        name = str(data[cursor : cursor + name_length], "utf-8", "replace")
        cursor += name_length
        (header_length,) = _LENGTH.unpack_from(data, cursor)
        cursor += LENGTH_BYTES
        if header_length < 0 or cursor + header_length > end:
            raise CorruptRecordError(index, "header value runs past the end of the body")
        if name != RESERVED_HEADER:
            headers.append((name, data[cursor : cursor + header_length]))
        cursor += header_length
    if cursor != end:
        raise CorruptRecordError(index, f"{end - cursor} unexpected bytes after the headers")
    return DecodedRecord(offset, timestamp_ns, epoch, key, value, tuple(headers)), end


def _read_bytes(
    data: bytes, cursor: int, length: int, limit: int, *, index: int, what: str
) -> tuple[bytes | None, int]:
    """Read a field of ``length`` bytes (-1 = null) at ``cursor``; return it and where it ends.

    The field must leave room for a header count (two bytes) before ``limit``.
    """
    if length < NULL_LENGTH:
        raise CorruptRecordError(index, f"negative {what} length {length}")
    stop = cursor + max(length, 0)
    if stop + HEADER_COUNT_BYTES > limit:
        raise CorruptRecordError(index, f"{what} runs past the end of the body")
    return (None if length < 0 else data[cursor:stop]), stop
