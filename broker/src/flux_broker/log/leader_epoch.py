"""The leader-epoch cache of a partition (Kafka KIP-101), with its checkpoint file.

Each entry says "leader epoch E wrote its first record at offset S". Epochs only grow and start
offsets never decrease. A follower that rejoins asks the leader where its last epoch ended
(:meth:`LeaderEpochCache.end_offset_for_epoch`) and truncates there, which is what prevents the
divergent logs that truncating to the high watermark allowed (KIP-101's "fast leader
re-election" and "divergence" scenarios).

The checkpoint ``leader-epoch-checkpoint`` is Liftbridge's text format: a version line ``0``,
a line with the entry count, then one ``<epoch> <start offset>`` line per entry. It is rewritten
atomically on every change and read tolerantly: a missing, empty or garbage file is reported
and yields an empty cache, which the log then rebuilds from the epochs stamped in its records.
"""

from __future__ import annotations

import bisect
import itertools
import logging
from pathlib import Path
from typing import Final, NamedTuple

from flux_broker.log import checkpoint

__all__ = ["CHECKPOINT_FILE", "UNDEFINED", "EpochEntry", "LeaderEpochCache"]

CHECKPOINT_FILE: Final = "leader-epoch-checkpoint"
_VERSION: Final = 0
#: Returned for an epoch or offset the cache knows nothing about.
UNDEFINED: Final = -1

_log = logging.getLogger(__name__)


class EpochEntry(NamedTuple):
    """Epoch ``epoch`` wrote its first record at ``start_offset``."""

    epoch: int
    start_offset: int


class LeaderEpochCache:
    """Epoch → start offset, kept in memory and in its checkpoint file."""

    def __init__(self, path: Path, entries: list[EpochEntry] | None = None) -> None:
        """Wrap ``entries`` (ordered); use :meth:`load` to read the checkpoint."""
        self.path = path
        self._entries: list[EpochEntry] = list(entries or [])

    @classmethod
    def load(cls, path: Path) -> tuple[LeaderEpochCache, bool]:
        """Read the checkpoint at ``path``.

        Returns:
            The cache and whether the file was valid (``False``: missing or unreadable, so
            the caller should rebuild the cache from the log).
        """
        entries = _parse(path)
        return cls(path, entries or []), entries is not None

    @property
    def entries(self) -> list[EpochEntry]:
        """A copy of the entries, oldest first."""
        return list(self._entries)

    @property
    def latest_epoch(self) -> int:
        """The newest epoch, or ``UNDEFINED`` when empty."""
        return self._entries[-1].epoch if self._entries else UNDEFINED

    def assign(self, epoch: int, start_offset: int) -> bool:
        """Record that ``epoch`` starts at ``start_offset``; persist; return whether it changed.

        An epoch at or below the latest one, or a start offset below the latest entry's, is
        ignored with a warning (they can only come from a bug or a stale leader). If the
        latest epoch wrote nothing (same start offset), its entry is replaced.
        """
        before = list(self._entries)
        if self._entries:
            latest = self._entries[-1]
            if epoch <= latest.epoch:
                if epoch < latest.epoch:
                    _log.warning(
                        "%s: epoch %d is older than %d; ignored", self.path, epoch, latest.epoch
                    )
                return False
            if start_offset < latest.start_offset:
                _log.warning(
                    "%s: epoch %d would start at %d, before epoch %d's %d; ignored",
                    self.path, epoch, start_offset, latest.epoch, latest.start_offset,
                )  # fmt: skip
                return False
            if start_offset == latest.start_offset:
                self._entries.pop()
        self._entries.append(EpochEntry(epoch, start_offset))
        try:
            self.flush()
        except OSError:
            # Not on disk, so not assigned: the next append assigns it again (a full disk).
            self._entries = before
            raise
        return True

    def end_offset_for_epoch(self, epoch: int, log_end_offset: int) -> tuple[int, int]:
        """Where ``epoch`` ended, as Kafka answers OffsetsForLeaderEpoch (KIP-101, KIP-279).

        Args:
            epoch: The epoch asked about (a follower's latest).
            log_end_offset: The log's newest offset + 1.

        Returns:
            ``(epoch found, end offset)``, the end offset being exclusive:

            - the latest epoch: ``(epoch, log_end_offset)``;
            - an older epoch: the largest known epoch ``<= epoch`` and the start offset of the
              first epoch after it;
            - an epoch older than every entry: ``(epoch, first entry's start offset)``;
            - an epoch newer than the latest, or an empty cache: ``(UNDEFINED, UNDEFINED)``.
        """
        if not self._entries or epoch > self._entries[-1].epoch or epoch < 0:
            return UNDEFINED, UNDEFINED
        if epoch == self._entries[-1].epoch:
            return epoch, log_end_offset
        epochs = [entry.epoch for entry in self._entries]
        i = bisect.bisect_right(epochs, epoch)  # the first entry with a larger epoch
        found = self._entries[i - 1].epoch if i else epoch
        return found, self._entries[i].start_offset

    def last_offset_for_leader_epoch(self, epoch: int, log_end_offset: int) -> int:
        """The exclusive end offset of ``epoch`` (see :meth:`end_offset_for_epoch`)."""
        return self.end_offset_for_epoch(epoch, log_end_offset)[1]

    def clear_latest(self, end_offset: int) -> None:
        """Forget epochs starting at or after ``end_offset`` (after truncating the log there)."""
        kept = [entry for entry in self._entries if entry.start_offset < end_offset]
        if kept != self._entries:
            self._entries = kept
            self.flush()

    def clear_earliest(self, start_offset: int) -> None:
        """Forget what lies before ``start_offset`` (after retention deleted it).

        The epoch covering ``start_offset`` is kept and moved to start there.
        """
        covering = bisect.bisect_right([e.start_offset for e in self._entries], start_offset)
        if covering == 0:
            return
        kept = self._entries[covering - 1 :]
        if kept[0].start_offset < start_offset:
            kept[0] = EpochEntry(kept[0].epoch, start_offset)
        if kept != self._entries:
            self._entries = kept
            self.flush()

    def replace(self, entries: list[EpochEntry]) -> None:
        """Replace every entry (after rebuilding the cache from the log) and persist."""
        self._entries = list(entries)
        self.flush()

    def flush(self) -> None:
        """Write the checkpoint atomically."""
        lines = [str(_VERSION), str(len(self._entries))]
        lines += [f"{entry.epoch} {entry.start_offset}" for entry in self._entries]
        checkpoint.write_atomic(self.path, ("\n".join(lines) + "\n").encode("ascii"))


def _parse(path: Path) -> list[EpochEntry] | None:
    try:
        text = path.read_bytes().decode("ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        _log.warning("%s unreadable (%s); rebuilding the epoch cache from the log", path, exc)
        return None
    lines = text.split()
    try:
        version, count = int(lines[0]), int(lines[1])
        pairs = [(int(lines[i]), int(lines[i + 1])) for i in range(2, len(lines), 2)]
    except (IndexError, ValueError):
        pairs, version, count = [], -1, -1
    entries = [EpochEntry(epoch, offset) for epoch, offset in pairs]
    ordered = all(
        a.epoch < b.epoch and a.start_offset <= b.start_offset
        for a, b in itertools.pairwise(entries)
    )
    if version != _VERSION or count != len(entries) or len(lines) % 2 or not ordered:
        _log.warning("%s is not a valid epoch checkpoint; rebuilding it from the log", path)
        return None
    return entries
