"""Golden files: the bytes of a small segment, pinned and checked against the documented layout.

``golden/00000000000000000000.log`` and ``.index`` are what :class:`FileCommitLog` writes for
:data:`APPENDS` with a manual clock and set leader epochs. A change to the bytes fails
:func:`test_segment_bytes_match_golden_files`; if the change is intended (a format change is a
compatibility break: Liftbridge data directories must stay readable), rewrite the files on
purpose with ``SNAP_UPDATE=1`` and review the diff.

The golden files are also decoded here with plain :mod:`struct` and a CRC-32C written out in
this file -- not with the package's decoder -- following DESIGN.md §4.1 and the
``flux_broker.log.format`` docstring, so the golden bytes are checked against the spec rather
than only against themselves.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from flux_broker.clock import ManualClock
from flux_broker.log import FileCommitLog, LogConfig, NewRecord, Record
from flux_broker.log.format import iter_decode

GOLDEN_DIR: Final = Path(__file__).resolve().parent / "golden"
SEGMENT: Final = "00000000000000000000"
UPDATE: Final = os.environ.get("SNAP_UPDATE") == "1"

START_NS: Final = 1_700_000_000_000_000_000
HEADERS: Final = (("trace-id", b"abc"), ("größe", b"\x00\xff"))

# (leader epoch, seconds to advance the clock after the batch, batch)
APPENDS: Final = (
    (3, 1.5, (NewRecord(value=b"hello"), NewRecord(value=b"", key=b"k1"))),
    (7, 0.25, (NewRecord(value=None, key=b"k2"), NewRecord(b"value", b"key", HEADERS))),
    (7, 0.0, (NewRecord(value=b"v", key=b""),)),
)

# Layout of DESIGN.md §4.1, written out independently of flux_broker.log.format.
RECORD_HEADER: Final = struct.Struct(">QqQI")  # offset u64, timestamp i64, epoch u64, size u32
BODY_PREFIX: Final = struct.Struct(">Ibb")  # CRC-32C u32, magic i8, attributes i8
I32: Final = struct.Struct(">i")
I16: Final = struct.Struct(">h")
INDEX_ENTRY: Final = struct.Struct(">iqii")  # relative offset, timestamp, position, size
CRC32C_POLYNOMIAL: Final = 0x82F63B78  # Castagnoli, reflected


@dataclass(frozen=True, slots=True)
class Decoded:
    """One record as the spec describes it, plus where it lies in the file."""

    offset: int
    timestamp_ns: int
    leader_epoch: int
    magic: int
    attributes: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    position: int
    size: int


# Every field of the golden records, written out by hand.
EXPECTED: Final = (
    (0, START_NS, 3, None, b"hello", ()),
    (1, START_NS, 3, b"k1", b"", ()),
    (2, START_NS + 1_500_000_000, 7, b"k2", None, ()),
    (3, START_NS + 1_500_000_000, 7, b"key", b"value", HEADERS),
    (4, START_NS + 1_750_000_000, 7, b"", b"v", ()),
)


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: slow, short, and independent of the package."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (CRC32C_POLYNOMIAL if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def read_sized(body: bytes, cursor: int) -> tuple[bytes | None, int]:
    """An i32 length (-1 = null) and that many bytes."""
    (length,) = I32.unpack_from(body, cursor)
    cursor += I32.size
    if length == -1:
        return None, cursor
    assert length >= 0
    assert cursor + length <= len(body)
    return body[cursor : cursor + length], cursor + length


def decode_segment(data: bytes) -> list[Decoded]:
    """Decode a ``.log`` file by the spec, checking every length and CRC on the way."""
    records: list[Decoded] = []
    position = 0
    while position < len(data):
        offset, timestamp_ns, epoch, body_size = RECORD_HEADER.unpack_from(data, position)
        body = data[position + RECORD_HEADER.size : position + RECORD_HEADER.size + body_size]
        assert len(body) == body_size
        crc, magic, attributes = BODY_PREFIX.unpack_from(body, 0)
        assert crc == crc32c(body[4:]), f"CRC of record {offset}"
        key, cursor = read_sized(body, BODY_PREFIX.size)
        value, cursor = read_sized(body, cursor)
        (count,) = I16.unpack_from(body, cursor)
        cursor += I16.size
        headers: list[tuple[str, bytes]] = []
        for _ in range(count):
            (name_length,) = I16.unpack_from(body, cursor)
            cursor += I16.size
            name = body[cursor : cursor + name_length].decode("utf-8")
            cursor += name_length
            header_value, cursor = read_sized(body, cursor)
            assert header_value is not None
            headers.append((name, header_value))
        assert cursor == body_size, f"record {offset} has bytes after its headers"
        size = RECORD_HEADER.size + body_size
        records.append(
            Decoded(
                offset,
                timestamp_ns,
                epoch,
                magic,
                attributes,
                key,
                value,
                tuple(headers),
                position,
                size,
            )
        )
        position += size
    return records


def check_golden(name: str, actual: bytes) -> None:
    """Compare ``actual`` with ``golden/<name>``, or rewrite that file under ``SNAP_UPDATE=1``."""
    path = GOLDEN_DIR / name
    if UPDATE:
        GOLDEN_DIR.mkdir(exist_ok=True)
        path.write_bytes(actual)
        return
    assert path.exists(), f"{path} is missing; create it with SNAP_UPDATE=1"
    expected = path.read_bytes()
    first_difference = next(
        (i for i, (a, b) in enumerate(zip(actual, expected, strict=False)) if a != b),
        min(len(actual), len(expected)),
    )
    assert actual == expected, (
        f"{name} differs from the golden file from byte {first_difference} "
        f"({len(actual)} bytes written, {len(expected)} golden); "
        "if the format change is intended, rerun with SNAP_UPDATE=1"
    )


def test_crc32c_matches_the_standard_check_value() -> None:
    assert crc32c(b"123456789") == 0xE3069283


async def test_segment_bytes_match_golden_files(data_dir: Path) -> None:
    clock = ManualClock(START_NS)
    log = await FileCommitLog.open(data_dir, LogConfig(), clock)
    try:
        for epoch, advance_s, batch in APPENDS:
            log.set_leader_epoch(epoch)
            await log.append(batch)
            clock.advance(advance_s)
    finally:
        await log.close()
    assert sorted(path.name for path in data_dir.glob("*.log")) == [f"{SEGMENT}.log"]
    check_golden(f"{SEGMENT}.log", (data_dir / f"{SEGMENT}.log").read_bytes())
    check_golden(f"{SEGMENT}.index", (data_dir / f"{SEGMENT}.index").read_bytes())


def test_golden_log_follows_the_documented_layout() -> None:
    records = decode_segment((GOLDEN_DIR / f"{SEGMENT}.log").read_bytes())
    assert [
        (r.offset, r.timestamp_ns, r.leader_epoch, r.key, r.value, r.headers) for r in records
    ] == list(EXPECTED)
    assert {(r.magic, r.attributes) for r in records} == {(1, 0)}
    # Null and empty are distinct on disk: -1 versus 0 as the i32 length.
    assert records[0].key is None
    assert records[4].key == b""
    assert records[2].value is None
    assert records[1].value == b""
    # The non-ASCII header name is stored as its UTF-8 bytes, with their count as length.
    data = (GOLDEN_DIR / f"{SEGMENT}.log").read_bytes()
    name = "größe".encode()
    assert I16.pack(len(name)) + name + I32.pack(2) + b"\x00\xff" in data
    assert len(name) == 7


def test_golden_index_follows_the_documented_layout() -> None:
    records = decode_segment((GOLDEN_DIR / f"{SEGMENT}.log").read_bytes())
    index = (GOLDEN_DIR / f"{SEGMENT}.index").read_bytes()
    assert len(index) == INDEX_ENTRY.size * len(records)
    assert INDEX_ENTRY.size == 20
    assert list(INDEX_ENTRY.iter_unpack(index)) == [
        (r.offset, r.timestamp_ns, r.position, r.size) for r in records
    ]


def test_package_decoder_agrees_with_the_golden_log() -> None:
    """The package reads the pinned bytes back as the records that were appended."""
    data = (GOLDEN_DIR / f"{SEGMENT}.log").read_bytes()
    assert list(iter_decode(data)) == [Record(*fields) for fields in EXPECTED]


# -- client-framed batches -----------------------------------------------------------------


def client_record(
    attributes: int,
    key: bytes | None,
    value: bytes | None,
    headers: tuple[tuple[str, bytes], ...],
) -> tuple[bytes, bytes]:
    """Frame a record as a client would, with junk in the fields the broker stamps.

    Returns:
        The framed record and its body.
    """

    def sized(data: bytes | None) -> bytes:
        return I32.pack(-1) if data is None else I32.pack(len(data)) + data

    rest = struct.pack(">bb", 1, attributes) + sized(key) + sized(value) + I16.pack(len(headers))
    for name, header_value in headers:
        encoded = name.encode()
        rest += I16.pack(len(encoded)) + encoded + sized(header_value)
    body = struct.pack(">I", crc32c(rest)) + rest
    return RECORD_HEADER.pack(777, -1, 99, len(body)) + body, body


async def test_append_framed_stores_client_bodies_as_sent_with_stamped_headers(
    data_dir: Path,
) -> None:
    """The body bytes are the client's (not re-encoded); offset, time and epoch are the log's.

    The first record's attributes byte is 0x20, which the package's own encoder never writes,
    so a re-encoded body would differ.
    """
    first, first_body = client_record(0x20, b"ck", b"cv", (("h", b"1"), ("ключ", b"")))
    second, second_body = client_record(0, None, None, ())
    client_batch = bytearray(first + second)
    sent = bytes(client_batch)
    clock = ManualClock(START_NS)
    log = await FileCommitLog.open(data_dir, LogConfig(), clock)
    try:
        log.set_leader_epoch(5)
        await log.append([NewRecord(value=b"before")])
        clock.advance(2.0)
        result = await log.append_framed(client_batch)
        assert (result.base_offset, result.last_offset) == (1, 2)
        assert result.timestamp_ns == START_NS + 2_000_000_000
        assert client_batch == sent  # the caller's buffer is not stamped in place
        reader = log.reader(1, committed=False)
        batch = reader.read_nowait(1 << 20)
        reader.close()
        assert batch is not None
        assert list(batch.records()) == [
            Record(1, result.timestamp_ns, 5, b"ck", b"cv", (("h", b"1"), ("ключ", b""))),
            Record(2, result.timestamp_ns, 5, None, None, ()),
        ]
    finally:
        await log.close()

    stored = (data_dir / f"{SEGMENT}.log").read_bytes()
    start = decode_segment(stored)[1].position
    stamp = RECORD_HEADER.pack
    assert stored[start:] == (
        stamp(1, result.timestamp_ns, 5, len(first_body))
        + first_body
        + stamp(2, result.timestamp_ns, 5, len(second_body))
        + second_body
    )
    assert batch.data == stored[start:]  # readers serve the stored bytes as they are
    index = (data_dir / f"{SEGMENT}.index").read_bytes()
    assert list(INDEX_ENTRY.iter_unpack(index))[1:] == [
        (1, result.timestamp_ns, start, len(first)),
        (2, result.timestamp_ns, start + len(first), len(second)),
    ]
