"""Client: connections, metadata, admin calls; it makes producers and subscriptions.

One gRPC channel per broker address, kept for the client's life; gRPC reconnects a channel by
itself (with a short backoff, so a restarted broker is found within a second) and keepalive
pings notice a dead peer. Calls go to the partition's leader when they are about a partition
(from the metadata cache), to any broker otherwise; a retriable failure refreshes the metadata
and tries again under the client's :class:`~flux_client.RetryPolicy`, within the call's
timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol, Self, TypeVar

import grpc

from flux_client._errors import (
    CallTimeoutError,
    ClosedError,
    ConnectionFailedError,
    FluxError,
    NotLeaderError,
    from_rpc_error,
)
from flux_client._metadata import MetadataCache, to_partition
from flux_client._retry import RetryPolicy
from flux_client._types import Metadata, PartitionMetadata, Start, Stop
from flux_proto import api_pb2, api_pb2_grpc

if TYPE_CHECKING:
    from flux_client._partitioner import Partitioner
    from flux_client._producer import Producer
    from flux_client._subscription import Subscription
    from flux_client._types import AckPolicy

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_MS",
    "DEFAULT_KEEPALIVE_MS",
    "DEFAULT_REQUEST_TIMEOUT_MS",
    "Client",
    "connect",
]

#: How long connect() tries to reach a broker before it fails.
DEFAULT_CONNECT_TIMEOUT_MS: Final = 10_000
#: Deadline of one admin or metadata call, retries included.
DEFAULT_REQUEST_TIMEOUT_MS: Final = 10_000
#: Keepalive ping interval on idle connections: a black-holed broker is noticed within about
#: this plus DEFAULT_KEEPALIVE_TIMEOUT_MS.
DEFAULT_KEEPALIVE_MS: Final = 10_000
#: Shortest keepalive interval: brokers answer faster pings with GOAWAY.
KEEPALIVE_MIN_MS: Final = 1_000
#: How long a keepalive ping may stay unanswered before the connection is declared dead.
DEFAULT_KEEPALIVE_TIMEOUT_MS: Final = 5_000
#: Largest message the client accepts (a RecordBatch is at most 4 MiB of records).
GRPC_RECEIVE_MAX_BYTES: Final = 16 * 1024 * 1024
#: Reconnect backoff of a channel: short, so a restarted broker is found quickly.
_RECONNECT_BACKOFF_MIN_MS: Final = 100
_RECONNECT_BACKOFF_MAX_MS: Final = 1_000

T = TypeVar("T")

#: CreateStream options: keyword → (request field, value type); durations in milliseconds.
_STREAM_OPTIONS: Final[dict[str, tuple[str, type]]] = {
    "retention_max_bytes": ("retentionMaxBytes", int),
    "retention_max_messages": ("retentionMaxMessages", int),
    "retention_max_age_ms": ("retentionMaxAge", int),
    "cleaner_interval_ms": ("cleanerInterval", int),
    "segment_max_bytes": ("segmentMaxBytes", int),
    "segment_max_age_ms": ("segmentMaxAge", int),
    "compact_max_goroutines": ("compactMaxGoroutines", int),
    "compact_enabled": ("compactEnabled", bool),
    "auto_pause_time_ms": ("autoPauseTime", int),
    "auto_pause_disable_if_subscribers": ("autoPauseDisableIfSubscribers", bool),
    "min_isr": ("minIsr", int),
    "optimistic_concurrency_control": ("optimisticConcurrencyControl", bool),
    "encryption": ("encryption", bool),
}


class _Closable(Protocol):
    async def close(self, timeout_ms: float | None = None) -> None: ...


async def connect(
    addresses: str | Sequence[str],
    *,
    connect_timeout_ms: float = DEFAULT_CONNECT_TIMEOUT_MS,
    request_timeout_ms: float = DEFAULT_REQUEST_TIMEOUT_MS,
    keepalive_ms: float = DEFAULT_KEEPALIVE_MS,
    keepalive_timeout_ms: float = DEFAULT_KEEPALIVE_TIMEOUT_MS,
    retry: RetryPolicy | None = None,
) -> Client:
    """Connect to a Flux (or Liftbridge) cluster.

    Args:
        addresses: One ``host:port`` or several; any broker of the cluster will do, the others
            are learned from its metadata.
        connect_timeout_ms: How long to keep trying to reach a broker.
        request_timeout_ms: Deadline of each admin and metadata call, retries included.
        keepalive_ms: Keepalive ping interval; a dead connection is noticed within about
            ``keepalive_ms + keepalive_timeout_ms``.
        keepalive_timeout_ms: How long a ping may stay unanswered.
        retry: Backoff between attempts of calls that are safe to repeat.

    Returns:
        A connected :class:`Client` (an async context manager).

    Raises:
        ConnectionFailedError: No broker answered within ``connect_timeout_ms``.
        ValueError: No address was given, or an address is not ``host:port``.
    """
    client = Client(
        addresses,
        request_timeout_ms=request_timeout_ms,
        keepalive_ms=keepalive_ms,
        keepalive_timeout_ms=keepalive_timeout_ms,
        retry=retry,
    )
    try:
        await client._bootstrap(connect_timeout_ms / 1000)
    except BaseException:
        await client.close()
        raise
    return client


def _check_addresses(addresses: str | Sequence[str]) -> list[str]:
    listed = [addresses] if isinstance(addresses, str) else list(addresses)
    if not listed:
        raise ValueError("connect() needs at least one broker address")
    for address in listed:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"broker address {address!r} is not host:port")
    return listed


class Client:
    """A connection to a Flux cluster; create it with :func:`connect`.

    Use it as ``async with await flux_client.connect(...) as client:`` or call :meth:`close`.
    Producers and subscriptions made from it are closed with it.
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        request_timeout_ms: float = DEFAULT_REQUEST_TIMEOUT_MS,
        keepalive_ms: float = DEFAULT_KEEPALIVE_MS,
        keepalive_timeout_ms: float = DEFAULT_KEEPALIVE_TIMEOUT_MS,
        retry: RetryPolicy | None = None,
    ) -> None:
        self._bootstrap_addresses = _check_addresses(addresses)
        if keepalive_ms < KEEPALIVE_MIN_MS:
            raise ValueError(
                f"keepalive_ms must be at least {KEEPALIVE_MIN_MS} (brokers refuse faster pings)"
            )
        self._request_timeout_s = request_timeout_ms / 1000
        self._keepalive_ms = int(keepalive_ms)
        self._keepalive_timeout_ms = int(keepalive_timeout_ms)
        self.retry: RetryPolicy = retry or RetryPolicy()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, api_pb2_grpc.APIAsyncStub] = {}
        self._rotation = itertools.count()
        self.metadata_cache = MetadataCache(self._fetch_metadata)
        self._children: set[_Closable] = set()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    async def close(self, timeout_ms: float | None = None) -> None:
        """Close every producer (flushing it) and subscription, then the connections.

        Args:
            timeout_ms: Bound for closing the producers and subscriptions; sends still pending
                after it fail with :class:`ClosedError`. Default: the request timeout.
        """
        if self._closed:
            return
        self._closed = True
        bound_ms = timeout_ms if timeout_ms is not None else self._request_timeout_s * 1000
        children = list(self._children)
        self._children.clear()
        if children:
            await asyncio.gather(
                *(child.close(bound_ms) for child in children), return_exceptions=True
            )
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the client is closed")

    def _adopt(self, child: _Closable) -> None:
        self._check_open()
        self._children.add(child)

    def _release(self, child: _Closable) -> None:
        self._children.discard(child)

    # -- connections -------------------------------------------------------------------------

    def stub(self, address: str) -> api_pb2_grpc.APIAsyncStub:
        """The API stub of ``address``'s channel (opened on first use)."""
        self._check_open()
        stub = self._stubs.get(address)
        if stub is None:
            channel = grpc.aio.insecure_channel(address, options=self._channel_options())
            self._channels[address] = channel
            stub = self._stubs[address] = api_pb2_grpc.APIStub(channel)
        return stub

    def _channel_options(self) -> list[tuple[str, Any]]:
        return [
            ("grpc.keepalive_time_ms", self._keepalive_ms),
            ("grpc.keepalive_timeout_ms", self._keepalive_timeout_ms),
            # grpcio 1.85 takes a ping's deadline from this one (60 s by default), not from
            # keepalive_timeout_ms alone: without it a black-holed broker goes unnoticed.
            ("grpc.http2.ping_timeout_ms", self._keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", GRPC_RECEIVE_MAX_BYTES),
            ("grpc.initial_reconnect_backoff_ms", _RECONNECT_BACKOFF_MIN_MS),
            ("grpc.min_reconnect_backoff_ms", _RECONNECT_BACKOFF_MIN_MS),
            ("grpc.max_reconnect_backoff_ms", _RECONNECT_BACKOFF_MAX_MS),
        ]

    def _next_address(self) -> str:
        known = self.metadata_cache.broker_addresses
        candidates = known + [a for a in self._bootstrap_addresses if a not in known]
        return candidates[next(self._rotation) % len(candidates)]

    async def _bootstrap(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        backoffs = self.retry.backoffs_s()
        last: FluxError | None = None
        while True:
            for address in self._bootstrap_addresses:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    response = await self.stub(address).FetchMetadata(
                        api_pb2.FetchMetadataRequest(), timeout=remaining
                    )
                except grpc.aio.AioRpcError as error:
                    last = from_rpc_error(error)
                    continue
                self.metadata_cache.update(response)
                return
            wait = next(backoffs, None)
            if wait is None or time.monotonic() + wait >= deadline:
                raise ConnectionFailedError(
                    f"no broker answered at {', '.join(self._bootstrap_addresses)} "
                    f"within {timeout_s:g} s"
                    + (f" (last error: {last.message})" if last is not None else "")
                ) from last
            await asyncio.sleep(wait)

    # -- calls -------------------------------------------------------------------------------

    async def call(
        self,
        send: Callable[[api_pb2_grpc.APIAsyncStub, float], Awaitable[T]],
        *,
        leader_of: tuple[str, int] | None = None,
        timeout_s: float | None = None,
    ) -> T:
        """Run one unary call with retries: ``send(stub, timeout_s)``.

        Args:
            send: Makes the call on the given stub with the given deadline.
            leader_of: (stream, partition) to route to its leader; any broker otherwise.
            timeout_s: Deadline for all attempts; the client's request timeout by default.

        Raises:
            FluxError: The call failed, and retrying did not help or was not safe.
        """
        self._check_open()
        deadline = time.monotonic() + (timeout_s or self._request_timeout_s)
        backoffs = self.retry.backoffs_s()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CallTimeoutError(
                    f"no answer within {timeout_s or self._request_timeout_s:g} s"
                )
            try:
                address = await self._address_for(leader_of)
                return await send(self.stub(address), remaining)
            except grpc.aio.AioRpcError as rpc_error:
                error = from_rpc_error(rpc_error)
                cause: BaseException = rpc_error
            except FluxError as flux_error:
                error, cause = flux_error, flux_error.__cause__ or flux_error
            if self._closed:
                raise ClosedError("the client was closed during the call") from cause
            wait = next(backoffs, None)
            if (
                not error.retriable
                or isinstance(error, CallTimeoutError)
                or wait is None
                or time.monotonic() + wait >= deadline
            ):
                raise error from cause
            if leader_of is not None and isinstance(error, NotLeaderError | ConnectionFailedError):
                with contextlib.suppress(FluxError):
                    await self.metadata_cache.refresh(leader_of[0])
            await asyncio.sleep(wait)

    async def _address_for(self, leader_of: tuple[str, int] | None) -> str:
        if leader_of is None:
            return self._next_address()
        address = await self.metadata_cache.leader_address(*leader_of)
        if address is None:
            raise NotLeaderError(f"partition {leader_of[1]} of {leader_of[0]!r} has no leader")
        return address

    async def _fetch_metadata(self, streams: Iterable[str]) -> api_pb2.FetchMetadataResponse:
        request = api_pb2.FetchMetadataRequest(streams=list(streams))
        return await self.call(lambda stub, timeout: stub.FetchMetadata(request, timeout=timeout))

    # -- admin -------------------------------------------------------------------------------

    async def create_stream(
        self,
        name: str,
        subject: str | None = None,
        partitions: int = 1,
        replication_factor: int = 1,
        *,
        group: str = "",
        **options: int | bool,
    ) -> None:
        """Create a stream attached to a NATS subject.

        Args:
            name: The stream's name.
            subject: Its NATS subject; the name by default. Partition N > 0 uses
                ``<subject>.<N>``.
            partitions: How many partitions.
            replication_factor: Copies of each partition (-1: every broker).
            group: NATS queue group for load-balancing streams on one subject.
            **options: Per-stream settings overriding the broker's: ``retention_max_bytes``,
                ``retention_max_messages``, ``retention_max_age_ms``, ``cleaner_interval_ms``,
                ``segment_max_bytes``, ``segment_max_age_ms``, ``compact_max_goroutines``,
                ``compact_enabled``, ``auto_pause_time_ms``,
                ``auto_pause_disable_if_subscribers``, ``min_isr``,
                ``optimistic_concurrency_control``, ``encryption``.

        Raises:
            StreamExistsError: A stream has this name (also when an earlier attempt whose
                answer was lost created it).
            InvalidArgumentError: A name, subject or option the broker refuses.
            TypeError: An unknown option, or one of the wrong type.
        """
        request = api_pb2.CreateStreamRequest(
            name=name,
            subject=name if subject is None else subject,
            partitions=partitions,
            replicationFactor=replication_factor,
            group=group,
        )
        for key, value in options.items():
            spec = _STREAM_OPTIONS.get(key)
            if spec is None:
                raise TypeError(
                    f"create_stream() got an unknown option {key!r}; "
                    f"known: {', '.join(sorted(_STREAM_OPTIONS))}"
                )
            field_name, kind = spec
            if type(value) is not kind:
                raise TypeError(f"create_stream() option {key!r} must be {kind.__name__}")
            getattr(request, field_name).value = value
        await self.call(lambda stub, timeout: stub.CreateStream(request, timeout=timeout))
        self.metadata_cache.forget(name)

    async def delete_stream(self, name: str) -> None:
        """Delete a stream and its data.

        Raises:
            StreamNotFoundError: No stream has this name.
        """
        request = api_pb2.DeleteStreamRequest(name=name)
        await self.call(lambda stub, timeout: stub.DeleteStream(request, timeout=timeout))
        self.metadata_cache.forget(name)

    async def pause_stream(
        self, name: str, partitions: Iterable[int] | None = None, *, resume_all: bool = False
    ) -> None:
        """Pause partitions of a stream (all by default); a publish or subscribe resumes one.

        Args:
            name: The stream.
            partitions: Which partitions; every one when None.
            resume_all: When one partition is resumed, resume all of them.
        """
        request = api_pb2.PauseStreamRequest(
            name=name, partitions=list(partitions or ()), resumeAll=resume_all
        )
        await self.call(lambda stub, timeout: stub.PauseStream(request, timeout=timeout))
        self.metadata_cache.forget(name)

    async def set_stream_readonly(
        self, name: str, partitions: Iterable[int] | None = None, *, readonly: bool = True
    ) -> None:
        """Make partitions of a stream read-only (all by default), or writable again."""
        request = api_pb2.SetStreamReadonlyRequest(
            name=name, partitions=list(partitions or ()), readonly=readonly
        )
        await self.call(lambda stub, timeout: stub.SetStreamReadonly(request, timeout=timeout))
        self.metadata_cache.forget(name)

    async def fetch_metadata(self, *streams: str) -> Metadata:
        """The brokers and the given streams (every stream when none is given).

        Streams that do not exist are absent from ``Metadata.streams``.
        """
        response = await self._fetch_metadata(streams)
        return self.metadata_cache.update(response)

    async def fetch_partition_metadata(self, stream: str, partition: int = 0) -> PartitionMetadata:
        """One partition's metadata, from its leader (offsets are current).

        Raises:
            StreamNotFoundError, PartitionNotFoundError: No such stream or partition.
        """
        request = api_pb2.FetchPartitionMetadataRequest(stream=stream, partition=partition)
        response = await self.call(
            lambda stub, timeout: stub.FetchPartitionMetadata(request, timeout=timeout),
            leader_of=(stream, partition),
        )
        return to_partition(stream, response.metadata)

    async def set_cursor(self, stream: str, partition: int, cursor_id: str, offset: int) -> None:
        """Store ``offset`` under ``cursor_id`` for a partition (-1 clears it).

        Raises:
            OffsetOutOfRangeError: ``offset`` is past the partition's newest offset + 1.
            CursorsDisabledError: The broker has cursors turned off.
        """
        request = api_pb2.SetCursorRequest(
            stream=stream, partition=partition, cursorId=cursor_id, offset=offset
        )
        await self.call(lambda stub, timeout: stub.SetCursor(request, timeout=timeout))

    async def fetch_cursor(self, stream: str, partition: int, cursor_id: str) -> int:
        """The offset stored under ``cursor_id`` for a partition; -1 if never set."""
        request = api_pb2.FetchCursorRequest(stream=stream, partition=partition, cursorId=cursor_id)
        response = await self.call(lambda stub, timeout: stub.FetchCursor(request, timeout=timeout))
        return int(response.offset)

    # -- data --------------------------------------------------------------------------------

    def producer(
        self,
        *,
        ack_policy: AckPolicy | None = None,
        linger_ms: float = 0.0,
        max_batch_bytes: int | None = None,
        max_buffer_bytes: int | None = None,
        max_block_ms: float | None = None,
        delivery_timeout_ms: float | None = None,
        partitioner: Partitioner | None = None,
        idempotent: bool = True,
    ) -> Producer:
        """A producer that batches sends over the batched publish RPC.

        See :class:`~flux_client.Producer` for the arguments and their defaults.
        """
        from flux_client._producer import Producer  # noqa: PLC0415 (import cycle)

        return Producer(
            self,
            ack_policy=ack_policy,
            linger_ms=linger_ms,
            max_batch_bytes=max_batch_bytes,
            max_buffer_bytes=max_buffer_bytes,
            max_block_ms=max_block_ms,
            delivery_timeout_ms=delivery_timeout_ms,
            partitioner=partitioner,
            idempotent=idempotent,
        )

    def subscribe(
        self,
        stream: str,
        partition: int = 0,
        *,
        start: Start = Start.NEW_ONLY,
        stop: Stop | None = None,
        max_batch_bytes: int | None = None,
        max_buffer_bytes: int | None = None,
        resume: bool = False,
    ) -> Subscription:
        """Read one partition: ``async for msg in client.subscribe(...)``.

        See :class:`~flux_client.Subscription` for the arguments and their defaults.
        """
        from flux_client._subscription import Subscription  # noqa: PLC0415 (import cycle)

        return Subscription(
            self,
            stream,
            [partition],
            start=start,
            stop=stop,
            max_batch_bytes=max_batch_bytes,
            max_buffer_bytes=max_buffer_bytes,
            resume=resume,
        )

    def subscribe_stream(
        self,
        stream: str,
        *,
        start: Start = Start.NEW_ONLY,
        stop: Stop | None = None,
        max_batch_bytes: int | None = None,
        max_buffer_bytes: int | None = None,
        resume: bool = False,
    ) -> Subscription:
        """Read every partition of a stream through one iterator (order kept per partition)."""
        from flux_client._subscription import Subscription  # noqa: PLC0415 (import cycle)

        return Subscription(
            self,
            stream,
            None,
            start=start,
            stop=stop,
            max_batch_bytes=max_batch_bytes,
            max_buffer_bytes=max_buffer_bytes,
            resume=resume,
        )
