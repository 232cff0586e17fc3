"""The broker's HTTP endpoint for Prometheus and supervisors: metrics, liveness, readiness.

Served on the broker's event loop (``asyncio.start_server``, no thread) when ``metrics.port``
(``--metrics-port``) is set:

- ``GET /metrics``: every metric of the broker (:mod:`flux_broker.metrics`), Prometheus text
  format.
- ``GET /healthz``: liveness, ``200 ok`` whenever the event loop answers at all. A broker whose
  loop is stuck does not answer, and the probe's own timeout fails it.
- ``GET /readyz``: readiness, ``200 ready`` once start-up finished (every stream recovered,
  the gRPC API serving) while the NATS connection is up; otherwise ``503`` and one line
  saying why (``starting``, ``NATS is disconnected``, ``shutting down``).

``HEAD`` works on each; anything else is 404 or 405. One request per connection
(``Connection: close``). The handler never blocks the broker: each connection is its own task,
reading the request is bounded in size (:data:`REQUEST_MAX_BYTES`) and time
(:data:`REQUEST_TIMEOUT_S`), and so is writing the answer; past
:data:`CONNECTIONS_MAX` open connections a new one is closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import Final

from flux_broker.metrics import CONTENT_TYPE, BrokerMetrics

__all__ = [
    "CONNECTIONS_MAX",
    "REQUEST_MAX_BYTES",
    "REQUEST_TIMEOUT_S",
    "HealthServer",
]

_logger = logging.getLogger(__name__)

#: Bound on reading one request and on writing its answer.
REQUEST_TIMEOUT_S: Final = 5.0
#: Longest request line or header line, and most header lines.
REQUEST_MAX_BYTES: Final = 8 * 1024
_HEADERS_MAX: Final = 100
#: Connections served at once; more are closed without an answer.
CONNECTIONS_MAX: Final = 32
_TEXT: Final = "text/plain; charset=utf-8"
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class HealthServer:
    """The HTTP endpoint of one broker. Use :meth:`start`, then :meth:`close`."""

    def __init__(self, metrics: BrokerMetrics, readiness: Callable[[], str | None]) -> None:
        """Serve ``metrics``; ``readiness`` returns why the broker is not ready, or ``None``."""
        self._metrics = metrics
        self._readiness = readiness
        self._server: asyncio.Server | None = None
        self._connections = 0
        self.host = ""
        self.port = 0

    @property
    def open_connections(self) -> int:
        """Connections being served (at most :data:`CONNECTIONS_MAX`)."""
        return self._connections

    @property
    def address(self) -> str:
        """``host:port`` it listens on (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host``:``port`` (0: a free port, on the first address ``host`` has).

        Raises:
            OSError: The address cannot be bound.
        """
        host = host.strip("[]")
        if port == 0:
            # Every address of a name ("localhost": 127.0.0.1 and ::1) would get its own free
            # port; one port is what the ready file can report.
            infos = await asyncio.get_running_loop().getaddrinfo(
                host or None, 0, type=socket.SOCK_STREAM
            )
            host = str(infos[0][4][0])
        self._server = await asyncio.start_server(
            self._serve, host or None, port, limit=REQUEST_MAX_BYTES
        )
        self.host = host
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening (connections being served finish within their own bounds)."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._connections >= CONNECTIONS_MAX:
            writer.close()
            return
        self._connections += 1
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                status, content_type, body, head = await self._answer(reader)
                reason = _REASONS[status]
                header = (
                    f"HTTP/1.1 {status} {reason}\r\n"
                    f"Content-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n"
                    "Cache-Control: no-store\r\n"
                    "Connection: close\r\n\r\n"
                ).encode("ascii")
                writer.write(header if head else header + body)
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            # The client went away or was too slow (perhaps not reading what was written):
            # drop the connection and whatever is still queued for it.
            writer.transport.abort()
        except Exception:
            _logger.exception("answering an HTTP request failed")
            writer.transport.abort()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                # Bounded: close() waits for queued data, which a client that does not read
                # never takes; the connection counts against the cap until it is gone.
                await asyncio.wait_for(writer.wait_closed(), REQUEST_TIMEOUT_S)
            writer.transport.abort()
            self._connections -= 1

    async def _answer(  # noqa: PLR0911 -- one return per answer
        self, reader: asyncio.StreamReader
    ) -> tuple[int, str, bytes, bool]:
        """(status, content type, body, whether HEAD) for the request ``reader`` holds."""
        try:
            request_line = (await reader.readuntil(b"\n")).decode("latin-1").strip()
            for _ in range(_HEADERS_MAX):
                if (await reader.readuntil(b"\n")).strip() == b"":
                    break
            else:
                return 400, _TEXT, b"too many header lines\n", False
        except (asyncio.LimitOverrunError, ValueError):
            return 400, _TEXT, b"request line or header too long\n", False
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, _TEXT, b"not an HTTP/1.x request\n", False
        method, target = parts[0], parts[1].split("?", 1)[0]
        head = method == "HEAD"
        if target not in ("/metrics", "/healthz", "/readyz"):
            return 404, _TEXT, b"not found: try /metrics, /healthz or /readyz\n", head
        if method not in ("GET", "HEAD"):
            return 405, _TEXT, b"only GET and HEAD\n", head
        if target == "/metrics":
            return 200, CONTENT_TYPE, self._metrics.exposition(), head
        if target == "/healthz":
            return 200, _TEXT, b"ok\n", head
        reason = self._readiness()
        if reason is None:
            return 200, _TEXT, b"ready\n", head
        return 503, _TEXT, f"not ready: {reason}\n".encode(), head
