"""The broker process: start-up summary, health, graceful shutdown, restart, configuration."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from flux_proto import api_pb2, api_pb2_grpc
from flux_testing.broker import BrokerProcess, BrokerProcessError
from flux_testing.nats_server import NatsServer
from flux_testing.pytest_plugin import BrokerFactory, NatsServerFactory


async def _health(broker: BrokerProcess, service: str = "") -> int:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        # The typed stubs of grpcio-health-checking declare no methods on HealthStub.
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        response = await check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)


async def test_prints_a_summary_serves_health_and_stops_gracefully(broker: BrokerProcess) -> None:
    output = broker.output()
    assert "flux-broker" in output
    assert "ready" in output
    for expected in (broker.broker_id, broker.address, broker.nats_url, str(broker.data_dir)):
        assert expected in output
    assert "sync policy  always" in output
    assert await _health(broker) == health_pb2.HealthCheckResponse.SERVING
    assert await _health(broker, "proto.API") == health_pb2.HealthCheckResponse.SERVING
    assert await broker.stop() == 0
    assert "stopped" in broker.output()
    assert "Traceback" not in broker.output()


async def test_restart_recovers_streams_ids_and_offsets(broker: BrokerProcess) -> None:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await api.CreateStream(
            api_pb2.CreateStreamRequest(subject="r", name="r", partitions=2, group="g")
        )
    assert await broker.stop() == 0
    again = await broker.restart()
    assert again.broker_id == broker.broker_id
    assert "recovered 3 partition(s) of 2 stream(s)" in again.output()  # with __cursors
    async with grpc.aio.insecure_channel(again.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        response = await api.FetchMetadata(api_pb2.FetchMetadataRequest())
    (stream,) = [s for s in response.streamMetadata if s.name != "__cursors"]
    assert (stream.name, stream.subject, sorted(stream.partitions)) == ("r", "r", [0, 1])
    assert stream.partitions[0].leader == broker.broker_id


async def test_configured_id_must_match_the_data_directory(
    broker: BrokerProcess, broker_factory: BrokerFactory
) -> None:
    assert await broker.stop() == 0
    with pytest.raises(BrokerProcessError) as info:
        await broker_factory(broker.data_dir, args=["--server-id", "someone-else"])
    assert f"belongs to broker '{broker.broker_id}'" in str(info.value)
    again = await broker_factory(broker.data_dir, args=["--server-id", broker.broker_id])
    assert again.broker_id == broker.broker_id


async def test_liftbridge_config_file_loads_with_warnings(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    config = tmp_path / "liftbridge.yaml"
    config.write_text(
        "clustering:\n"
        "  server.id: lb-1\n"
        "  raft.bootstrap.seed: true\n"
        "streams:\n"
        "  retention.max.age: 24h\n"
        "  sync.policy: never\n"
        "logging.level: debug\n",
        encoding="utf-8",
    )
    broker = await broker_factory(args=["--config", str(config)])
    assert broker.broker_id == "lb-1"
    output = broker.output()
    assert "clustering.raft.bootstrap.seed is not supported by Flux yet" in output
    assert "sync policy  never" in output


async def test_tls_in_the_config_fails_closed(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    config = tmp_path / "tls.yaml"
    config.write_text("tls:\n  cert: /etc/cert.pem\n  key: /etc/key.pem\n", encoding="utf-8")
    data_dir = tmp_path / "data"
    with pytest.raises(BrokerProcessError) as info:
        await broker_factory(data_dir, args=["--config", str(config)])
    assert "tls.key is set" in str(info.value) or "tls.cert is set" in str(info.value)
    assert not data_dir.exists()


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


async def test_a_taken_embedded_nats_port_names_the_flag(
    broker_factory: BrokerFactory, taken_port: int
) -> None:
    with pytest.raises(BrokerProcessError) as info:
        await broker_factory(args=["--embedded-nats-port", str(taken_port)])
    assert "--embedded-nats-port" in str(info.value)
    assert str(taken_port) in str(info.value)


async def test_external_nats_is_used_when_named(
    broker_factory: BrokerFactory, nats_server: NatsServer
) -> None:
    broker = await broker_factory(args=["--nats-servers", nats_server.url])
    assert broker.nats_url == nats_server.url
    assert "(external)" in broker.output()
    assert "embedded NATS server" not in broker.output()
    assert await broker.stop() == 0


async def test_nats_credentials_from_the_config_are_used(
    broker_factory: BrokerFactory, nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    server = nats_server_factory(args=["--user", "flux", "--pass", "s3cret"])
    config = tmp_path / "auth.yaml"
    config.write_text(
        f"nats:\n  servers: [{server.url}]\n  user: flux\n  password: s3cret\n", encoding="utf-8"
    )
    broker = await broker_factory(args=["--config", str(config)])
    assert broker.nats_url == server.url
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await api.CreateStream(api_pb2.CreateStreamRequest(subject="auth", name="auth"))
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(
        f"nats:\n  servers: [{server.url}]\n  user: flux\n  password: nope\n", encoding="utf-8"
    )
    with pytest.raises(BrokerProcessError) as info:
        await broker_factory(args=["--config", str(wrong)])
    assert "cannot connect to NATS" in str(info.value)


async def test_a_second_broker_on_the_same_data_dir_refuses_naming_the_holder(
    broker: BrokerProcess, broker_factory: BrokerFactory
) -> None:
    with pytest.raises(BrokerProcessError) as info:
        await broker_factory(broker.data_dir)
    assert f"is in use by process {broker.pid}" in str(info.value)
    assert broker.running
    assert await broker.stop() == 0
    again = await broker.restart()  # the lock goes with its holder
    assert again.running


async def test_listen_binds_one_address_and_metadata_advertises_another(
    broker_factory: BrokerFactory,
) -> None:
    broker = await broker_factory(
        args=["--listen", "127.0.0.1:0", "--host", "flux.example", "--port", "19292"]
    )
    assert "(advertised as flux.example:19292)" in broker.output()
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        response = await api.FetchMetadata(api_pb2.FetchMetadataRequest())
    (me,) = response.brokers
    assert (me.host, me.port) == ("flux.example", 19292)
    assert not broker.address.endswith(":19292")


async def test_a_lost_broker_id_file_is_refused_naming_the_id(
    broker: BrokerProcess, broker_factory: BrokerFactory
) -> None:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await api.CreateStream(api_pb2.CreateStreamRequest(subject="owned", name="owned"))
    assert await broker.stop() == 0
    (broker.data_dir / "broker-id").unlink()
    with pytest.raises(BrokerProcessError) as info:
        await broker_factory(broker.data_dir)
    assert f"--server-id {broker.broker_id}" in str(info.value)
    again = await broker_factory(broker.data_dir, args=["--server-id", broker.broker_id])
    assert again.broker_id == broker.broker_id


async def test_data_the_metadata_does_not_know_is_moved_aside_not_deleted(
    broker: BrokerProcess,
) -> None:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await api.CreateStream(api_pb2.CreateStreamRequest(subject="kept", name="kept"))
    assert await broker.stop() == 0
    for path in broker.data_dir.glob("metadata.db*"):
        path.unlink()  # a lost metadata database
    again = await broker.restart()
    assert not (broker.data_dir / "streams" / "kept").exists()
    # __cursors went with the metadata too; the broker created a new, empty one.
    cursors, moved = sorted((broker.data_dir / "orphans").iterdir())
    assert moved.name.startswith("kept-")
    assert cursors.name.startswith("__cursors-")
    assert (moved / "0").is_dir()
    assert "which the metadata does not know" in again.output()
