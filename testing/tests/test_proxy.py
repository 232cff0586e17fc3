"""TcpProxy forwards real sockets and injects each fault it promises, with nothing left running."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2

from flux_testing import TcpProxy, wait_for
from flux_testing.broker import BrokerProcess

# How long a test waits for an echo that must not come. Long enough for loopback to deliver
# several times over, short enough to keep the suite quick; a late echo fails a later assertion.
SILENCE_S = 0.3
# The bound on waits for things that do happen.
TIMEOUT_S = 5.0


class EchoServer:
    """A real TCP echo server on a free 127.0.0.1 port that counts its connections."""

    def __init__(self) -> None:
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[object]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @classmethod
    async def start(cls) -> EchoServer:
        echo = cls()
        echo._server = await asyncio.start_server(echo._handle, "127.0.0.1", 0)
        return echo

    @property
    def address(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        self.accepted += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()
            self._writers.discard(writer)
            self._handlers.discard(task)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        if handlers:
            await asyncio.wait(handlers)
        await self._server.wait_closed()


@pytest_asyncio.fixture
async def echo_factory() -> AsyncIterator[Callable[[], Awaitable[EchoServer]]]:
    """Start echo servers for one test; all are closed when it ends."""
    servers: list[EchoServer] = []

    async def start() -> EchoServer:
        server = await EchoServer.start()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            await server.close()


@pytest_asyncio.fixture
async def echo(echo_factory: Callable[[], Awaitable[EchoServer]]) -> EchoServer:
    return await echo_factory()


Client = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@pytest_asyncio.fixture
async def connect() -> AsyncIterator[Callable[[str], Awaitable[Client]]]:
    """Open client connections for one test; all are closed when it ends."""
    writers: list[asyncio.StreamWriter] = []

    async def open_client(address: str) -> Client:
        host, _, port = address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writers.append(writer)
        return reader, writer

    try:
        yield open_client
    finally:
        for writer in writers:
            writer.close()
        for writer in writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@pytest_asyncio.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[TcpProxy]:
    async with await TcpProxy.start(echo.address) as started:
        yield started


async def _echoes(client: Client, payload: bytes = b"ping") -> bool:
    reader, writer = client
    writer.write(payload)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(payload)), TIMEOUT_S) == payload


async def _stays_silent(client: Client, payload: bytes = b"ping") -> bool:
    """Send ``payload``; True when nothing comes back and the connection stays open."""
    reader, writer = client
    writer.write(payload)
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), SILENCE_S)
    return not reader.at_eof() and not writer.is_closing()


async def _closed_by_peer(reader: asyncio.StreamReader) -> bool:
    """True when the peer closes or resets the connection (within the bound)."""
    try:
        return await asyncio.wait_for(reader.read(1), TIMEOUT_S) == b""
    except ConnectionResetError:
        return True


def _proxy_tasks() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name().startswith("TcpProxy")]


async def test_bytes_round_trip_both_ways(
    proxy: TcpProxy, echo: EchoServer, connect: Callable[[str], Awaitable[Client]]
) -> None:
    assert proxy.address == f"127.0.0.1:{proxy.port}"
    assert proxy.target == echo.address
    client = await connect(proxy.address)
    assert await _echoes(client, b"hello")

    # More than the socket buffers and the 64 KiB reads hold: backpressure, not buffering.
    reader, writer = client
    payload = bytes(range(256)) * 8192  # 2 MiB
    received = asyncio.ensure_future(reader.readexactly(len(payload)))
    writer.write(payload)
    await writer.drain()
    assert await asyncio.wait_for(received, TIMEOUT_S) == payload
    assert (proxy.accepted, proxy.connections, echo.accepted) == (1, 1, 1)

    # A half-close travels through; the echo server then closes, and so does the proxy.
    writer.write_eof()
    assert await _closed_by_peer(reader)
    await wait_for(lambda: proxy.connections == 0, TIMEOUT_S, message="connection closed")


async def test_retarget_moves_new_connections_only(
    proxy: TcpProxy,
    echo: EchoServer,
    echo_factory: Callable[[], Awaitable[EchoServer]],
    connect: Callable[[str], Awaitable[Client]],
) -> None:
    before = await connect(proxy.address)
    assert await _echoes(before)
    moved = await echo_factory()
    address = proxy.address
    proxy.retarget(moved.address)
    assert proxy.target == moved.address
    assert proxy.address == address

    after = await connect(proxy.address)
    assert await _echoes(after)
    assert await _echoes(before)  # still on the first server
    assert (echo.accepted, moved.accepted) == (1, 1)

    proxy.target = echo.address
    assert await _echoes(await connect(proxy.address))
    assert (echo.accepted, moved.accepted) == (2, 1)
    with pytest.raises(ValueError, match="host:port"):
        proxy.retarget("no-port")
    assert proxy.target == echo.address


async def test_reset_disconnects_everyone_and_accepts_again(
    proxy: TcpProxy, echo: EchoServer, connect: Callable[[str], Awaitable[Client]]
) -> None:
    clients = [await connect(proxy.address) for _ in range(3)]
    for client in clients:
        assert await _echoes(client)
    assert proxy.connections == 3

    assert await proxy.reset() == 3
    assert proxy.connections == 0
    for reader, _ in clients:
        assert await _closed_by_peer(reader)

    again = await connect(proxy.address)
    assert await _echoes(again)
    assert (proxy.accepted, proxy.connections, echo.accepted) == (4, 1, 4)


async def test_black_hole_keeps_sockets_open_and_forwards_nothing(
    proxy: TcpProxy, echo: EchoServer, connect: Callable[[str], Awaitable[Client]]
) -> None:
    existing = await connect(proxy.address)
    assert await _echoes(existing)

    proxy.black_hole()
    assert proxy.black_holed
    assert await _stays_silent(existing)
    during = await connect(proxy.address)  # accepted, never connected upstream
    assert await _stays_silent(during)
    assert (proxy.accepted, proxy.connections, echo.accepted) == (2, 2, 1)

    proxy.black_hole(False)
    after = await connect(proxy.address)
    assert await _echoes(after)
    # Documented: what the black hole swallowed stays swallowed; reset() ends those.
    assert await _stays_silent(existing)
    assert proxy.connections == 3

    assert await proxy.reset() == 3
    assert await _closed_by_peer(existing[0])
    assert await _closed_by_peer(during[0])
    assert await _echoes(await connect(proxy.address))


async def test_refuse_refuses_new_connections_and_keeps_existing_ones(
    proxy: TcpProxy, connect: Callable[[str], Awaitable[Client]]
) -> None:
    existing = await connect(proxy.address)
    assert await _echoes(existing)
    address = proxy.address

    proxy.refuse()
    proxy.refuse()  # idempotent
    assert proxy.refusing
    with pytest.raises(ConnectionRefusedError):
        await connect(proxy.address)
    assert await _echoes(existing)
    assert proxy.accepted == 1

    proxy.refuse(False)
    assert (proxy.refusing, proxy.address) == (False, address)
    assert await _echoes(await connect(proxy.address))
    assert proxy.accepted == 2


async def test_an_unreachable_target_resets_the_client(
    proxy: TcpProxy,
    echo_factory: Callable[[], Awaitable[EchoServer]],
    connect: Callable[[str], Awaitable[Client]],
) -> None:
    gone = await echo_factory()
    address = gone.address
    await gone.close()  # its port now refuses connections
    proxy.retarget(address)
    reader, _ = await connect(proxy.address)
    assert await _closed_by_peer(reader)
    await wait_for(lambda: proxy.connections == 0, TIMEOUT_S, message="connection dropped")
    assert proxy.accepted == 1


async def test_close_stops_listening_and_leaves_nothing_running(
    echo: EchoServer, connect: Callable[[str], Awaitable[Client]]
) -> None:
    proxy = await TcpProxy.start(echo.address)
    forwarded = await connect(proxy.address)
    assert await _echoes(forwarded)
    proxy.black_hole()
    swallowed = await connect(proxy.address)
    assert await _stays_silent(swallowed)
    assert len(_proxy_tasks()) == 2

    await proxy.close()
    assert _proxy_tasks() == []
    assert proxy.connections == 0
    assert await _closed_by_peer(forwarded[0])
    assert await _closed_by_peer(swallowed[0])
    with pytest.raises(ConnectionRefusedError):
        await connect(proxy.address)
    await proxy.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        proxy.refuse()
    assert "closed" in repr(proxy)


async def test_start_rejects_a_target_that_is_not_an_address() -> None:
    with pytest.raises(ValueError, match="host:port"):
        await TcpProxy.start("127.0.0.1")
    with pytest.raises(ValueError, match="host:port"):
        await TcpProxy.start("127.0.0.1:70000")


async def _health(channel: grpc.aio.Channel, timeout_s: float) -> int:
    # The typed stubs of grpcio-health-checking declare no methods on HealthStub.
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response = await check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    return int(response.status)


@pytest.mark.integration
async def test_grpc_channel_survives_black_hole_and_reset(broker: BrokerProcess) -> None:
    async with (
        await TcpProxy.start(broker.address) as proxy,
        grpc.aio.insecure_channel(
            proxy.address, options=[("grpc.enable_http_proxy", 0)]
        ) as channel,
    ):
        assert await _health(channel, TIMEOUT_S) == health_pb2.HealthCheckResponse.SERVING
        assert proxy.connections == 1

        proxy.black_hole()
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await _health(channel, 1.0)
        assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert proxy.connections == 1  # half-open: nobody closed anything
        accepted = proxy.accepted

        proxy.black_hole(False)
        assert await proxy.reset() == 1

        async def serving() -> bool:
            try:
                return await _health(channel, 1.0) == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                return False

        assert await wait_for(serving, 20, interval_s=0.05, message="a health check to pass")
        assert proxy.accepted > accepted  # the channel reconnected through the proxy
