"""Opening a log directory after any shutdown: the repairs a crash can need.

Never raises for damaged data (see :mod:`flux_broker.log.segment` for the per-segment rules):

- leftover temporary files of interrupted atomic writes are deleted;
- an index without its log is deleted;
- an empty newest segment (a crash right after a roll) is dropped, so the one before it is
  recovered as the active segment;
- the HW checkpoint is clamped to the recovered log (and the corrected value written back);
- the leader-epoch cache is rebuilt from the records if its checkpoint is unusable, and
  trimmed to the log.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from flux_broker.log import checkpoint
from flux_broker.log.compaction import CLEANED_SUFFIX
from flux_broker.log.leader_epoch import CHECKPOINT_FILE as EPOCH_CHECKPOINT_FILE
from flux_broker.log.leader_epoch import EpochEntry, LeaderEpochCache
from flux_broker.log.segment import INDEX_SUFFIX, LOG_SUFFIX, Segment, segment_name

__all__ = ["CLEAN_SHUTDOWN_FILE", "HW_CHECKPOINT_FILE", "LogStats", "recover"]

HW_CHECKPOINT_FILE: Final = "replication-offset-checkpoint"
CLEAN_SHUTDOWN_FILE: Final = "clean-shutdown"
_SEGMENT_FILE: Final = re.compile(r"^(\d{20})\.(log|index)$")
_LEFTOVER_SUFFIXES: Final = (".tmp", ".rebuild", CLEANED_SUFFIX)

_log = logging.getLogger(__name__)


@dataclass(slots=True)
class LogStats:
    """Counters the broker exports as metrics.

    Attributes:
        corrupt_records: Reads that stopped at a record failing its checks.
        torn_tail_recoveries: Opens that cut a torn or corrupt tail off the active segment.
        cut_bytes: The bytes those cuts removed.
        corrupt_segments: Sealed segments recovery found corrupt (reads stop there).
        index_rebuilds: Indexes rebuilt from their log at open.
        rolls: Segments rolled.
        write_failures: Appends the disk refused (nothing of them was kept).
    """

    corrupt_records: int = 0
    torn_tail_recoveries: int = 0
    cut_bytes: int = 0
    corrupt_segments: int = 0
    index_rebuilds: int = 0
    rolls: int = 0
    write_failures: int = 0


def _is_empty_segment(directory: Path, base: int) -> bool:
    return (directory / (segment_name(base) + LOG_SUFFIX)).stat().st_size == 0


def _drop_segment_files(directory: Path, base: int) -> None:
    for suffix in (LOG_SUFFIX, INDEX_SUFFIX):
        (directory / (segment_name(base) + suffix)).unlink(missing_ok=True)


def _recover_epochs(directory: Path, segments: list[Segment]) -> LeaderEpochCache:
    """Load the epoch cache, rebuilding it from the records' epochs if the file is bad."""
    epochs, valid = LeaderEpochCache.load(directory / EPOCH_CHECKPOINT_FILE)
    if not valid and any(segment.records for segment in segments):
        starts: list[EpochEntry] = []
        for segment in segments:
            for epoch, offset in segment.epoch_starts():
                if not starts or epoch > starts[-1].epoch:
                    starts.append(EpochEntry(epoch, offset))
        epochs.replace(starts)
    epochs.clear_latest(segments[-1].next_offset)
    epochs.clear_earliest(segments[0].base_offset)
    return epochs


def recover(directory: Path) -> tuple[list[Segment], int, LogStats, LeaderEpochCache]:
    """Open every segment of ``directory`` (blocking), repairing crash damage.

    Returns:
        The segments (oldest first; the last one active), the HW, the recovery counters and
        the leader-epoch cache.
    """
    """Open every segment of ``directory`` (blocking), repairing crash damage."""
    stats = LogStats()
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / CLEAN_SHUTDOWN_FILE
    clean = marker.exists()
    bases: set[int] = set()
    for path in directory.iterdir():
        if path.name.endswith(_LEFTOVER_SUFFIXES):
            path.unlink()  # an interrupted atomic write; its target is intact
            continue
        match = _SEGMENT_FILE.match(path.name)
        if match and match.group(2) == "log":
            bases.add(int(match.group(1)))
    for path in directory.glob(f"*{INDEX_SUFFIX}"):
        if _SEGMENT_FILE.match(path.name) and not path.with_suffix(LOG_SUFFIX).exists():
            path.unlink()  # an index without its log
    ordered = sorted(bases)
    if len(ordered) > 1 and _is_empty_segment(directory, ordered[-1]):
        # An empty newest segment is either a crash right after a roll, or the end marker a
        # truncation left after a compaction gap. Only in the first case can the segment
        # before it have a torn tail (under sync policy "never" its data was not synced before
        # the new file was created): then drop the empty segment, so the one before it is
        # recovered as the active segment and its tail cut. Otherwise keep the marker.
        probe = Segment.recover(directory, ordered[-2], active=False, trust=True)
        if probe.corrupt_from is not None:
            _drop_segment_files(directory, ordered.pop())
    segments: list[Segment] = []
    for i, base in enumerate(ordered):
        active = i == len(ordered) - 1
        segment = Segment.recover(directory, base, active=active, trust=clean or not active)
        stats.index_rebuilds += segment.rebuilt_index
        stats.torn_tail_recoveries += segment.cut_bytes > 0
        stats.cut_bytes += segment.cut_bytes
        stats.corrupt_segments += segment.corrupt_from is not None
        if segments and segment.base_offset < segments[-1].next_offset:
            _log.error(
                "%s: segment %d overlaps its predecessor; ignoring the log beyond it",
                directory,
                base,
            )
            break
        segments.append(segment)
    if not segments:
        segments.append(Segment.create(directory, 0))
    segments[-1].active = True
    segments[-1].open_handles()
    newest = segments[-1].next_offset - 1
    stored_hw = checkpoint.read_int(directory / HW_CHECKPOINT_FILE)
    hw = -1 if stored_hw is None else min(max(stored_hw, -1), newest)
    if stored_hw is not None and stored_hw != hw:
        # Write the corrected value now: records appended later must not look committed.
        _log.warning("%s: HW checkpoint %d beyond the log; using %d", directory, stored_hw, hw)
        checkpoint.write_int(directory / HW_CHECKPOINT_FILE, hw)
    if clean:
        marker.unlink()
    epochs = _recover_epochs(directory, segments)
    checkpoint.fsync_dir(directory)
    return segments, hw, stats, epochs
