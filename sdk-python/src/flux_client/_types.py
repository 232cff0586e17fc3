"""The SDK's value types: records in and out, positions, acks and metadata.

They are the SDK's own small frozen dataclasses, not generated protobuf classes (DESIGN.md §3):
the wire format can grow without changing what users hold. The two made once per record,
:class:`Message` and :class:`RecordMetadata`, are named tuples: immutable and about three
times cheaper to create than a frozen dataclass, which matters at a million records a second.
Times are Unix nanoseconds (fields named ``timestamp`` follow Liftbridge's names).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

from flux_proto import api_pb2

__all__ = [
    "AckPolicy",
    "BrokerMetadata",
    "Message",
    "Metadata",
    "PartitionMetadata",
    "Record",
    "RecordMetadata",
    "Start",
    "Stop",
    "StreamMetadata",
]


class AckPolicy(enum.Enum):
    """When the broker acknowledges a batch.

    ``LEADER``: once the partition leader has written it; ``ALL``: once every in-sync replica
    has (the batch is committed); ``NONE``: never — sends resolve once the batch is handed to
    the connection, without an offset.
    """

    LEADER = api_pb2.LEADER
    ALL = api_pb2.ALL
    NONE = api_pb2.NONE


@dataclass(frozen=True, slots=True)
class Record:
    """A record to send: ``value`` (``None`` writes a tombstone), an optional key and headers."""

    value: bytes | None
    key: bytes | None = None
    headers: Mapping[str, bytes] | None = None


class RecordMetadata(NamedTuple):
    """Where an acknowledged record was written.

    Attributes:
        stream: The stream's name.
        partition: The partition's id.
        offset: The record's offset; -1 when the ack policy is ``NONE``.
        timestamp: The broker's timestamp, Unix nanoseconds; -1 with ``NONE``.
    """

    stream: str
    partition: int
    offset: int
    timestamp: int


class Message(NamedTuple):
    """A record read from a partition.

    Attributes:
        stream: The stream's name.
        partition: The partition's id.
        offset: Its offset in the partition.
        key: Its key, ``None`` when it has none.
        value: Its value, ``None`` for a tombstone.
        headers: Its headers (the broker's ``flux.producer`` bookkeeping header removed).
        timestamp: The broker's timestamp, Unix nanoseconds.
        subject: The NATS subject it arrived on (the partition's subject for records
            published with the batched path).
        reply_subject: The NATS reply subject it carried, ``""`` if none.
    """

    stream: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Mapping[str, bytes]
    timestamp: int
    subject: str
    reply_subject: str = ""


class _StartKind(enum.Enum):
    NEW_ONLY = api_pb2.NEW_ONLY
    OFFSET = api_pb2.OFFSET
    EARLIEST = api_pb2.EARLIEST
    LATEST = api_pb2.LATEST
    TIMESTAMP = api_pb2.TIMESTAMP
    CURSOR = -1  # resolved by the client: the stored offset + 1


@dataclass(frozen=True, slots=True)
class Start:
    """Where a subscription starts.

    Use the constants ``Start.NEW_ONLY`` (the default, as in Liftbridge's clients: only
    records published after subscribing), ``Start.EARLIEST``, ``Start.LATEST`` (the newest
    record, then new ones), or ``Start.offset(n)``, ``Start.timestamp(ns)`` (the first record
    at or after the time), ``Start.cursor(cursor_id)`` (after the offset stored under a
    cursor — the last one processed —, or the earliest record if it was never set).
    """

    kind: _StartKind
    value: int = 0
    cursor_id: str = ""

    NEW_ONLY: ClassVar[Start]
    EARLIEST: ClassVar[Start]
    LATEST: ClassVar[Start]

    @staticmethod
    def offset(offset: int) -> Start:
        """Start at ``offset`` (a negative offset means 0, as in Liftbridge)."""
        return Start(_StartKind.OFFSET, max(0, offset))

    @staticmethod
    def timestamp(timestamp_ns: int) -> Start:
        """Start at the first record whose timestamp is at or after ``timestamp_ns``."""
        return Start(_StartKind.TIMESTAMP, timestamp_ns)

    @staticmethod
    def cursor(cursor_id: str) -> Start:
        """Start after the offset stored under ``cursor_id`` (earliest if never set)."""
        if not cursor_id:
            raise ValueError("cursor_id must not be empty")
        return Start(_StartKind.CURSOR, 0, cursor_id)


Start.NEW_ONLY = Start(_StartKind.NEW_ONLY)
Start.EARLIEST = Start(_StartKind.EARLIEST)
Start.LATEST = Start(_StartKind.LATEST)


class _StopKind(enum.Enum):
    OFFSET = api_pb2.STOP_OFFSET
    LATEST = api_pb2.STOP_LATEST
    TIMESTAMP = api_pb2.STOP_TIMESTAMP


@dataclass(frozen=True, slots=True)
class Stop:
    """Where a subscription ends; without one it follows the partition until closed.

    ``Stop.LATEST`` (the newest record when subscribing), ``Stop.offset(n)`` (after the record
    at ``n``), ``Stop.timestamp(ns)`` (after the last record at or before the time). The
    iteration ends cleanly once the stop is delivered; on an empty partition
    ``Stop.LATEST`` ends it at once.
    """

    kind: _StopKind
    value: int = 0

    LATEST: ClassVar[Stop]

    @staticmethod
    def offset(offset: int) -> Stop:
        """Stop after the record at ``offset``."""
        return Stop(_StopKind.OFFSET, offset)

    @staticmethod
    def timestamp(timestamp_ns: int) -> Stop:
        """Stop after the last record whose timestamp is at or before ``timestamp_ns``."""
        return Stop(_StopKind.TIMESTAMP, timestamp_ns)


Stop.LATEST = Stop(_StopKind.LATEST)


@dataclass(frozen=True, slots=True)
class BrokerMetadata:
    """A broker of the cluster and the address clients dial."""

    id: str
    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port``."""
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class PartitionMetadata:
    """One partition: its leader and replicas and its offsets.

    Attributes:
        stream: The stream's name.
        id: The partition's id.
        leader: Id of the broker that leads it.
        replicas: Ids of the brokers holding a copy.
        isr: Ids of the in-sync replicas.
        high_watermark: Offset of the newest committed record (-1 when empty).
        newest_offset: Offset of the newest record (-1 when empty).
        paused: Whether the partition is paused.
        readonly: Whether it refuses publishes.
    """

    stream: str
    id: int
    leader: str
    replicas: tuple[str, ...]
    isr: tuple[str, ...]
    high_watermark: int
    newest_offset: int
    paused: bool
    readonly: bool


@dataclass(frozen=True, slots=True)
class StreamMetadata:
    """A stream: its subject and partitions."""

    name: str
    subject: str
    partitions: Mapping[int, PartitionMetadata]
    creation_timestamp: int


@dataclass(frozen=True, slots=True)
class Metadata:
    """The cluster as one broker sees it: brokers and streams by name."""

    brokers: tuple[BrokerMetadata, ...]
    streams: Mapping[str, StreamMetadata]
