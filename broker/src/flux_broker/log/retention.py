"""Retention: which old segments to delete, by age, record count and size.

Whole segments only, never the active one, checked in Liftbridge's order:

1. **age** (``retention_max_age_s``): from the oldest segment forward, every segment whose
   newest record is older than the limit; stops at the first younger one.
2. **records** (``retention_max_messages``): walking back from the newest segment (the
   active one included) and adding up records, the first segment that takes the total over the
   limit and every older one.
3. **bytes** (``retention_max_bytes``): the same with segment sizes.

A limit of 0 disables its check. The log deletes the union (the longest prefix), but only
segments entirely at or below the high watermark: records nobody could read yet (or that a
follower still needs) are never deleted, as in Kafka.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flux_broker.log.config import LogConfig
from flux_broker.log.segment import Segment

__all__ = ["segments_to_delete"]


def segments_to_delete(
    segments: Sequence[Segment], config: LogConfig, now_ns: int, high_watermark: int
) -> int:
    """How many of the oldest ``segments`` retention deletes (never the last one)."""
    sealed = len(segments) - 1
    while sealed > 0 and segments[sealed - 1].next_offset - 1 > high_watermark:
        sealed -= 1  # segments holding uncommitted records stay
    count = 0
    if config.retention_max_age_s > 0:
        cutoff_ns = now_ns - int(config.retention_max_age_s * 1e9)
        while count < sealed:
            newest_ns = segments[count].last_timestamp_ns
            if newest_ns is not None and newest_ns >= cutoff_ns:
                break
            count += 1
    for limit, measure in (
        (config.retention_max_messages, _records),
        (config.retention_max_bytes, _bytes),
    ):
        if limit > 0:
            count = max(count, _over_limit(segments, limit, measure))
    return min(count, sealed)


def _records(segment: Segment) -> int:
    return segment.records


def _bytes(segment: Segment) -> int:
    return segment.size_bytes


def _over_limit(segments: Sequence[Segment], limit: int, measure: Callable[[Segment], int]) -> int:
    total = 0
    for i in range(len(segments) - 1, -1, -1):
        total += measure(segments[i])
        if total > limit:
            return i + 1  # this segment and every older one go
    return 0
