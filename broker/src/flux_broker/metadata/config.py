"""Per-stream configuration overrides, as a CreateStreamRequest carries them.

Every field is optional: ``None`` means "not set in the request, use the server's default"
(the ``streams.*`` keys), exactly like Liftbridge's ``Nullable*`` wrappers. Values keep the
request's units, so a stored config is what the client asked for, not what the server's
defaults resolved it to at the time: changing a server default later changes every stream that
did not override it, as in Liftbridge. Durations are milliseconds, as Liftbridge's clients send
them (``retentionMaxAge`` etc.).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final

__all__ = ["FLAG_FIELDS", "INT32_MAX", "INT64_MAX", "StreamConfig"]

INT32_MAX: Final = 2**31 - 1  # NullableInt32 fields
INT64_MAX: Final = 2**63 - 1  # NullableInt64 fields; also SQLite's INTEGER range


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamConfig:
    """A stream's configuration overrides (CreateStreamRequest fields 6-18).

    Attributes:
        retention_max_bytes: Log size cap (``streams.retention.max.bytes``; 0 = no limit).
        retention_max_messages: Record count cap (``streams.retention.max.messages``).
        retention_max_age_ms: Segment TTL (``streams.retention.max.age``).
        cleaner_interval_ms: Retention and compaction period (``streams.cleaner.interval``).
        segment_max_bytes: Segment roll size (``streams.segment.max.bytes``).
        segment_max_age_ms: Segment roll age (``streams.segment.max.age``).
        compact_max_goroutines: Compaction parallelism (``streams.compact.max.goroutines``).
        compact_enabled: Key compaction on or off (``streams.compact.enabled``).
        auto_pause_time_ms: Idle time before a partition pauses (``streams.auto.pause.time``).
        auto_pause_disable_if_subscribers: Never auto-pause while subscribed
            (``streams.auto.pause.disable.if.subscribers``).
        min_isr: ISR size needed to commit (``clustering.min.insync.replicas``).
        optimistic_concurrency_control: Check ``expectedOffset`` on publish
            (``streams.concurrency.control``).
        encryption: Encrypt values at rest (``streams.encryption``).
    """

    retention_max_bytes: int | None = None
    retention_max_messages: int | None = None
    retention_max_age_ms: int | None = None
    cleaner_interval_ms: int | None = None
    segment_max_bytes: int | None = None
    segment_max_age_ms: int | None = None
    compact_max_goroutines: int | None = None
    compact_enabled: bool | None = None
    auto_pause_time_ms: int | None = None
    auto_pause_disable_if_subscribers: bool | None = None
    min_isr: int | None = None
    optimistic_concurrency_control: bool | None = None
    encryption: bool | None = None

    @staticmethod
    def field_names() -> tuple[str, ...]:
        """Names of every field, in declaration order (also the store's column names)."""
        return tuple(f.name for f in dataclasses.fields(StreamConfig))

    def problems(self) -> list[tuple[str, str]]:
        """Return ``(field, reason)`` for every value out of its type or range (empty if none).

        Integers must be non-negative and fit the request's wire type (int32 for
        ``compact_max_goroutines`` and ``min_isr``, int64 otherwise); flags must be ``bool``.
        Policy limits (for example ``min_isr`` against the replication factor) are the API
        layer's to enforce, with Liftbridge's status codes.
        """
        found: list[tuple[str, str]] = []
        for name in self.field_names():
            value = getattr(self, name)
            if value is None:
                continue
            kind = _FIELD_KINDS[name]
            if kind is bool:
                if not isinstance(value, bool):
                    found.append((name, f"must be a bool, not {type(value).__name__}"))
            elif not isinstance(value, int) or isinstance(value, bool):
                found.append((name, f"must be an int, not {type(value).__name__}"))
            elif not 0 <= value <= kind:
                found.append((name, f"{value} is outside [0, {kind}]"))
        return found


# bool for flags, else the field's largest value.
_FIELD_KINDS: Final[dict[str, type[bool] | int]] = {
    "retention_max_bytes": INT64_MAX,
    "retention_max_messages": INT64_MAX,
    "retention_max_age_ms": INT64_MAX,
    "cleaner_interval_ms": INT64_MAX,
    "segment_max_bytes": INT64_MAX,
    "segment_max_age_ms": INT64_MAX,
    "compact_max_goroutines": INT32_MAX,
    "compact_enabled": bool,
    "auto_pause_time_ms": INT64_MAX,
    "auto_pause_disable_if_subscribers": bool,
    "min_isr": INT32_MAX,
    "optimistic_concurrency_control": bool,
    "encryption": bool,
}
assert set(_FIELD_KINDS) == set(StreamConfig.field_names())

#: The boolean fields (stored as 0/1).
FLAG_FIELDS: Final = frozenset(name for name, kind in _FIELD_KINDS.items() if kind is bool)
