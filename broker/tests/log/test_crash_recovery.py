"""Fault tests of the commit log on real files: torn tails, flipped bits, damaged indexes.

Every test writes a log of known records across several small segments, damages its files the
way a crash or a failing disk would, reopens it and checks the invariant of DESIGN.md §4.1:
**no committed record the damage did not touch is lost, and no corrupt record is ever
returned** (:func:`check_recovered`, which reads everything back and compares each record,
offset by offset, with what was appended).

A crash is simulated by copying the directory while the log is still open: that is what a
killed process leaves on disk, since its writes are in the page cache; the copy has no
``clean-shutdown`` marker. Recovery then takes one of two paths, and the tests name which:

- **no marker** (crash): the active segment is rescanned record by record, so any torn or
  corrupt tail is cut; sealed segments keep their index when it is consistent with the log.
- **marker** (clean shutdown): every index, the active one included, is trusted when it is
  consistent (first entry at byte 0, last entry ending exactly at the end of the file).
  Truncation and appended garbage break that consistency and are still caught at open; a
  flipped bit inside a record does not, and is caught by readers instead
  (``CorruptRecordError``).

Several tests here are regression tests for bugs found while writing them (all fixed): readers
hanging at corruption found by recovery, the reverse reader skipping records next to a bad one,
raised offset fields being served, damaged middle index entries being trusted, clamped HW
checkpoints not being written back, and a torn segment before an empty one after a crash
mid-roll.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux_broker.clock import ManualClock
from flux_broker.log import (
    CorruptRecordError,
    FileCommitLog,
    LogConfig,
    NewRecord,
    Record,
    SyncPolicy,
)
from flux_broker.log.commitlog import CLEAN_SHUTDOWN_FILE, HW_CHECKPOINT_FILE

# Small segments so a few dozen records span several of them. Page-cache writes are what a
# process crash preserves, so the writer does not fsync; the HW is checkpointed explicitly.
CONFIG: Final = LogConfig(
    segment_max_bytes=400,
    sync_policy=SyncPolicy.NEVER,
    read_max_bytes=150,  # several batches per segment: exercises batch and segment boundaries
    hw_checkpoint_interval_s=3600.0,  # only explicit checkpoints, so tests are deterministic
)
BATCH_SIZES: Final = (1, 3, 2, 1, 4, 2, 3, 1, 2, 3, 1)
LEADER_EPOCH: Final = 4
READS_MAX: Final = 1000  # bound on the reads of one read-back loop

# The record header as DESIGN.md §4.1 lays it out, decoded here without the package.
RECORD_HEADER: Final = struct.Struct(">QqQI")  # offset, timestamp, leader epoch, body size
BODY_SIZE_AT: Final = 24  # the body size is the last header field, the first the CRC misses
INDEX_ENTRY_BYTES: Final = 20

# One log per example, in its own directory under the test's data_dir: the fixture is created
# once per test, so Hypothesis's function-scoped-fixture check does not apply.
EXAMPLES: Final = settings(
    max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


# -- writing a known log -----------------------------------------------------------------


def new_record(i: int) -> NewRecord:
    """The i-th appended record: null and non-null keys and values, empty values, headers."""
    key = None if i % 4 == 0 else f"key-{i}".encode()
    value: bytes | None = bytes([i]) * (8 + 3 * (i % 5))
    if i % 7 == 3:
        value = None
    elif i % 7 == 5:
        value = b""
    headers = (("trace", f"t{i}".encode()), ("größe", bytes([i, 255]))) if i % 3 == 0 else ()
    return NewRecord(value=value, key=key, headers=headers)


@dataclass(frozen=True, slots=True)
class WrittenLog:
    """A log written by :func:`write_log`, as it was before any damage.

    Attributes:
        directory: The log directory to damage and reopen.
        expected: Every appended record, by offset.
        high_watermark: The checkpointed HW (the newest offset: everything is committed).
    """

    directory: Path
    expected: dict[int, Record]
    high_watermark: int

    @property
    def newest_offset(self) -> int:
        """Last appended offset."""
        return max(self.expected)

    def log_files(self) -> list[Path]:
        """The segments' ``.log`` files, oldest first (20-digit names sort numerically)."""
        return sorted(self.directory.glob("*.log"))

    def index_files(self) -> list[Path]:
        """The segments' ``.index`` files, oldest first."""
        return sorted(self.directory.glob("*.index"))


async def write_log(data_dir: Path, *, clean: bool) -> WrittenLog:
    """Append the known records in batches, commit and checkpoint them all.

    Args:
        data_dir: Parent of the directories this creates (a fresh one per call).
        clean: Close the log (marker written) and return its directory; otherwise return a
            copy taken while it was open (a crash: no marker).
    """
    root = Path(tempfile.mkdtemp(dir=data_dir))
    source = root / "log"
    clock = ManualClock()
    log = await FileCommitLog.open(source, CONFIG, clock)
    expected: dict[int, Record] = {}
    try:
        log.set_leader_epoch(LEADER_EPOCH)
        i = 0
        for size in BATCH_SIZES:
            batch = [new_record(i + j) for j in range(size)]
            result = await log.append(batch)
            for j, record in enumerate(batch):
                offset = result.base_offset + j
                expected[offset] = Record(
                    offset,
                    result.timestamp_ns,
                    LEADER_EPOCH,
                    record.key,
                    record.value,
                    record.headers,
                )
            i += size
            clock.advance(0.001)
        log.set_high_watermark(log.newest_offset)
        log.checkpoint_high_watermark()
        directory = source
        if not clean:
            directory = root / "crashed"
            shutil.copytree(source, directory)
    finally:
        await log.close()
    written = WrittenLog(directory, expected, max(expected))
    # Preconditions of the scenarios: several sealed segments and an active one with records.
    assert len(written.log_files()) >= 4
    assert len(record_spans(written.log_files()[-1])) >= 3
    assert (directory / CLEAN_SHUTDOWN_FILE).exists() == clean
    return written


# -- reading the files without the package -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Span:
    """Where one record lies in a ``.log`` file: bytes ``[start, end)``."""

    offset: int
    start: int
    end: int


def record_spans(path: Path) -> list[Span]:
    """The records of an undamaged ``.log`` file, walked by their body sizes."""
    data = path.read_bytes()
    spans: list[Span] = []
    position = 0
    while position < len(data):
        offset, _timestamp_ns, _epoch, body_size = RECORD_HEADER.unpack_from(data, position)
        end = position + RECORD_HEADER.size + body_size
        spans.append(Span(offset, position, end))
        position = end
    assert position == len(data)
    return spans


def expected_index(log_path: Path) -> bytes:
    """The index a ``.log`` file should have: one 20-byte entry per record, from its headers.

    The index on disk may lag its log after a crash (entries are written in chunks), so tests
    compare rebuilt indexes with this rather than with what a crash left on disk.
    """
    data = log_path.read_bytes()
    base = int(log_path.stem)
    entries = bytearray()
    for span in record_spans(log_path):
        _offset, timestamp_ns, _epoch, _size = RECORD_HEADER.unpack_from(data, span.start)
        entries += struct.pack(
            ">iqii", span.offset - base, timestamp_ns, span.start, span.end - span.start
        )
    return bytes(entries)


def flip_bit(path: Path, bit: int) -> None:
    """Invert bit ``bit`` (0 = the lowest bit of byte 0) of ``path``."""
    data = bytearray(path.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def protected_bits(span: Span) -> st.SearchStrategy[int]:
    """A bit of the record that its checks cover: the body size field and the body.

    Offset, timestamp and epoch are outside the CRC by design (the broker stamps them into
    client-framed records); see the offset-field tests below for what that leaves open.
    """
    return st.integers((span.start + BODY_SIZE_AT) * 8, span.end * 8 - 1)


# -- reading back and checking -------------------------------------------------------------


def read_all(
    log: FileCommitLog, start: int | None = None, *, committed: bool = False
) -> tuple[list[Record], CorruptRecordError | None]:
    """Read from ``start`` (default: the oldest offset) to the reader's bound.

    Uses ``read_nowait``: every record is already on disk, so "nothing readable" while the
    reader is still below its bound means the reader is stuck -- reported as a failure at
    once rather than as a timeout.

    Returns:
        The records read, and the ``CorruptRecordError`` that stopped the reader, if any.
    """
    reader = log.reader(log.oldest_offset if start is None else start, committed=committed)
    records: list[Record] = []
    try:
        for _ in range(READS_MAX):
            bound = log.high_watermark if committed else log.newest_offset
            if reader.next_offset > bound:
                return records, None
            batch = reader.read_nowait(CONFIG.read_max_bytes)
            assert batch is not None, (
                f"reader stuck at offset {reader.next_offset}: nothing readable, bound {bound}"
            )
            records.extend(batch.records())
    except CorruptRecordError as error:
        return records, error
    finally:
        reader.close()
    raise AssertionError(f"no end after {READS_MAX} reads")


async def read_all_backwards(
    log: FileCommitLog, max_bytes: int
) -> tuple[list[Record], CorruptRecordError | None]:
    """Read from the newest offset back to the oldest, newest first, like :func:`read_all`."""
    reader = log.reverse_reader(committed=False)
    records: list[Record] = []
    try:
        for _ in range(READS_MAX):
            batch = await reader.read(max_bytes)
            if batch is None:
                return records, None
            records.extend(batch.records())
    except CorruptRecordError as error:
        return records, error
    finally:
        reader.close()
    raise AssertionError(f"no end after {READS_MAX} reads")


def assert_records(records: list[Record], expected: dict[int, Record], offsets: range) -> None:
    """``records`` are exactly the appended records at ``offsets``, byte for byte."""
    assert [record.offset for record in records] == list(offsets)
    for record in records:
        assert record == expected[record.offset]


def check_recovered(log: FileCommitLog, written: WrittenLog, survivors: int) -> None:
    """The invariant: offsets ``[0, survivors)`` hold exactly what was appended, and nothing else.

    Checks a sequential read of everything (no record lost, none corrupt, none extra, no
    ``CorruptRecordError``), a read from every offset (the index positions each one right),
    the newest offset and the HW (the checkpoint clamped to what survived).
    """
    records, error = read_all(log)
    assert error is None
    assert_records(records, written.expected, range(survivors))
    assert log.oldest_offset == 0
    assert log.newest_offset == survivors - 1
    assert log.high_watermark == min(written.high_watermark, survivors - 1)
    for offset in range(survivors):
        assert first_record(log, offset) == written.expected[offset], f"reader({offset})"


def first_record(log: FileCommitLog, offset: int) -> Record | None:
    """The first record an uncommitted reader started at ``offset`` returns now, if any."""
    reader = log.reader(offset, committed=False)
    try:
        batch = reader.read_nowait(CONFIG.read_max_bytes)
    finally:
        reader.close()
    return None if batch is None else next(batch.records())


async def check_appends_continue(log: FileCommitLog, written: WrittenLog) -> None:
    """A new append gets the next offset, is readable, and survives a clean restart."""
    survivors = log.newest_offset + 1
    result = await log.append([NewRecord(value=b"after recovery", key=b"new")])
    assert result.base_offset == survivors
    records, error = read_all(log, survivors)
    assert error is None
    assert [(r.offset, r.key, r.value) for r in records] == [(survivors, b"new", b"after recovery")]
    if survivors:
        assert records[0].timestamp_ns >= written.expected[survivors - 1].timestamp_ns
    await log.close()
    reopened = await FileCommitLog.open(written.directory, CONFIG)
    try:
        again, error = read_all(reopened)
        assert error is None
        assert again[:survivors] == [written.expected[o] for o in range(survivors)]
        assert again[survivors:] == records
        assert reopened.stats.index_rebuilds == 0  # the clean restart trusts every index
    finally:
        await reopened.close()


# -- 9. no damage: the baseline of both recovery paths -------------------------------------


@pytest.mark.parametrize("clean", [False, True], ids=["crash", "clean"])
async def test_undamaged_log_recovers_everything(data_dir: Path, *, clean: bool) -> None:
    """A crash copy loses nothing; the active index is rebuilt only without the marker."""
    written = await write_log(data_dir, clean=clean)
    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        check_recovered(log, written, written.newest_offset + 1)
        assert log.stats.torn_tail_recoveries == 0
        assert log.stats.index_rebuilds == (0 if clean else 1)
        assert not (written.directory / CLEAN_SHUTDOWN_FILE).exists()  # consumed by the open
        records, error = read_all(log, committed=True)
        assert error is None
        assert_records(records, written.expected, range(written.high_watermark + 1))
        await check_appends_continue(log, written)
    finally:
        await log.close()


# -- 1. torn active tail -------------------------------------------------------------------


@pytest.mark.parametrize("clean", [False, True], ids=["crash", "clean"])
@EXAMPLES
@given(data=st.data())
async def test_torn_active_segment_is_cut_at_the_last_whole_record(
    data_dir: Path, data: st.DataObject, *, clean: bool
) -> None:
    """Cut the active ``.log`` anywhere: whole records before the cut survive, nothing after.

    Crash: the active segment is rescanned. Clean: its index is trusted only when its last
    entry ends at the end of the file, which no cut satisfies, so the tail is still found.
    """
    written = await write_log(data_dir, clean=clean)
    active = written.log_files()[-1]
    spans = record_spans(active)
    cut = data.draw(st.integers(0, spans[-1].end - 1), label="cut")
    os.truncate(active, cut)
    whole = [span for span in spans if span.end <= cut]
    survivors = spans[0].offset + len(whole)

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        check_recovered(log, written, survivors)
        on_boundary = cut == (whole[-1].end if whole else 0)
        assert log.stats.torn_tail_recoveries == (0 if on_boundary else 1)
        if whole:
            assert log.stats.index_rebuilds == 1  # only the active segment's
            assert active.stat().st_size == whole[-1].end  # cut on disk too
        else:
            # Nothing of the segment survived; it stays as the (empty) active segment, since
            # the segment before it ends cleanly.
            assert active.stat().st_size == 0
        await check_appends_continue(log, written)
    finally:
        await log.close()


# -- 2. garbage after the active tail ------------------------------------------------------


@pytest.mark.parametrize("clean", [False, True], ids=["crash", "clean"])
@EXAMPLES
@given(garbage=st.binary(min_size=1, max_size=100))
async def test_garbage_after_the_active_tail_is_cut(
    data_dir: Path, garbage: bytes, *, clean: bool
) -> None:
    """Bytes after the last record (a torn write of the next batch) are cut; data is intact."""
    written = await write_log(data_dir, clean=clean)
    active = written.log_files()[-1]
    size = active.stat().st_size
    with active.open("ab") as file:
        file.write(garbage)

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        check_recovered(log, written, written.newest_offset + 1)
        assert log.stats.torn_tail_recoveries == 1
        assert active.stat().st_size == size
        await check_appends_continue(log, written)
    finally:
        await log.close()


# -- 3. a flipped bit in the active segment ------------------------------------------------


@EXAMPLES
@given(data=st.data())
async def test_flipped_bit_in_active_segment_cuts_that_record_and_the_rest(
    data_dir: Path, data: st.DataObject
) -> None:
    """Crash: the rescan stops at the corrupt record and cuts the tail from there."""
    written = await write_log(data_dir, clean=False)
    active = written.log_files()[-1]
    victim = data.draw(st.sampled_from(record_spans(active)), label="victim")
    flip_bit(active, data.draw(protected_bits(victim), label="bit"))

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        check_recovered(log, written, victim.offset)
        assert log.stats.torn_tail_recoveries == 1
        assert active.stat().st_size == victim.start
        await check_appends_continue(log, written)
    finally:
        await log.close()


@EXAMPLES
@given(data=st.data())
async def test_flipped_bit_in_active_segment_after_clean_shutdown_is_never_served(
    data_dir: Path, data: st.DataObject
) -> None:
    """Clean: the consistent index is trusted, so readers find the bad record and stop there.

    Records before it are served; the bad one raises ``CorruptRecordError`` (again on every
    try); the records after it stay readable by a reader started past it.
    """
    written = await write_log(data_dir, clean=True)
    active = written.log_files()[-1]
    victim = data.draw(st.sampled_from(record_spans(active)), label="victim")
    flip_bit(active, data.draw(protected_bits(victim), label="bit"))

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        check_stops_at_corrupt_record(log, written, victim.offset)
        assert log.newest_offset == written.newest_offset  # nothing was cut at open
    finally:
        await log.close()


def check_stops_at_corrupt_record(log: FileCommitLog, written: WrittenLog, bad: int) -> None:
    """Readers serve ``[0, bad)``, raise at ``bad`` (counted), and serve what follows it."""
    records, error = read_all(log)
    assert_records(records, written.expected, range(bad))
    assert error is not None
    assert error.offset == bad
    assert log.stats.corrupt_records == 1
    retry, error = read_all(log, bad)
    assert retry == []
    assert error is not None
    assert error.offset == bad
    assert log.stats.corrupt_records == 2
    after, error = read_all(log, bad + 1)
    assert error is None
    assert_records(after, written.expected, range(bad + 1, written.newest_offset + 1))


# -- 4. a flipped bit in a sealed segment --------------------------------------------------


@pytest.mark.parametrize("clean", [False, True], ids=["crash", "clean"])
@EXAMPLES
@given(data=st.data())
async def test_flipped_bit_in_sealed_segment_stops_readers_before_it(
    data_dir: Path, data: st.DataObject, *, clean: bool
) -> None:
    """Sealed segments keep their consistent index on both paths: open works, reads stop."""
    written = await write_log(data_dir, clean=clean)
    sealed = data.draw(st.sampled_from(written.log_files()[:-1]), label="segment")
    victim = data.draw(st.sampled_from(record_spans(sealed)), label="victim")
    flip_bit(sealed, data.draw(protected_bits(victim), label="bit"))

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        check_stops_at_corrupt_record(log, written, victim.offset)
        assert log.newest_offset == written.newest_offset
        assert log.high_watermark == written.high_watermark
    finally:
        await log.close()


def middle_record(path: Path) -> Span:
    """A record with records before and after it in its segment."""
    spans = record_spans(path)
    assert len(spans) >= 3
    return spans[len(spans) // 2]


async def test_sealed_corruption_found_at_open_raises_and_later_segments_stay_readable(
    data_dir: Path,
) -> None:
    """A sealed segment without its index is rescanned; a bad record found then must raise.

    Reproduction: delete a sealed segment's ``.index`` and flip a body bit of its middle
    record. Recovery sets ``corrupt_from`` and ``next_offset`` to that record's offset, so a
    reader reaching it sees ``next_offset >= segment.next_offset``, finds no index entry and
    sets its next offset back to ``segment.next_offset``: it never calls ``Segment.read``
    (whose ``corrupt_from`` check would raise) and returns ``None`` forever. A reader started
    in a later segment is walked back the same way.
    """
    written = await write_log(data_dir, clean=True)
    sealed = written.log_files()[1]
    victim = middle_record(sealed)
    flip_bit(sealed, (victim.start + RECORD_HEADER.size + 6) * 8)
    sealed.with_suffix(".index").unlink()
    next_base = record_spans(written.log_files()[2])[0].offset

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        after, error = read_all(log, next_base)
        assert error is None
        assert_records(after, written.expected, range(next_base, written.newest_offset + 1))
        records, error = read_all(log)
        assert_records(records, written.expected, range(victim.offset))
        assert error is not None
        assert error.offset == victim.offset
    finally:
        await log.close()


@pytest.mark.parametrize(
    "max_bytes", [CONFIG.read_max_bytes, 1024 * 1024], ids=["small-window", "whole-segment"]
)
async def test_reverse_reader_raises_at_corrupt_record_without_skipping(
    data_dir: Path, max_bytes: int
) -> None:
    """Reverse reading must serve newest-first down to the bad record, then raise there.

    Reproduction: flip a body bit of a middle record (offset 3) of the first segment, clean
    restart, read backwards from the newest offset. With 150-byte windows the window
    [3, 4] raises at 3 and record 4 is never returned; with a window covering the segment,
    records 0-2 are returned, 3-6 skipped and no error is raised at all.
    """
    written = await write_log(data_dir, clean=True)
    sealed = written.log_files()[0]
    victim = middle_record(sealed)
    flip_bit(sealed, (victim.start + RECORD_HEADER.size + 6) * 8)

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        records, error = await read_all_backwards(log, max_bytes)
        assert_records(records, written.expected, range(written.newest_offset, victim.offset, -1))
        assert error is not None
        assert error.offset == victim.offset
        assert log.stats.corrupt_records == 1
    finally:
        await log.close()


# -- 3/4. the offset field: outside the CRC ------------------------------------------------


async def test_raised_offset_field_in_active_segment_is_cut(data_dir: Path) -> None:
    """A record whose stored offset is not the one the log assigned must not be served.

    Reproduction: crash copy, set bit 0 of the offset of an even-offset record in the middle
    of the active segment (offset n becomes n + 1). The rescan accepts it (n + 1 >= n), cuts
    the real record n + 1 as "not increasing", and serves record n's content as offset n + 1;
    the newest offset is unchanged although record n + 1 is gone. Offsets in the active
    segment are dense (compaction never touches it), so the scan could require exactly
    ``next_offset``.
    """
    written = await write_log(data_dir, clean=False)
    active = written.log_files()[-1]
    victim = next(span for span in record_spans(active)[1:-1] if span.offset % 2 == 0)
    flip_bit(active, (victim.start + 7) * 8)  # lowest bit of the big-endian u64 offset

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        check_recovered(log, written, victim.offset)
    finally:
        await log.close()


async def test_raised_offset_field_in_sealed_segment_raises_instead_of_hanging(
    data_dir: Path,
) -> None:
    """The index says which offset is at a position; a header that disagrees is corrupt.

    Reproduction: flip bit 40 of the offset of a middle record of a sealed segment (clean
    restart). The index is consistent and trusted; a forward reader reaching the record sees
    an offset beyond its bound, ``Segment.read`` returns no record and no error, and
    ``read()`` waits forever for data that is already there.
    """
    written = await write_log(data_dir, clean=True)
    sealed = written.log_files()[0]
    victim = middle_record(sealed)
    flip_bit(sealed, (victim.start + 2) * 8)  # bit 40 of the big-endian u64 offset

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        check_stops_at_corrupt_record(log, written, victim.offset)
    finally:
        await log.close()


# -- 5. damaged indexes --------------------------------------------------------------------


@pytest.mark.parametrize("which", ["sealed", "active"])
@pytest.mark.parametrize("clean", [False, True], ids=["crash", "clean"])
async def test_missing_index_is_rebuilt(data_dir: Path, which: str, *, clean: bool) -> None:
    """A deleted ``.index`` is rebuilt from its log, byte for byte as it should be."""
    written = await write_log(data_dir, clean=clean)
    index = written.index_files()[1 if which == "sealed" else -1]
    original = expected_index(index.with_suffix(".log"))
    index.unlink()

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        check_recovered(log, written, written.newest_offset + 1)
        assert log.stats.index_rebuilds >= 1
        assert index.read_bytes() == original
        assert log.stats.torn_tail_recoveries == 0
    finally:
        await log.close()


@EXAMPLES
@given(data=st.data())
async def test_truncated_index_is_rebuilt(data_dir: Path, data: st.DataObject) -> None:
    """Clean restart (indexes trusted when consistent): a shortened index is still rebuilt."""
    written = await write_log(data_dir, clean=True)
    index = data.draw(st.sampled_from(written.index_files()), label="index")
    original = index.read_bytes()
    os.truncate(index, data.draw(st.integers(0, len(original) - 1), label="length"))

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        check_recovered(log, written, written.newest_offset + 1)
        assert log.stats.index_rebuilds == 1
        assert index.read_bytes() == original
    finally:
        await log.close()


@EXAMPLES
@given(data=st.data())
async def test_garbage_index_is_rebuilt(data_dir: Path, data: st.DataObject) -> None:
    """Clean restart: an index overwritten with garbage of its own length is rebuilt."""
    written = await write_log(data_dir, clean=True)
    index = data.draw(st.sampled_from(written.index_files()), label="index")
    original = index.read_bytes()
    garbage = data.draw(
        st.binary(min_size=len(original), max_size=len(original)).filter(
            lambda candidate: candidate != original
        ),
        label="garbage",
    )
    index.write_bytes(garbage)

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        check_recovered(log, written, written.newest_offset + 1)
        assert log.stats.index_rebuilds == 1
        assert index.read_bytes() == original
    finally:
        await log.close()


async def test_index_with_a_damaged_middle_entry_is_not_trusted(data_dir: Path) -> None:
    """An index whose ends are right but whose middle is zeroed must not position readers.

    Reproduction: clean restart after zeroing entry 1 of the first segment's index. The
    index is adopted; ``reader(1)`` binary-searches past the zeroed entry and starts at
    offset 2, silently skipping committed record 1. A page of the index lost in a power
    failure looks like this (the index is never fsynced).
    """
    written = await write_log(data_dir, clean=True)
    index = written.index_files()[0]
    entries = bytearray(index.read_bytes())
    assert len(entries) >= 3 * INDEX_ENTRY_BYTES
    entries[INDEX_ENTRY_BYTES : 2 * INDEX_ENTRY_BYTES] = bytes(INDEX_ENTRY_BYTES)
    index.write_bytes(bytes(entries))

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        check_recovered(log, written, written.newest_offset + 1)
    finally:
        await log.close()


# -- 6. the HW checkpoint ------------------------------------------------------------------

NEWEST: Final = -2  # placeholder in the table below for "the newest offset"


@pytest.mark.parametrize(
    ("content", "expected_hw"),
    [
        pytest.param(None, -1, id="missing"),
        pytest.param(b"", -1, id="empty"),
        pytest.param(b"\x00\xffnot a number\n", -1, id="garbage"),
        pytest.param(b"99999999999999999999999999\n", NEWEST, id="huge"),
        pytest.param(b"-42\n", -1, id="negative"),
        pytest.param(b"7\n", 7, id="below-newest"),
    ],
)
async def test_hw_checkpoint_falls_back_or_is_clamped(
    data_dir: Path, content: bytes | None, expected_hw: int
) -> None:
    """A missing or unreadable checkpoint means HW -1; one beyond the log is clamped."""
    written = await write_log(data_dir, clean=True)
    checkpoint = written.directory / HW_CHECKPOINT_FILE
    if content is None:
        checkpoint.unlink()
    else:
        checkpoint.write_bytes(content)
    hw = written.newest_offset if expected_hw == NEWEST else expected_hw

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        assert log.high_watermark == hw
        committed, error = read_all(log, committed=True)
        assert error is None
        assert_records(committed, written.expected, range(hw + 1))
        as_checkpointed = WrittenLog(written.directory, written.expected, hw)
        check_recovered(log, as_checkpointed, written.newest_offset + 1)
    finally:
        await log.close()


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda _: None, id="torn-tail-below-checkpoint"),
        pytest.param(lambda path: path.write_bytes(b"99999999999999999999\n"), id="huge"),
    ],
)
async def test_clamped_hw_is_checkpointed_before_new_appends_can_pass_it(
    data_dir: Path, damage: Callable[[Path], None]
) -> None:
    """An HW clamped at open must stay put: records appended later are not committed.

    Reproduction: clean shutdown with HW = newest = N; cut the last record off the active
    segment (or write a huge checkpoint); open: HW = N - 1 (clamped). Append one record
    (offset N, not committed) and close: the checkpoint still says N (or the huge value)
    because the clamped HW equals ``_checkpointed_hw``. Reopen: HW = N, the uncommitted
    record is now reported committed.
    """
    written = await write_log(data_dir, clean=True)
    active = written.log_files()[-1]
    os.truncate(active, record_spans(active)[-1].start)
    damage(written.directory / HW_CHECKPOINT_FILE)
    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        clamped = log.high_watermark
        assert clamped == written.newest_offset - 1
        await log.append([NewRecord(value=b"not committed")])
    finally:
        await log.close()
    reopened = await FileCommitLog.open(written.directory, CONFIG)
    try:
        assert reopened.high_watermark == clamped
    finally:
        await reopened.close()


# -- 7. leftovers of interrupted writes ----------------------------------------------------


@pytest.mark.parametrize("clean", [False, True], ids=["crash", "clean"])
async def test_leftover_temporary_files_and_orphan_indexes_are_removed(
    data_dir: Path, *, clean: bool
) -> None:
    """``*.tmp`` / ``*.rebuild`` (interrupted atomic writes) and indexes without a log go."""
    written = await write_log(data_dir, clean=clean)
    directory = written.directory
    sealed_index = written.index_files()[1]
    leftovers = [
        directory / f"{HW_CHECKPOINT_FILE}.tmp",
        directory / f"{CLEAN_SHUTDOWN_FILE}.tmp",
        directory / f"{sealed_index.name}.rebuild",
        directory / f"{written.log_files()[-1].name}.tmp",
        directory / "00000000000000099999.index",  # an index without its log
    ]
    original_indexes = {
        path: expected_index(path.with_suffix(".log")) for path in written.index_files()
    }
    for path in leftovers:
        path.write_bytes(b"3\n" + bytes(range(40)))

    log = await FileCommitLog.open(directory, CONFIG)
    try:
        assert [path.name for path in leftovers if path.exists()] == []
        check_recovered(log, written, written.newest_offset + 1)
        assert log.high_watermark == written.high_watermark  # not the ".tmp" value 3
        assert {path: path.read_bytes() for path in written.index_files()} == original_indexes
    finally:
        await log.close()


# -- 8. a crash in the middle of a roll ----------------------------------------------------


@pytest.mark.parametrize("with_index", [False, True], ids=["log-only", "log-and-index"])
async def test_crash_mid_roll_leaves_an_empty_segment_that_is_used(
    data_dir: Path, *, with_index: bool
) -> None:
    """An empty next segment (created, not yet written) becomes the active one."""
    written = await write_log(data_dir, clean=False)
    empty = written.directory / f"{written.newest_offset + 1:020d}.log"
    empty.touch()
    if with_index:
        empty.with_suffix(".index").touch()

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        check_recovered(log, written, written.newest_offset + 1)
        assert log.stats.torn_tail_recoveries == 0
        await check_appends_continue(log, written)
        assert empty.stat().st_size > 0  # the new record went into the empty segment
    finally:
        await log.close()


async def test_crash_mid_roll_with_a_torn_previous_segment(data_dir: Path) -> None:
    """A torn tail is cut even when the segment was being sealed when the crash hit.

    Reproduction (power loss under ``sync_policy=never``: the roll does not fdatasync the
    old segment, but the new segment's directory entry is fsynced): cut 10 bytes off the
    last segment and create the empty next segment. The old segment is rescanned as sealed,
    so its tail is not cut but remembered as ``corrupt_from``; the newest offset stays at
    the empty segment's base - 1 and the HW is clamped to it, so committed-looking offsets
    do not exist; a forward reader stops at the hole forever, and new appends land beyond it.
    """
    written = await write_log(data_dir, clean=False)
    last = written.log_files()[-1]
    spans = record_spans(last)
    os.truncate(last, spans[-1].end - 10)
    (written.directory / f"{written.newest_offset + 1:020d}.log").touch()

    log = await FileCommitLog.open(written.directory, CONFIG)
    try:
        check_recovered(log, written, spans[-1].offset)
        await check_appends_continue(log, written)
    finally:
        await log.close()
