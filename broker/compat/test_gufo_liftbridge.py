"""Compatibility: the gufo-liftbridge 0.2.0 client, unchanged, against a running Flux broker.

This module must not import ``flux_proto`` or ``flux_broker``: gufo bundles its own generated
``api.proto`` (package ``proto``), and a second copy in the same process fails in protobuf's
default descriptor pool with "duplicate symbol". The broker runs in its own process.

What gufo 0.2.0 does that shapes these tests:

* ``publish`` is a unary Publish with no deadline, so the broker answers without an ack; the
  tests learn that such messages are stored from the partition's high watermark.
* ``publish_bulk`` is PublishAsync: it keeps the request stream open until every request has a
  response, so its messages must ask for acks (the default, LEADER).
* ``subscribe`` swallows the handshake message, has no stop position and never ends by itself:
  every read here takes a known number of messages under a deadline and then closes it.
* ``subscribe`` finds the partition leader from FetchMetadata and dials the advertised
  ``host:port``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Final

import pytest
from gufo.liftbridge.api_pb2 import PublishResponse
from gufo.liftbridge.client import LiftbridgeClient
from gufo.liftbridge.error import ErrorAlreadyExists, ErrorNotFound
from gufo.liftbridge.types import (
    Message,
    Metadata,
    PartitionMetadata,
    StartPosition,
    StreamMetadata,
)

from flux_testing import wait_for
from flux_testing.broker import BrokerProcess

pytestmark = pytest.mark.integration

#: Bound of every wait in this module: a subscription read, a batch of acks, a watermark.
WAIT_S: Final = 10.0
#: gufo's debug log line once a subscription's handshake message has arrived (gufo 0.2.0).
HANDSHAKE_LOG: Final = "[%s] Stream is ready, waiting for messages"
#: gufo's logger name.
GUFO_LOGGER: Final = "gufo.liftbridge"

#: The five messages every subscribe test starts from: three sent with ``publish`` (offsets
#: 0-2), then two with ``publish_bulk`` (offsets 3-4).
VALUES: Final = [b"v0", b"v1", b"v2", b"v3", b"v4"]
KEYS: Final = [b"k0", b"k1", b"k2", b"k3", b"k4"]
UNARY_COUNT: Final = 3


def _subject(stream: str) -> str:
    """The NATS subject the tests give ``stream`` (distinct from its name on purpose)."""
    return f"compat.{stream}"


def _headers(offset: int) -> dict[str, bytes]:
    """The user headers of the seeded message at ``offset``."""
    return {"n": str(offset).encode()}


@pytest.fixture
async def client(broker: BrokerProcess) -> AsyncIterator[LiftbridgeClient]:
    """A gufo client seeded with the broker's address; its channels are closed afterwards.

    FetchMetadata retries sleep ``metadata_leader_timeout`` +- ``metadata_leader_dev``
    seconds (3 +- 1 by default); short ones keep a retry inside the tests' deadlines.
    """
    async with LiftbridgeClient(
        [broker.address],
        publish_async_ack_timeout=WAIT_S,
        metadata_leader_timeout=0.2,
        metadata_leader_dev=0.1,
    ) as lb:
        yield lb


def _stream(metadata: Metadata, name: str) -> StreamMetadata:
    """The one entry for ``name`` in ``metadata``."""
    found = [stream for stream in metadata.metadata if stream.name == name]
    assert len(found) == 1, f"stream {name!r} in metadata: {metadata.metadata}"
    return found[0]


async def _partition(client: LiftbridgeClient, name: str, partition: int) -> PartitionMetadata:
    """Fresh metadata of one partition, through FetchMetadata for that stream."""
    return _stream(await client.get_metadata(name), name).partitions[partition]


async def _wait_committed(
    client: LiftbridgeClient, name: str, partition: int, last_offset: int
) -> None:
    """Wait until the partition's high watermark is ``last_offset``."""

    async def committed() -> bool:
        metadata = await _partition(client, name, partition)
        assert metadata.high_watermark <= last_offset, metadata
        return metadata.high_watermark == last_offset

    await wait_for(committed, WAIT_S, message=f"{name}/{partition} committed to {last_offset}")


async def _publish_bulk(
    client: LiftbridgeClient, name: str, first_offset: int, values: list[bytes]
) -> None:
    """Publish ``values`` to partition 0 through PublishAsync; check each ack's offset."""
    requests = [
        client.get_publish_request(
            value,
            stream=name,
            key=KEYS[offset] if offset < len(KEYS) else None,
            partition=0,
            headers=_headers(offset),
            correlation_id=f"c{offset}",
        )
        for offset, value in enumerate(values, start=first_offset)
    ]
    # gufo annotates the items as Ack; they are PublishResponse messages.
    received: list[object] = []
    async with asyncio.timeout(WAIT_S):
        async for ack in client.publish_bulk(requests):
            received.append(ack)
    assert len(received) == len(values)
    for offset, response in enumerate(received, start=first_offset):
        assert isinstance(response, PublishResponse)
        assert not response.HasField("asyncError"), response
        assert response.HasField("ack"), response
        assert response.ack.stream == name
        assert response.ack.offset == offset
        assert response.ack.correlationId == f"c{offset}"


async def _seed(client: LiftbridgeClient, name: str, *, partitions: int = 1) -> None:
    """Create ``name`` and store :data:`VALUES` at offsets 0-4 of partition 0."""
    await client.create_stream(name, subject=_subject(name), partitions=partitions)
    for offset in range(UNARY_COUNT):
        await client.publish(
            VALUES[offset], stream=name, key=KEYS[offset], partition=0, headers=_headers(offset)
        )
    # Fire-and-forget publishes carry no ack: the watermark says when they are stored, and so
    # fixes their offsets before the acked ones.
    await _wait_committed(client, name, 0, UNARY_COUNT - 1)
    await _publish_bulk(client, name, UNARY_COUNT, VALUES[UNARY_COUNT:])
    await _wait_committed(client, name, 0, len(VALUES) - 1)


async def _take(messages: AsyncIterable[Message], count: int) -> list[Message]:
    """The first ``count`` messages of a subscription, which is closed afterwards."""
    received: list[Message] = []
    try:
        async with asyncio.timeout(WAIT_S):
            async for message in messages:
                received.append(message)
                if len(received) == count:
                    break
    except TimeoutError:
        offsets = [message.offset for message in received]
        pytest.fail(f"{count} messages expected within {WAIT_S:g} s; got offsets {offsets}")
    finally:
        if isinstance(messages, AsyncGenerator):
            await messages.aclose()
    return received


def _assert_seeded(messages: list[Message], name: str, offsets: range) -> None:
    """``messages`` are exactly the seeded messages at ``offsets`` of partition 0."""
    assert [message.offset for message in messages] == list(offsets)
    for message, offset in zip(messages, offsets, strict=True):
        assert message.value == VALUES[offset]
        assert message.key == KEYS[offset]
        assert message.partition == 0
        assert message.subject == _subject(name)
        # The broker may add its own headers (Liftbridge adds `subject` and `reply`).
        assert {key: message.headers.get(key) for key in _headers(offset)} == _headers(offset)


class _HandshakeWatcher(logging.Handler):
    """Sets :attr:`ready` when gufo logs that a subscription's handshake has arrived."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.ready = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        """Note a handshake; ignore every other record."""
        if record.msg == HANDSHAKE_LOG:
            self.ready.set()


@contextmanager
def _handshake() -> Iterator[asyncio.Event]:
    """An event set once a subscription opened inside the block has its handshake.

    gufo gives no other sign that a subscription is in place, and NEW_ONLY needs one: only
    messages published after the broker fixed the start position are delivered.
    """
    logger = logging.getLogger(GUFO_LOGGER)
    watcher = _HandshakeWatcher()
    level = logger.level
    logger.addHandler(watcher)
    logger.setLevel(logging.DEBUG)
    try:
        yield watcher.ready
    finally:
        logger.removeHandler(watcher)
        logger.setLevel(level)


async def test_create_duplicate_and_delete(client: LiftbridgeClient) -> None:
    """CreateStream, AlreadyExists on a second create, DeleteStream, NotFound on a second one."""
    await client.create_stream("gufo-lifecycle", subject=_subject("gufo-lifecycle"))
    with pytest.raises(ErrorAlreadyExists):
        await client.create_stream("gufo-lifecycle", subject=_subject("gufo-lifecycle"))
    assert _stream(await client.get_metadata(), "gufo-lifecycle").subject == _subject(
        "gufo-lifecycle"
    )

    await client.delete_stream("gufo-lifecycle")
    assert "gufo-lifecycle" not in [
        stream.name for stream in (await client.get_metadata()).metadata
    ]
    with pytest.raises(ErrorNotFound):
        await client.delete_stream("gufo-lifecycle")
    # The name is free again.
    await client.create_stream("gufo-lifecycle", subject=_subject("gufo-lifecycle"))
    assert _stream(await client.get_metadata(), "gufo-lifecycle").partitions.keys() == {0}


async def test_fetch_metadata(client: LiftbridgeClient, broker: BrokerProcess) -> None:
    """FetchMetadata advertises the broker's gRPC address and every partition it leads."""
    await client.create_stream("gufo-metadata", subject=_subject("gufo-metadata"), partitions=2)

    metadata = await client.get_metadata()

    assert len(metadata.brokers) == 1
    (node,) = metadata.brokers
    assert node.id == broker.broker_id
    assert f"{node.host}:{node.port}" == broker.address
    stream = _stream(metadata, "gufo-metadata")
    assert stream.subject == _subject("gufo-metadata")
    assert stream.partitions.keys() == {0, 1}
    for partition_id, partition in stream.partitions.items():
        assert partition.id == partition_id
        assert partition.leader == node.id
        assert partition.replicas == [node.id]
        assert partition.isr == [node.id]
        assert partition.high_watermark == -1
        assert partition.newest_offset == -1
        assert not partition.paused
    # A request naming streams gets only those.
    assert [stream.name for stream in (await client.get_metadata("gufo-metadata")).metadata] == [
        "gufo-metadata"
    ]


async def test_publish_and_publish_bulk(client: LiftbridgeClient) -> None:
    """Unary Publish (no deadline, no ack) and PublishAsync land at consecutive offsets."""
    await _seed(client, "gufo-publish", partitions=2)

    head = await _partition(client, "gufo-publish", 0)
    assert (head.newest_offset, head.high_watermark) == (4, 4)
    assert (await _partition(client, "gufo-publish", 1)).newest_offset == -1

    await client.publish(b"p1", stream="gufo-publish", partition=1)
    await _wait_committed(client, "gufo-publish", 1, 0)
    (message,) = await _take(
        client.subscribe("gufo-publish", partition=1, start_position=StartPosition.EARLIEST), 1
    )
    assert (message.offset, message.value, message.key) == (0, b"p1", b"")
    assert message.partition == 1
    assert message.subject == f"{_subject('gufo-publish')}.1"


async def test_publish_to_missing_stream_raises_not_found(client: LiftbridgeClient) -> None:
    """Publish to a stream that does not exist fails with NotFound."""
    with pytest.raises(ErrorNotFound):
        await client.publish(b"lost", stream="gufo-missing")


async def test_subscribe_earliest(client: LiftbridgeClient) -> None:
    """EARLIEST starts at offset 0 and delivers every stored message in order."""
    await _seed(client, "gufo-earliest")

    messages = await _take(
        client.subscribe("gufo-earliest", partition=0, start_position=StartPosition.EARLIEST),
        len(VALUES),
    )

    _assert_seeded(messages, "gufo-earliest", range(len(VALUES)))
    timestamps = [message.timestamp for message in messages]
    assert timestamps == sorted(timestamps)
    assert timestamps[0] > 0


async def test_subscribe_offset(client: LiftbridgeClient) -> None:
    """OFFSET starts at the given offset."""
    await _seed(client, "gufo-offset")

    messages = await _take(client.subscribe("gufo-offset", partition=0, start_offset=2), 3)

    _assert_seeded(messages, "gufo-offset", range(2, 5))


async def test_subscribe_latest(client: LiftbridgeClient) -> None:
    """LATEST starts at the newest stored message, inclusive."""
    await _seed(client, "gufo-latest")

    messages = await _take(
        client.subscribe("gufo-latest", partition=0, start_position=StartPosition.LATEST), 1
    )

    _assert_seeded(messages, "gufo-latest", range(4, 5))


def _start_seconds(target_ns: int, previous_ns: int) -> float:
    """Seconds that gufo turns (``int(seconds * 1e9)``) into a time in ``(previous_ns, target_ns]``.

    A float holds a nanosecond Unix time only to a few hundred nanoseconds, so the division is
    corrected downwards until gufo's product does not overshoot the target.
    """
    seconds = target_ns / 1e9
    while int(seconds * 1_000_000_000.0) > target_ns:
        seconds = math.nextafter(seconds, 0.0)
    sent_ns = int(seconds * 1_000_000_000.0)
    assert previous_ns < sent_ns <= target_ns, (previous_ns, sent_ns, target_ns)
    return seconds


async def test_subscribe_timestamp(client: LiftbridgeClient) -> None:
    """TIMESTAMP starts at the first message whose timestamp is at or after the given time."""
    await _seed(client, "gufo-timestamp")
    stored = await _take(
        client.subscribe("gufo-timestamp", partition=0, start_position=StartPosition.EARLIEST),
        len(VALUES),
    )
    # Offset 3 was published after offset 2 was stored, so it is strictly later.
    start = _start_seconds(stored[3].timestamp, stored[2].timestamp)

    messages = await _take(
        client.subscribe("gufo-timestamp", partition=0, start_timestamp=start), 2
    )

    _assert_seeded(messages, "gufo-timestamp", range(3, 5))
    assert [message.timestamp for message in messages] == [m.timestamp for m in stored[3:]]


async def test_subscribe_new_only(client: LiftbridgeClient) -> None:
    """NEW_ONLY skips every stored message and delivers those published after subscribing."""
    await _seed(client, "gufo-new-only")

    with _handshake() as ready:
        subscription = client.subscribe(
            "gufo-new-only", partition=0, start_position=StartPosition.NEW_ONLY
        )
        async with asyncio.TaskGroup() as group:
            reader = group.create_task(_take(subscription, 2))
            async with asyncio.timeout(WAIT_S):
                await ready.wait()
            await _publish_bulk(client, "gufo-new-only", len(VALUES), [b"n5", b"n6"])

    messages = reader.result()
    assert [(message.offset, message.value) for message in messages] == [(5, b"n5"), (6, b"n6")]
    assert all(message.partition == 0 for message in messages)
