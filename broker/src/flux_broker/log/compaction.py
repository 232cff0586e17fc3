"""Key compaction: keep only the newest record per key, below the high watermark.

A pass runs in a worker thread on its own file handles, so appends and reads go on meanwhile:

1. **Key map.** Scan the records at or below the HW, oldest first, remembering the newest
   offset of each key (by a 16-byte BLAKE2b digest, so memory does not depend on key sizes).
   The map holds at most ``compact_max_keys`` keys; at the first record whose key would not
   fit, the scan stops, and this pass only compacts records before that offset (a record may be
   kept although a newer one exists further on -- never the reverse). Like Kafka's cleaner, a
   pass maps only the *dirty* records (from where the previous pass stopped), so the passes
   together cover any number of keys.
2. **Rewrite.** Each sealed segment the map covers is copied to ``<base>.log.cleaned`` and
   ``.index.cleaned`` without the records a newer one with the same key supersedes. Kept
   records are copied byte for byte (offsets, CRCs, timestamps unchanged). Records without a key
   and records above the HW are always kept. A **tombstone** -- the newest record of its key
   with a null value -- is dropped once it is older than ``compact_tombstone_retention_s``.
3. **Swap** (on the event loop, by the log): the cleaned files are renamed over the originals,
   log first; a crash between the two renames leaves an index that does not match its log,
   which recovery rebuilds. Readers hold the segment object they started with, notice it was
   replaced and reposition by offset in the new one, so nobody sees half a segment.

The active segment is never rewritten.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, NamedTuple

from flux_broker.log.format import (
    BODY_PREFIX,
    HEADER,
    HEADER_BYTES,
    INDEX_ENTRY,
    LENGTH,
    NULL_LENGTH,
)
from flux_broker.log.segment import SCAN_CHUNK_BYTES

__all__ = ["CLEANED_SUFFIX", "CompactionPlan", "CompactionResult", "SegmentFiles", "compact"]

CLEANED_SUFFIX: Final = ".cleaned"
_DIGEST_BYTES: Final = 16


@dataclass(frozen=True, slots=True)
class SegmentFiles:
    """What a compaction pass needs to know of one segment (a snapshot taken on the loop)."""

    base_offset: int
    next_offset: int
    log_path: Path
    size_bytes: int
    sealed: bool


@dataclass(frozen=True, slots=True)
class CompactionPlan:
    """Inputs of one pass."""

    segments: list[SegmentFiles]
    high_watermark: int
    now_ns: int
    tombstone_retention_ns: int
    max_keys: int
    first_dirty_offset: int = 0


@dataclass(slots=True)
class CompactionResult:
    """What a pass produced.

    Attributes:
        cleaned: Base offsets of sealed segments with ``.cleaned`` files ready to swap in
            (an empty cleaned log means the segment holds nothing any more).
        records_removed: Records left out of the cleaned files.
        bytes_reclaimed: Bytes left out.
        keys: Keys in the map.
        key_limit_reached: The map filled up and the pass stopped early.
        next_dirty_offset: Where the next pass should start mapping keys.
    """

    cleaned: list[int] = field(default_factory=list)
    records_removed: int = 0
    bytes_reclaimed: int = 0
    keys: int = 0
    key_limit_reached: bool = False
    next_dirty_offset: int = 0


class _Record(NamedTuple):
    offset: int
    timestamp_ns: int
    data: bytes  # the whole record, header included
    null_value: bool


def _records(path: Path, size_bytes: int) -> Iterator[_Record]:
    """Stream the records of a segment file, one chunk in memory at a time.

    The data was verified when it was written or recovered, so lengths are trusted.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        position = 0
        while position + HEADER_BYTES <= size_bytes:
            chunk = os.pread(fd, min(SCAN_CHUNK_BYTES, size_bytes - position), position)
            cursor = 0
            while cursor + HEADER_BYTES <= len(chunk):
                offset, timestamp_ns, _epoch, body_size = HEADER.unpack_from(chunk, cursor)
                end = cursor + HEADER_BYTES + body_size
                if end > len(chunk):
                    if cursor == 0:  # a record larger than a chunk
                        chunk = os.pread(fd, end, position)
                        continue
                    break
                record = chunk[cursor:end]
                key_length = BODY_PREFIX.unpack_from(record, HEADER_BYTES)[3]
                value_at = HEADER_BYTES + BODY_PREFIX.size + max(key_length, 0)
                (value_length,) = LENGTH.unpack_from(record, value_at)
                yield _Record(offset, timestamp_ns, record, value_length == NULL_LENGTH)
                cursor = end
            position += cursor
    finally:
        os.close(fd)


def _key_digest(record: bytes) -> bytes | None:
    key_length = BODY_PREFIX.unpack_from(record, HEADER_BYTES)[3]
    if key_length < 0:
        return None
    start = HEADER_BYTES + BODY_PREFIX.size
    return hashlib.blake2b(record[start : start + key_length], digest_size=_DIGEST_BYTES).digest()


def compact(plan: CompactionPlan) -> CompactionResult:
    """Run steps 1 and 2 of a pass (blocking; run it in a thread)."""
    result = CompactionResult()
    newest: dict[bytes, int] = {}
    mapped_until: int | None = None  # first offset whose key is not in the map (None: all)
    # Only sealed segments are mapped: a key mapped in the active segment would not be
    # removed from it, and once mapped it would not be again, so an older version of that key
    # could outlive an expired tombstone.
    sealed = [segment for segment in plan.segments if segment.sealed]
    cleanable_end = min(
        [plan.high_watermark + 1]
        + [segment.base_offset for segment in plan.segments if not segment.sealed]
    )
    for segment in sealed:
        if segment.next_offset <= plan.first_dirty_offset:
            continue  # mapped by an earlier pass
        for record in _records(segment.log_path, segment.size_bytes):
            if record.offset < plan.first_dirty_offset:
                continue
            if record.offset >= cleanable_end:
                break
            digest = _key_digest(record.data)
            if digest is None:
                continue
            if digest not in newest and len(newest) >= plan.max_keys:
                mapped_until = record.offset
                result.key_limit_reached = True
                break
            newest[digest] = record.offset
        if mapped_until is not None:
            break
    result.keys = len(newest)
    limit = cleanable_end if mapped_until is None else mapped_until
    result.next_dirty_offset = max(limit, plan.first_dirty_offset)
    for segment in plan.segments:
        if segment.sealed and segment.base_offset < limit:
            _rewrite(segment, newest, limit, plan, result)
    return result


def _rewrite(
    segment: SegmentFiles,
    newest: dict[bytes, int],
    limit: int,
    plan: CompactionPlan,
    result: CompactionResult,
) -> None:
    """Copy ``segment`` without superseded records and expired tombstones below ``limit``."""
    log_path = segment.log_path.with_name(segment.log_path.name + CLEANED_SUFFIX)
    index_path = segment.log_path.with_name(
        segment.log_path.with_suffix(".index").name + CLEANED_SUFFIX
    )
    removed = 0
    with _Output(log_path) as log_out, _Output(index_path) as index_out:
        for record in _records(segment.log_path, segment.size_bytes):
            digest = _key_digest(record.data) if record.offset < limit else None
            if digest is not None and (
                newest.get(digest, record.offset) > record.offset  # a newer one exists
                or (
                    # A tombstone that no map supersedes is the newest of its key: the older
                    # versions went when its key was mapped, so once expired it can go too.
                    record.null_value
                    and plan.now_ns - record.timestamp_ns > plan.tombstone_retention_ns
                )
            ):
                removed += 1
                result.bytes_reclaimed += len(record.data)
                continue
            index_out.write(
                INDEX_ENTRY.pack(
                    record.offset - segment.base_offset,
                    record.timestamp_ns,
                    log_out.size,
                    len(record.data),
                )
            )
            log_out.write(record.data)
    if removed:
        result.records_removed += removed
        result.cleaned.append(segment.base_offset)
    else:
        log_path.unlink()
        index_path.unlink()


class _Output:
    """A file written through a bounded buffer, fsynced on close."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._buffer = bytearray()
        self.size = 0

    def write(self, data: bytes) -> None:
        self._buffer += data
        self.size += len(data)
        if len(self._buffer) >= SCAN_CHUNK_BYTES:
            self._flush()

    def _flush(self) -> None:
        with memoryview(self._buffer) as whole:
            view = whole
            while view:
                view = view[os.write(self._fd, view) :]
            view.release()
        self._buffer.clear()

    def __enter__(self) -> _Output:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._flush()
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
