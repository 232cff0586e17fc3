"""A TCP forwarder that puts network faults between a real client and a real broker.

Integration tests point a client (a gRPC channel, a NATS connection) at
:attr:`TcpProxy.address` instead of the server's own address, and then break the network on
demand. The proxy is plain TCP: it neither parses nor changes what it forwards, so the client
and the server see exactly what they would see on a real network that misbehaves.

The faults and what each one looks like to the client:

- :meth:`TcpProxy.retarget` -- *the server moved*. New connections go to another address;
  existing ones stay on the old one. A restarted broker gets new ports, and the proxy keeps
  the address the client knows stable across the restart.
- :meth:`TcpProxy.reset` -- *a forced disconnect*. Every current connection is aborted on both
  sides with a TCP reset (``SO_LINGER`` 0), so the client reads ``ECONNRESET`` (or end of file
  when the reset races its read) and the server sees its peer vanish. New connections are
  accepted and forwarded as usual: the client's reconnect path is what gets exercised.
- :meth:`TcpProxy.black_hole` -- *a dropped network*. Packets go nowhere and nothing answers,
  yet no socket is closed: the client keeps a half-open connection and only its deadlines or
  keepalives can tell that something is wrong. While it is on, bytes of every current
  connection are read and discarded in both directions, and new connections are accepted but
  never connected upstream (their bytes are discarded too). Turning it off forwards *new*
  connections again; connections that were black-holed stay dead, as a TCP connection whose
  packets were lost for good does (their byte streams have gaps, so forwarding again would
  corrupt them). They are held open until the client or the server closes them, or until
  :meth:`TcpProxy.reset` / :meth:`TcpProxy.close` -- call ``reset()`` after the black hole to
  make the client notice at once.
- :meth:`TcpProxy.refuse` -- *the server is down*. New connection attempts are refused: the
  client's ``connect()`` fails with ``ECONNREFUSED``, exactly as when nothing listens on the
  port. On Linux the listening socket stops listening while keeping its port (so the address
  stays the proxy's); elsewhere new connections are accepted and reset at once instead, which
  clients also report as "unavailable". Existing connections are not touched: combine it with
  :meth:`TcpProxy.reset` for "the server crashed".

Everything is bounded: reads are at most 64 KiB, each direction waits for the receiving
transport to drain before it reads more (so at most one read plus the transport's write
buffer is in flight per direction), accepting is done in batches, and every task the proxy
starts is tracked and cancelled by :meth:`TcpProxy.close`. The proxy needs an event loop with
``add_reader`` (the default loop on Unix).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket
import struct
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self

__all__ = ["DEFAULT_CONNECT_TIMEOUT_S", "TcpProxy"]

DEFAULT_CONNECT_TIMEOUT_S: Final = 10.0
_CHUNK_BYTES: Final = 64 * 1024  # the most one read takes from a socket
_ACCEPT_BATCH: Final = 32  # connections accepted per readiness callback; the rest wait a turn
_BACKLOG: Final = 128
_RESET_ON_CLOSE: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def _split_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) into its parts."""
    host, colon, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not a host:port address: {address!r}")
    return host, int(port)


def _join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reset_socket(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset instead of an orderly FIN."""
    with contextlib.suppress(OSError):  # already closed, or never connected
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    sock.close()


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Abort a stream's transport with a TCP reset; a no-op when it is already gone."""
    if writer is None:
        return
    transport = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # the socket is already closed
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    transport.abort()


@dataclass(eq=False, slots=True)
class _Connection:
    """One accepted client connection and, once connected, its upstream."""

    sock: socket.socket  # the accepted socket, until ``client`` owns it
    black_holed: bool
    client: asyncio.StreamWriter | None = None
    upstream: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def abort(self) -> None:
        """Reset both sides now."""
        _abort(self.client)
        _abort(self.upstream)


async def _pump(
    connection: _Connection, source: asyncio.StreamReader, sink: asyncio.StreamWriter | None
) -> None:
    """Copy ``source`` to ``sink`` until end of file; discard while black-holed.

    ``sink`` is ``None`` for a connection that was black-holed before it had an upstream. An
    end of file is passed on as a half-close. A socket error aborts the whole connection (the
    other direction then reads end of file and ends too).
    """
    try:
        while data := await source.read(_CHUNK_BYTES):
            if connection.black_holed or sink is None:
                continue  # lost in the network
            sink.write(data)
            await sink.drain()
        if (
            not connection.black_holed
            and sink is not None
            and not sink.transport.is_closing()
            and sink.can_write_eof()
        ):
            sink.write_eof()
    except OSError:  # ConnectionResetError, BrokenPipeError, ...
        connection.abort()


class TcpProxy:
    """An asyncio TCP forwarder from a stable local address to a target that can move.

    Create it with :meth:`start` (or ``async with await TcpProxy.start(...)``) and stop it with
    :meth:`close`. All methods must be called from the event loop it was started on. See the
    module documentation for what each fault simulates.
    """

    def __init__(
        self,
        listener: socket.socket,
        target: str,
        *,
        port_kept_when_refusing: bool,
        connect_timeout_s: float,
    ) -> None:
        """Wrap a listening socket; use :meth:`start` instead."""
        self._loop = asyncio.get_running_loop()
        self._listener = listener
        bound = listener.getsockname()
        self._host: str = bound[0]
        self._port: int = bound[1]
        self._target = target
        self._target_parts = _split_address(target)
        self._connect_timeout_s = connect_timeout_s
        self._port_kept_when_refusing = port_kept_when_refusing
        self._connections: set[_Connection] = set()
        self._accepted = 0
        self._black_hole = False
        self._refusing = False
        self._not_listening = False  # refusing by having stopped listening (Linux)
        self._reading = False
        self._closed = False
        self._error: BaseException | None = None
        self._start_accepting()

    @classmethod
    async def start(
        cls,
        target: str,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
    ) -> Self:
        """Listen on ``host:port`` (a free port when 0) and forward connections to ``target``.

        Args:
            target: Where connections go, ``host:port``.
            host: The address to listen on.
            port: The port to listen on; 0 picks a free one.
            connect_timeout_s: How long connecting upstream may take; a client whose
                upstream cannot be reached in time (or refuses) is reset.

        Raises:
            ValueError: ``target`` is not a ``host:port`` address.
            OSError: The address cannot be listened on.
        """
        _split_address(target)
        listener, port_kept = _listen(host, port)
        try:
            return cls(
                listener,
                target,
                port_kept_when_refusing=port_kept,
                connect_timeout_s=connect_timeout_s,
            )
        except BaseException:
            listener.close()
            raise

    @property
    def address(self) -> str:
        """Where clients connect: ``host:port``, the same for the proxy's whole life."""
        return _join_address(self._host, self._port)

    @property
    def host(self) -> str:
        """The host the proxy listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        return self._port

    @property
    def target(self) -> str:
        """Where new connections are forwarded, ``host:port``."""
        return self._target

    @target.setter
    def target(self, target: str) -> None:
        self._target_parts = _split_address(target)
        self._target = target

    def retarget(self, target: str) -> None:
        """Forward new connections to ``target``; existing connections stay where they are.

        Raises:
            ValueError: ``target`` is not a ``host:port`` address.
        """
        self.target = target

    @property
    def connections(self) -> int:
        """How many accepted connections are open, black-holed ones included."""
        return len(self._connections)

    @property
    def accepted(self) -> int:
        """How many connections the proxy has accepted in all (refused ones do not count)."""
        return self._accepted

    @property
    def black_holed(self) -> bool:
        """Whether the black hole is on."""
        return self._black_hole

    @property
    def refusing(self) -> bool:
        """Whether new connections are refused."""
        return self._refusing

    def black_hole(self, on: bool = True) -> None:
        """Turn the black hole on or off.

        On: every current connection stops forwarding for good (bytes are discarded, sockets
        stay open), and new connections are accepted but never forwarded. Off: new connections
        are forwarded again; the black-holed ones stay dead until closed or :meth:`reset`.
        """
        self._black_hole = on
        if on:
            for connection in self._connections:
                connection.black_holed = True

    def refuse(self, on: bool = True) -> None:
        """Refuse new connections (on) or accept them again (off); existing ones go on.

        Raises:
            RuntimeError: The proxy is closed, or (off) its port could not be listened on
                again.
        """
        if self._closed:
            raise RuntimeError("the proxy is closed")
        if on == self._refusing:
            return
        self._refusing = on
        if on:
            if self._port_kept_when_refusing:
                self._stop_accepting()
                try:
                    # On Linux a listening socket that is shut down stops listening (pending
                    # connections are reset) but stays bound, and listen() revives it.
                    self._listener.shutdown(socket.SHUT_RD)
                except OSError:
                    self._start_accepting()  # elsewhere: accept and reset instead
                else:
                    self._not_listening = True
            return
        if self._not_listening:
            self._listener.listen(_BACKLOG)
            self._not_listening = False
            if self._listener.getsockname()[1] != self._port:  # pragma: no cover -- not Linux
                raise RuntimeError(f"the proxy lost its port {self._port}")
            self._start_accepting()

    async def reset(self) -> int:
        """Abort every current connection, both sides, with a TCP reset; return how many.

        New connections are accepted (unless refused) and forwarded (unless black-holed).
        When this returns, the reset sockets are closed.
        """
        connections = list(self._connections)
        for connection in connections:
            connection.abort()
        tasks = [connection.task for connection in connections if connection.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        return len(connections)

    async def close(self) -> None:
        """Stop listening and reset every connection; idempotent.

        Raises:
            Exception: The first unexpected error a connection task or the accept loop met
                (a bug in the proxy or an exhausted system), so a test cannot miss it.
        """
        if not self._closed:
            self._closed = True
            self._stop_accepting()
            self._listener.close()
        await self.reset()
        error, self._error = self._error, None
        if error is not None:
            raise error

    async def __aenter__(self) -> Self:
        """Return the proxy; it is already running."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the proxy."""
        await self.close()

    def __repr__(self) -> str:
        """Show the addresses and the faults that are on."""
        faults = [
            name
            for name, on in (("black hole", self._black_hole), ("refusing", self._refusing))
            if on
        ]
        state = "closed" if self._closed else ", ".join(faults) or "forwarding"
        return f"<TcpProxy {self.address} -> {self._target} ({state})>"

    def _start_accepting(self) -> None:
        if not self._reading:
            self._loop.add_reader(self._listener.fileno(), self._accept_ready)
            self._reading = True

    def _stop_accepting(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._listener.fileno())
            self._reading = False

    def _accept_ready(self) -> None:
        """Accept the connections that are waiting, at most a batch of them."""
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while it waited in the backlog
            except OSError as error:
                # Out of descriptors or memory: the listener would stay readable and this
                # callback would spin. Stop accepting; close() raises the error.
                self._stop_accepting()
                if self._error is None:
                    self._error = error
                return
            if self._refusing:  # refusing where the listener cannot stop listening
                _reset_socket(sock)
                continue
            sock.setblocking(False)
            self._accepted += 1
            connection = _Connection(sock=sock, black_holed=self._black_hole)
            task = self._loop.create_task(
                self._serve(connection),
                name=f"TcpProxy {self.address} connection {self._accepted}",
            )
            connection.task = task
            self._connections.add(connection)
            task.add_done_callback(functools.partial(self._forget, connection))

    def _forget(self, connection: _Connection, task: asyncio.Task[None]) -> None:
        """Drop a finished connection; keep its error, if it had one, for close()."""
        self._connections.discard(connection)
        if connection.client is None:
            # The task never wrapped the socket (cancelled before it ran, or it failed).
            _reset_socket(connection.sock)
        error = None if task.cancelled() else task.exception()
        if error is not None and self._error is None:
            self._error = error

    async def _serve(self, connection: _Connection) -> None:
        """Forward one connection until both sides are done with it."""
        try:
            reader, connection.client = await asyncio.open_connection(
                sock=connection.sock, limit=_CHUNK_BYTES
            )
            if connection.black_holed:  # accepted in the black hole: nothing goes upstream
                await _pump(connection, reader, None)
            else:
                host, port = self._target_parts
                try:
                    async with asyncio.timeout(self._connect_timeout_s):
                        upstream_reader, connection.upstream = await asyncio.open_connection(
                            host, port, limit=_CHUNK_BYTES
                        )
                except (OSError, TimeoutError):
                    connection.abort()  # the client sees its connection reset
                    return
                await asyncio.gather(
                    _pump(connection, reader, connection.upstream),
                    _pump(connection, upstream_reader, connection.client),
                )
            for writer in (connection.client, connection.upstream):
                if writer is not None:
                    writer.close()
            for writer in (connection.client, connection.upstream):
                if writer is not None:
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except BaseException:
            connection.abort()
            raise


def _listen(host: str, port: int) -> tuple[socket.socket, bool]:
    """Return a non-blocking socket listening on ``host:port`` and whether it keeps its port.

    Linux releases an automatically chosen port when a listening socket is shut down (see
    :meth:`TcpProxy.refuse`), but not a port given to ``bind()`` explicitly. So a free port is
    first reserved by a second socket, and the listener binds to it by number; both set
    ``SO_REUSEADDR``, which lets two sockets that are not listening share a port on Linux.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        port_kept = True
        if port == 0:
            with socket.socket(family, kind, proto) as reservation:
                reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                reservation.bind(address)
                try:
                    listener.bind(reservation.getsockname())
                except OSError as error:
                    if error.errno != errno.EADDRINUSE:
                        raise
                    port_kept = False  # not Linux: an automatic port, refused by resets
            if not port_kept:
                listener.bind(address)
        else:
            listener.bind(address)
        listener.listen(_BACKLOG)
        listener.setblocking(False)
    except BaseException:
        listener.close()
        raise
    return listener, port_kept
