"""The nats-server fixtures start a real server that real clients can use, and stop it."""

from __future__ import annotations

import asyncio
import socket

import nats
import pytest

from flux_testing import NatsServer, NatsServerError, wait_for
from flux_testing.pytest_plugin import NatsServerFactory

pytestmark = pytest.mark.integration


async def test_publish_and_subscribe_through_the_session_server(nats_server: NatsServer) -> None:
    assert nats_server.url.startswith("nats://127.0.0.1:")
    client = await nats.connect(nats_server.url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        subscription = await client.subscribe("flux.test.echo")
        await client.publish("flux.test.echo", b"hello")
        message = await subscription.next_msg(timeout=5)
        assert message.data == b"hello"
    finally:
        await client.close()


def _refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except OSError:
        return True


async def test_factory_servers_are_private_and_stop(
    nats_server: NatsServer, nats_server_factory: NatsServerFactory
) -> None:
    server = nats_server_factory()
    assert server.port != nats_server.port
    assert server.is_running()
    server.kill()
    assert not server.is_running()
    await wait_for(lambda: _refuses_connections(server.port), 5, message="port to close")
    server.stop()  # idempotent after kill


async def test_restart_on_the_same_port_with_jetstream(
    nats_server_factory: NatsServerFactory,
) -> None:
    first = nats_server_factory()
    port = first.port
    first.stop()
    second = nats_server_factory(port=port, jetstream=True)
    assert second.port == port
    client = await nats.connect(second.url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        jetstream = client.jetstream()
        await jetstream.add_stream(name="T", subjects=["t.>"])
        ack = await jetstream.publish("t.1", b"x", timeout=5)
        assert ack.seq == 1
    finally:
        await client.close()


async def test_start_failure_quotes_the_log(nats_server: NatsServer) -> None:
    """A port that is taken makes start() fail with the server's own explanation."""
    with pytest.raises(NatsServerError, match="did not start") as failure:
        await asyncio.to_thread(NatsServer.start, port=nats_server.port, startup_timeout_s=5)
    assert "address already in use" in str(failure.value).lower()
