"""The file-backed commit log of one partition (the :class:`~.contract.CommitLog` contract).

Directory ``<data.dir>/streams/<stream>/<partition>/`` holds the segments
(``<20-digit base offset>.log`` + ``.index``), the HW checkpoint
``replication-offset-checkpoint`` and, after a clean shutdown, the marker ``clean-shutdown``.

Appends run on the event loop: the batch is framed (or, client-framed, verified), the segment
rolled first if it is full or old, and the bytes written with one ``write`` -- then the sync
policy decides when the append returns. Opening is blocking file work and runs in a thread.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

from flux_broker.clock import Clock, SystemClock
from flux_broker.log import checkpoint
from flux_broker.log.cleaner import Cleaner
from flux_broker.log.config import LogConfig, SyncPolicy
from flux_broker.log.contract import AppendGuard, AppendResult, Traffic
from flux_broker.log.errors import (
    BatchTooLargeError,
    CorruptRecordError,
    LogClosedError,
    LogWriteError,
    write_failed,
)
from flux_broker.log.format import (
    INDEX_ENTRY_BYTES,
    NewRecord,
    Placement,
    check_and_stamp,
    frame,
)
from flux_broker.log.leader_epoch import CHECKPOINT_FILE as EPOCH_CHECKPOINT_FILE
from flux_broker.log.leader_epoch import LeaderEpochCache
from flux_broker.log.reader import ForwardReader, ReverseReader
from flux_broker.log.recovery import (
    CLEAN_SHUTDOWN_FILE,
    HW_CHECKPOINT_FILE,
    LogStats,
    recover,
)
from flux_broker.log.segment import (
    HandleCache,
    Segment,
)
from flux_broker.log.syncer import Syncer

__all__ = ["CLEAN_SHUTDOWN_FILE", "HW_CHECKPOINT_FILE", "FileCommitLog", "LogStats"]


_log = logging.getLogger(__name__)


class FileCommitLog:
    """A segmented commit log in one directory. Create it with :meth:`open`."""

    def __init__(
        self, directory: Path, config: LogConfig, clock: Clock, segments: list[Segment]
    ) -> None:
        """Assemble a recovered log; use :meth:`open`."""
        self.directory = directory
        self.config = config
        self.clock = clock
        self.segments = segments
        self._bases = [segment.base_offset for segment in segments]
        self.stats = LogStats()
        #: Every record written, counted per batch; the owner may share one across reopens.
        self.written = Traffic()
        self.closed = False
        self._high_watermark = -1
        self._leader_epoch = 0
        self._last_timestamp_ns = max(
            (s.last_timestamp_ns for s in segments if s.last_timestamp_ns is not None), default=0
        )
        self._handles = HandleCache(config.open_segment_handles_max)
        for segment in segments:
            segment.handle_cache = self._handles
        self._uncommitted_event = asyncio.Event()
        self._committed_event = asyncio.Event()
        self._syncer = Syncer(config.sync_policy, config.sync_interval_s, self._active_fd)
        self._checkpointer: asyncio.Task[None] | None = None
        self._checkpoint_write: asyncio.Future[None] | None = None
        self._checkpoint_lock = threading.Lock()
        self.epochs = LeaderEpochCache(directory / EPOCH_CHECKPOINT_FILE)
        #: Grows on every truncation, so readers notice that offsets they passed may return.
        self.generation = 0
        # (generation, offset) of recent truncations; older ones are folded into the floor.
        self._truncations: collections.deque[tuple[int, int]] = collections.deque(maxlen=1024)
        self._truncation_floor: int | None = None
        #: Held by truncation, retention and compaction: one maintenance operation at a time.
        self.maintenance_lock = asyncio.Lock()
        self._cleaner: Cleaner | None = None
        self._checkpointed_hw: int | None = None
        self._append_lock = asyncio.Lock()
        self._write_failing = False  # the last append failed (logged once per run)
        self._checkpoint_failing = False  # the last HW checkpoint failed (logged once per run)

    # -- opening and closing -------------------------------------------------------------

    @classmethod
    async def open(
        cls, directory: Path, config: LogConfig | None = None, clock: Clock | None = None
    ) -> FileCommitLog:
        """Open (creating if needed) the log in ``directory``, recovering from any crash.

        Recovery never raises for damaged data: torn tails are cut, bad indexes rebuilt, bad
        checkpoints ignored (see :mod:`flux_broker.log.segment`). ``OSError`` is raised only
        when the directory itself cannot be used.
        """
        config = config or LogConfig()
        segments, hw, stats, epochs = await asyncio.to_thread(recover, directory)
        log = cls(directory, config, clock or SystemClock(), segments)
        log.stats = stats
        log.epochs = epochs
        log._leader_epoch = max(epochs.latest_epoch, 0)
        log._high_watermark = hw
        log._checkpointed_hw = hw
        log._syncer.start()
        log._checkpointer = asyncio.create_task(log._checkpoint_loop(), name="log-hw-checkpoint")
        log._cleaner = Cleaner(log)
        log._cleaner.start()
        return log

    async def close(self) -> None:
        """Sync, checkpoint the HW, mark a clean shutdown and release every file (idempotent)."""
        if self.closed:
            return
        if self._cleaner is not None:
            await self._cleaner.stop()
        async with self.maintenance_lock, self._append_lock:  # let work in progress finish
            self.closed = True
        self.wake_readers()
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
        if self._checkpoint_write is not None:
            with contextlib.suppress(OSError):
                await self._checkpoint_write
        await self._syncer.stop()
        await asyncio.to_thread(self._sync_active)
        # Appends still waiting for a sync see it done and return; none can start another.
        self._syncer.mark_durable()
        await asyncio.to_thread(self._close_files)

    def _sync_active(self) -> None:
        active = self.segments[-1]
        os.fdatasync(active.log_fd())
        os.fsync(active.index.fileno())

    def _close_files(self) -> None:
        self.checkpoint_high_watermark()
        checkpoint.write_atomic(self.directory / CLEAN_SHUTDOWN_FILE, b"clean\n")
        for segment in self.segments:
            segment.close_handles()

    # -- offsets ---------------------------------------------------------------------------

    @property
    def oldest_offset(self) -> int:
        """First offset held."""
        return self.segments[0].base_offset

    @property
    def newest_offset(self) -> int:
        """Last written offset; -1 when empty."""
        return self.segments[-1].next_offset - 1

    @property
    def high_watermark(self) -> int:
        """Last committed offset; -1 when nothing is committed."""
        return self._high_watermark

    @property
    def leader_epoch(self) -> int:
        """Epoch stamped on appended records."""
        return self._leader_epoch

    def set_leader_epoch(self, epoch: int) -> None:
        """Stamp ``epoch`` on records appended from now on (epochs only grow)."""
        if epoch < self._leader_epoch:
            raise ValueError(f"leader epoch {epoch} is below the current {self._leader_epoch}")
        self._leader_epoch = epoch

    def set_high_watermark(self, offset: int) -> None:
        """Move the HW forward to ``offset`` and wake committed readers."""
        if offset > self.newest_offset:
            raise ValueError(f"HW {offset} is beyond the newest offset {self.newest_offset}")
        if offset > self._high_watermark:
            self._high_watermark = offset
            self._committed_event.set()
            self._committed_event = asyncio.Event()

    def checkpoint_high_watermark(self) -> None:
        """Write the HW checkpoint now (blocking: temp file, fsync, rename).

        Thread-safe: the periodic checkpoint runs in a worker thread while truncation and
        close write from the loop; the lock serialises them and each writes the HW current
        when it gets the lock, so an older value can never land last.
        """
        with self._checkpoint_lock:
            hw = self._high_watermark
            if hw != self._checkpointed_hw:
                checkpoint.write_int(self.directory / HW_CHECKPOINT_FILE, hw)
                self._checkpointed_hw = hw

    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.hw_checkpoint_interval_s)
            if self._high_watermark != self._checkpointed_hw:
                # The write runs in a thread that cancellation cannot stop: keep it, so close()
                # can wait for it before writing the final value (else an older HW could land
                # last).
                self._checkpoint_write = asyncio.ensure_future(
                    asyncio.to_thread(self.checkpoint_high_watermark)
                )
                try:
                    await asyncio.shield(self._checkpoint_write)
                except OSError as error:
                    # A full disk fails every checkpoint until space is freed: once per run.
                    if not self._checkpoint_failing:
                        self._checkpoint_failing = True
                        _log.warning(
                            "%s: HW checkpoint failed (%s); retrying every interval, quietly "
                            "until it succeeds",
                            self.directory,
                            error,
                        )
                else:
                    if self._checkpoint_failing:
                        self._checkpoint_failing = False
                        _log.info("%s: HW checkpoint succeeds again", self.directory)

    # -- appending -----------------------------------------------------------------------

    async def append(
        self, records: Sequence[NewRecord], *, guard: AppendGuard | None = None
    ) -> AppendResult:
        """Frame and append ``records`` with one write (see the contract)."""
        if not records:
            raise ValueError("append needs at least one record")
        async with self._append_lock:
            self._check_open()
            at, roll = self._placement()
            if guard is not None:
                guard.check(at.base_offset)
            data, entries = frame(
                records, at, self.config.record_max_bytes, self.config.batch_max_bytes
            )
            result = self._write(data, entries, len(records), at, roll)
            if guard is not None:
                guard.written(result)
        await self._syncer.after_append()
        return result

    async def append_framed(
        self, data: bytes | bytearray, *, guard: AppendGuard | None = None
    ) -> AppendResult:
        """Append a client-framed batch, verified and stamped (see the contract)."""
        result = await self.write_framed(data, guard=guard)
        await self.wait_durable()
        return result

    async def write_framed(
        self, data: bytes | bytearray, *, guard: AppendGuard | None = None
    ) -> AppendResult:
        """:meth:`append_framed` without waiting for durability: call :meth:`wait_durable`.

        Lets a writer write batches in order while their fsyncs overlap (group commit).
        """
        if len(data) > self.config.batch_max_bytes:
            raise BatchTooLargeError(len(data), self.config.batch_max_bytes)
        batch = bytearray(data)  # stamped in place: never the caller's buffer
        async with self._append_lock:
            self._check_open()
            at, roll = self._placement()
            if guard is not None:
                guard.check(at.base_offset)
            entries = check_and_stamp(batch, at, self.config.record_max_bytes)
            count = len(entries) // INDEX_ENTRY_BYTES
            result = self._write(batch, entries, count, at, roll)
            if guard is not None:
                guard.written(result)
        return result

    async def wait_durable(self) -> None:
        """Return once every write made before the call is durable per the sync policy.

        Raises:
            LogWriteError: The fsync failed.
        """
        await self._syncer.after_append()

    def _placement(self) -> tuple[Placement, bool]:
        """Where the next batch goes, and whether the active segment must roll first."""
        active = self.segments[-1]
        now_ns = self.clock.now_ns()
        timestamp_ns = max(now_ns, self._last_timestamp_ns)
        roll = active.size_bytes > 0 and (
            active.size_bytes >= self.config.segment_max_bytes
            or (
                self.config.segment_max_age_s > 0
                and active.first_timestamp_ns is not None
                and now_ns - active.first_timestamp_ns >= self.config.segment_max_age_s * 1e9
            )
        )
        base = active.next_offset
        at = Placement(
            base_offset=base,
            timestamp_ns=timestamp_ns,
            leader_epoch=self._leader_epoch,
            segment_base_offset=base if roll else active.base_offset,
            segment_position=0 if roll else active.size_bytes,
        )
        return at, roll

    def _write(
        self, data: bytearray, entries: bytes, count: int, at: Placement, roll: bool
    ) -> AppendResult:
        last_offset = at.base_offset + count - 1
        try:
            if roll:
                self._roll()
            if at.leader_epoch > self.epochs.latest_epoch:
                # Before the write, as Kafka does: after a crash, recovery drops entries past
                # the log's end, but could not restore one that was never written.
                try:
                    self.epochs.assign(at.leader_epoch, at.base_offset)
                except OSError as exc:
                    raise write_failed(f"epoch checkpoint of {self.directory}", exc) from exc
            self.segments[-1].append(data, entries, last_offset + 1, at.timestamp_ns)
        except LogWriteError as error:
            self._note_write_failure(error)
            raise
        if self._write_failing:
            self._write_failing = False
            _log.info("%s: appends succeed again", self.directory)
        self._last_timestamp_ns = at.timestamp_ns
        written = self.written
        written.records += count
        written.bytes += len(data)
        self._syncer.note_write()
        self._uncommitted_event.set()
        self._uncommitted_event = asyncio.Event()
        return AppendResult(at.base_offset, last_offset, at.timestamp_ns)

    def _note_write_failure(self, error: LogWriteError) -> None:
        """Count a failed append; log the first of a run of them (a full disk fails many)."""
        self.stats.write_failures += 1
        if not self._write_failing:
            self._write_failing = True
            _log.warning(
                "%s: %s; nothing of the batch was kept, and appends fail until the cause is "
                "gone (free space, for a full disk); reads go on",
                self.directory,
                error,
            )

    def _roll(self) -> None:
        """Seal the active segment and start a new one at the next offset.

        Raises:
            LogWriteError: A file could not be written, synced or created (a full disk); the
                log is as it was, and no file of the new segment is left behind.
        """
        old = self.segments[-1]
        try:
            old.index.flush()  # sealing writes nothing after this, so it cannot fail halfway
            if self.config.sync_policy is not SyncPolicy.NEVER:
                # Its data must not wait for a sync of the new file; its index is sealed for
                # good.
                os.fdatasync(old.log_fd())
                os.fsync(old.index.fileno())
            new = self._new_segment(old.next_offset)
        except OSError as exc:
            raise write_failed(f"roll of {self.directory}", exc) from exc
        try:
            checkpoint.fsync_dir(self.directory)
        except OSError as exc:
            new.discard()
            raise write_failed(f"roll of {self.directory}", exc) from exc
        old.seal()
        self.segments.append(new)
        self._bases.append(new.base_offset)
        self.stats.rolls += 1
        _log.debug("%s: rolled to segment %d", self.directory, new.base_offset)

    # -- maintenance -----------------------------------------------------------------------

    async def truncate(self, offset: int) -> None:
        """Remove every record with an offset ``>= offset`` (a follower's truncation).

        Whole later segments are deleted (newest first, so a crash leaves a prefix of the
        log), then the segment holding ``offset`` is cut in place. The HW moves back to at most
        ``offset - 1`` and epochs starting at or after ``offset`` are forgotten. Readers past
        the new end wait there for the records that will take those offsets again.

        Raises:
            ValueError: ``offset`` is negative.
        """
        if offset < 0:
            raise ValueError(f"cannot truncate to a negative offset ({offset})")
        async with self.maintenance_lock, self._append_lock:
            self._check_open()
            if offset > self.newest_offset:
                return
            self._truncate_segments(offset)
            checkpoint.fsync_dir(self.directory)
            self._bases = [segment.base_offset for segment in self.segments]
            if self._high_watermark >= offset:
                self._high_watermark = min(offset - 1, self.newest_offset)
                self.checkpoint_high_watermark()
            self.epochs.clear_latest(offset)
            self.generation += 1
            if len(self._truncations) == self._truncations.maxlen:
                _gen, folded = self._truncations[0]
                floor = self._truncation_floor
                self._truncation_floor = folded if floor is None else min(floor, folded)
            self._truncations.append((self.generation, offset))
            self._syncer.mark_durable()  # everything left was synced by the cut
            _log.info("%s: truncated to offset %d", self.directory, offset)
        self.wake_readers()

    def _truncate_segments(self, offset: int) -> None:
        """Cut the files so that the log ends at ``offset`` (see :meth:`truncate`).

        Every intermediate state is a valid log holding a prefix of the old one (or, when
        everything goes, the old log plus an empty first segment), so a crash at any point
        recovers to a log that the truncation can simply be repeated on.
        """
        if offset < self.oldest_offset:
            # Everything goes. The new first segment exists before anything is deleted, so a
            # crash can never bring the log back at offset 0.
            fresh = self._new_segment(offset)
            checkpoint.fsync_dir(self.directory)
            for segment in reversed(self.segments):
                segment.delete_files()
            self.segments = [fresh]
            return
        split = bisect.bisect_right(self._bases, offset - 1) if offset > 0 else 0
        split = max(split, 1)  # the segment holding offset - 1 (or the first) stays
        for segment in reversed(self.segments[split:]):  # newest first: a prefix remains
            segment.delete_files()
        del self.segments[split:]
        last = self.segments[-1]
        if not last.active:  # reopen it writable
            last.close_handles()
            last.active = True
            last.open_handles()
        last.truncate_to(offset)
        if last.records == 0 and last.base_offset == offset:
            last.dense = True  # emptied: it simply starts over at its own base
        elif not last.dense or last.next_offset != offset:
            # A compacted segment, or one ending before ``offset`` (compaction removed what
            # followed it), does not prove where the log ends: start a new active segment at
            # ``offset`` so that the end survives a restart and no offset is reused.
            last.seal()
            self.segments.append(self._new_segment(offset))

    def truncated_since(self, generation: int) -> int | None:
        """The lowest offset truncated away after ``generation``, or ``None``."""
        lowest = [offset for gen, offset in self._truncations if gen > generation]
        folded_away = bool(self._truncations) and generation < self._truncations[0][0] - 1
        if folded_away and self._truncation_floor is not None:
            lowest.append(self._truncation_floor)
        return min(lowest, default=None)

    def _new_segment(self, base_offset: int) -> Segment:
        segment = Segment.create(self.directory, base_offset)
        segment.handle_cache = self._handles
        return segment

    def delete_oldest(self, count: int) -> None:
        """Delete the ``count`` oldest segments (retention); never the active one.

        Readers inside a deleted segment move on to the new oldest offset.
        """
        count = min(count, len(self.segments) - 1)
        if count <= 0:
            return
        doomed, self.segments = self.segments[:count], self.segments[count:]
        self._bases = self._bases[count:]
        for segment in doomed:
            segment.delete_files()
        checkpoint.fsync_dir(self.directory)
        self.epochs.clear_earliest(self.oldest_offset)
        _log.info(
            "%s: retention deleted %d segment(s); oldest offset is now %d",
            self.directory,
            count,
            self.oldest_offset,
        )

    def replace_segment(self, old: Segment, cleaned_log: Path, cleaned_index: Path) -> None:
        """Swap a compacted copy in for the sealed segment ``old`` (log first, then index).

        An empty copy removes the segment. Readers of ``old`` notice (``holds``) and
        reposition by offset in its replacement.
        """
        assert not old.active
        assert self.holds(old)
        i = self.segments.index(old)
        old.close_handles()
        if cleaned_log.stat().st_size == 0:
            cleaned_log.unlink()
            cleaned_index.unlink()
            old.delete_files()
            del self.segments[i]
            del self._bases[i]
        else:
            cleaned_log.replace(old.log_path)
            cleaned_index.replace(old.index_path)
            new = Segment.recover(self.directory, old.base_offset, active=False, trust=True)
            new.handle_cache = self._handles
            self.segments[i] = new
        checkpoint.fsync_dir(self.directory)

    def _active_fd(self) -> int:
        return self.segments[-1].log_fd()

    def _check_open(self) -> None:
        if self.closed:
            raise LogClosedError(f"log {self.directory} is closed")

    # -- reading ---------------------------------------------------------------------------

    def reader(self, start_offset: int, *, committed: bool = True) -> ForwardReader:
        """A forward reader from ``start_offset``, clamped into ``[oldest, newest + 1]``."""
        self._check_open()
        start = min(max(start_offset, self.oldest_offset), self.newest_offset + 1)
        return ForwardReader(self, start, committed=committed)

    def reverse_reader(
        self, start_offset: int | None = None, *, committed: bool = True
    ) -> ReverseReader:
        """A reader from ``start_offset`` (default: HW, or newest) back to the oldest."""
        self._check_open()
        bound = self._high_watermark if committed else self.newest_offset
        start = bound if start_offset is None else min(start_offset, bound)
        return ReverseReader(self, start, committed=committed)

    def offset_for_timestamp(self, timestamp_ns: int) -> int:
        """Earliest offset whose timestamp is ``>= timestamp_ns``; newest + 1 if none."""
        self._check_open()
        for segment in self.segments:
            if segment.last_timestamp_ns is None or segment.last_timestamp_ns < timestamp_ns:
                continue
            i = segment.index.find_timestamp(timestamp_ns)
            if i is not None:
                return segment.base_offset + segment.index.entry(i).relative_offset
        return self.newest_offset + 1

    def data_event(self, *, committed: bool) -> asyncio.Event:
        """The event set at the next HW move (committed) or append (uncommitted)."""
        return self._committed_event if committed else self._uncommitted_event

    def wake_readers(self) -> None:
        """Wake every waiting reader (they re-check their state)."""
        for event in (self._committed_event, self._uncommitted_event):
            event.set()
        self._committed_event = asyncio.Event()
        self._uncommitted_event = asyncio.Event()

    def segment_after(self, segment: Segment) -> Segment | None:
        """The segment following ``segment``, or ``None`` for the active one."""
        i = bisect.bisect_right(self._bases, segment.base_offset)
        return self.segment_for(self._bases[i]) if i < len(self._bases) else None

    def check_not_corrupt(self, segment: Segment, offset: int) -> None:
        """Raise if ``offset`` lies in the part of ``segment`` that recovery found corrupt.

        Raises:
            CorruptRecordError: It does (counted in ``stats.corrupt_records``).
        """
        if segment.corrupt_from is not None and offset >= segment.corrupt_from:
            error = CorruptRecordError(
                segment.corrupt_from, segment.log_path, segment.size_bytes, "found by recovery"
            )
            self.report_corruption(error)
            raise error

    def report_corruption(self, error: CorruptRecordError) -> None:
        """Log and count a corrupt record a reader stopped at (the reader then raises it)."""
        self.stats.corrupt_records += 1
        _log.error("%s: read stopped before a corrupt record: %s", self.directory, error)

    def locate(self, segment: Segment, offset: int) -> tuple[int, int, int] | None:
        """``(entry, position, offset)`` of the first record at or after ``offset``.

        In a dense segment the index must name ``offset`` itself; if it does not, the index is
        damaged and is rebuilt from the log before answering.
        """
        located = segment.position_of(offset)
        if (
            segment.dense
            and offset < segment.next_offset
            and (located is None or located[2] != offset)
        ):
            self.rebuild_index(segment)
            located = segment.position_of(offset)
        return located

    def rebuild_index(self, segment: Segment) -> None:
        """Rebuild ``segment``'s index from its log (after finding it inconsistent)."""
        _log.warning("%s: index inconsistent with its log; rebuilding it", segment.index_path)
        segment.rebuild_index()
        self.stats.index_rebuilds += 1

    def holds(self, segment: Segment) -> bool:
        """Whether ``segment`` is still one of the log's segments."""
        i = bisect.bisect_left(self._bases, segment.base_offset)
        return i < len(self.segments) and self.segments[i] is segment

    def segment_for(self, offset: int) -> Segment:
        """The segment that holds ``offset`` (or the first after it), with open handles."""
        i = max(bisect.bisect_right(self._bases, offset) - 1, 0)
        segment = self.segments[i]
        if not segment.active:
            self.touch(segment)
        return segment

    def touch(self, segment: Segment) -> None:
        """Mark a sealed segment as just read (for the open-handle LRU), opening it if needed."""
        segment.open_handles()
        self._handles.used(segment)
