"""The cleaner: every ``cleaner_interval_s``, retention then compaction, for one log.

It never blocks appends or reads: retention only deletes files, and compaction does its
reading and writing in a worker thread, swapping the result in on the event loop. The log's
``maintenance_lock`` keeps it from overlapping a truncation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from flux_broker.log.compaction import (
    CLEANED_SUFFIX,
    CompactionPlan,
    CompactionResult,
    SegmentFiles,
    compact,
)
from flux_broker.log.retention import segments_to_delete

if TYPE_CHECKING:
    from flux_broker.log.commitlog import FileCommitLog

__all__ = ["Cleaner"]

_log = logging.getLogger(__name__)


class Cleaner:
    """Runs retention and compaction for one log, periodically or on demand."""

    def __init__(self, log: FileCommitLog) -> None:
        """Prepare the cleaner of ``log``; :meth:`start` runs it periodically."""
        self._log = log
        self._task: asyncio.Task[None] | None = None
        self.runs = 0
        self._first_dirty_offset = 0  # where the next compaction pass starts mapping keys
        self._generation = log.generation  # the log's truncation count when last planned

    def start(self) -> None:
        """Run every ``cleaner_interval_s`` until :meth:`stop`."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="log-cleaner")

    async def stop(self) -> None:
        """Stop the periodic runs, waiting for one in progress to finish its current step."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._log.config.cleaner_interval_s)
            try:
                await self.run_once()
            except OSError:
                _log.exception("%s: cleaning failed; retrying next interval", self._log.directory)

    async def run_once(self) -> CompactionResult | None:
        """Apply retention, then (if enabled) one compaction pass; return the pass's result."""
        log = self._log
        async with log.maintenance_lock:
            if log.closed:
                return None
            self.runs += 1
            doomed = segments_to_delete(
                log.segments, log.config, log.clock.now_ns(), log.high_watermark
            )
            log.delete_oldest(doomed)
            if not log.config.compact_enabled:
                return None
            return await self._compact()

    async def _compact(self) -> CompactionResult:
        log = self._log
        config = log.config
        sealed = log.segments[:-1]
        if self._generation != log.generation:
            # Records from a truncation's cut on were written anew: map them again.
            cut = log.truncated_since(self._generation)
            if cut is not None:
                self._first_dirty_offset = min(self._first_dirty_offset, cut)
            self._generation = log.generation
        plan = CompactionPlan(
            segments=[
                SegmentFiles(
                    s.base_offset, s.next_offset, s.log_path, s.size_bytes, sealed=not s.active
                )
                for s in log.segments
            ],
            high_watermark=log.high_watermark,
            now_ns=log.clock.now_ns(),
            tombstone_retention_ns=int(config.compact_tombstone_retention_s * 1e9),
            max_keys=config.compact_max_keys,
            # A truncation may have cut below where the last pass stopped.
            first_dirty_offset=max(
                min(self._first_dirty_offset, log.newest_offset + 1), log.oldest_offset
            ),
        )
        result = await asyncio.to_thread(compact, plan)
        self._first_dirty_offset = result.next_dirty_offset
        by_base = {segment.base_offset: segment for segment in sealed}
        for base in result.cleaned:
            segment = by_base[base]
            cleaned_log = segment.log_path.with_name(segment.log_path.name + CLEANED_SUFFIX)
            cleaned_index = segment.index_path.with_name(segment.index_path.name + CLEANED_SUFFIX)
            log.replace_segment(segment, cleaned_log, cleaned_index)
        if result.cleaned:
            _log.info(
                "%s: compaction rewrote %d segment(s), removed %d record(s) (%d bytes)%s",
                log.directory,
                len(result.cleaned),
                result.records_removed,
                result.bytes_reclaimed,
                "; key limit reached, more next pass" if result.key_limit_reached else "",
            )
        return result
