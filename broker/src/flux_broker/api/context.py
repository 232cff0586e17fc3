"""What every gRPC handler needs to know about the broker it runs in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc
from nats.aio.client import Client

from flux_broker.api.limits import Limits
from flux_broker.api.slow_consumer import SlowConsumers
from flux_broker.clock import Clock
from flux_broker.cursors import CursorStore
from flux_broker.groups.coordinator import GroupCoordinator
from flux_broker.metadata import StreamConfig
from flux_broker.metrics import BrokerMetrics
from flux_broker.nats.acks import AckRouter
from flux_broker.streams.manager import StreamManager

__all__ = ["BrokerContext", "ServicerContext"]

#: The servicer context grpc.aio passes to every handler.
ServicerContext: TypeAlias = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerContext:
    """The broker as the API layer sees it.

    Attributes:
        broker_id: This broker's id (``clustering.server.id``).
        host: The host advertised to clients in metadata (``--host``).
        port: The gRPC port advertised to clients (``--port``, or the bound port when 0).
        namespace: The NATS namespace (``clustering.namespace``), prefix of generated inboxes.
        record_max_bytes: Largest message payload accepted
            (``clustering.replication.max.bytes``).
        streams: The stream manager.
        nc: The broker's NATS connection.
        acks: Routes acks to the publish calls waiting for them (one subscription, on ``nc``).
        clock: The broker's clock.
        stream_defaults: The broker's default for every stream setting (``streams.*``), fully
            set, for the effective configuration FetchMetadata reports.
        cursors: The cursor store (SetCursor, FetchCursor); ``None`` serves no cursors, as
            when ``cursors.stream.partitions`` is 0.
        limits: The broker's resource limits (``limits.*``) and the counts they check.
        metrics: The broker's metrics (default: a private set nobody scrapes).
        slow_consumers: When a subscriber that stops reading is cut off
            (``subscriptions.slow.consumer.timeout``).
    """

    broker_id: str
    host: str
    port: int
    namespace: str
    record_max_bytes: int
    streams: StreamManager
    nc: Client
    acks: AckRouter
    clock: Clock
    stream_defaults: StreamConfig = field(default_factory=StreamConfig)
    cursors: CursorStore | None = None
    groups: GroupCoordinator | None = None
    limits: Limits = field(default_factory=Limits)
    metrics: BrokerMetrics = field(default_factory=lambda: BrokerMetrics(process=False))
    slow_consumers: SlowConsumers = field(default_factory=SlowConsumers)
