"""Durability: every acknowledged message survives ``kill -9`` of the broker.

The scenario of the issue: a producer publishes with ack policy ALL to a broker running with
``streams.sync.policy: always``; the broker is killed with SIGKILL mid-stream and restarted.
Every acknowledged message must then be in the log, in order, once, at the offset its ack
named, with its key, value and headers, and the log must accept new writes.

How:

- The broker uses an external nats-server (the session's ``nats_server``), named in its YAML
  config file with the sync policy, as a user would write it. Its embedded NATS server would
  die with it and take the producer's connection along; the external one keeps the producer
  connected across the kill, so the acks the broker sent before dying still arrive.
- The producer publishes Liftbridge envelopes straight to the stream's NATS subject, as
  Liftbridge clients do, with at most :data:`IN_FLIGHT_MAX` unacknowledged at a time. Message
  ``n`` is entirely derived from ``n`` (:func:`expected`), so the check needs no copy of what
  was sent. Small segments make the log roll several times before the kill.
- Once :data:`ACKED_BEFORE_KILL` acks have arrived, the broker is killed while the window is
  full: messages are queued, being appended or being fsynced when it lands. Only
  messages whose ack arrived are required to survive; the others may or may not be stored.
- The restarted broker must report a newest offset and HW covering every ack, and must take
  one more message, acked at the next offset. It is then stopped gracefully and the partition
  log is read directly from offset 0, committed records or not: it must hold exactly
  messages ``0 .. S-1`` (S at least the acked count) at offsets ``0 .. S-1``, then the message
  written after the restart.

SIGKILL leaves the kernel's page cache intact, so this test proves that the broker never acks
what it has not written to the file and that recovery keeps all of it; it cannot prove that
the fsync happened (only a power cut could).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from uuid import uuid4

import grpc
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from flux_broker.log.commitlog import FileCommitLog
from flux_broker.log.format import Record
from flux_broker.nats.envelope import decode_ack, encode_message
from flux_broker.streams.manager import STREAMS_DIR
from flux_broker.streams.partition import REPLY_HEADER, SUBJECT_HEADER
from flux_proto import api_pb2, api_pb2_grpc
from flux_testing.broker import BrokerProcess, stop_all
from flux_testing.nats_server import NatsServer
from flux_testing.pytest_plugin import BrokerFactory
from flux_testing.wait import wait_for

pytestmark = pytest.mark.integration

_logger = logging.getLogger(__name__)

STREAM: Final = "durability"
#: Unacknowledged messages the producer allows at once: enough for the broker to batch.
IN_FLIGHT_MAX: Final = 256
#: Acks to collect before the kill.
ACKED_BEFORE_KILL: Final = 2000
#: Small segments, so the log rolls several times and the kill may land near a roll.
SEGMENT_MAX_BYTES: Final = 64 * 1024
#: Bound on each phase of the test (collecting acks, stopping the producer, reading the log).
PHASE_TIMEOUT_S: Final = 15.0

_ALL = api_pb2.AckPolicy.ALL
_OK = api_pb2.Ack.Error.OK


def expected(n: int) -> tuple[bytes, bytes, dict[str, bytes]]:
    """Key, value and headers of message ``n``: varied sizes and binary bytes, all from ``n``."""
    digest = hashlib.sha256(b"%d" % n).digest()
    value = digest * (1 + n % 7)
    headers = {"i": b"%d" % n, "bin": bytes([n % 256, 0, 255]) + digest[:4]}
    return b"k%d" % n, value, headers


def envelope(n: int, inbox: str) -> bytes:
    """Message ``n`` as a Liftbridge PUBLISH envelope with ack policy ALL."""
    key, value, headers = expected(n)
    return encode_message(
        api_pb2.Message(
            offset=-1,  # no optimistic concurrency check, as Liftbridge's Go client sends
            key=key,
            value=value,
            headers=headers,
            ackInbox=inbox,
            correlationId=str(n),
            ackPolicy=_ALL,
        )
    )


class Producer:
    """Publishes messages ``first``, ``first + 1``, ... with a bounded window of unacked ones."""

    def __init__(self, nc: Client, subject: str, *, first: int = 0, end: int | None = None) -> None:
        """Prepare to publish to ``subject`` over ``nc``; :meth:`start` subscribes the inbox.

        Args:
            nc: A connected NATS client.
            subject: The stream's subject.
            first: Number of the first message.
            end: Stop before this message number (``None``: publish until :meth:`stop`).
        """
        self.nc = nc
        self.subject = subject
        self.inbox = nc.new_inbox()
        #: Acked message number -> the offset its ack named.
        self.acks: dict[int, int] = {}
        #: Acks that were errors or repeated a message already acked (both must stay empty).
        self.bad_acks: list[api_pb2.Ack] = []
        #: Number of the next message to publish.
        self.published = first
        self._end = end
        self._window = asyncio.Semaphore(IN_FLIGHT_MAX)
        self._subscription: Subscription | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Subscribe the ack inbox, then publish until :meth:`stop`."""
        self._subscription = await self.nc.subscribe(self.inbox, cb=self._on_ack)
        # The SUB is queued ahead of every PUB on this connection, and the server handles a
        # connection's commands in order, so no ack can be routed before the inbox exists;
        # the round trip just makes that visible.
        await self.nc.flush()
        self._task = asyncio.create_task(self._run(), name="durability-producer")

    async def _run(self) -> None:
        while self._end is None or self.published < self._end:
            await self._window.acquire()
            await self.nc.publish(self.subject, envelope(self.published, self.inbox))
            self.published += 1

    async def _on_ack(self, msg: Msg) -> None:
        ack = decode_ack(msg.data)
        n = int(ack.correlationId)
        if ack.ackError != _OK or n in self.acks:
            self.bad_acks.append(ack)
        else:
            self.acks[n] = ack.offset
        self._window.release()

    async def stop(self) -> dict[int, int]:
        """Stop publishing and listening; return the acks received (message -> offset)."""
        assert self._task is not None
        assert self._subscription is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        # Whatever the server already routed to the inbox arrives before the PONG.
        await self.nc.flush()
        await self._subscription.unsubscribe()
        return dict(self.acks)


@contextlib.asynccontextmanager
async def grpc_api(broker: BrokerProcess) -> AsyncIterator[api_pb2_grpc.APIAsyncStub]:
    """A ``proto.API`` client of ``broker``."""
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield api_pb2_grpc.APIStub(channel)


async def partition_metadata(broker: BrokerProcess) -> api_pb2.PartitionMetadata:
    """Partition 0's metadata as ``broker`` reports it."""
    async with grpc_api(broker) as api:
        response = await api.FetchPartitionMetadata(
            api_pb2.FetchPartitionMetadataRequest(stream=STREAM, partition=0), timeout=10
        )
    return response.metadata


async def read_log(directory: Path) -> list[Record]:
    """Every record of the partition log in ``directory``, committed or not, in log order."""
    log = await FileCommitLog.open(directory)
    try:
        reader = log.reader(0, committed=False)
        records: list[Record] = []
        async with asyncio.timeout(PHASE_TIMEOUT_S):
            while reader.next_offset <= log.newest_offset:
                records.extend((await reader.read()).records())
        return records
    finally:
        await log.close()


def check_record(record: Record, n: int, subject: str) -> None:
    """Assert that ``record`` is message ``n`` as published to ``subject``."""
    key, value, headers = expected(n)
    stored = dict(record.headers)
    assert len(stored) == len(record.headers), f"offset {record.offset}: repeated header names"
    assert stored.pop(SUBJECT_HEADER, None) == subject.encode(), record
    assert stored.pop(REPLY_HEADER, None) == b"", record
    assert (record.key, record.value, stored) == (key, value, headers), (
        f"offset {record.offset} should hold message {n}"
    )


def write_config(path: Path, nats_url: str) -> Path:
    """A broker config file: the external NATS server, ``always`` sync, small segments."""
    path.write_text(
        "nats:\n"
        f"  servers: [{nats_url}]\n"
        "streams:\n"
        "  sync:\n"
        "    policy: always\n"
        "  segment:\n"
        "    max:\n"
        f"      bytes: {SEGMENT_MAX_BYTES}\n",
        encoding="utf-8",
    )
    return path


@dataclass(frozen=True, slots=True)
class Killed:
    """What the producer saw of a broker killed under load.

    Attributes:
        acked: Messages acked (0 .. acked-1, each at the offset equal to its number).
        published: Messages published (0 .. published-1).
        acked_at_kill: Acks received when the kill was sent (the rest were in transit).
        published_at_kill: Messages published when the kill was sent.
    """

    acked: int
    published: int
    acked_at_kill: int
    published_at_kill: int


async def publish_and_kill(broker: BrokerProcess, nc: Client, subject: str) -> Killed:
    """Publish until :data:`ACKED_BEFORE_KILL` acks are back, SIGKILL the broker, stop."""
    producer = Producer(nc, subject)
    await producer.start()
    await wait_for(
        lambda: len(producer.acks) >= ACKED_BEFORE_KILL,
        PHASE_TIMEOUT_S,
        message=f"{ACKED_BEFORE_KILL} acks",
    )
    broker.kill()
    acked_at_kill, published_at_kill = len(producer.acks), producer.published
    assert broker.process.returncode == -signal.SIGKILL
    async with asyncio.timeout(PHASE_TIMEOUT_S):
        acks = await producer.stop()
    assert producer.bad_acks == [], producer.bad_acks[:5]
    # Acks go out in offset order over one connection, and this producer is the stream's only
    # writer: message n is at offset n, and the acks received are a prefix.
    assert acks == {n: n for n in range(len(acks))}, "acks out of order or with gaps"
    assert acked_at_kill <= len(acks) < producer.published
    return Killed(len(acks), producer.published, acked_at_kill, published_at_kill)


async def write_once(broker: BrokerProcess, nc: Client, subject: str, n: int) -> int:
    """Publish message ``n`` with ack policy ALL; return the offset its ack names."""
    producer = Producer(nc, subject, first=n, end=n + 1)
    async with asyncio.timeout(PHASE_TIMEOUT_S):
        await producer.start()
        await wait_for(lambda: producer.acks, PHASE_TIMEOUT_S, message=f"the ack of message {n}")
        acks = await producer.stop()
    assert producer.bad_acks == [], broker.output_tail()
    assert list(acks) == [n]
    return acks[n]


async def test_acked_messages_survive_kill_9(
    broker_factory: BrokerFactory, nats_server: NatsServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "flux.yaml", nats_server.url)
    broker = await broker_factory(args=["--config", str(config)])
    await wait_for(lambda: "sync policy  always" in broker.output(), message="start-up summary")
    assert "(external)" in broker.output(), broker.output_tail()
    subject = f"durability.{uuid4().hex}"
    async with grpc_api(broker) as api:
        await api.CreateStream(
            api_pb2.CreateStreamRequest(subject=subject, name=STREAM), timeout=10
        )

    nc = await nats.connect(nats_server.url, name="durability-producer")
    restarted: BrokerProcess | None = None
    try:
        # 1. Publish until enough acks have come back, then kill -9 mid-stream.
        killed = await publish_and_kill(broker, nc, subject)

        # 2. Restart: everything acked is there and committed, and a new write is accepted.
        restarted = await broker.restart()
        recovered = await partition_metadata(restarted)
        assert recovered.newestOffset >= killed.acked - 1, (
            f"{killed.acked} messages were acked, but the newest offset after the restart is "
            f"{recovered.newestOffset}:\n{restarted.output_tail()}"
        )
        assert recovered.highWatermark == recovered.newestOffset
        extra = killed.published  # a message number never used before
        assert await write_once(restarted, nc, subject, extra) == recovered.newestOffset + 1
        final = await partition_metadata(restarted)
        assert (final.newestOffset, final.highWatermark) == (recovered.newestOffset + 1,) * 2
        assert await restarted.stop() == 0, restarted.output_tail()
    finally:
        await nc.close()
        if restarted is not None:
            await stop_all([restarted])

    # 3. The log itself: messages 0 .. S-1 at offsets 0 .. S-1, then the post-restart one.
    directory = broker.data_dir / STREAMS_DIR / STREAM / "0"
    records = await read_log(directory)
    offsets = [record.offset for record in records]
    assert offsets == list(range(len(records))), "offsets are not 0, 1, 2, ... once each"
    *before, last = records
    lost = killed.acked - len(before)
    assert lost <= 0, f"{lost} of {killed.acked} acked messages lost, from {len(before)} on"
    assert len(before) <= killed.published, "more messages stored than were published"
    for n, record in enumerate(before):
        check_record(record, n, subject)
    check_record(last, extra, subject)
    segments = len(list(directory.glob("*.log")))
    assert segments > 1, "the log never rolled: make the segments smaller"
    _logger.info(
        "published %d and acked %d at the kill; %d acks in all; %d stored; %d segments",
        killed.published_at_kill,
        killed.acked_at_kill,
        killed.acked,
        len(before),
        segments,
    )
