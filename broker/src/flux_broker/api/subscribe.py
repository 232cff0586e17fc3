"""Subscribe (placeholder: being written)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from flux_broker.api.context import BrokerContext
from flux_broker.api.status import FluxStatus
from flux_proto import api_pb2

__all__ = ["subscribe"]


async def subscribe(
    broker: BrokerContext, request: api_pb2.SubscribeRequest, closing: asyncio.Event
) -> AsyncIterator[api_pb2.Message]:
    """Stream one partition's committed messages after the empty handshake message."""
    raise FluxStatus.from_entry("UNIMPLEMENTED", "Subscribe is being written")
    yield api_pb2.Message()  # type: ignore[unreachable]  # pragma: no cover
