"""Observability against real broker processes: metrics, health checks and log lines.

Every broker here runs with ``--metrics-port 0`` and is found through its ready file. Metrics
are scraped over HTTP and parsed with prometheus-client's own parser; counters are checked
for exact values after traffic of known size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flux_broker.log.format import NewRecord, Placement, frame
from flux_broker.nats.envelope import encode_message
from flux_proto import api_pb2, api_pb2_grpc
from flux_testing.broker import BrokerProcess, broker_command
from flux_testing.wait import wait_for

if TYPE_CHECKING:
    from flux_testing.pytest_plugin import BrokerFactory, NatsServerFactory

    API = api_pb2_grpc.APIAsyncStub

pytestmark = pytest.mark.integration

LEADER = api_pb2.AckPolicy.LEADER
ALL = api_pb2.AckPolicy.ALL
TIMEOUT_S = 20.0
METRICS = ("--metrics-port", "0")
#: A text log line: time, level, component, optional [stream/partition], message.
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) +"
    r"(?P<component>\S+)(?: \[(?P<where>[^\]]*)\])?: (?P<message>.*)$"
)
#: An ack inbox full of characters that would split or garble a log line.
EVIL_INBOX = "evil\ninbox\r\x1b[31m\x00\u2028\u2029"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- HTTP and metrics ----------------------------------------------------------------------------


async def http_get(address: str, path: str) -> tuple[int, str]:
    """GET ``path`` from ``host:port``: (status, body)."""
    host, port = address.rsplit(":", 1)
    async with asyncio.timeout(TIMEOUT_S):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {address}\r\n\r\n".encode())
            await writer.drain()
            response = await reader.read()
        finally:
            writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def scrape(broker: BrokerProcess) -> Samples:
    status, text = await http_get(broker.metrics, "/metrics")
    assert status == 200, text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: object) -> float:
    key = (name, tuple(sorted((k, str(v)) for k, v in labels.items())))
    assert key in samples, f"{key} not among {sorted(k for k in samples if k[0] == name)}"
    return samples[key]


async def metric(broker: BrokerProcess, name: str, **labels: object) -> float:
    return value(await scrape(broker), name, **labels)


# -- gRPC ----------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def client(broker: BrokerProcess) -> AsyncIterator[API]:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield api_pb2_grpc.APIStub(channel)


async def create(api: API, name: str, partitions: int = 1) -> None:
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=name, subject=name, partitions=partitions),
        timeout=TIMEOUT_S,
    )


def framed(values: Sequence[bytes]) -> bytes:
    """Records framed as a client frames them (the broker stamps them in place)."""
    data, _ = frame(
        [NewRecord(value=v) for v in values], Placement(0, 0, 0, 0, 0), 1 << 30, 1 << 30
    )
    return bytes(data)


async def publish_batches(api: API, requests: Sequence[api_pb2.PublishBatchRequest]) -> None:
    async def stream() -> AsyncIterator[api_pb2.PublishBatchRequest]:
        for request in requests:
            yield request

    async with asyncio.timeout(TIMEOUT_S):
        responses = [response async for response in api.PublishBatch(stream())]
    assert len(responses) == len(requests)
    assert not any(response.HasField("error") for response in responses), responses


async def read_all(api: API, stream: str, partition: int) -> list[api_pb2.RecordBatch]:
    """Every batch of the partition up to its newest record (handshake left out)."""
    request = api_pb2.SubscribeBatchRequest(
        subscribe=api_pb2.SubscribeRequest(
            stream=stream,
            partition=partition,
            startPosition=api_pb2.EARLIEST,
            stopPosition=api_pb2.STOP_LATEST,
        )
    )
    async with asyncio.timeout(TIMEOUT_S):
        return [batch async for batch in api.SubscribeBatch(request)][1:]


# -- the tests -----------------------------------------------------------------------------------


async def test_messages_bytes_and_acks_are_counted_exactly(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(args=METRICS)
    async with client(broker) as api:
        await create(api, "traffic", partitions=2)
        # Partition 0: five Publish calls through NATS, each acked (policy LEADER) on its own.
        for i in range(5):
            await api.Publish(
                api_pb2.PublishRequest(
                    stream="traffic", partition=0, value=bytes([i]) * 100, ackPolicy=LEADER
                ),
                timeout=TIMEOUT_S,
            )
        # Partition 1: one PublishBatch of ten 100-byte records, policy ALL: one response.
        records = framed([bytes([i]) * 100 for i in range(10)])
        await publish_batches(
            api,
            [
                api_pb2.PublishBatchRequest(
                    stream="traffic", partition=1, records=records, ackPolicy=ALL
                )
            ],
        )
        before = await scrape(broker)
        stored = {p: await read_all(api, "traffic", p) for p in (0, 1)}
        after = await scrape(broker)

    stored_bytes = {p: sum(len(b.records) for b in batches) for p, batches in stored.items()}
    assert stored_bytes[1] == len(records)  # stored as framed by the client
    for p, count in ((0, 5), (1, 10)):
        labels = {"stream": "traffic", "partition": p}
        assert sum(b.recordCount for b in stored[p]) == count
        assert value(before, "flux_partition_messages_in_total", **labels) == count
        assert value(before, "flux_partition_bytes_in_total", **labels) == stored_bytes[p]
        assert value(before, "flux_partition_messages_out_total", **labels) == 0
        assert value(before, "flux_partition_high_watermark", **labels) == count - 1
        assert value(after, "flux_partition_messages_out_total", **labels) == count
        assert value(after, "flux_partition_bytes_out_total", **labels) == stored_bytes[p]
    assert value(after, "flux_acks_total", policy="leader") == 5
    assert value(after, "flux_acks_total", policy="all") == 1
    assert value(after, "flux_publish_ack_latency_seconds_count") == 6
    assert 0 < value(after, "flux_publish_ack_latency_seconds_sum") < 6 * TIMEOUT_S
    assert value(after, "flux_publish_ack_latency_seconds_bucket", le="10.0") == 6


async def test_deleting_a_stream_removes_its_series(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(args=METRICS)
    async with client(broker) as api:
        await create(api, "doomed")
        assert (
            await metric(broker, "flux_partition_messages_in_total", stream="doomed", partition=0)
            == 0
        )
        await api.DeleteStream(api_pb2.DeleteStreamRequest(name="doomed"), timeout=TIMEOUT_S)
    samples = await scrape(broker)
    assert not [key for key in samples if ("stream", "doomed") in key[1]]


async def test_an_open_subscription_shows_until_it_is_cancelled(
    broker_factory: BrokerFactory,
) -> None:
    broker = await broker_factory(args=METRICS)
    labels = {"stream": "watched", "partition": 0}
    async with client(broker) as api:
        await create(api, "watched")
        assert await metric(broker, "flux_active_subscriptions", **labels) == 0
        call = api.Subscribe(api_pb2.SubscribeRequest(stream="watched"))
        await call.read()  # the handshake: the subscription is open
        await wait_for(
            lambda: _equals(broker, "flux_active_subscriptions", 1, **labels),
            TIMEOUT_S,
            message="the subscription counted",
        )
        call.cancel()
        await wait_for(
            lambda: _equals(broker, "flux_active_subscriptions", 0, **labels),
            TIMEOUT_S,
            message="the cancelled subscription gone",
        )


async def _equals(broker: BrokerProcess, name: str, expected: float, **labels: object) -> bool:
    return await metric(broker, name, **labels) == expected


async def test_subscriber_lag_is_what_it_has_not_been_sent(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(args=METRICS, env={"FLUX_STREAMS_SYNC_POLICY": "never"})
    labels = {"stream": "lagging", "partition": 0}
    record_bytes, per_batch, batches = 64 * 1024, 64, 8  # 32 MiB: more than gRPC buffers
    total = per_batch * batches
    async with client(broker) as api:
        await create(api, "lagging")
        await publish_batches(
            api,
            [
                api_pb2.PublishBatchRequest(
                    stream="lagging",
                    records=framed([bytes([b]) * record_bytes] * per_batch),
                    ackPolicy=LEADER,
                )
                for b in range(batches)
            ],
        )
        assert await metric(broker, "flux_subscriber_lag_messages", **labels) == 0  # nobody
        request = api_pb2.SubscribeBatchRequest(
            subscribe=api_pb2.SubscribeRequest(stream="lagging", startPosition=api_pb2.EARLIEST),
            maxBytes=record_bytes,  # one record per batch
        )
        call = api.SubscribeBatch(request)
        received = 0
        try:
            await call.read()  # handshake
            first = await call.read()  # then the client stops reading
            assert isinstance(first, api_pb2.RecordBatch)
            received += first.recordCount
            sent = await _settled(broker, "flux_partition_messages_out_total", **labels)
            assert received <= sent < total, "gRPC buffered the whole partition"
            # Sent contiguously from offset 0: the last sent offset is sent - 1.
            lag = await metric(broker, "flux_subscriber_lag_messages", **labels)
            assert lag == (total - 1) - (sent - 1) > 0
            while received < total:
                batch = await asyncio.wait_for(call.read(), TIMEOUT_S)
                assert isinstance(batch, api_pb2.RecordBatch)
                received += batch.recordCount
            await wait_for(
                lambda: _equals(broker, "flux_subscriber_lag_messages", 0, **labels),
                TIMEOUT_S,
                message="no lag once everything was read",
            )
            assert await metric(broker, "flux_partition_messages_out_total", **labels) == total
        finally:
            call.cancel()


async def _settled(broker: BrokerProcess, name: str, **labels: object) -> float:
    """The metric's value once two scrapes half a second apart agree."""
    previous = await metric(broker, name, **labels)
    for _ in range(int(TIMEOUT_S / 0.5)):
        await asyncio.sleep(0.5)
        current = await metric(broker, name, **labels)
        if current == previous:
            return current
        previous = current
    raise AssertionError(f"{name} kept changing")


async def test_recovery_counts_a_corrupt_tail(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(args=METRICS)
    async with client(broker) as api:
        await create(api, "torn")
        await publish_batches(
            api, [api_pb2.PublishBatchRequest(stream="torn", records=framed([b"r"] * 5))]
        )
    broker.kill()
    segment = broker.data_dir / "streams" / "torn" / "0" / f"{0:020d}.log"
    with segment.open("ab") as file:
        file.write(b"\xff" * 37)  # a torn write: garbage after the last record
    restarted = await broker.restart()
    samples = await scrape(restarted)
    assert value(samples, "flux_recovery_corrupt_records_total") == 1
    assert value(samples, "flux_recovery_cut_bytes_total") == 37
    assert value(samples, "flux_partition_high_watermark", stream="torn", partition=0) == 4
    # The recovery's line names the partition.
    lines = [m for line in restarted.output().splitlines() if (m := TEXT_LINE.match(line))]
    cut = [m for m in lines if "cutting 37 bytes" in m["message"]]
    assert len(cut) == 1, restarted.output_tail()
    assert cut[0]["where"] == "torn/0"
    assert cut[0]["component"] == "log.segment"


async def test_readyz_follows_the_nats_connection(
    broker_factory: BrokerFactory, nats_server_factory: NatsServerFactory
) -> None:
    server = nats_server_factory()
    broker = await broker_factory(args=("--nats-servers", server.url, *METRICS))
    assert await http_get(broker.metrics, "/readyz") == (200, "ready\n")
    assert await http_get(broker.metrics, "/healthz") == (200, "ok\n")
    samples = await scrape(broker)
    assert value(samples, "flux_nats_connected") == 1
    assert value(samples, "flux_ready") == 1

    server.stop()
    await wait_for(lambda: _readyz_is(broker, 503), TIMEOUT_S, message="/readyz 503 without NATS")
    assert await http_get(broker.metrics, "/readyz") == (503, "not ready: NATS is disconnected\n")
    assert await http_get(broker.metrics, "/healthz") == (200, "ok\n")  # alive all the same
    samples = await scrape(broker)
    assert value(samples, "flux_nats_connected") == 0
    assert value(samples, "flux_ready") == 0

    nats_server_factory(port=server.port)
    await wait_for(lambda: _readyz_is(broker, 200), 30.0, message="/readyz 200 once NATS is back")
    samples = await scrape(broker)
    assert value(samples, "flux_nats_connected") == 1
    assert value(samples, "flux_nats_reconnects_total") >= 1


async def _readyz_is(broker: BrokerProcess, status: int) -> bool:
    return (await http_get(broker.metrics, "/readyz"))[0] == status


async def _publish_with_an_evil_inbox(broker: BrokerProcess, stream: str) -> None:
    """A raw NATS publish whose ack inbox the leader refuses, and logs."""
    nc = await nats.connect(broker.nats_url)
    try:
        message = api_pb2.Message(value=b"x", ackInbox=EVIL_INBOX, ackPolicy=LEADER)
        await nc.publish(stream, encode_message(message))
        await nc.flush()
    finally:
        await nc.close()


async def test_text_logs_by_default_one_line_per_record(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(args=("--level", "debug", *METRICS))
    async with client(broker) as api:
        await create(api, "plain")
        with pytest.raises(grpc.aio.AioRpcError):
            await create(api, "bad\nname\u2028")  # refused; whatever it logs stays one line
    await _publish_with_an_evil_inbox(broker, "plain")
    await wait_for(
        lambda: "could not send an ack" in broker.output(), TIMEOUT_S, message="the warning"
    )
    await http_get(broker.metrics, "/metrics")
    assert await broker.stop() == 0
    summary = False  # the start-up summary on stdout: its first line, then indented ones
    matched = []
    for line in broker.output().splitlines():
        if line.startswith("flux-broker ") and line.endswith(" ready"):
            summary = True
            continue
        if summary and line.startswith("  "):
            continue
        summary = False
        match = TEXT_LINE.match(line)
        assert match is not None, f"not a log line: {line!r}"
        matched.append(match)
    (warning,) = [m for m in matched if "could not send an ack" in m["message"]]
    assert warning["where"] == "plain/0"
    assert warning["component"] == "streams.partition"
    assert repr(EVIL_INBOX)[1:-1] in warning["message"]


async def test_json_logs_every_stderr_line_is_an_object(tmp_path: Path) -> None:
    async with _json_broker(tmp_path) as (broker, stderr):
        async with client(broker) as api:
            await create(api, "structured")
        await _publish_with_an_evil_inbox(broker, "structured")
        await wait_for(
            lambda: "could not send an ack" in stderr.read_text(encoding="utf-8"),
            TIMEOUT_S,
            message="the warning",
        )
    lines = stderr.read_text(encoding="utf-8").splitlines()
    assert len(lines) > 5
    records = [json.loads(line) for line in lines]  # every line parses
    for record in records:
        assert {"time", "level", "component", "message"} <= record.keys(), record
    (warning,) = [r for r in records if "could not send an ack" in r["message"]]
    assert warning["level"] == "warning"
    assert warning["component"] == "streams.partition"
    assert (warning["stream"], warning["partition"]) == ("structured", 0)
    assert repr(EVIL_INBOX) in warning["message"]
    created = [r for r in records if r["message"].startswith("created stream 'structured'")]
    assert [r.get("stream") for r in created] == ["structured"]


def _spawn(command: Sequence[str], stdout: Path, stderr: Path) -> subprocess.Popen[bytes]:
    with stderr.open("wb") as err, stdout.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL)


@contextlib.asynccontextmanager
async def _json_broker(tmp_path: Path) -> AsyncIterator[tuple[BrokerProcess, Path]]:
    """A broker with ``--log-format json``, its stderr kept apart from its stdout."""
    ready = tmp_path / "ready.json"
    stderr_path, stdout_path = tmp_path / "stderr.log", tmp_path / "stdout.log"
    command = broker_command(tmp_path / "data", ready, "--log-format", "json", *METRICS)
    process = _spawn(command, stdout_path, stderr_path)
    try:

        def started() -> bool:
            assert process.poll() is None, stderr_path.read_text(encoding="utf-8")
            return ready.exists()

        await wait_for(started, 30.0, message="the JSON broker ready")
        info = json.loads(ready.read_text(encoding="utf-8"))
        broker = BrokerProcess(
            data_dir=tmp_path / "data",
            work_dir=tmp_path,
            args=(),
            env={},
            process=process,
            address=info["grpc"],
            nats_url=info["nats"],
            broker_id=info["broker_id"],
            pid=process.pid,
            metrics=info["metrics"],
        )
        yield broker, stderr_path
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, TIMEOUT_S) == 0
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


async def test_consumer_groups_are_counted(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(args=METRICS, env={"FLUX_GROUPS_CONSUMER_TIMEOUT": "1s"})
    async with client(broker) as api:
        await create(api, "jobs", partitions=2)
        for consumer in ("a", "b"):
            await api.JoinConsumerGroup(
                api_pb2.JoinConsumerGroupRequest(
                    groupId="workers", consumerId=consumer, streams=["jobs"]
                ),
                timeout=TIMEOUT_S,
            )
        samples = await scrape(broker)
        assert value(samples, "flux_consumer_group_members", group="workers") == 2
        assert value(samples, "flux_consumer_group_partitions_revoking", group="workers") == 1
        assert value(samples, "flux_consumer_group_changes_total") == 2
        # Nobody heartbeats: both members expire after the timeout, and the group empties.
        await wait_for(lambda: _expired(broker, 2), timeout_s=TIMEOUT_S, interval_s=0.1)
        samples = await scrape(broker)
        assert ("flux_consumer_group_members", (("group", "workers"),)) not in samples


async def _expired(broker: BrokerProcess, count: int) -> bool:
    return await metric(broker, "flux_consumer_group_members_expired_total") == count
