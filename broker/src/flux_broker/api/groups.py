"""Consumer-group RPCs: Liftbridge's four, and Flux's watch, describe, list and reset.

Every request is checked before the coordinator sees it (reference ``liftbridge-api.md`` §1.8,
§3; reliability-plan §6 item 27):

==========================================================  ================================
condition                                                   status (row)
==========================================================  ================================
``groupId`` / ``consumerId`` / ``streams`` / ``coordinator``  INVALID_ARGUMENT, Liftbridge's
missing                                                     texts ("No groupId provided")
an id over :data:`GROUP_ID_MAX_BYTES` or with control or    INVALID_ARGUMENT
format characters; more than :data:`JOIN_STREAMS_MAX_COUNT`
streams; a malformed or internal stream name; an unknown
assignor
group unknown (or without members, for the member calls)    GROUP_NOT_FOUND (NOT_FOUND)
consumer not a member                                       NOT_GROUP_MEMBER
                                                            (FAILED_PRECONDITION)
Fetch: epoch other than the current one                     GROUP_EPOCH_MISMATCH
                                                            (FAILED_PRECONDITION)
Report: coordinator or epoch not the current ones           NOT_COORDINATOR
                                                            (FAILED_PRECONDITION)
Join: an assignor other than the existing group's           GROUP_ASSIGNOR_MISMATCH
a new group beyond the broker's limit                       RESOURCE_LIMIT
Reset: the group has members                                GROUP_NOT_EMPTY
==========================================================  ================================

A join may name streams that do not exist yet (as Liftbridge, which counts them as having no
partitions): their partitions are assigned once they are created.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import Final

from flux_broker.api.context import BrokerContext
from flux_broker.api.status import FluxStatus
from flux_broker.cursors import NO_CURSOR, CursorsDisabledError
from flux_broker.groups.assignor import ASSIGNORS
from flux_broker.groups.coordinator import GroupCoordinator
from flux_broker.groups.state import GroupState
from flux_broker.nats.subjects import rejected_character, shown, validate_stream_name
from flux_broker.streams.manager import LivePartition, LiveStream
from flux_proto import api_pb2

__all__ = [
    "GROUP_CURSOR_PREFIX",
    "GROUP_ID_MAX_BYTES",
    "JOIN_STREAMS_MAX_COUNT",
    "check_group_id",
    "describe_group",
    "fetch_assignments",
    "group_cursor_id",
    "join_group",
    "leave_group",
    "list_groups",
    "report_coordinator",
    "reset_positions",
    "watch_assignments",
]

#: Longest group or consumer id, in UTF-8 bytes.
GROUP_ID_MAX_BYTES: Final = 255
#: Most streams one join may name.
JOIN_STREAMS_MAX_COUNT: Final = 1000
#: The cursor id of a group's positions is this prefix + the group id (the Go client's).
GROUP_CURSOR_PREFIX: Final = "__group:"

_NANOS_PER_SECOND: Final = 1_000_000_000


def _invalid(message: str) -> FluxStatus:
    return FluxStatus.from_entry("INVALID_ARGUMENT", message)


def _check_id(field: str, value: str) -> None:
    if not value:
        raise _invalid(f"No {field} provided")
    if len(value) > GROUP_ID_MAX_BYTES or len(value.encode()) > GROUP_ID_MAX_BYTES:
        raise _invalid(f"{field} {shown(value)} is over the limit of {GROUP_ID_MAX_BYTES} bytes")
    if (char := rejected_character(value)) is not None:
        raise _invalid(f"{field} {shown(value)} holds the control or format character {char!r}")


def check_group_id(group_id: str) -> None:
    """Check a group id from a request (also used by member-checked commits).

    Raises:
        FluxStatus: INVALID_ARGUMENT.
    """
    _check_id("groupId", group_id)


def _check_member(group_id: str, consumer_id: str) -> None:
    check_group_id(group_id)
    _check_id("consumerId", consumer_id)


def group_cursor_id(group_id: str) -> str:
    """The cursor id holding the group's positions (last processed offsets)."""
    return GROUP_CURSOR_PREFIX + group_id


def _coordinator(broker: BrokerContext) -> GroupCoordinator:
    if broker.groups is None:
        raise FluxStatus.from_entry("UNAVAILABLE", "consumer groups are not running yet")
    return broker.groups


def _assignments(by_stream: Mapping[str, tuple[int, ...]]) -> list[api_pb2.PartitionAssignment]:
    return [
        api_pb2.PartitionAssignment(stream=stream, partitions=partitions)
        for stream, partitions in by_stream.items()
    ]


async def join_group(
    broker: BrokerContext, request: api_pb2.JoinConsumerGroupRequest
) -> api_pb2.JoinConsumerGroupResponse:
    """JoinConsumerGroup: add the consumer, creating the group if needed."""
    _check_member(request.groupId, request.consumerId)
    if not request.streams:
        raise _invalid("No streams provided")
    if len(request.streams) > JOIN_STREAMS_MAX_COUNT:
        raise _invalid(
            f"{len(request.streams)} streams is over the limit of {JOIN_STREAMS_MAX_COUNT} a "
            "consumer may read"
        )
    for stream in request.streams:
        validate_stream_name(stream)
    if request.assignor and request.assignor not in ASSIGNORS:
        raise _invalid(
            f"unknown assignor {shown(request.assignor)}: use one of {', '.join(ASSIGNORS)}"
        )
    coordinator = _coordinator(broker)
    state = await coordinator.join(
        request.groupId, request.consumerId, request.streams, request.assignor
    )
    timeouts = coordinator.timeouts
    return api_pb2.JoinConsumerGroupResponse(
        coordinator=state.coordinator,
        epoch=state.epoch,
        consumerTimeout=round(timeouts.consumer_s * _NANOS_PER_SECOND),
        coordinatorTimeout=round(timeouts.coordinator_s * _NANOS_PER_SECOND),
        assignor=state.assignor,
        revokeTimeout=round(timeouts.revoke_s * _NANOS_PER_SECOND),
    )


async def leave_group(
    broker: BrokerContext, request: api_pb2.LeaveConsumerGroupRequest
) -> api_pb2.LeaveConsumerGroupResponse:
    """LeaveConsumerGroup: remove the consumer; its partitions go to the others at once."""
    _check_member(request.groupId, request.consumerId)
    await _coordinator(broker).leave(request.groupId, request.consumerId)
    return api_pb2.LeaveConsumerGroupResponse()


async def fetch_assignments(
    broker: BrokerContext, request: api_pb2.FetchConsumerGroupAssignmentsRequest
) -> api_pb2.FetchConsumerGroupAssignmentsResponse:
    """FetchConsumerGroupAssignments: the heartbeat; confirms revocations up to the epoch."""
    _check_member(request.groupId, request.consumerId)
    epoch, assignment = await _coordinator(broker).fetch(
        request.groupId, request.consumerId, request.epoch
    )
    return api_pb2.FetchConsumerGroupAssignmentsResponse(
        epoch=epoch, assignments=_assignments(assignment)
    )


async def report_coordinator(
    broker: BrokerContext, request: api_pb2.ReportConsumerGroupCoordinatorRequest
) -> api_pb2.ReportConsumerGroupCoordinatorResponse:
    """ReportConsumerGroupCoordinator: count the report (see the coordinator module)."""
    _check_member(request.groupId, request.consumerId)
    if not request.coordinator:
        raise _invalid("No coordinator provided")
    await _coordinator(broker).report(
        request.groupId, request.consumerId, request.coordinator, request.epoch
    )
    return api_pb2.ReportConsumerGroupCoordinatorResponse()


async def watch_assignments(
    broker: BrokerContext,
    request: api_pb2.WatchConsumerGroupAssignmentsRequest,
    closing: asyncio.Event,
) -> AsyncGenerator[api_pb2.ConsumerGroupAssignmentUpdate, None]:
    """WatchConsumerGroupAssignments: the assignment now, then after every change."""
    _check_member(request.groupId, request.consumerId)
    updates = _coordinator(broker).watch(request.groupId, request.consumerId, closing)
    async with contextlib.aclosing(updates):
        async for update in updates:
            yield api_pb2.ConsumerGroupAssignmentUpdate(
                epoch=update.epoch,
                assignments=_assignments(update.assignments),
                revoked=_assignments(update.revoked),
                revoking=_assignments(update.revoking),
            )
    if closing.is_set():
        raise FluxStatus.from_entry("UNAVAILABLE", "the broker is shutting down; watch again")


async def _committed(broker: BrokerContext, group_id: str, stream: str, partition: int) -> int:
    store = broker.cursors
    live = broker.streams.stream(stream)
    if store is None or not store.enabled or live is None:
        return NO_CURSOR
    try:
        return await store.fetch(
            group_cursor_id(group_id),
            stream,
            partition,
            stream_created_ns=live.metadata.creation_timestamp_ns,
        )
    except CursorsDisabledError:
        return NO_CURSOR


async def _partition_rows(
    broker: BrokerContext,
    state: GroupState,
    streams: tuple[str, ...],
    only: frozenset[int] = frozenset(),
) -> list[api_pb2.ConsumerGroupPartition]:
    rows = []
    for stream in streams:
        live = broker.streams.stream(stream)
        if live is None:
            continue
        for partition in live.partitions:
            if only and partition.id not in only:
                continue
            committed = await _committed(broker, state.group_id, stream, partition.id)
            hw = partition.high_watermark
            if committed >= 0:
                lag = max(hw - committed, 0)
            else:
                lag = max(hw - partition.log.oldest_offset + 1, 0)
            own = state.owners.get((stream, partition.id))
            rows.append(
                api_pb2.ConsumerGroupPartition(
                    stream=stream,
                    partition=partition.id,
                    owner="" if own is None else own.owner,
                    revoking=own is not None and own.revoking,
                    committedOffset=committed,
                    highWatermark=hw,
                    lag=lag,
                )
            )
    return rows


async def describe_group(
    broker: BrokerContext, request: api_pb2.DescribeConsumerGroupRequest
) -> api_pb2.DescribeConsumerGroupResponse:
    """DescribeConsumerGroup: members, assignments, positions and lag."""
    check_group_id(request.groupId)
    coordinator = _coordinator(broker)
    state = coordinator.group(request.groupId)
    if state is None:
        raise FluxStatus.from_entry(
            "GROUP_NOT_FOUND", f"no consumer group {shown(request.groupId)}"
        )
    members = [
        api_pb2.ConsumerGroupMember(
            consumerId=consumer,
            streams=streams,
            assignments=_assignments(state.assignment(consumer)),
            revoking=_assignments(state.revoking(consumer)),
            watching=coordinator.watching(state.group_id, consumer),
        )
        for consumer, streams in sorted(state.members.items())
    ]
    return api_pb2.DescribeConsumerGroupResponse(
        groupId=state.group_id,
        epoch=state.epoch,
        coordinator=state.coordinator,
        assignor=state.assignor,
        members=members,
        partitions=await _partition_rows(broker, state, state.streams),
    )


async def list_groups(
    broker: BrokerContext, request: api_pb2.ListConsumerGroupsRequest
) -> api_pb2.ListConsumerGroupsResponse:
    """ListConsumerGroups: every group this broker keeps, by id."""
    return api_pb2.ListConsumerGroupsResponse(
        groups=[
            api_pb2.ConsumerGroupSummary(
                groupId=state.group_id,
                epoch=state.epoch,
                members=len(state.members),
                assignor=state.assignor,
            )
            for state in _coordinator(broker).groups()
        ]
    )


def _reset_targets(
    broker: BrokerContext, request: api_pb2.ResetConsumerGroupPositionsRequest
) -> tuple[LiveStream, list[LivePartition]]:
    """Check a reset request: the stream and the partitions it moves."""
    check_group_id(request.groupId)
    if not request.stream:
        raise _invalid("No stream provided")
    validate_stream_name(request.stream)
    if request.position not in api_pb2.ResetPosition.values():
        raise _invalid(f"unknown position {request.position}")
    if len(set(request.partitions)) != len(request.partitions):
        raise _invalid("partitions has duplicate ids")
    live = broker.streams.stream(request.stream)
    if live is None:
        raise FluxStatus.from_entry("STREAM_NOT_FOUND", f"no stream is named {request.stream!r}")
    for partition_id in request.partitions:
        if not 0 <= partition_id < len(live.partitions):
            raise FluxStatus.from_entry("PARTITION_NOT_FOUND")
    targets = [p for p in live.partitions if not request.partitions or p.id in request.partitions]
    if request.position == api_pb2.RESET_OFFSET:
        if request.resetOffset < 0:
            raise _invalid(f"resetOffset {request.resetOffset} is negative")
        for partition in targets:
            if request.resetOffset > partition.newest_offset + 1:
                raise FluxStatus.from_entry(
                    "OFFSET_OUT_OF_RANGE",
                    f"resetOffset {request.resetOffset} is past the end of partition "
                    f"{partition.id} (newest offset + 1 is {partition.newest_offset + 1})",
                )
    return live, targets


def _next_offset(
    partition: LivePartition, request: api_pb2.ResetConsumerGroupPositionsRequest
) -> int:
    """The next offset the group reads after the reset."""
    log = partition.log
    match request.position:
        case api_pb2.RESET_EARLIEST:
            return log.oldest_offset
        case api_pb2.RESET_LATEST:
            return log.newest_offset + 1
        case api_pb2.RESET_OFFSET:
            return request.resetOffset
        case _:
            return log.offset_for_timestamp(request.resetTimestamp)


async def reset_positions(
    broker: BrokerContext, request: api_pb2.ResetConsumerGroupPositionsRequest
) -> api_pb2.ResetConsumerGroupPositionsResponse:
    """ResetConsumerGroupPositions: rewrite the group's cursors while it has no members.

    The stored position is the last processed offset, so "read from X next" stores X - 1;
    X = 0 clears the cursor (-1), and a consumer then starts at its own auto-offset policy.
    """
    live, targets = _reset_targets(broker, request)
    store = broker.cursors
    if store is None or not store.enabled:
        raise FluxStatus.from_entry(
            "CURSORS_DISABLED",
            "cursors are disabled on this broker, so consumer groups keep no positions",
        )
    async with _coordinator(broker).resetting(request.groupId) as state:
        for partition in targets:
            next_offset = _next_offset(partition, request)
            await store.set(
                group_cursor_id(request.groupId),
                request.stream,
                partition.id,
                max(next_offset - 1, NO_CURSOR),
                stream_created_ns=live.metadata.creation_timestamp_ns,
            )
        rows = await _partition_rows(
            broker, state, (request.stream,), frozenset(p.id for p in targets)
        )
    return api_pb2.ResetConsumerGroupPositionsResponse(partitions=rows)
