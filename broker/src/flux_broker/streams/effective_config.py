"""A stream's effective settings: its CreateStream overrides over the broker's defaults.

FetchMetadata reports them in the Flux extension ``StreamMetadata.effectiveConfig``, so a user
sees what a stream actually runs with, not only what its creator asked for. A stream stores only
its overrides (:class:`~flux_broker.metadata.StreamConfig`): changing a broker default changes
every stream that did not override it, as in Liftbridge.
"""

from __future__ import annotations

from typing import Final

from flux_broker.config import Config
from flux_broker.metadata import StreamConfig
from flux_proto import api_pb2

__all__ = ["defaults", "effective_config"]

_MS_PER_S: Final = 1000


def _ms(seconds: float) -> int:
    return round(seconds * _MS_PER_S)


def defaults(config: Config) -> StreamConfig:
    """The broker's defaults for every stream setting (the ``streams.*`` keys), fully set."""
    return StreamConfig(
        retention_max_bytes=config.integer("streams.retention.max.bytes"),
        retention_max_messages=config.integer("streams.retention.max.messages"),
        retention_max_age_ms=_ms(config.seconds("streams.retention.max.age")),
        cleaner_interval_ms=_ms(config.seconds("streams.cleaner.interval")),
        segment_max_bytes=config.integer("streams.segment.max.bytes"),
        segment_max_age_ms=_ms(config.seconds("streams.segment.max.age")),
        compact_max_goroutines=config.integer("streams.compact.max.goroutines"),
        compact_enabled=config.boolean("streams.compact.enabled"),
        auto_pause_time_ms=_ms(config.seconds("streams.auto.pause.time")),
        auto_pause_disable_if_subscribers=config.boolean(
            "streams.auto.pause.disable.if.subscribers"
        ),
        min_isr=config.integer("clustering.min.insync.replicas"),
        optimistic_concurrency_control=config.boolean("streams.concurrency.control"),
        encryption=config.boolean("streams.encryption"),
    )


def effective_config(
    server: StreamConfig, overrides: StreamConfig
) -> api_pb2.EffectiveStreamConfig:
    """The settings a stream runs with: each override where set, the server's value elsewhere.

    Args:
        server: The broker's defaults, from :func:`defaults`.
        overrides: What the stream's CreateStreamRequest set.
    """

    def pick(name: str) -> int | bool:
        value = getattr(overrides, name)
        chosen = getattr(server, name) if value is None else value
        assert chosen is not None, name
        return chosen  # type: ignore[no-any-return]

    return api_pb2.EffectiveStreamConfig(
        retentionMaxBytes=pick("retention_max_bytes"),
        retentionMaxMessages=pick("retention_max_messages"),
        retentionMaxAge=pick("retention_max_age_ms"),
        cleanerInterval=pick("cleaner_interval_ms"),
        segmentMaxBytes=pick("segment_max_bytes"),
        segmentMaxAge=pick("segment_max_age_ms"),
        compactMaxGoroutines=pick("compact_max_goroutines"),
        compactEnabled=bool(pick("compact_enabled")),
        autoPauseTime=pick("auto_pause_time_ms"),
        autoPauseDisableIfSubscribers=bool(pick("auto_pause_disable_if_subscribers")),
        minIsr=pick("min_isr"),
        optimisticConcurrencyControl=bool(pick("optimistic_concurrency_control")),
        encryption=bool(pick("encryption")),
    )
