"""PauseStream and SetStreamReadonly: validate the request completely, then apply one command.

Liftbridge semantics (reference ``liftbridge-api.md`` §1.3, §3; ``liftbridge-server.md``
§4.3, §4.4); what the partitions then do is :mod:`flux_broker.streams.manager`'s.

Checks, in order, before anything changes (reliability-plan §6):

- the name: empty, malformed or reserved (``__cursors``) → INVALID_ARGUMENT;
- the partition list: more ids than a stream can have partitions, a negative id, or an id
  listed twice → INVALID_ARGUMENT (an empty list means every partition);
- the stream exists → STREAM_NOT_FOUND (NOT_FOUND), and every id is one of its partitions →
  PARTITION_NOT_FOUND (NOT_FOUND, "No such partition", Liftbridge's ErrNoSuchPartition),
  both checked by the metadata store inside the command's transaction.

A request for partitions already in the wanted state succeeds and changes only what the
command records (a PauseStream's ``resumeAll``): pausing is idempotent, as in Liftbridge.
"""

from __future__ import annotations

from collections.abc import Sequence

from flux_broker.api.admin import PARTITIONS_PER_STREAM_MAX
from flux_broker.api.context import BrokerContext
from flux_broker.api.status import FluxStatus
from flux_broker.nats.subjects import validate_stream_name
from flux_proto import api_pb2

__all__ = ["partition_ids", "pause_stream", "set_stream_readonly"]


def partition_ids(
    requested: Sequence[int], max_count: int = PARTITIONS_PER_STREAM_MAX
) -> tuple[int, ...]:
    """The request's partition ids, checked for shape (existence is the store's check).

    Args:
        requested: The ``partitions`` field; empty means every partition.
        max_count: The most partitions a stream may have
            (``limits.stream.partitions.max.count``).

    Returns:
        The ids, in the request's order.

    Raises:
        FluxStatus: INVALID_ARGUMENT for too many ids, a negative id or a duplicate.
    """
    if len(requested) > max_count:
        raise FluxStatus.from_entry(
            "INVALID_ARGUMENT",
            f"{len(requested)} partition ids, more than a stream can have "
            f"({max_count}); leave the list empty for every partition",
        )
    seen: set[int] = set()
    for partition_id in requested:
        if partition_id < 0:
            raise FluxStatus.from_entry(
                "INVALID_ARGUMENT", f"partition id {partition_id} is negative"
            )
        if partition_id in seen:
            raise FluxStatus.from_entry(
                "INVALID_ARGUMENT", f"partition {partition_id} is listed more than once"
            )
        seen.add(partition_id)
    return tuple(requested)


async def pause_stream(
    broker: BrokerContext, request: api_pb2.PauseStreamRequest
) -> api_pb2.PauseStreamResponse:
    """PauseStream: pause the listed partitions (all when none is listed).

    Raises:
        InvalidNameError: The name is empty, malformed or reserved.
        FluxStatus: INVALID_ARGUMENT for a bad partition list.
        flux_broker.metadata.StreamNotFoundError: No stream of that name.
        flux_broker.metadata.PartitionNotFoundError: A listed id is not one of its partitions.
    """
    validate_stream_name(request.name)
    ids = partition_ids(request.partitions, broker.limits.settings.stream_partitions_max_count)
    await broker.streams.pause(request.name, ids, resume_all=request.resumeAll)
    return api_pb2.PauseStreamResponse()


async def set_stream_readonly(
    broker: BrokerContext, request: api_pb2.SetStreamReadonlyRequest
) -> api_pb2.SetStreamReadonlyResponse:
    """SetStreamReadonly: set or clear the read-only flag of the listed partitions (or all).

    Raises:
        InvalidNameError: The name is empty, malformed or reserved.
        FluxStatus: INVALID_ARGUMENT for a bad partition list.
        flux_broker.metadata.StreamNotFoundError: No stream of that name.
        flux_broker.metadata.PartitionNotFoundError: A listed id is not one of its partitions.
    """
    validate_stream_name(request.name)
    ids = partition_ids(request.partitions, broker.limits.settings.stream_partitions_max_count)
    await broker.streams.set_readonly(request.name, ids, readonly=request.readonly)
    return api_pb2.SetStreamReadonlyResponse()
