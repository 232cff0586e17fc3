"""Resource limits: how much one request, one connection or the whole broker may hold.

Every limit is a configuration key under ``limits.`` with its unit last (:data:`KEY_NAMES`),
and a generous but finite default (below). A request that would pass one is refused before it
changes anything, with a status from the error table (DESIGN.md §7, reliability-plan §6):

- streams on the broker: one more CreateStream is RESOURCE_EXHAUSTED (``resource-limit``);
- partitions of one stream: a CreateStream asking for more is INVALID_ARGUMENT;
- headers of one message, their count and their bytes (names and values): a Publish,
  PublishAsync or PublishToSubject over either is INVALID_ARGUMENT (``BAD_REQUEST``);
- subscriptions of one client connection: one more Subscribe or SubscribeBatch is
  RESOURCE_EXHAUSTED (``resource-limit``);
- the size of one gRPC request: a larger one is RESOURCE_EXHAUSTED, from gRPC itself.

Counts of things that exist (streams, open subscriptions) get RESOURCE_EXHAUSTED: the request
is fine and could succeed once something is deleted or closed. A request whose own shape is
too big (partitions, headers) gets INVALID_ARGUMENT, as Liftbridge answers an oversized
message (reference ``liftbridge-api.md`` §3: it never uses RESOURCE_EXHAUSTED for size, which
its clients read as "read-only partition"). The gRPC receive limit is enforced by gRPC itself,
which answers RESOURCE_EXHAUSTED before any handler runs.

Internal streams (``__cursors``, ``__activity``) do not count towards the stream limit: the
broker creates them itself. A *connection* is what grpc.aio names as the call's peer
(``ipv4:<address>:<port>``): one client TCP connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from flux_broker.api.status import FluxStatus
from flux_broker.config import Config
from flux_broker.nats.subjects import INTERNAL_STREAMS

__all__ = [
    "CONNECTION_SUBSCRIPTIONS_MAX_COUNT",
    "GRPC_RECEIVE_MAX_BYTES",
    "GRPC_REQUEST_OVERHEAD_BYTES",
    "HEADER_NAME_MAX_BYTES",
    "KEY_NAMES",
    "MESSAGE_HEADERS_MAX_BYTES",
    "MESSAGE_HEADERS_MAX_COUNT",
    "STREAMS_MAX_COUNT",
    "STREAM_PARTITIONS_MAX_COUNT",
    "LimitSettings",
    "Limits",
]

_T = TypeVar("_T")
_KIB: Final = 1024
_MIB: Final = 1024 * _KIB

#: Streams on one broker. Each partition holds open segment files, a NATS subscription and an
#: ingest task; ten thousand streams is far beyond one broker's use and keeps that bounded.
STREAMS_MAX_COUNT: Final = 10_000
#: Partitions of one stream: beyond this a request is far more likely a mistake than a design.
STREAM_PARTITIONS_MAX_COUNT: Final = 1024
#: Headers of one message. The log format allows 32,765; each one costs work on every read.
MESSAGE_HEADERS_MAX_COUNT: Final = 1024
#: Header names and values of one message together, in bytes: headers are metadata, and a
#: message's payload belongs in its value.
MESSAGE_HEADERS_MAX_BYTES: Final = 64 * _KIB
#: Longest header name in UTF-8 bytes (a fixed bound, not configurable; the log's is 32,767).
HEADER_NAME_MAX_BYTES: Final = 1024
#: Open Subscribe and SubscribeBatch calls of one client connection: each holds a log reader
#: and a batch buffer, so this bounds what one client can pin in the broker.
CONNECTION_SUBSCRIPTIONS_MAX_COUNT: Final = 1000
#: Largest gRPC request the broker accepts: twice the default ``streams.batch.max.bytes``, so
#: a batch at that limit, with its request fields, always fits.
GRPC_RECEIVE_MAX_BYTES: Final = 16 * _MIB
#: Room for a request's other fields beside its largest record or batch.
GRPC_REQUEST_OVERHEAD_BYTES: Final = 64 * _KIB

#: Configuration key of each limit.
KEY_NAMES: Final = {
    "streams_max_count": "limits.streams.max.count",
    "stream_partitions_max_count": "limits.stream.partitions.max.count",
    "message_headers_max_count": "limits.message.headers.max.count",
    "message_headers_max_bytes": "limits.message.headers.max.bytes",
    "connection_subscriptions_max_count": "limits.connection.subscriptions.max.count",
    "grpc_receive_max_bytes": "limits.grpc.receive.max.bytes",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitSettings:
    """The configured limits (see the module docstring); every one is at least 1."""

    streams_max_count: int = STREAMS_MAX_COUNT
    stream_partitions_max_count: int = STREAM_PARTITIONS_MAX_COUNT
    message_headers_max_count: int = MESSAGE_HEADERS_MAX_COUNT
    message_headers_max_bytes: int = MESSAGE_HEADERS_MAX_BYTES
    connection_subscriptions_max_count: int = CONNECTION_SUBSCRIPTIONS_MAX_COUNT
    grpc_receive_max_bytes: int = GRPC_RECEIVE_MAX_BYTES

    def __post_init__(self) -> None:
        """Refuse a limit below 1: it would refuse every request of its kind."""
        for field_name, key in KEY_NAMES.items():
            value = getattr(self, field_name)
            if value < 1:
                raise ValueError(f"{key} is {value}; a limit must be at least 1")

    @classmethod
    def from_config(cls, config: Config) -> LimitSettings:
        """The limits of ``config``, checked against the request sizes it allows.

        Raises:
            ValueError: A limit is below 1, or ``limits.grpc.receive.max.bytes`` is too small
                for the largest request ``streams.batch.max.bytes`` or
                ``clustering.replication.max.bytes`` allow; the message names the keys.
        """
        settings = cls(**{name: config.integer(key) for name, key in KEY_NAMES.items()})
        largest_key, largest_bytes = max(
            (
                ("streams.batch.max.bytes", config.integer("streams.batch.max.bytes")),
                (
                    "clustering.replication.max.bytes",
                    config.integer("clustering.replication.max.bytes"),
                ),
            ),
            key=lambda item: item[1],
        )
        needed_bytes = largest_bytes + GRPC_REQUEST_OVERHEAD_BYTES
        if settings.grpc_receive_max_bytes < needed_bytes:
            raise ValueError(
                f"limits.grpc.receive.max.bytes is {settings.grpc_receive_max_bytes}, too small "
                f"for the requests {largest_key} ({largest_bytes}) allows: set it to at least "
                f"{needed_bytes}"
            )
        return settings


class Limits:
    """The broker's limits, and the counts they are checked against.

    One instance per broker, used from its event loop only.
    """

    def __init__(self, settings: LimitSettings | None = None) -> None:
        """Enforce ``settings`` (the defaults when ``None``)."""
        self.settings = settings or LimitSettings()
        self._creating_streams = 0
        self._subscriptions: dict[str, int] = {}

    # -- requests whose shape is too big: INVALID_ARGUMENT ---------------------------------

    def partitions_problem(self, partitions: int) -> str | None:
        """What is wrong with a stream of ``partitions`` partitions (0 made 1), if anything."""
        limit = self.settings.stream_partitions_max_count
        if 1 <= partitions <= limit:
            return None
        return (
            f"partitions {partitions} is out of range: use 1..{limit} (0 means 1; the limit is "
            "limits.stream.partitions.max.count)"
        )

    def headers_problem(self, headers: Mapping[str, bytes]) -> str | None:
        """What is wrong with a message's ``headers``, if anything: count, name or total size."""
        settings = self.settings
        if len(headers) > settings.message_headers_max_count:
            return (
                f"{len(headers)} headers, over the limit of "
                f"{settings.message_headers_max_count} (limits.message.headers.max.count)"
            )
        total_bytes = 0
        for name, value in headers.items():
            name_bytes = len(name.encode("utf-8"))
            if name_bytes > HEADER_NAME_MAX_BYTES:
                shown = repr(name[:64]) + ("..." if len(name) > 64 else "")
                return (
                    f"header name {shown} is {name_bytes} bytes, over the limit of "
                    f"{HEADER_NAME_MAX_BYTES}"
                )
            total_bytes += name_bytes + len(value)
        if total_bytes > settings.message_headers_max_bytes:
            return (
                f"the headers are {total_bytes} bytes, over the limit of "
                f"{settings.message_headers_max_bytes} (limits.message.headers.max.bytes)"
            )
        return None

    # -- counts of things that exist: RESOURCE_EXHAUSTED ------------------------------------

    async def creating_stream(self, stream_names: Iterator[str], create: Awaitable[_T]) -> _T:
        """Run ``create`` (the creation of one stream) if the broker may hold one more stream.

        Creations in flight count as streams until they finish, so concurrent creates cannot
        pass the limit together; a creation whose caller is cancelled still counts until it
        is done (the stream manager finishes it regardless).

        Args:
            stream_names: The names of the streams the broker holds now.
            create: The creation; awaited only when admitted.

        Returns:
            What ``create`` returns.

        Raises:
            FluxStatus: RESOURCE_LIMIT when the broker already holds its limit of streams.
        """
        held = sum(1 for name in stream_names if name not in INTERNAL_STREAMS)
        limit = self.settings.streams_max_count
        if held + self._creating_streams >= limit:
            if asyncio.iscoroutine(create):
                create.close()  # never awaited: say so, rather than warn about it
            raise FluxStatus.from_entry(
                "RESOURCE_LIMIT",
                f"the broker holds {limit} streams, its limit (limits.streams.max.count); "
                "delete a stream first",
            )
        task = asyncio.ensure_future(create)
        self._creating_streams += 1
        task.add_done_callback(self._created)
        return await asyncio.shield(task)

    def _created(self, _task: asyncio.Future[Any]) -> None:
        self._creating_streams -= 1

    def hold_subscription(self, peer: str) -> Callable[[object], None]:
        """Count one open subscription of the connection ``peer``; return its release.

        The caller releases it when the call is over for gRPC too (``add_done_callback``):
        a subscription cut off while its client does not read still holds what gRPC queued
        for it, so it keeps counting until the client reads, cancels or disconnects.

        Args:
            peer: The call's peer as grpc.aio names it (``context.peer()``).

        Returns:
            The release (it takes and ignores the call gRPC passes to done callbacks); calling
            it more than once releases once.

        Raises:
            FluxStatus: RESOURCE_LIMIT when the connection already holds its limit.
        """
        count = self._subscriptions.get(peer, 0)
        limit = self.settings.connection_subscriptions_max_count
        if count >= limit:
            raise FluxStatus.from_entry(
                "RESOURCE_LIMIT",
                f"this connection has {count} open subscriptions, its limit "
                "(limits.connection.subscriptions.max.count); end one first",
            )
        self._subscriptions[peer] = count + 1
        released = False

        def release(_call: object = None) -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._subscriptions[peer] - 1
            if left:
                self._subscriptions[peer] = left
            else:
                del self._subscriptions[peer]

        return release
