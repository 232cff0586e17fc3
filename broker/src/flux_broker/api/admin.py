"""CreateStream and DeleteStream: validate the request completely, then apply one command.

Validation order follows Liftbridge (reference ``liftbridge-api.md`` §1.3, §3) with the
precedence rules of DESIGN.md §4: name, subject, replication factor, partitions, then the
per-stream overrides. Nothing is written before every check has passed, so a bad request
creates nothing: no metadata row, no directory.
"""

from __future__ import annotations

from typing import Final

from flux_broker.api.context import BrokerContext
from flux_broker.api.limits import STREAM_PARTITIONS_MAX_COUNT
from flux_broker.api.status import FluxStatus
from flux_broker.metadata import CreateStream, PartitionAssignment, StreamConfig
from flux_broker.nats.subjects import (
    InvalidSubjectError,
    validate_stream_name,
    validate_subject,
)
from flux_broker.streams.manager import stream_log_config
from flux_proto import api_pb2

__all__ = [
    "GROUP_MAX_CHARS",
    "PARTITIONS_PER_STREAM_MAX",
    "create_stream",
    "create_stream_command",
    "delete_stream",
]

#: Most partitions one stream may have by default (``limits.stream.partitions.max.count``).
PARTITIONS_PER_STREAM_MAX: Final = STREAM_PARTITIONS_MAX_COUNT
#: Longest NATS queue group name accepted as a stream's ``group``.
GROUP_MAX_CHARS: Final = 255


def _invalid(message: str) -> FluxStatus:
    return FluxStatus.from_entry("INVALID_ARGUMENT", message)


def _replication_factor(requested: int, cluster_size: int) -> int:
    # Liftbridge: 0 means 1, -1 means every broker; anything else must fit the cluster.
    if requested == 0:
        return 1
    if requested == -1:
        return cluster_size
    if not 1 <= requested <= cluster_size:
        raise _invalid(
            f"replicationFactor {requested} is impossible with {cluster_size} broker(s): "
            f"use 1..{cluster_size}, 0 (one replica) or -1 (every broker)"
        )
    return requested


def _partitions(broker: BrokerContext, requested: int) -> int:
    partitions = requested or 1  # Liftbridge: 0 means 1
    problem = broker.limits.partitions_problem(partitions)
    if problem is not None:
        raise _invalid(problem)
    return partitions


def _check_group(group: str) -> None:
    if len(group) > GROUP_MAX_CHARS:
        raise _invalid(f"group is {len(group)} characters, over the limit of {GROUP_MAX_CHARS}")
    if any(char.isspace() or not char.isprintable() for char in group):
        raise _invalid(f"group {group[:64]!r} must not hold whitespace or control characters")


def _config(request: api_pb2.CreateStreamRequest) -> StreamConfig:
    def int_value(name: str) -> int | None:
        return getattr(request, name).value if request.HasField(name) else None  # type: ignore[arg-type]

    def bool_value(name: str) -> bool | None:
        return getattr(request, name).value if request.HasField(name) else None  # type: ignore[arg-type]

    return StreamConfig(
        retention_max_bytes=int_value("retentionMaxBytes"),
        retention_max_messages=int_value("retentionMaxMessages"),
        retention_max_age_ms=int_value("retentionMaxAge"),
        cleaner_interval_ms=int_value("cleanerInterval"),
        segment_max_bytes=int_value("segmentMaxBytes"),
        segment_max_age_ms=int_value("segmentMaxAge"),
        compact_max_goroutines=int_value("compactMaxGoroutines"),
        compact_enabled=bool_value("compactEnabled"),
        auto_pause_time_ms=int_value("autoPauseTime"),
        auto_pause_disable_if_subscribers=bool_value("autoPauseDisableIfSubscribers"),
        min_isr=int_value("minIsr"),
        optimistic_concurrency_control=bool_value("optimisticConcurrencyControl"),
        encryption=bool_value("encryption"),
    )


#: Request field name of each StreamConfig field, for error messages.
_REQUEST_FIELD: Final = {
    "retention_max_bytes": "retentionMaxBytes",
    "retention_max_messages": "retentionMaxMessages",
    "retention_max_age_ms": "retentionMaxAge",
    "cleaner_interval_ms": "cleanerInterval",
    "segment_max_bytes": "segmentMaxBytes",
    "segment_max_age_ms": "segmentMaxAge",
    "compact_max_goroutines": "compactMaxGoroutines",
    "compact_enabled": "compactEnabled",
    "auto_pause_time_ms": "autoPauseTime",
    "auto_pause_disable_if_subscribers": "autoPauseDisableIfSubscribers",
    "min_isr": "minIsr",
    "optimistic_concurrency_control": "optimisticConcurrencyControl",
    "encryption": "encryption",
}
assert set(_REQUEST_FIELD) == set(StreamConfig.field_names())


def create_stream_command(
    broker: BrokerContext, request: api_pb2.CreateStreamRequest
) -> CreateStream:
    """Validate a CreateStreamRequest and turn it into the command that creates the stream.

    Raises:
        InvalidNameError: The name is empty, malformed or reserved.
        InvalidSubjectError: The subject is not a valid stream subject.
        FluxStatus: INVALID_ARGUMENT for a bad replication factor, partition count, group or
            override; ENCRYPTION_UNAVAILABLE when encryption is requested.
    """
    validate_stream_name(request.name)
    partitions = _partitions(broker, request.partitions)
    if not request.subject:
        raise InvalidSubjectError(request.subject, "it is empty; a stream needs a NATS subject")
    validate_subject(request.subject, partitions=partitions)
    _check_group(request.group)
    cluster_size = 1  # a single broker is a cluster of one (DESIGN.md §4.3)
    replication_factor = _replication_factor(request.replicationFactor, cluster_size)
    config = _config(request)
    for name, reason in config.problems():
        raise _invalid(f"{_REQUEST_FIELD[name]}: {reason}")
    if config.encryption:
        raise FluxStatus.from_entry(
            "ENCRYPTION_UNAVAILABLE",
            "encryption at rest is not available on this broker; create the stream without it",
        )
    if config.min_isr is not None and config.min_isr > replication_factor:
        raise _invalid(
            f"minIsr {config.min_isr} exceeds the replication factor {replication_factor}: "
            "no write could ever commit"
        )
    try:
        stream_log_config(broker.streams.log_config, config)
    except ValueError as error:
        raise _invalid(_request_names(str(error))) from None
    return CreateStream(
        name=request.name,
        subject=request.subject,
        group=request.group,
        replication_factor=replication_factor,
        partitions=tuple(PartitionAssignment.single(broker.broker_id) for _ in range(partitions)),
        creation_timestamp_ns=broker.clock.now_ns(),
        config=config,
    )


# LogConfig names its fields in seconds; say them as the request does.
_LOG_FIELD_IN_REQUEST: Final = {
    "segment_max_bytes": "segmentMaxBytes",
    "segment_max_age_s": "segmentMaxAge",
    "retention_max_bytes": "retentionMaxBytes",
    "retention_max_messages": "retentionMaxMessages",
    "retention_max_age_s": "retentionMaxAge",
    "cleaner_interval_s": "cleanerInterval",
}


def _request_names(message: str) -> str:
    for log_name, request_name in _LOG_FIELD_IN_REQUEST.items():
        message = message.replace(log_name, request_name)
    return message


async def create_stream(
    broker: BrokerContext, request: api_pb2.CreateStreamRequest
) -> api_pb2.CreateStreamResponse:
    """CreateStream: validate, check the stream limit, apply, open the logs, start the leaders.

    An existing name is ALREADY_EXISTS (Liftbridge's answer) even at the stream limit.
    """
    command = create_stream_command(broker, request)
    streams = broker.streams
    if streams.stream(command.name) is not None:
        await streams.create_stream(command)  # raises StreamExistsError
    else:
        names = (stream.metadata.name for stream in streams.streams())
        await broker.limits.creating_stream(names, streams.create_stream(command))
    return api_pb2.CreateStreamResponse()


async def delete_stream(
    broker: BrokerContext, request: api_pb2.DeleteStreamRequest
) -> api_pb2.DeleteStreamResponse:
    """DeleteStream: remove the stream's metadata, then its partitions and data.

    Raises:
        InvalidNameError: The name is empty or malformed (never reaches the filesystem).
        flux_broker.metadata.StreamNotFoundError: No stream of that name.
    """
    validate_stream_name(request.name)
    await broker.streams.delete_stream(request.name)
    return api_pb2.DeleteStreamResponse()
