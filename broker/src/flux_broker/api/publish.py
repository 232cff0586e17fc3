"""Publish, PublishAsync and PublishToSubject (placeholder: being written)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from flux_broker.api.context import BrokerContext
from flux_broker.api.status import FluxStatus
from flux_proto import api_pb2

__all__ = ["publish", "publish_async", "publish_to_subject"]


async def publish(
    broker: BrokerContext, request: api_pb2.PublishRequest, deadline_s: float | None
) -> api_pb2.PublishResponse:
    """Publish one message through NATS; wait for its ack until the deadline if there is one."""
    raise FluxStatus.from_entry("UNIMPLEMENTED", "Publish is being written")


async def publish_async(
    broker: BrokerContext,
    requests: AsyncIterator[api_pb2.PublishRequest],
    closing: asyncio.Event,
) -> AsyncIterator[api_pb2.PublishResponse]:
    """Publish a stream of messages; yield their acks and async errors."""
    raise FluxStatus.from_entry("UNIMPLEMENTED", "PublishAsync is being written")
    yield api_pb2.PublishResponse()  # type: ignore[unreachable]  # pragma: no cover


async def publish_to_subject(
    broker: BrokerContext, request: api_pb2.PublishToSubjectRequest, deadline_s: float | None
) -> api_pb2.PublishToSubjectResponse:
    """Publish one message to a NATS subject; wait for the first ack if there is a deadline."""
    raise FluxStatus.from_entry("UNIMPLEMENTED", "PublishToSubject is being written")
