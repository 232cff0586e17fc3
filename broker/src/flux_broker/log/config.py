"""Configuration of one commit log: sizes, ages, durability and limits, with units in names."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = ["LogConfig", "SyncPolicy"]

MIB: Final = 1024 * 1024


class SyncPolicy(enum.StrEnum):
    """When appended data is forced to disk (``streams.sync.policy``).

    - ``ALWAYS``: group commit. An append returns only after its bytes are fsynced; appends
      that arrive while an fsync runs share the next one. Survives power loss.
    - ``INTERVAL``: fsync every ``sync_interval_s`` when something was written. A power loss
      loses at most that window; a process crash loses nothing (the page cache survives it).
    - ``NEVER``: page cache only, as Liftbridge does; the OS decides when to write.
    """

    ALWAYS = "always"
    INTERVAL = "interval"
    NEVER = "never"


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Settings of one partition's commit log.

    Attributes:
        segment_max_bytes: Roll to a new segment before an append once the active one holds
            this many bytes (``streams.segment.max.bytes``; Liftbridge's default, 256 MiB).
        segment_max_age_s: Roll once the active segment's first record is this old
            (``streams.segment.max.age``; 0 = never by age). Default one week, Liftbridge's.
        sync_policy: Durability policy; see :class:`SyncPolicy`. Default ``ALWAYS``: measured
            here, group commit costs little with batched appends (see docs/internals).
        sync_interval_s: Period of ``INTERVAL`` syncs (``streams.sync.interval``).
        record_max_bytes: Largest record, header included (Liftbridge's
            ``clustering.replication.max.bytes`` default, 1 MiB).
        batch_max_bytes: Largest appended batch (``streams.batch.max.bytes``), 8 MiB.
        read_max_bytes: Default byte budget of one reader batch, 1 MiB.
        open_segment_handles_max: Sealed segments kept open for reading at once; older ones are
            closed and reopened on demand (the active segment is always open).
        hw_checkpoint_interval_s: How often the high watermark is checkpointed (and on close).
        retention_max_bytes: Delete the oldest segments while the log is larger
            (``streams.retention.max.bytes``; 0 = no limit).
        retention_max_messages: Delete the oldest segments while the log holds more records
            (``streams.retention.max.messages``; 0 = no limit).
        retention_max_age_s: Delete segments whose newest record is older
            (``streams.retention.max.age``; 0 = no limit). Default one week, Liftbridge's.
        cleaner_interval_s: How often retention and compaction run (``streams.cleaner.interval``).
        compact_enabled: Keep only the newest record per key (``streams.compact.enabled``).
        compact_tombstone_retention_s: How long a tombstone (a record with a null value) is kept
            after it was written before compaction drops it too
            (``streams.compact.tombstone.retention``); one day, Kafka's ``delete.retention.ms``,
            so that consumers that were down for less than that still see deletions.
        compact_max_keys: Keys a compaction pass tracks at most (about 100 bytes of memory each,
            so ~100 MiB at the default). Past it, the pass compacts only the oldest segments
            whose keys fit and leaves the rest for the next pass.
    """

    segment_max_bytes: int = 256 * MIB
    segment_max_age_s: float = 7 * 24 * 3600.0
    sync_policy: SyncPolicy = SyncPolicy.ALWAYS
    sync_interval_s: float = 1.0
    record_max_bytes: int = 1 * MIB
    batch_max_bytes: int = 8 * MIB
    read_max_bytes: int = 1 * MIB
    open_segment_handles_max: int = 64
    hw_checkpoint_interval_s: float = 5.0
    retention_max_bytes: int = 0
    retention_max_messages: int = 0
    retention_max_age_s: float = 7 * 24 * 3600.0
    cleaner_interval_s: float = 300.0
    compact_enabled: bool = False
    compact_tombstone_retention_s: float = 24 * 3600.0
    compact_max_keys: int = 1_000_000

    def __post_init__(self) -> None:
        """Reject settings that cannot work, naming the setting."""
        positive = {
            "segment_max_bytes": self.segment_max_bytes,
            "sync_interval_s": self.sync_interval_s,
            "record_max_bytes": self.record_max_bytes,
            "batch_max_bytes": self.batch_max_bytes,
            "read_max_bytes": self.read_max_bytes,
            "open_segment_handles_max": self.open_segment_handles_max,
            "hw_checkpoint_interval_s": self.hw_checkpoint_interval_s,
            "cleaner_interval_s": self.cleaner_interval_s,
            "compact_max_keys": self.compact_max_keys,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        not_negative = {
            "segment_max_age_s": self.segment_max_age_s,
            "retention_max_bytes": self.retention_max_bytes,
            "retention_max_messages": self.retention_max_messages,
            "retention_max_age_s": self.retention_max_age_s,
            "compact_tombstone_retention_s": self.compact_tombstone_retention_s,
        }
        for name, value in not_negative.items():
            if value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if self.segment_max_bytes + self.batch_max_bytes > 2**31 - 1:
            # Index positions are i32 and a segment may pass its limit by one batch.
            raise ValueError("segment_max_bytes + batch_max_bytes must stay below 2 GiB")
        if not isinstance(self.sync_policy, SyncPolicy):
            raise ValueError(f"unknown sync policy {self.sync_policy!r}")
