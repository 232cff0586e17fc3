"""Model-based tests of FileCommitLog: a hypothesis state machine against an in-memory model.

The machine drives a real log in a temporary directory, with an injected ``ManualClock``, and
keeps a model next to it: the records by offset (with the timestamp and leader epoch the log
must have stamped), the HW, and where the segments must start. Appends (plain, client-framed
with junk in the headers, concurrent ones racing ``close``, and invalid ones that must change
nothing), HW moves and checkpoints, leader epochs, clock steps (forwards, backwards, past the
segment age), forward readers (fresh, and long-lived ones that straddle appends and rolls),
reverse readers, timestamp lookups, clean reopens and crash reopens (the directory copied while
the log is open) are interleaved, and every record read back is compared with the model.

Maintenance is interleaved too, each step optionally followed by a clean or crash reopen:
truncation (anywhere from below the oldest offset to past the end; long-lived readers rewind to
the cut), retention (whole oldest segments, predicted from the documented rules) and
compaction passes, whose survivors are checked against what a pass may remove (superseded
records, expired tombstones, never keyless ones, nothing at or above the HW or in the active
segment) and what it must keep, down to one record per key once a pass maps every key. The
model then holds gaps: readers must return every record it still has, and skip none.

Each machine draws its own configuration: sync policy, small segment, record and batch limits
(so rolls and refusals are frequent), how many sealed segments may stay open, and whether the
interval syncer fires during the run. Focused tests at the end pin what the machine reaches
only by chance, and the bugs found while writing them.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import pytest
from crc32c import crc32c
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from flux_broker.clock import ManualClock
from flux_broker.log import (
    AppendResult,
    BatchTooLargeError,
    FileCommitLog,
    InvalidBatchError,
    LogClosedError,
    LogConfig,
    LogError,
    NewRecord,
    Record,
    RecordBatch,
    RecordTooLargeError,
    SyncPolicy,
    checkpoint,
)
from flux_broker.log.cleaner import Cleaner
from flux_broker.log.commitlog import HW_CHECKPOINT_FILE
from flux_broker.log.compaction import CompactionResult
from flux_broker.log.format import HEADER, HEADER_BYTES, encode_body, record_bytes
from flux_broker.log.leader_epoch import EpochEntry
from flux_broker.log.reader import ForwardReader
from flux_broker.log.segment import INDEX_SUFFIX, LOG_SUFFIX, segment_name
from flux_testing import wait_for

T = TypeVar("T")

#: Framed size of a record with no key, value or headers: the 28-byte header, then CRC (4),
#: magic (1), attributes (1), key and value lengths (4 + 4) and the header count (2).
EMPTY_RECORD_BYTES: Final = 28 + 4 + 1 + 1 + 4 + 4 + 2
#: Per header: name length (2) and value length (4), besides the name and value themselves.
HEADER_OVERHEAD_BYTES: Final = 2 + 4
#: A read budget large enough for the whole log of any example.
WHOLE_LOG_BYTES: Final = 1 << 30
#: A background interval that never elapses during an example.
QUIET_S: Final = 3600.0
#: Live forward readers kept at once (each straddles later appends, rolls and HW moves).
LIVE_READERS_MAX: Final = 4

U64 = st.integers(0, 2**64 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)
PAYLOADS = st.none() | st.binary(max_size=300)
HEADER_LISTS = st.lists(st.tuples(st.text(max_size=8), st.binary(max_size=32)), max_size=3).map(
    tuple
)
NEW_RECORDS = st.builds(NewRecord, value=PAYLOADS, key=PAYLOADS, headers=HEADER_LISTS)
#: Records that always fit the smallest record limit drawn below (at most 160 bytes framed).
SMALL_RECORDS = st.builds(
    NewRecord,
    value=st.none() | st.binary(max_size=40),
    key=st.none() | st.binary(max_size=16),
    headers=st.lists(st.tuples(st.text(max_size=4), st.binary(max_size=8)), max_size=2).map(tuple),
)
STAMPS = st.tuples(U64, I64, U64)  # offset, timestamp, epoch: whatever a client writes
INVALID_APPENDS: Final = ("flipped body byte", "truncated", "oversized record", "oversized batch")
DAMAGES: Final = ("flip a byte", "set a body size", "truncate", "append junk")
CLOCK_MOVES: Final = ("forward", "back", "past the segment age")
#: A configuration per machine: small segments, limits that refusals can reach, few open
#: handles, and interval syncs that either fire during the run or never. The background HW
#: checkpointer never fires: when it fires is timing, and what a crash recovers must not
#: depend on timing, or hypothesis could not replay and shrink a failure. The machine
#: checkpoints explicitly instead; ``test_close_waits_for_a_checkpoint_in_flight`` covers
#: the background writes.
CONFIGS = st.builds(
    LogConfig,
    segment_max_bytes=st.integers(512, 4096),
    segment_max_age_s=st.sampled_from([0.0, 1.0, 60.0]),
    sync_policy=st.sampled_from(SyncPolicy),
    sync_interval_s=st.sampled_from([0.001, QUIET_S]),
    record_max_bytes=st.integers(400, 2048),
    batch_max_bytes=st.integers(8192, 65536),
    open_segment_handles_max=st.integers(1, 4),
    hw_checkpoint_interval_s=st.just(QUIET_S),
    # Maintenance: the machine runs the cleaner itself, never the background one.
    cleaner_interval_s=st.just(QUIET_S),
    retention_max_messages=st.sampled_from([0, 0, 0, 3, 20, 80]),
    retention_max_bytes=st.sampled_from([0, 0, 0, 1000, 4000, 20000]),
    retention_max_age_s=st.sampled_from([0.0, 2.0, 7 * 24 * 3600.0, 7 * 24 * 3600.0]),
    compact_enabled=st.sampled_from([True, True, False]),
    compact_max_keys=st.sampled_from([1, 3, 1_000_000, 1_000_000]),
    compact_tombstone_retention_s=st.sampled_from([0.0, 1.0, 24 * 3600.0]),
)
#: Whether a maintenance step is followed by a reopen, and which kind.
REOPENS: Final = (None, "clean", "crash")
#: Keys drawn from a small set, so that compaction finds superseded records and tombstones.
KEYED_RECORDS = st.builds(
    NewRecord,
    value=st.none() | st.binary(max_size=120),
    key=st.none() | st.sampled_from([b"", b"a", b"b", b"c", b"d", b"e"]),
    headers=st.just(()),
)
#: Keyed batches appended before a maintenance step, so that it has material.
FILLS = st.lists(KEYED_RECORDS, min_size=5, max_size=30)
#: Passes run until compaction is done with the sealed part (the key limit may need several).
COMPACTION_PASSES_MAX: Final = 50
#: Any positive budget: a budget below one record (or one header) must still return a record.
BUDGETS = st.integers(1, 4096) | st.just(WHOLE_LOG_BYTES)


def framed_size(record: NewRecord) -> int:
    """Framed size of ``record``, computed from the documented layout, not from the log."""
    size = EMPTY_RECORD_BYTES
    size += 0 if record.key is None else len(record.key)
    size += 0 if record.value is None else len(record.value)
    for name, value in record.headers:
        size += HEADER_OVERHEAD_BYTES + len(name.encode("utf-8")) + len(value)
    return size


def frame_as_client(
    records: Sequence[NewRecord], stamps: Sequence[tuple[int, int, int]]
) -> tuple[bytearray, list[int]]:
    """Frame ``records`` the way a client would, with arbitrary header fields.

    Returns:
        The batch and the start position of each record, plus the batch length at the end.
    """
    batch = bytearray()
    starts = [0]
    for record, (offset, timestamp_ns, epoch) in zip(records, stamps, strict=True):
        body = encode_body(record)
        batch += HEADER.pack(offset, timestamp_ns, epoch, len(body)) + body
        starts.append(len(batch))
    return batch, starts


@st.composite
def damaged_batches(draw: st.DrawFn) -> tuple[list[NewRecord], bytes]:
    """Small records framed as a client would, then damaged one to three times anywhere."""
    records = draw(st.lists(SMALL_RECORDS, min_size=1, max_size=5))
    batch, starts = frame_as_client(records, [(0, 0, 0)] * len(records))
    for damage in draw(st.lists(st.sampled_from(DAMAGES), min_size=1, max_size=3)):
        if damage == "flip a byte" and batch:
            at = draw(st.integers(0, len(batch) - 1))
            batch[at] ^= draw(st.integers(1, 255))
        elif damage == "set a body size":
            body_size_at = starts[draw(st.integers(0, len(records) - 1))] + HEADER_BYTES - 4
            if body_size_at + 4 <= len(batch):
                struct.pack_into(">I", batch, body_size_at, draw(st.integers(0, 400)))
        elif damage == "truncate":
            del batch[draw(st.integers(0, len(batch))) :]
        else:
            batch += draw(st.binary(min_size=1, max_size=60))
    return records, bytes(batch)


def record_bodies(batch: bytes, record_max_bytes: int) -> tuple[list[bytes], int]:
    """Walk a client-framed batch by the documented layout, independently of the log.

    Returns:
        The bodies of the well-formed records before the first malformed one, and the index
        of that record (-1 if every record is well formed; 0 for an empty batch).
    """
    bodies: list[bytes] = []
    position = 0
    while position < len(batch):
        if position + HEADER_BYTES > len(batch):
            return bodies, len(bodies)
        (body_size,) = struct.unpack_from(">I", batch, position + HEADER_BYTES - 4)
        end = position + HEADER_BYTES + body_size
        body = bytes(batch[position + HEADER_BYTES : end])
        if end > len(batch) or end - position > record_max_bytes or not body_is_valid(body):
            return bodies, len(bodies)
        bodies.append(body)
        position = end
    return bodies, -1 if bodies else 0


class MalformedBodyError(Exception):
    """A record body does not follow the documented layout."""


def body_is_valid(body: bytes) -> bool:
    """Whether ``body`` is a record body: CRC-32C, magic 1, and fields filling it exactly."""
    try:
        walk_body(body)
    except (MalformedBodyError, struct.error):  # struct.error: a field runs past the end
        return False
    return True


def walk_body(body: bytes) -> None:
    """Raise ``MalformedBodyError`` (or ``struct.error``) unless ``body`` is well formed."""

    def require(condition: bool) -> None:
        if not condition:
            raise MalformedBodyError

    require(len(body) >= EMPTY_RECORD_BYTES - HEADER_BYTES)
    require(crc32c(body[4:]) == int.from_bytes(body[:4], "big"))
    magic, _attributes, key_length = struct.unpack_from(">bbi", body, 4)
    require(magic == 1 and key_length >= -1)
    cursor = 10 + max(key_length, 0)
    (value_length,) = struct.unpack_from(">i", body, cursor)
    require(value_length >= -1)
    cursor += 4 + max(value_length, 0)
    (count,) = struct.unpack_from(">h", body, cursor)
    require(count >= 0)
    cursor += 2
    for _ in range(count):
        (name_length,) = struct.unpack_from(">h", body, cursor)
        require(name_length >= 0)
        cursor += 2 + name_length
        (header_value_length,) = struct.unpack_from(">i", body, cursor)
        require(header_value_length >= 0)
        cursor += 4 + header_value_length
    require(cursor == len(body))


def open_sealed_segments(log: FileCommitLog) -> list[int]:
    """Base offsets of the sealed segments whose file handles are open."""
    return [segment.base_offset for segment in log.segments[:-1] if segment.is_open]


def _copy_if_present(source: str, target: str) -> object:
    """Copy a file unless it vanished since the directory was listed.

    A checkpoint being written while the directory is copied renames its temp file away;
    a crash at that moment leaves either file, which is what the copy stands for.
    """
    with contextlib.suppress(FileNotFoundError):
        return shutil.copy2(source, target)
    return target


@dataclass(frozen=True, slots=True)
class Expected:
    """A record as the model expects to read it back."""

    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...]
    timestamp_ns: int
    leader_epoch: int
    size_bytes: int


@dataclass(slots=True)
class ModelSegment:
    """Where a segment must start; its records are the model's between it and the next one.

    ``dense`` is what the log believes of it: offsets consecutive from the base. New segments
    are; a compaction that removes records, or a reopen, decides again from the records; a
    truncation leaves it as it was.
    """

    base_offset: int
    dense: bool = True


@dataclass(slots=True)
class LiveReader:
    """A forward reader kept across steps, and where the model expects it to go on."""

    reader: ForwardReader
    committed: bool
    position: int


class CommitLogMachine(RuleBasedStateMachine):
    """A real FileCommitLog against the model (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.root = Path(tempfile.mkdtemp(prefix="flux-log-model-"))
        self.directory = self.root / "log-0"
        self.clock = ManualClock()
        self.config = LogConfig()
        self._log: FileCommitLog | None = None
        #: By offset; ``None`` where retention or compaction removed the record.
        self.records: list[Expected | None] = []
        self.segments = [ModelSegment(0)]
        self.epochs: list[EpochEntry] = []  # the leader-epoch cache
        self.cleaner: Cleaner | None = None
        self.hw = -1
        self.checkpointed_hw = -1  # what the HW checkpoint file holds
        self.epoch = 0
        self.last_timestamp_ns = 0
        self.live: list[LiveReader] = []
        self.crashes = 0
        self.rolls_since_open = 0

    @property
    def log(self) -> FileCommitLog:
        assert self._log is not None
        return self._log

    @property
    def age_ns(self) -> int:
        return int(self.config.segment_max_age_s * 1e9)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    # -- the model's view of records and segments -------------------------------------------

    @property
    def oldest(self) -> int:
        return self.segments[0].base_offset

    def expected(self, offset: int) -> Expected:
        record = self.records[offset]
        assert record is not None, f"offset {offset} is not in the model"
        return record

    def present(self, start: int, end: int) -> list[int]:
        """Offsets in ``[start, end)`` that hold a record."""
        start = max(start, 0)
        return [o for o in range(start, min(end, len(self.records))) if self.records[o] is not None]

    def segment_end(self, i: int) -> int:
        following = i + 1 < len(self.segments)
        return self.segments[i + 1].base_offset if following else len(self.records)

    def segment_offsets(self, i: int) -> list[int]:
        return self.present(self.segments[i].base_offset, self.segment_end(i))

    def segment_next_offset(self, i: int) -> int:
        """The log's ``next_offset`` of segment ``i``: after its last record, or its base."""
        offsets = self.segment_offsets(i)
        return offsets[-1] + 1 if offsets else self.segments[i].base_offset

    def segment_size(self, i: int) -> int:
        return sum(self.expected(o).size_bytes for o in self.segment_offsets(i))

    def segment_timestamps(self, i: int) -> tuple[int | None, int | None]:
        offsets = self.segment_offsets(i)
        if not offsets:
            return None, None
        return self.expected(offsets[0]).timestamp_ns, self.expected(offsets[-1]).timestamp_ns

    def is_dense(self, i: int) -> bool:
        offsets = self.segment_offsets(i)
        base = self.segments[i].base_offset
        return offsets == list(range(base, base + len(offsets)))

    def clear_earliest_epochs(self, start_offset: int) -> None:
        """The epoch cache after retention (or recovery) moved the oldest offset up."""
        covering = bisect.bisect_right([e.start_offset for e in self.epochs], start_offset)
        if covering:
            kept = self.epochs[covering - 1 :]
            if kept[0].start_offset < start_offset:
                kept[0] = EpochEntry(kept[0].epoch, start_offset)
            self.epochs = kept

    def clear_latest_epochs(self, end_offset: int) -> None:
        self.epochs = [e for e in self.epochs if e.start_offset < end_offset]

    @initialize(
        config=CONFIGS,
        seed=st.lists(st.lists(NEW_RECORDS | KEYED_RECORDS, min_size=1, max_size=20)),
    )
    def open_log(self, config: LogConfig, seed: list[list[NewRecord]]) -> None:
        """Open the log with this machine's configuration and append a few batches."""
        self.config = config
        self._log = self.run(FileCommitLog.open(self.directory, self.config, self.clock))
        self.cleaner = Cleaner(self.log)
        for records in seed:
            self.append_records(records)

    def teardown(self) -> None:
        try:
            if self._log is not None:
                self.run(self._log.close())
            self.run(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()
            shutil.rmtree(self.root, ignore_errors=True)

    # -- predictions -----------------------------------------------------------------------

    def predict_frame_error(self, records: Sequence[NewRecord]) -> tuple[type[LogError], int]:
        """What ``append`` must refuse ``records`` with, or ``(LogError, -1)`` for nothing.

        Records are checked in order: each against the record limit, then the batch so far
        against the batch limit.
        """
        position = 0
        for i, record in enumerate(records):
            size = framed_size(record)
            if size > self.config.record_max_bytes:
                return RecordTooLargeError, i
            position += size
            if position > self.config.batch_max_bytes:
                return BatchTooLargeError, -1
        return LogError, -1

    def predict_framed_error(self, records: Sequence[NewRecord]) -> tuple[type[LogError], int]:
        """What ``append_framed`` must refuse a well-formed batch of ``records`` with."""
        if sum(map(framed_size, records)) > self.config.batch_max_bytes:
            return BatchTooLargeError, -1
        for i, record in enumerate(records):
            if framed_size(record) > self.config.record_max_bytes:
                return InvalidBatchError, i
        return LogError, -1

    def placement(self) -> tuple[int, bool]:
        """The timestamp the next batch gets and whether the active segment rolls first."""
        now_ns = self.clock.now_ns()
        size = self.segment_size(len(self.segments) - 1)
        first_ns, _last_ns = self.segment_timestamps(len(self.segments) - 1)
        full = size >= self.config.segment_max_bytes
        old = self.age_ns > 0 and first_ns is not None and now_ns - first_ns >= self.age_ns
        return max(now_ns, self.last_timestamp_ns), size > 0 and (full or old)

    # -- appending -------------------------------------------------------------------------

    def append_and_record(
        self, records: Sequence[NewRecord], append: Callable[[], Coroutine[Any, Any, AppendResult]]
    ) -> None:
        self.record_append(records, self.run(append()))

    def record_append(self, records: Sequence[NewRecord], result: AppendResult) -> None:
        """Check where an append landed and add its records to the model."""
        timestamp_ns, roll = self.placement()  # the clock has not moved since the append
        base = len(self.records)
        assert (result.base_offset, result.last_offset) == (base, base + len(records) - 1)
        assert result.count == len(records)
        assert result.timestamp_ns == timestamp_ns
        if roll:
            full = self.segment_size(len(self.segments) - 1) >= self.config.segment_max_bytes
            event("roll", "by size" if full else "by age")
            self.segments.append(ModelSegment(base))
            self.rolls_since_open += 1
        latest = self.epochs[-1] if self.epochs else EpochEntry(-1, -1)
        if self.epoch > latest.epoch:  # the epoch cache learns where this epoch starts
            if latest.start_offset == base:
                self.epochs.pop()
            self.epochs.append(EpochEntry(self.epoch, base))
        for record in records:
            size = framed_size(record)
            self.records.append(
                Expected(record.key, record.value, record.headers, timestamp_ns, self.epoch, size)
            )
        self.last_timestamp_ns = timestamp_ns

    def expect_refusal(
        self,
        append: Callable[[], Coroutine[Any, Any, Any]],
        error: type[LogError],
        index: int,
    ) -> LogError:
        """Run an append that must fail with ``error`` (naming ``index``) and change nothing."""
        with pytest.raises(error) as refused:
            self.run(append())
        if index >= 0:
            assert getattr(refused.value, "index", None) == index
        self.check_whole_log()
        return refused.value

    def append_records(self, records: list[NewRecord]) -> None:
        error, index = self.predict_frame_error(records)
        if error is LogError:
            self.append_and_record(records, lambda: self.log.append(records))
        else:
            event("append refused", error.__name__)
            self.expect_refusal(lambda: self.log.append(records), error, index)

    def append_framed_records(
        self, records: list[NewRecord], stamps: Sequence[tuple[int, int, int]]
    ) -> None:
        batch, _starts = frame_as_client(records, stamps)
        sent = bytes(batch)
        error, index = self.predict_framed_error(records)
        if error is LogError:
            self.append_and_record(records, lambda: self.log.append_framed(batch))
        else:
            event("framed append refused", error.__name__)
            self.expect_refusal(lambda: self.log.append_framed(batch), error, index)
        assert batch == sent  # the log stamps its own copy, never the caller's buffer

    @rule(record=NEW_RECORDS)
    def append_one(self, record: NewRecord) -> None:
        self.append_records([record])

    @rule(records=st.lists(NEW_RECORDS, min_size=1, max_size=50))
    def append_batch(self, records: list[NewRecord]) -> None:
        self.append_records(records)

    @rule(records=st.lists(KEYED_RECORDS, min_size=5, max_size=60))
    def append_keyed(self, records: list[NewRecord]) -> None:
        """Records with a few keys and null values: what compaction has to work with."""
        self.append_records(records)

    @rule(records=st.lists(NEW_RECORDS, min_size=1, max_size=20), data=st.data())
    def append_client_framed(self, records: list[NewRecord], data: st.DataObject) -> None:
        size = len(records)
        stamps = data.draw(st.lists(STAMPS, min_size=size, max_size=size), label="stamps")
        self.append_framed_records(records, stamps)

    @rule(
        kind=st.sampled_from(INVALID_APPENDS),
        records=st.lists(SMALL_RECORDS, min_size=1, max_size=5),
        stamp=STAMPS,
        data=st.data(),
    )
    def append_invalid(
        self, kind: str, records: list[NewRecord], stamp: tuple[int, int, int], data: st.DataObject
    ) -> None:
        """An append the log must refuse, naming the right record, without changing anything."""
        batch, starts = frame_as_client(records, [stamp] * len(records))
        if kind == "flipped body byte":
            bad = data.draw(st.integers(0, len(records) - 1), label="bad record")
            at = data.draw(st.integers(starts[bad] + HEADER_BYTES, starts[bad + 1] - 1))
            batch[at] ^= data.draw(st.integers(1, 255), label="xor mask")
            self.expect_refusal(lambda: self.log.append_framed(batch), InvalidBatchError, bad)
        elif kind == "truncated":
            bad = data.draw(st.integers(0, len(records) - 1), label="cut record")
            # Cut strictly inside record ``bad`` (a cut between records is a valid batch);
            # a cut at 0 leaves an empty batch, which names record 0.
            inside = st.integers(0 if bad == 0 else 1, starts[bad + 1] - starts[bad] - 1)
            cut = starts[bad] + data.draw(inside, label="cut")
            self.expect_refusal(lambda: self.log.append_framed(batch[:cut]), InvalidBatchError, bad)
        elif kind == "oversized record":
            self.append_oversized_record(records, data)
        else:
            self.append_oversized_batch(framed=data.draw(st.booleans(), label="framed"))

    def append_oversized_record(self, small: list[NewRecord], data: st.DataObject) -> None:
        excess = data.draw(st.integers(1, 100), label="excess bytes")
        big = NewRecord(b"x" * (self.config.record_max_bytes - EMPTY_RECORD_BYTES + excess))
        at = data.draw(st.integers(0, len(small)), label="position")
        records = [*small[:at], big, *small[at:]]
        if data.draw(st.booleans(), label="framed"):
            # A client-framed batch is checked as a whole first, then record by record.
            error, index = self.predict_framed_error(records)
            assert error is not LogError
            batch, _starts = frame_as_client(records, [(0, 0, 0)] * len(records))
            self.expect_refusal(lambda: self.log.append_framed(batch), error, index)
            return
        refused = self.expect_refusal(lambda: self.log.append(records), RecordTooLargeError, at)
        assert isinstance(refused, RecordTooLargeError)
        assert (refused.size_bytes, refused.limit_bytes) == (
            framed_size(big),
            self.config.record_max_bytes,
        )

    def append_oversized_batch(self, *, framed: bool) -> None:
        # Every record fits the record limit; together they pass the batch limit.
        record = NewRecord(b"b" * (self.config.record_max_bytes - EMPTY_RECORD_BYTES))
        records = [record] * (self.config.batch_max_bytes // self.config.record_max_bytes + 1)
        if framed:
            batch, _starts = frame_as_client(records, [(0, 0, 0)] * len(records))
            self.expect_refusal(lambda: self.log.append_framed(batch), BatchTooLargeError, -1)
        else:
            self.expect_refusal(lambda: self.log.append(records), BatchTooLargeError, -1)

    @rule(damaged=st.data())
    def append_damaged_framed(self, damaged: st.DataObject) -> None:
        """A client-framed batch damaged anywhere, judged by :func:`record_bodies`.

        Damage to the stamped header fields (offset, timestamp, epoch) or a cut between
        records leaves a valid batch, which must be appended; anything else must be refused
        with ``InvalidBatchError`` naming the first malformed record.
        """
        records, batch = damaged.draw(damaged_batches(), label="damaged batch")
        bodies, bad = record_bodies(batch, self.config.record_max_bytes)
        event("damaged framed batch", "refused" if bad >= 0 else "valid")
        if len(batch) > self.config.batch_max_bytes:
            self.expect_refusal(lambda: self.log.append_framed(batch), BatchTooLargeError, -1)
        elif bad >= 0:
            self.expect_refusal(lambda: self.log.append_framed(batch), InvalidBatchError, bad)
        else:
            # Only whole original records can be valid: any other body fails its CRC-32C.
            assert bodies == [encode_body(r) for r in records[: len(bodies)]]
            accepted = records[: len(bodies)]
            self.append_and_record(accepted, lambda: self.log.append_framed(batch))

    @rule(
        calls=st.lists(
            st.tuples(st.lists(NEW_RECORDS, min_size=1, max_size=10), st.booleans()),
            min_size=2,
            max_size=6,
        ),
        close_at=st.none() | st.integers(0, 6),
        budget=BUDGETS,
    )
    def append_concurrently(
        self, calls: list[tuple[list[NewRecord], bool]], close_at: int | None, budget: int
    ) -> None:
        """Appends racing each other (group commit under ALWAYS), a waiting reader, maybe close.

        Appends started before ``close`` must all land (close lets them finish); appends
        started after it either land or are refused with ``LogClosedError``, and what landed
        is in the log after a reopen. A reader waiting at the end wakes up.
        """
        waiter = self.log.reader(len(self.records), committed=False)
        predictions, coroutines = self.prepare_appends(calls)
        if close_at is not None:
            close_at = min(close_at, len(calls))
            coroutines.insert(close_at, self.log.close())

        async def race() -> tuple[list[object], RecordBatch | None]:
            reading = asyncio.ensure_future(waiter.read(budget))  # starts waiting first
            outcomes = await asyncio.gather(*coroutines, return_exceptions=True)
            if not any(isinstance(outcome, AppendResult) for outcome in outcomes):
                waiter.close()  # nothing to wake it
            try:
                woken = await asyncio.wait_for(reading, 5)
            except LogClosedError:
                return outcomes, None
            return outcomes, woken

        outcomes, woken = self.run(race())
        if close_at is not None:
            assert outcomes.pop(close_at) is None
        first_new = len(self.records)
        landed: list[tuple[AppendResult, list[NewRecord]]] = []
        for i, ((records, _framed), error, outcome) in enumerate(
            zip(calls, predictions, outcomes, strict=True)
        ):
            racing_close = close_at is not None and i >= close_at
            if isinstance(outcome, AppendResult):
                assert error is LogError, outcome
                landed.append((outcome, records))
                event("append racing close", "landed" if racing_close else "not racing")
            elif racing_close and isinstance(outcome, LogClosedError):
                event("append racing close", "refused")
            else:
                assert error is not LogError, outcome  # an append started before close lands
                assert isinstance(outcome, error), outcome
        for outcome, records in sorted(landed, key=lambda pair: pair[0].base_offset):
            self.record_append(records, outcome)
        if woken is not None:
            assert woken.first_offset == first_new
            self.check_batch(woken, budget, descending=False)
        elif close_at is None:
            assert len(self.records) == first_new  # only a log without news leaves it waiting
        if close_at is not None:
            self.retire_live_readers()
            self.reopen_clean()
            self.reopened()

    def prepare_appends(
        self, calls: list[tuple[list[NewRecord], bool]]
    ) -> tuple[list[type[LogError]], list[Coroutine[Any, Any, object]]]:
        """The predicted refusal (``LogError``: none) and the append coroutine of each call."""
        predictions: list[type[LogError]] = []
        coroutines: list[Coroutine[Any, Any, object]] = []
        for records, framed in calls:
            if framed:
                batch, _starts = frame_as_client(records, [(0, 0, 0)] * len(records))
                predictions.append(self.predict_framed_error(records)[0])
                coroutines.append(self.log.append_framed(batch))
            else:
                predictions.append(self.predict_frame_error(records)[0])
                coroutines.append(self.log.append(records))
        return predictions, coroutines

    # -- HW, epoch, clock ------------------------------------------------------------------

    @rule(data=st.data())
    def set_high_watermark(self, data: st.DataObject) -> None:
        newest = len(self.records) - 1
        offset = data.draw(st.just(newest) | st.integers(-1, newest + 2), label="HW")
        if offset > newest:
            with pytest.raises(ValueError, match="beyond the newest"):
                self.log.set_high_watermark(offset)
            return
        self.log.set_high_watermark(offset)
        self.hw = max(self.hw, offset)  # a lower value is ignored

    @rule()
    def checkpoint_high_watermark(self) -> None:
        self.log.checkpoint_high_watermark()
        self.checkpointed_hw = self.hw  # what a crash from now on recovers

    @rule(step=st.integers(-1, 3))
    def set_leader_epoch(self, step: int) -> None:
        if step < 0:
            with pytest.raises(ValueError, match="below the current"):
                self.log.set_leader_epoch(self.epoch + step)
            return
        self.log.set_leader_epoch(self.epoch + step)
        self.epoch += step

    @rule(move=st.sampled_from(CLOCK_MOVES), data=st.data())
    def move_clock(self, move: str, data: st.DataObject) -> None:
        now_ns = self.clock.now_ns()
        if move == "forward":
            self.clock.advance(data.draw(st.integers(0, 5000), label="ms") / 1000)
        elif move == "back":
            self.clock.set_ns(now_ns - data.draw(st.integers(1, 10**12), label="ns"))
        elif self.age_ns > 0:  # past the active segment's age: the next append rolls
            first_ns, _last_ns = self.segment_timestamps(len(self.segments) - 1)
            self.clock.set_ns(max(now_ns, first_ns or 0) + self.age_ns)

    # -- reading ---------------------------------------------------------------------------

    def bound(self, *, committed: bool) -> int:
        return self.hw if committed else len(self.records) - 1

    def check_record(self, record: Record) -> None:
        assert 0 <= record.offset < len(self.records)
        expected = self.expected(record.offset)
        assert (record.key, record.value, record.headers) == (
            expected.key,
            expected.value,
            expected.headers,
        )
        assert (record.timestamp_ns, record.leader_epoch) == (
            expected.timestamp_ns,
            expected.leader_epoch,
        )

    def check_batch(self, batch: RecordBatch, budget: int, *, descending: bool) -> None:
        records = list(batch.records())
        assert batch.count == len(records) >= 1
        # Every record the model holds in the batch's range, none skipped.
        offsets = self.present(batch.first_offset, batch.last_offset + 1)
        assert offsets[0] == batch.first_offset
        assert offsets[-1] == batch.last_offset
        assert [r.offset for r in records] == (offsets[::-1] if descending else offsets)
        assert batch.descending is descending
        assert len(batch.data) == sum(self.expected(o).size_bytes for o in offsets)
        assert len(batch.data) <= budget or batch.count == 1
        for record in records:
            self.check_record(record)

    def read_forward(
        self,
        reader: ForwardReader,
        position: int,
        budget: int,
        *,
        committed: bool,
        batches_max: int,
    ) -> tuple[bool, int]:
        """Read up to ``batches_max`` batches, checking each.

        ``position`` is where the model expects the reader to go on: records may have gone
        (retention, compaction) since, but none at or after it may be skipped.

        Returns:
            Whether it caught up, and the position to expect next.
        """
        bound = self.bound(committed=committed)
        for _ in range(batches_max):
            batch = reader.read_nowait(budget)
            if batch is None:
                assert not self.present(position, bound + 1)
                assert not self.present(position, reader.next_offset)
                return True, max(position, reader.next_offset)
            assert batch.first_offset >= position
            assert not self.present(position, batch.first_offset)
            assert batch.last_offset <= bound
            self.check_batch(batch, budget, descending=False)
            assert reader.next_offset == batch.last_offset + 1
            position = reader.next_offset
        return False, position

    def clamp(self, start: int) -> int:
        return min(max(start, self.oldest), len(self.records))

    def drain(self, start: int, budget: int, *, committed: bool) -> None:
        reader = self.log.reader(start, committed=committed)
        clamped = self.clamp(start)
        assert reader.next_offset == clamped
        # Every batch holds a record, so this many reads always reach the end.
        caught_up, _position = self.read_forward(
            reader, clamped, budget, committed=committed, batches_max=len(self.records) + 2
        )
        assert caught_up

    def check_whole_log(self) -> None:
        self.drain(0, WHOLE_LOG_BYTES, committed=False)

    @rule(committed=st.booleans(), budget=BUDGETS, data=st.data())
    def read_from(self, committed: bool, budget: int, data: st.DataObject) -> None:
        start = data.draw(st.integers(-3, len(self.records) + 3), label="start")
        self.drain(start, budget, committed=committed)

    @precondition(lambda self: len(self.live) < LIVE_READERS_MAX)
    @rule(committed=st.booleans(), data=st.data())
    def open_live_reader(self, committed: bool, data: st.DataObject) -> None:
        start = data.draw(st.integers(-1, len(self.records) + 1), label="start")
        reader = self.log.reader(start, committed=committed)
        self.live.append(LiveReader(reader, committed, self.clamp(start)))

    @precondition(lambda self: self.live)
    @rule(budget=BUDGETS, batches_max=st.integers(1, 5), data=st.data())
    def read_live_reader(self, budget: int, batches_max: int, data: st.DataObject) -> None:
        live = self.live[data.draw(st.integers(0, len(self.live) - 1), label="reader")]
        self.read_live(live, budget, batches_max)

    def read_live(self, live: LiveReader, budget: int, batches_max: int) -> None:
        _caught_up, live.position = self.read_forward(
            live.reader, live.position, budget, committed=live.committed, batches_max=batches_max
        )

    @rule(committed=st.booleans(), budget=BUDGETS, data=st.data())
    def read_backwards(self, committed: bool, budget: int, data: st.DataObject) -> None:
        start = data.draw(st.none() | st.integers(-3, len(self.records) + 3), label="start")
        reader = self.log.reverse_reader(start, committed=committed)
        bound = self.bound(committed=committed)
        top = bound if start is None else min(start, bound)
        below = top  # the next batch ends at the newest record at or below it
        for _ in range(len(self.records) + 2):
            batch = self.run(reader.read(budget))
            if batch is None:
                break
            assert batch.last_offset == self.present(self.oldest, below + 1)[-1]
            self.check_batch(batch, budget, descending=True)
            below = batch.first_offset - 1
        else:
            pytest.fail("the reverse reader never returned None")
        assert not self.present(self.oldest, below + 1)
        assert self.run(reader.read(budget)) is None

    @rule(data=st.data())
    def look_up_timestamp(self, data: st.DataObject) -> None:
        offsets = self.present(0, len(self.records))
        timestamps = [self.expected(o).timestamp_ns for o in offsets]
        near_a_record = data.draw(st.booleans(), label="near a record")
        if timestamps and near_a_record:
            i = data.draw(st.integers(0, len(timestamps) - 1), label="record")
            batch = self.log.reader(offsets[i], committed=False).read_nowait(1)
            assert batch is not None
            read_back = next(batch.records()).timestamp_ns
            assert read_back == timestamps[i]
            target = read_back + data.draw(st.integers(-1, 1), label="delta")
        else:
            target = data.draw(I64, label="timestamp")
        found = bisect.bisect_left(timestamps, target)
        expected = offsets[found] if found < len(offsets) else len(self.records)
        assert self.log.offset_for_timestamp(target) == expected

    # -- maintenance: truncation, retention, compaction --------------------------------------

    def reopen_after(self, reopen: str | None) -> None:
        if reopen is not None:
            self.reopen(crash=reopen == "crash")

    def commit_all(self, commit: bool, fill: list[NewRecord] | None = None) -> None:
        """Maybe append keyed batches, then maybe commit everything (compaction's material)."""
        if fill:
            # The same keys twice over, in segments that the second and third appends may seal.
            for _ in range(3):
                self.append_records(fill)
        if commit:
            self.log.set_high_watermark(len(self.records) - 1)
            self.hw = len(self.records) - 1

    @rule(data=st.data(), commit=st.booleans(), reopen=st.sampled_from(REOPENS))
    def truncate(self, data: st.DataObject, commit: bool, reopen: str | None) -> None:
        """A follower's truncation, anywhere from below the oldest offset to past the end."""
        self.commit_all(commit)
        newest = len(self.records) - 1
        below_oldest = st.integers(0, self.oldest - 1) if self.oldest else st.nothing()
        offset = data.draw(st.integers(0, newest + 2) | below_oldest, label="truncate to")
        if data.draw(st.integers(0, 20), label="negative?") == 0:
            with pytest.raises(ValueError, match="negative"):
                self.run(self.log.truncate(-1 - offset))
        self.run(self.log.truncate(offset))
        if offset > newest:
            event("truncate", "past the end")
        elif offset < self.oldest:
            event("truncate", "below the oldest")
            self.segments = [ModelSegment(offset)]
            del self.records[offset:]
        else:
            # The segment holding offset - 1 (or the first) is cut; the later ones go.
            split = max(bisect.bisect_right([s.base_offset for s in self.segments], offset - 1), 1)
            del self.segments[split:]
            del self.records[offset:]
            last = len(self.segments) - 1
            if not self.segment_offsets(last) and self.segments[last].base_offset == offset:
                # Emptied by the cut: it starts over at its own base.
                event("truncate", "emptied the segment it cut")
                self.segments[last].dense = True
            elif not self.segments[last].dense or self.segment_next_offset(last) != offset:
                # A gap before the cut: a new segment keeps the end.
                event("truncate", "into a gap: new segment")
                self.segments.append(ModelSegment(offset))
            else:
                event("truncate", "in place")
        if offset <= newest:
            if self.hw >= offset:
                self.hw = offset - 1
                self.checkpointed_hw = self.hw  # the truncation checkpoints it
            self.clear_latest_epochs(offset)
            for live in self.live:
                live.position = min(live.position, offset)
        next_offset = len(self.records)
        assert self.log.newest_offset + 1 == next_offset
        # A reader's next records are the model's, whatever it read before the cut.
        for live in self.live:
            self.read_live(live, WHOLE_LOG_BYTES, 2)
        if offset <= newest and data.draw(st.booleans(), label="append after"):
            result = self.run(self.log.append([NewRecord(b"after the cut", key=b"a")]))
            assert result.base_offset == next_offset
            self.record_append([NewRecord(b"after the cut", key=b"a")], result)
        self.check_whole_log()
        self.reopen_after(reopen)

    def predict_retention(self) -> int:
        """How many of the oldest segments retention deletes (see ``retention.py``)."""
        config = self.config
        sealed = len(self.segments) - 1
        while sealed > 0 and self.segment_next_offset(sealed - 1) - 1 > self.hw:
            sealed -= 1
        count = 0
        if config.retention_max_age_s > 0:
            cutoff_ns = self.clock.now_ns() - int(config.retention_max_age_s * 1e9)
            while count < sealed:
                _first_ns, last_ns = self.segment_timestamps(count)
                if last_ns is not None and last_ns >= cutoff_ns:
                    break
                count += 1
        measures: list[tuple[int, Callable[[int], int]]] = [
            (config.retention_max_messages, lambda i: len(self.segment_offsets(i))),
            (config.retention_max_bytes, self.segment_size),
        ]
        for limit, measure in measures:
            total = 0
            for i in range(len(self.segments) - 1, -1, -1):
                total += measure(i)
                if limit and total > limit:
                    count = max(count, i + 1)
                    break
        return min(count, sealed)

    def clean_once(self) -> CompactionResult | None:
        """One cleaner run: retention (predicted exactly), then a compaction pass (checked)."""
        assert self.cleaner is not None
        deleted = self.predict_retention()
        cleanable_end = min(self.hw + 1, self.segments[-1].base_offset)
        result = self.run(self.cleaner.run_once())
        if deleted:
            event("retention", "deleted segments")
            new_oldest = self.segments[deleted].base_offset
            assert self.segment_next_offset(deleted - 1) - 1 <= self.hw
            for o in range(self.oldest, new_oldest):
                self.records[o] = None
            del self.segments[:deleted]
            self.clear_earliest_epochs(new_oldest)
        if not self.config.compact_enabled:
            assert result is None
            return None
        assert result is not None
        self.check_compaction(cleanable_end, result)
        return result

    def check_compaction(self, cleanable_end: int, result: CompactionResult) -> None:
        """Compare what a pass left with what it may remove and what it must keep."""
        reader = self.log.reader(0, committed=False)
        survivors: dict[int, Record] = {}
        while (batch := reader.read_nowait(WHOLE_LOG_BYTES)) is not None:
            for record in batch.records():
                survivors[record.offset] = record
        offsets = list(survivors)
        assert offsets == sorted(set(offsets))
        before = self.present(0, len(self.records))
        assert set(offsets) <= set(before)
        for record in survivors.values():
            self.check_record(record)
        now_ns = self.clock.now_ns()
        retention_ns = int(self.config.compact_tombstone_retention_s * 1e9)

        def expired_tombstone(o: int) -> bool:  # keyless records are no tombstones
            record = self.expected(o)
            expired = now_ns - record.timestamp_ns > retention_ns
            return record.key is not None and record.value is None and expired

        newest: dict[bytes, int] = {}
        keyed_count = 0
        for o in before:
            key = self.expected(o).key
            if key is not None and o < cleanable_end:
                newest[key] = o
                keyed_count += 1
        superseded = keyed_count > len(newest)
        event("compaction input", "superseded records" if superseded else "none")
        removed = [o for o in before if o not in survivors]
        for o in removed:
            key = self.expected(o).key
            assert o < cleanable_end, f"removed {o} at or above {cleanable_end}"
            assert key is not None, f"removed keyless record {o}"
            assert newest[key] > o or expired_tombstone(o), f"removed {o}, newest of its key"
        for key, o in newest.items():
            if o not in survivors:
                # A deleted key stays deleted: no older version of it may be left.
                left = [s for s in offsets if s < o and survivors[s].key == key]
                assert not left, f"tombstone {o} of {key!r} dropped, {left} left"
        event("compaction", "removed records" if removed else "nothing removed")
        assert result.records_removed == len(removed)
        self.remove_compacted(removed)
        if not result.key_limit_reached:
            # Every key of the sealed, committed part was mapped: one record per key, and no
            # expired tombstone.
            keys = [self.expected(o).key for o in self.present(0, cleanable_end)]
            keyed = [k for k in keys if k is not None]
            assert len(keyed) == len(set(keyed))
            assert not any(map(expired_tombstone, self.present(0, cleanable_end)))

    def remove_compacted(self, removed: list[int]) -> None:
        """Segments left empty go, the others are rewritten (``dense`` decided again)."""
        touched = {self.segment_of(o) for o in removed}
        for o in removed:
            self.records[o] = None
        for i in sorted(touched, reverse=True):
            if self.segment_offsets(i):
                self.segments[i].dense = self.is_dense(i)
            else:
                del self.segments[i]

    def segment_of(self, offset: int) -> int:
        return bisect.bisect_right([s.base_offset for s in self.segments], offset) - 1

    @rule(
        runs=st.integers(1, 3),
        fill=st.none() | FILLS,
        commit=st.booleans(),
        reopen=st.sampled_from(REOPENS),
    )
    def clean(
        self, runs: int, fill: list[NewRecord] | None, commit: bool, reopen: str | None
    ) -> None:
        """The cleaner, run as its timer would: retention then (if enabled) one pass."""
        self.commit_all(commit, fill)
        for _ in range(runs):
            self.clean_once()
            for live in self.live:  # readers in deleted segments go on at the oldest
                self.read_live(live, 1, 1)
        self.check_whole_log()
        self.reopen_after(reopen)

    @precondition(lambda self: self.config.compact_enabled)
    @rule(fill=st.none() | FILLS, commit=st.booleans(), reopen=st.sampled_from(REOPENS))
    def compact_until_done(
        self, fill: list[NewRecord] | None, commit: bool, reopen: str | None
    ) -> None:
        """Passes until one maps every key left: then the sealed part has one record per key.

        With a small key limit and many keys that may take more passes than this runs; with
        the large one, the first pass maps every key.
        """
        self.commit_all(commit, fill)
        for passes in range(1, COMPACTION_PASSES_MAX + 1):
            result = self.clean_once()
            assert result is not None
            if not result.key_limit_reached:
                event("compaction done after", "1 pass" if passes == 1 else "several passes")
                break
            assert self.config.compact_max_keys < 1000
        else:
            event("compaction done after", "more passes than run")
        self.check_whole_log()
        self.reopen_after(reopen)

    # -- reopening -------------------------------------------------------------------------

    def retire_live_readers(self) -> None:
        """Readers of a closed log refuse to read; forget them."""
        for live in self.live:
            with pytest.raises(LogClosedError):
                live.reader.read_nowait(WHOLE_LOG_BYTES)
        self.live.clear()

    def check_files(self) -> None:
        stems = [segment_name(s.base_offset) for s in self.segments]
        segment_files = {p.name for p in self.directory.iterdir() if p.name[0].isdigit()}
        assert segment_files == {s + LOG_SUFFIX for s in stems} | {s + INDEX_SUFFIX for s in stems}

    @rule(crash=st.booleans())
    def reopen(self, crash: bool) -> None:
        if crash:
            self.reopen_after_crash()
        else:
            self.run(self.log.close())
            self.retire_live_readers()
            self.reopen_clean()
        self.reopened()

    def reopened(self) -> None:
        """Checks and model updates common to every reopen."""
        # Recovery trims the epoch cache to the log's offsets; the epoch after a restart is
        # the latest one that wrote records (the contract only says it never exceeds the
        # epoch before it).
        self.clear_latest_epochs(len(self.records))
        self.clear_earliest_epochs(self.oldest)
        assert 0 <= self.log.leader_epoch <= self.epoch
        assert self.log.leader_epoch == max([e.epoch for e in self.epochs], default=0)
        self.epoch = self.log.leader_epoch
        self.checkpointed_hw = self.hw
        self.rolls_since_open = 0
        # Timestamps continue from the newest record left (truncation may have cut newer).
        offsets = self.present(0, len(self.records))
        self.last_timestamp_ns = self.expected(offsets[-1]).timestamp_ns if offsets else 0
        # An empty newest segment stays (it marks where a truncation ended the log); recovery
        # drops one only after a torn predecessor, which this machine never produces.
        for i, segment in enumerate(self.segments):
            segment.dense = self.is_dense(i)
        self.cleaner = Cleaner(self.log)  # a restarted broker's cleaner starts afresh
        self.check_files()
        self.check_whole_log()

    def reopen_clean(self) -> None:
        """Open the directory of the log that was just closed."""
        self._log = self.run(FileCommitLog.open(self.directory, self.config, self.clock))
        assert (self.log.stats.index_rebuilds, self.log.stats.torn_tail_recoveries) == (0, 0)
        assert self.log.high_watermark == self.hw  # checkpointed by close

    def reopen_after_crash(self) -> None:
        """Open a copy of the directory taken while the log is open, as a crash leaves it."""
        self.crashes += 1
        copy = self.root / f"log-{self.crashes}"
        shutil.copytree(self.directory, copy, copy_function=_copy_if_present)
        crashed, crashed_directory = self.log, self.directory
        self._log = self.run(FileCommitLog.open(copy, self.config, self.clock))
        self.directory = copy
        self.run(crashed.close())
        shutil.rmtree(crashed_directory)
        self.retire_live_readers()
        # Every write reached the file (the page cache survives a process crash), so only
        # the active segment is rescanned and nothing is cut; the HW is the checkpoint's.
        assert (self.log.stats.index_rebuilds, self.log.stats.torn_tail_recoveries) == (1, 0)
        # The contract allows anything in [checkpointed, HW before the crash]; with no
        # background checkpoint it is exactly the last checkpointed value.
        assert self.log.high_watermark == self.checkpointed_hw <= self.hw
        event("crash reopen HW", "lower" if self.log.high_watermark < self.hw else "same")
        self.hw = self.log.high_watermark

    # -- invariants ------------------------------------------------------------------------

    @invariant()
    def offsets_match_the_model(self) -> None:
        assert self.log.oldest_offset == self.oldest
        assert self.log.newest_offset == len(self.records) - 1
        assert self.log.high_watermark == self.hw <= self.log.newest_offset
        assert self.log.leader_epoch == self.epoch
        assert self.log.epochs.entries == self.epochs

    @invariant()
    def segments_match_the_model(self) -> None:
        assert [s.base_offset for s in self.log.segments] == [s.base_offset for s in self.segments]
        assert [s.dense for s in self.log.segments] == [s.dense for s in self.segments]
        active = self.log.segments[-1]
        assert active.log_path.stat().st_size == self.segment_size(len(self.segments) - 1)
        assert self.log.stats.rolls == self.rolls_since_open
        assert len(open_sealed_segments(self.log)) <= self.config.open_segment_handles_max


CommitLogMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=50)
# About 15-30 s when it passes (depending on the seed); shrinking a failure to its shortest
# steps takes longer than the suite's default timeout, which would hide the example.
TestCommitLogModel = pytest.mark.timeout(600)(CommitLogMachine.TestCase)


# -- focused tests for what the machine only hits by chance ---------------------------------

FAST: Final = LogConfig(sync_policy=SyncPolicy.NEVER)


@given(record=NEW_RECORDS)
def test_framed_size_follows_the_documented_layout(record: NewRecord) -> None:
    # The machine predicts rolls and refusals from ``framed_size``; it must be the log's size.
    assert framed_size(record) == record_bytes(record) == HEADER_BYTES + len(encode_body(record))


async def test_a_budget_below_one_header_still_returns_one_record(data_dir: Path) -> None:
    # Regression (bf687ee): the first pread was capped at the budget, so a budget under the
    # 28-byte header returned None while records were readable and read() waited forever.
    log = await FileCommitLog.open(data_dir, FAST)
    try:
        await log.append([NewRecord(b"a"), NewRecord(None, key=b"k"), NewRecord(b"c")])
        log.set_high_watermark(2)
        for committed in (True, False):
            reader = log.reader(0, committed=committed)
            seen: list[tuple[int, int]] = []
            while (batch := reader.read_nowait(1)) is not None:
                seen.append((batch.first_offset, batch.count))
            assert seen == [(0, 1), (1, 1), (2, 1)]
        batch = await asyncio.wait_for(log.reader(1).read(1), 5)
        assert (batch.first_offset, batch.count) == (1, 1)
        backwards = log.reverse_reader()
        seen = []
        while (batch := await backwards.read(1)) is not None:
            seen.append((batch.first_offset, batch.count))
        assert seen == [(2, 1), (1, 1), (0, 1)]
    finally:
        await log.close()


async def test_a_refused_append_does_not_roll_a_full_segment(data_dir: Path) -> None:
    config = LogConfig(sync_policy=SyncPolicy.NEVER, segment_max_bytes=100, record_max_bytes=200)
    log = await FileCommitLog.open(data_dir, config)
    try:
        await log.append([NewRecord(b"f" * 100)])  # 142 bytes: the segment is full
        with pytest.raises(RecordTooLargeError):
            await log.append([NewRecord(b"x" * 200)])
        framed, _starts = frame_as_client([NewRecord(b"y")], [(0, 0, 0)])
        with pytest.raises(InvalidBatchError):
            await log.append_framed(framed[:-1])
        assert ([s.base_offset for s in log.segments], log.stats.rolls) == ([0], 0)
        assert sorted(p.name for p in data_dir.glob(f"*{LOG_SUFFIX}")) == [
            segment_name(0) + LOG_SUFFIX
        ]
        await log.append([NewRecord(b"z")])
        assert [s.base_offset for s in log.segments] == [0, 1]
    finally:
        await log.close()


async def test_client_header_fields_are_restamped_in_a_copy(data_dir: Path) -> None:
    log = await FileCommitLog.open(data_dir, FAST, ManualClock(start_ns=5_000))
    try:
        log.set_leader_epoch(7)
        junk = (2**64 - 1, -(2**63), 2**64 - 1)
        batch, _starts = frame_as_client([NewRecord(b"a"), NewRecord(b"b")], [junk, junk])
        sent = bytes(batch)
        result = await log.append_framed(batch)
        assert batch == sent
        read = log.reader(0, committed=False).read_nowait(WHOLE_LOG_BYTES)
        assert read is not None
        stamped = [(r.offset, r.timestamp_ns, r.leader_epoch) for r in read.records()]
        assert stamped == [(0, 5_000, 7), (1, 5_000, 7)]
        assert result == AppendResult(0, 1, 5_000)
    finally:
        await log.close()


async def test_timestamps_never_go_back_across_reopens(data_dir: Path, tmp_path: Path) -> None:
    clock = ManualClock()
    log = await FileCommitLog.open(data_dir, FAST, clock)
    first = await log.append([NewRecord(b"a")])
    await log.close()
    clock.set_ns(first.timestamp_ns - 10**12)  # the wall clock stepped back while we were down
    log = await FileCommitLog.open(data_dir, FAST, clock)
    second = await log.append([NewRecord(b"b")])
    copy = tmp_path / "crashed"
    shutil.copytree(data_dir, copy)  # a crash: no close, no clean-shutdown marker
    await log.close()
    log = await FileCommitLog.open(copy, FAST, clock)
    try:
        third = await log.append([NewRecord(b"c")])
        assert first.timestamp_ns == second.timestamp_ns == third.timestamp_ns
        assert log.offset_for_timestamp(first.timestamp_ns) == 0
        assert log.offset_for_timestamp(first.timestamp_ns + 1) == 3
    finally:
        await log.close()


async def test_equal_timestamps_over_many_segments_find_the_earliest(data_dir: Path) -> None:
    clock = ManualClock()
    config = LogConfig(sync_policy=SyncPolicy.NEVER, segment_max_bytes=100)
    log = await FileCommitLog.open(data_dir, config, clock)
    try:
        for _ in range(12):
            await log.append([NewRecord(b"s" * 60)])  # one record per segment
        now_ns = clock.now_ns()
        assert len(log.segments) == 12
        assert log.offset_for_timestamp(now_ns - 1) == 0
        assert log.offset_for_timestamp(now_ns) == 0
        assert log.offset_for_timestamp(now_ns + 1) == 12
        clock.advance(1)
        await log.append([NewRecord(b"later")])
        assert log.offset_for_timestamp(now_ns + 1) == 12
    finally:
        await log.close()


async def test_a_torn_checkpoint_write_keeps_the_previous_hw(
    data_dir: Path, tmp_path: Path
) -> None:
    log = await FileCommitLog.open(data_dir, FAST)
    await log.append([NewRecord(b"a"), NewRecord(b"b")])
    log.set_high_watermark(0)
    await log.close()
    log = await FileCommitLog.open(data_dir, FAST)
    log.set_high_watermark(1)
    # A crash in the middle of the next checkpoint write: its temp file is half written.
    (data_dir / f"{HW_CHECKPOINT_FILE}.tmp").write_bytes(b"1")
    copy = tmp_path / "crashed"
    shutil.copytree(data_dir, copy)
    await log.close()
    recovered = await FileCommitLog.open(copy, FAST)
    try:
        assert (recovered.newest_offset, recovered.high_watermark) == (1, 0)
        assert not (copy / f"{HW_CHECKPOINT_FILE}.tmp").exists()
    finally:
        await recovered.close()


async def test_close_waits_for_a_checkpoint_in_flight(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression (9e97ffa): close() cancelled the checkpoint task but not the write it had
    # started in a thread, which then landed after close's own and put an older HW on disk.
    write_int = checkpoint.write_int
    held, later_write_done, held_write_done = (threading.Event() for _ in range(3))

    def hold_the_first_write(path: Path, value: int) -> None:
        if held.is_set():
            write_int(path, value)
            later_write_done.set()
            return
        held.set()
        # Released as soon as another write (close's) is done, so a close that does not wait
        # lets this older value land last; a close that waits runs into the timeout instead.
        later_write_done.wait(0.5)
        write_int(path, value)
        held_write_done.set()

    monkeypatch.setattr(checkpoint, "write_int", hold_the_first_write)
    config = LogConfig(sync_policy=SyncPolicy.NEVER, hw_checkpoint_interval_s=0.001)
    log = await FileCommitLog.open(data_dir, config)
    await log.append([NewRecord(b"a"), NewRecord(b"b")])
    log.set_high_watermark(0)
    await wait_for(held.is_set, 5, message="the checkpointer to start writing HW 0")
    log.set_high_watermark(1)
    await log.close()  # checkpoints HW 1
    await wait_for(held_write_done.is_set, 5, message="the checkpoint write that was held")
    reopened = await FileCommitLog.open(data_dir, FAST)
    try:
        assert reopened.high_watermark == 1
    finally:
        await reopened.close()


async def test_timestamp_lookups_keep_sealed_handles_bounded(data_dir: Path) -> None:
    # Regression (before efb52f3): Segment.index reopened a sealed segment's handles behind
    # the LRU's back, so they stayed open past the bound. The machine shrank it to: read
    # everything, then look up a timestamp that lands in the first segment.
    config = LogConfig(
        sync_policy=SyncPolicy.NEVER, segment_max_bytes=100, open_segment_handles_max=1
    )
    log = await FileCommitLog.open(data_dir, config)
    try:
        for _ in range(3):
            await log.append([NewRecord(b"s" * 60)])  # one record per segment
        reader = log.reader(0, committed=False)
        while reader.read_nowait(WHOLE_LOG_BYTES) is not None:
            pass
        assert open_sealed_segments(log) == [1]  # the LRU closed segment 0
        assert log.offset_for_timestamp(0) == 0
        assert len(open_sealed_segments(log)) <= config.open_segment_handles_max
    finally:
        await log.close()


async def test_readers_inside_sealed_segments_keep_handles_bounded(data_dir: Path) -> None:
    # Regression (before efb52f3): a reader went on reading its cached sealed segment after the
    # LRU had closed it, reopening its handles behind the LRU's back.
    config = LogConfig(
        sync_policy=SyncPolicy.NEVER, segment_max_bytes=200, open_segment_handles_max=1
    )
    log = await FileCommitLog.open(data_dir, config)
    try:
        for _ in range(12):
            await log.append([NewRecord(b"v" * 50)])  # 92 bytes: three records per segment
        assert [s.base_offset for s in log.segments] == [0, 3, 6, 9]
        readers = [log.reader(base, committed=False) for base in (0, 3, 6)]
        for _ in range(2):  # a budget of one record keeps each reader inside its segment
            for reader in readers:
                assert reader.read_nowait(1) is not None
        assert len(open_sealed_segments(log)) <= config.open_segment_handles_max
    finally:
        await log.close()


@settings(max_examples=200)
@given(damaged=damaged_batches(), record_max_bytes=st.integers(EMPTY_RECORD_BYTES, 400))
def test_damaged_framed_batches_are_judged_by_the_documented_layout(
    damaged: tuple[list[NewRecord], bytes], record_max_bytes: int
) -> None:
    records, batch = damaged
    bodies, bad = record_bodies(batch, record_max_bytes)
    config = LogConfig(sync_policy=SyncPolicy.NEVER, record_max_bytes=record_max_bytes)

    async def append(directory: Path) -> AppendResult | LogError:
        log = await FileCommitLog.open(directory, config)
        try:
            return await log.append_framed(batch)
        except LogError as refused:
            assert log.newest_offset == -1
            return refused
        finally:
            await log.close()

    with tempfile.TemporaryDirectory(prefix="flux-log-framed-") as directory:
        outcome = asyncio.run(append(Path(directory)))
    if bad >= 0:
        assert isinstance(outcome, InvalidBatchError)
        assert outcome.index == bad
    else:
        assert isinstance(outcome, AppendResult)
        assert (outcome.base_offset, outcome.last_offset) == (0, len(bodies) - 1)
        assert bodies == [encode_body(r) for r in records[: len(bodies)]]


async def test_a_framed_batch_ending_in_a_short_record_is_invalid(data_dir: Path) -> None:
    # Regression (efb52f3 and before): the fast path of check_and_stamp (null key, magic 1)
    # unpacked the value length at byte 38 before checking the batch held it, so this batch
    # raised struct.error instead of InvalidBatchError. Hypothesis shrank it to a header
    # claiming an empty body, then CRC, magic 1, attributes and a null key length: 38 bytes.
    batch = HEADER.pack(0, 0, 0, 0) + struct.pack(">Ibbi", 0xAEE6ED8C, 1, 0, -1)
    log = await FileCommitLog.open(data_dir, FAST)
    try:
        with pytest.raises(InvalidBatchError) as refused:
            await log.append_framed(batch)
        assert refused.value.index == 0
        assert log.newest_offset == -1
    finally:
        await log.close()


# -- bugs found by the maintenance rules of the machine (which steers around them) ----------


def read_everything(log: FileCommitLog, budget: int = WHOLE_LOG_BYTES) -> list[RecordBatch]:
    reader = log.reader(0, committed=False)
    batches: list[RecordBatch] = []
    while (batch := reader.read_nowait(budget)) is not None:
        batches.append(batch)
    return batches


async def test_reopen_after_truncating_behind_a_compaction_gap_keeps_the_end(
    data_dir: Path,
) -> None:
    # Regression: _truncate_segments starts an empty segment at the cut when the segment it
    # cut ends before it (compaction removed offset 1 here), so that the end survives a
    # restart; recovery used to drop trailing empty segments, so the reopened log ended at 0,
    # the HW checkpoint (1) was lowered, and offset 1 was handed out again.
    config = LogConfig(sync_policy=SyncPolicy.NEVER, segment_max_bytes=100, compact_enabled=True)
    log = await FileCommitLog.open(data_dir, config)
    await log.append([NewRecord(b"a", key=b"A"), NewRecord(b"b", key=b"B")])
    await log.append([NewRecord(b"b" * 60, key=b"B")])  # offset 2 supersedes offset 1
    await log.append([NewRecord(b"c" * 60)])  # rolls: segments 0 (0..2) and 3
    log.set_high_watermark(log.newest_offset)
    await Cleaner(log).run_once()  # segment 0 keeps offsets 0 and 2
    await log.truncate(2)  # segment 0 keeps offset 0; a new segment starts at 2
    assert (log.newest_offset, log.high_watermark) == (1, 1)
    await log.close()
    log = await FileCommitLog.open(data_dir, config)
    try:
        assert (log.newest_offset, log.high_watermark) == (1, 1)
        assert (await log.append([NewRecord(b"new")])).base_offset == 2
    finally:
        await log.close()


async def test_compaction_after_a_truncation_keeps_deleted_keys_deleted(data_dir: Path) -> None:
    # Regression: the cleaner maps keys from where its last pass stopped (3 here). It used to
    # notice a truncation below that (to 1) only if the log was still shorter at the next
    # pass; here it grew back, so the tombstone of A written at 1 was never mapped, the old
    # value of A at 0 never removed -- and the expired tombstone was, so A came back to life.
    clock = ManualClock()
    config = LogConfig(
        sync_policy=SyncPolicy.NEVER,
        segment_max_bytes=1,  # one record per segment
        compact_enabled=True,
        compact_tombstone_retention_s=0,
        retention_max_age_s=0,
    )
    log = await FileCommitLog.open(data_dir, config, clock)
    try:
        before: list[tuple[bytes | None, bytes | None]] = [
            (b"A", b"old"), (b"B", b"x"), (b"C", b"y"), (None, b"z")
        ]  # fmt: skip
        for key, value in before:
            await log.append([NewRecord(value, key=key)])
        log.set_high_watermark(3)
        cleaner = Cleaner(log)
        await cleaner.run_once()  # maps offsets 0..2: the next pass starts at 3
        await log.truncate(1)
        after: list[tuple[bytes | None, bytes | None]] = [
            (b"A", None), (None, b"p"), (None, b"q"), (None, b"r")
        ]  # fmt: skip
        for key, value in after:
            await log.append([NewRecord(value, key=key)])  # a tombstone of A at 1
        log.set_high_watermark(4)
        clock.advance(1)  # the tombstone has expired
        await cleaner.run_once()
        left = [(r.offset, r.key) for b in read_everything(log) for r in b.records()]
        assert (0, b"A") not in left
    finally:
        await log.close()


async def test_a_batch_read_across_a_compaction_gap_names_its_first_record(
    data_dir: Path,
) -> None:
    # Regression (dab752f): a forward reader going on inside a segment (without relocating by
    # the index) took its next offset as the batch's first_offset; after compaction removed
    # that offset the batch starts later: first_offset was 1 while the batch held only 2.
    config = LogConfig(sync_policy=SyncPolicy.NEVER, segment_max_bytes=1000, compact_enabled=True)
    log = await FileCommitLog.open(data_dir, config)
    try:
        await log.append([NewRecord(b"a", key=b"J"), NewRecord(b"b", key=b"K")])
        await log.append([NewRecord(b"c", key=b"K"), NewRecord(b"d" * 1000)])  # 1 superseded
        await log.append([NewRecord(b"e")])  # rolls: segment 0 holds 0..3
        log.set_high_watermark(log.newest_offset)
        await Cleaner(log).run_once()
        for batch in read_everything(log, budget=1):  # one record per batch
            assert batch.first_offset == next(batch.records()).offset
    finally:
        await log.close()
