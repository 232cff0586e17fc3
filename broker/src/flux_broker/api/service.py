"""The gRPC service ``proto.API``: each method checks, then hands over to its module.

One module per RPC family: :mod:`~flux_broker.api.admin` (CreateStream, DeleteStream),
:mod:`~flux_broker.api.lifecycle` (PauseStream, SetStreamReadonly),
:mod:`~flux_broker.api.metadata` (FetchMetadata, FetchPartitionMetadata),
:mod:`~flux_broker.api.publish` (Publish, PublishAsync, PublishToSubject),
:mod:`~flux_broker.api.publish_batch` (InitProducer, PublishBatch),
:mod:`~flux_broker.api.subscribe` (Subscribe, SubscribeBatch), :mod:`~flux_broker.api.cursors`
(SetCursor, FetchCursor) and :mod:`~flux_broker.api.groups` (the consumer-group calls). Every
method is wrapped by :func:`~flux_broker.api.status.guarded`, so whatever it raises ends the
call with a status from the one error table.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

from flux_broker.api import (
    admin,
    cursors,
    groups,
    lifecycle,
    metadata,
    publish,
    publish_batch,
    slow_consumer,
    subscribe,
)
from flux_broker.api.context import BrokerContext, ServicerContext
from flux_broker.api.status import guarded
from flux_proto import api_pb2, api_pb2_grpc

__all__ = ["ApiService"]


def _release_when_done(context: ServicerContext, release: Callable[[object], None]) -> None:
    # The stubs type the callback as a nominal class; any callable taking the context works.
    context.add_done_callback(cast(Any, release))


class ApiService(api_pb2_grpc.APIServicer):
    """``proto.API`` for one broker."""

    def __init__(self, broker: BrokerContext) -> None:
        """Serve ``broker``."""
        self._broker = broker
        #: Set when the broker begins to shut down: open subscriptions and PublishAsync calls
        #: end (UNAVAILABLE), so their clients move on.
        self.closing = asyncio.Event()

    def begin_shutdown(self) -> None:
        """End long-lived calls; the server stops accepting new ones separately."""
        self.closing.set()

    # -- streams ---------------------------------------------------------------------------

    @guarded
    async def CreateStream(
        self, request: api_pb2.CreateStreamRequest, context: ServicerContext
    ) -> api_pb2.CreateStreamResponse:
        """See :func:`flux_broker.api.admin.create_stream`."""
        return await admin.create_stream(self._broker, request)

    @guarded
    async def DeleteStream(
        self, request: api_pb2.DeleteStreamRequest, context: ServicerContext
    ) -> api_pb2.DeleteStreamResponse:
        """See :func:`flux_broker.api.admin.delete_stream`."""
        return await admin.delete_stream(self._broker, request)

    @guarded
    async def PauseStream(
        self, request: api_pb2.PauseStreamRequest, context: ServicerContext
    ) -> api_pb2.PauseStreamResponse:
        """See :func:`flux_broker.api.lifecycle.pause_stream`."""
        return await lifecycle.pause_stream(self._broker, request)

    @guarded
    async def SetStreamReadonly(
        self, request: api_pb2.SetStreamReadonlyRequest, context: ServicerContext
    ) -> api_pb2.SetStreamReadonlyResponse:
        """See :func:`flux_broker.api.lifecycle.set_stream_readonly`."""
        return await lifecycle.set_stream_readonly(self._broker, request)

    # -- metadata --------------------------------------------------------------------------

    @guarded
    async def FetchMetadata(
        self, request: api_pb2.FetchMetadataRequest, context: ServicerContext
    ) -> api_pb2.FetchMetadataResponse:
        """See :func:`flux_broker.api.metadata.fetch_metadata`."""
        return await metadata.fetch_metadata(self._broker, request)

    @guarded
    async def FetchPartitionMetadata(
        self, request: api_pb2.FetchPartitionMetadataRequest, context: ServicerContext
    ) -> api_pb2.FetchPartitionMetadataResponse:
        """See :func:`flux_broker.api.metadata.fetch_partition_metadata`."""
        return await metadata.fetch_partition_metadata(self._broker, request)

    # -- data path -------------------------------------------------------------------------

    # Subscribe and SubscribeBatch write through the context (grpc.aio accepts a coroutine
    # that does), so that a write a stalled client blocks can be timed out: see
    # flux_broker.api.slow_consumer. The stubs only name the iterator forms.

    @guarded
    async def Subscribe(  # type: ignore[override]
        self, request: api_pb2.SubscribeRequest, context: ServicerContext
    ) -> None:
        """See :func:`flux_broker.api.subscribe.subscribe` and :mod:`~.slow_consumer`."""
        # RESOURCE_LIMIT past the cap; held until gRPC is done with the call.
        _release_when_done(context, self._broker.limits.hold_subscription(context.peer()))
        messages = subscribe.subscribe(self._broker, request, self.closing)
        await slow_consumer.send_all(  # closes messages (and so the reader) when it ends
            context,
            messages,
            self._broker.slow_consumers,
            stream=request.stream,
            partition=request.partition,
        )

    @guarded
    async def Publish(
        self, request: api_pb2.PublishRequest, context: ServicerContext
    ) -> api_pb2.PublishResponse:
        """See :func:`flux_broker.api.publish.publish`."""
        return await publish.publish(self._broker, request, context.time_remaining())

    @guarded
    async def PublishAsync(
        self, request_iterator: AsyncIterator[api_pb2.PublishRequest], context: ServicerContext
    ) -> AsyncIterator[api_pb2.PublishResponse]:
        """See :func:`flux_broker.api.publish.publish_async`."""
        responses = publish.publish_async(self._broker, request_iterator, self.closing)
        async with contextlib.aclosing(responses):
            async for response in responses:
                yield response

    @guarded
    async def PublishToSubject(
        self, request: api_pb2.PublishToSubjectRequest, context: ServicerContext
    ) -> api_pb2.PublishToSubjectResponse:
        """See :func:`flux_broker.api.publish.publish_to_subject`."""
        return await publish.publish_to_subject(self._broker, request, context.time_remaining())

    # -- the batched data path (Flux) -------------------------------------------------------

    @guarded
    async def InitProducer(
        self, request: api_pb2.InitProducerRequest, context: ServicerContext
    ) -> api_pb2.InitProducerResponse:
        """See :func:`flux_broker.api.publish_batch.init_producer`."""
        return publish_batch.init_producer()

    @guarded
    async def PublishBatch(
        self,
        request_iterator: AsyncIterator[api_pb2.PublishBatchRequest],
        context: ServicerContext,
    ) -> AsyncIterator[api_pb2.PublishBatchResponse]:
        """See :func:`flux_broker.api.publish_batch.publish_batch`."""
        responses = publish_batch.publish_batch(self._broker, request_iterator, self.closing)
        async with contextlib.aclosing(responses):
            async for response in responses:
                yield response

    @guarded
    async def SubscribeBatch(  # type: ignore[override]
        self, request: api_pb2.SubscribeBatchRequest, context: ServicerContext
    ) -> None:
        """See :func:`flux_broker.api.subscribe.subscribe_batch` and :mod:`~.slow_consumer`."""
        # RESOURCE_LIMIT past the cap; held until gRPC is done with the call.
        _release_when_done(context, self._broker.limits.hold_subscription(context.peer()))
        batches = subscribe.subscribe_batch(self._broker, request, self.closing)
        await slow_consumer.send_all(
            context,
            batches,
            self._broker.slow_consumers,
            stream=request.subscribe.stream,
            partition=request.subscribe.partition,
        )

    # -- cursors and consumer groups ---------------------------------------------------------

    @guarded
    async def SetCursor(
        self, request: api_pb2.SetCursorRequest, context: ServicerContext
    ) -> api_pb2.SetCursorResponse:
        """See :func:`flux_broker.api.cursors.set_cursor`."""
        return await cursors.set_cursor(self._broker, request)

    @guarded
    async def FetchCursor(
        self, request: api_pb2.FetchCursorRequest, context: ServicerContext
    ) -> api_pb2.FetchCursorResponse:
        """See :func:`flux_broker.api.cursors.fetch_cursor`."""
        return await cursors.fetch_cursor(self._broker, request)

    @guarded
    async def JoinConsumerGroup(
        self, request: api_pb2.JoinConsumerGroupRequest, context: ServicerContext
    ) -> api_pb2.JoinConsumerGroupResponse:
        """See :func:`flux_broker.api.groups.join_group`."""
        return await groups.join_group(self._broker, request)

    @guarded
    async def LeaveConsumerGroup(
        self, request: api_pb2.LeaveConsumerGroupRequest, context: ServicerContext
    ) -> api_pb2.LeaveConsumerGroupResponse:
        """See :func:`flux_broker.api.groups.leave_group`."""
        return await groups.leave_group(self._broker, request)

    @guarded
    async def FetchConsumerGroupAssignments(
        self, request: api_pb2.FetchConsumerGroupAssignmentsRequest, context: ServicerContext
    ) -> api_pb2.FetchConsumerGroupAssignmentsResponse:
        """See :func:`flux_broker.api.groups.fetch_assignments`."""
        return await groups.fetch_assignments(self._broker, request)

    @guarded
    async def ReportConsumerGroupCoordinator(
        self, request: api_pb2.ReportConsumerGroupCoordinatorRequest, context: ServicerContext
    ) -> api_pb2.ReportConsumerGroupCoordinatorResponse:
        """See :func:`flux_broker.api.groups.report_coordinator`."""
        return await groups.report_coordinator(self._broker, request)

    # -- consumer groups (Flux) -------------------------------------------------------------

    @guarded
    async def WatchConsumerGroupAssignments(
        self, request: api_pb2.WatchConsumerGroupAssignmentsRequest, context: ServicerContext
    ) -> AsyncIterator[api_pb2.ConsumerGroupAssignmentUpdate]:
        """See :func:`flux_broker.api.groups.watch_assignments`."""
        updates = groups.watch_assignments(self._broker, request, self.closing)
        async with contextlib.aclosing(updates):
            async for update in updates:
                yield update

    @guarded
    async def DescribeConsumerGroup(
        self, request: api_pb2.DescribeConsumerGroupRequest, context: ServicerContext
    ) -> api_pb2.DescribeConsumerGroupResponse:
        """See :func:`flux_broker.api.groups.describe_group`."""
        return await groups.describe_group(self._broker, request)

    @guarded
    async def ListConsumerGroups(
        self, request: api_pb2.ListConsumerGroupsRequest, context: ServicerContext
    ) -> api_pb2.ListConsumerGroupsResponse:
        """See :func:`flux_broker.api.groups.list_groups`."""
        return await groups.list_groups(self._broker, request)

    @guarded
    async def ResetConsumerGroupPositions(
        self, request: api_pb2.ResetConsumerGroupPositionsRequest, context: ServicerContext
    ) -> api_pb2.ResetConsumerGroupPositionsResponse:
        """See :func:`flux_broker.api.groups.reset_positions`."""
        return await groups.reset_positions(self._broker, request)
