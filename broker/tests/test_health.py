"""The HTTP endpoint (/metrics, /healthz, /readyz) and the metrics registry, in process."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from flux_broker import health
from flux_broker.health import HealthServer
from flux_broker.log.recovery import LogStats
from flux_broker.metrics import BrokerMetrics
from flux_proto import api_pb2
from flux_testing import wait_for


class Readiness:
    """A readiness the test sets: ``None`` is ready, a string says why not."""

    def __init__(self) -> None:
        self.reason: str | None = "starting (recovering streams)"

    def __call__(self) -> str | None:
        return self.reason


@pytest_asyncio.fixture
async def server() -> AsyncIterator[tuple[HealthServer, BrokerMetrics, Readiness]]:
    metrics = BrokerMetrics()
    readiness = Readiness()
    metrics.watch(readiness=readiness)
    http = HealthServer(metrics, readiness)
    await http.start("127.0.0.1", 0)
    try:
        yield http, metrics, readiness
    finally:
        await http.close()


async def request(http: HealthServer, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(http.host, http.port)
    try:
        writer.write(raw)
        await writer.drain()
        async with asyncio.timeout(5):
            response = await reader.read()
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return int(status_line.split()[1]), headers, body


async def get(http: HealthServer, path: str, method: str = "GET") -> tuple[int, bytes]:
    status, headers, body = await request(
        http, f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    )
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body) or method == "HEAD"
    return status, body


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


async def test_healthz_answers_and_readyz_follows_the_readiness(
    server: tuple[HealthServer, BrokerMetrics, Readiness],
) -> None:
    http, _, readiness = server
    assert await get(http, "/healthz") == (200, b"ok\n")
    assert await get(http, "/readyz") == (503, b"not ready: starting (recovering streams)\n")
    readiness.reason = None
    assert await get(http, "/readyz") == (200, b"ready\n")
    readiness.reason = "NATS is disconnected"
    assert await get(http, "/readyz") == (503, b"not ready: NATS is disconnected\n")
    assert await get(http, "/readyz", "HEAD") == (503, b"")


async def test_metrics_are_served_in_the_prometheus_text_format(
    server: tuple[HealthServer, BrokerMetrics, Readiness],
) -> None:
    http, metrics, readiness = server
    metrics.publish.acked(3, 2, received_ns=1_000_000, now_ns=3_000_000)
    metrics.publish.acked_batch(api_pb2.AckPolicy.ALL, received_ns=0, now_ns=20_000_000)
    metrics.recovered(LogStats(torn_tail_recoveries=1, cut_bytes=37, corrupt_segments=1))
    readiness.reason = None
    status, headers, body = await request(http, b"GET /metrics HTTP/1.1\r\n\r\n")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    values = samples(body)
    assert values["flux_acks_total", (("policy", "leader"),)] == 3
    assert values["flux_acks_total", (("policy", "all"),)] == 3
    assert values["flux_publish_ack_latency_seconds_count", ()] == 2
    assert values["flux_publish_ack_latency_seconds_bucket", (("le", "0.0025"),)] == 1
    assert values["flux_publish_ack_latency_seconds_sum", ()] == pytest.approx(0.022)
    assert values["flux_recovery_corrupt_records_total", ()] == 2
    assert values["flux_recovery_cut_bytes_total", ()] == 37
    assert values["flux_nats_connected", ()] == 0  # no connection to watch
    assert values["flux_ready", ()] == 1
    assert ("process_cpu_seconds_total", ()) in values


async def test_two_brokers_in_one_process_keep_their_own_metrics() -> None:
    first, second = BrokerMetrics(), BrokerMetrics()
    first.publish.acked(1, 0, 0, 0)
    assert samples(first.exposition())["flux_acks_total", (("policy", "leader"),)] == 1
    assert samples(second.exposition())["flux_acks_total", (("policy", "leader"),)] == 0


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /nowhere HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\n\r\n", 405),
        (b"nonsense\r\n\r\n", 400),
        (b"GET /" + b"x" * (health.REQUEST_MAX_BYTES + 10) + b" HTTP/1.1\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", 400),
    ],
)
async def test_bad_requests_get_a_status_not_a_hang(
    server: tuple[HealthServer, BrokerMetrics, Readiness], raw: bytes, status: int
) -> None:
    http, _, _ = server
    assert (await request(http, raw))[0] == status


async def test_a_client_that_never_sends_does_not_block_others(
    server: tuple[HealthServer, BrokerMetrics, Readiness], monkeypatch: pytest.MonkeyPatch
) -> None:
    http, _, _ = server
    monkeypatch.setattr(health, "REQUEST_TIMEOUT_S", 0.2)
    reader, writer = await asyncio.open_connection(http.host, http.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\n")  # and never the end of the headers
        await writer.drain()
        assert await get(http, "/healthz") == (200, b"ok\n")  # served meanwhile
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # closed without an answer once timed out
    finally:
        writer.close()


def test_every_metric_is_documented() -> None:
    page = Path(__file__).parents[2] / "docs" / "operating.md"
    text = page.read_text(encoding="utf-8")
    families = text_string_to_metric_families(BrokerMetrics(process=False).exposition().decode())
    names = [family.name for family in families if family.name.startswith("flux_")]
    assert len(names) > 10
    for name in names:
        assert f"`{name}`" in text or f"`{name}_total`" in text, f"{name} is not in {page}"


async def test_a_client_that_stops_reading_is_dropped_within_the_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A big answer to a client that never reads must not hold the connection forever."""
    monkeypatch.setattr(health, "REQUEST_TIMEOUT_S", 0.5)
    metrics = BrokerMetrics()
    monkeypatch.setattr(metrics, "exposition", lambda: b"x" * (16 << 20))
    http = HealthServer(metrics, lambda: None)
    await http.start("127.0.0.1", 0)
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (http.host, http.port))
        try:
            await loop.sock_sendall(sock, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            await wait_for(lambda: http.open_connections == 1, timeout_s=5.0, interval_s=0.01)
            # Never read: the answer cannot be written, and the connection must still go.
            await wait_for(lambda: http.open_connections == 0, timeout_s=10.0, interval_s=0.05)
        finally:
            sock.close()
    finally:
        await http.close()
