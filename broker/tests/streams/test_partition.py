"""The partition leader's ingest path (flux_broker.streams.partition) and delivery mapping.

Integration tests: a real nats-server, real nats-py clients and a real FileCommitLog. Each test
uses its own subjects, so tests sharing the session's server never see each other's messages.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Protocol

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from flux_broker.log import FileCommitLog, LogConfig, Record, SyncPolicy
from flux_broker.log.contract import AppendGuard, AppendResult
from flux_broker.log.format import NewRecord
from flux_broker.nats.envelope import MAGIC, decode_ack, encode_ack, encode_message
from flux_broker.streams.delivery import record_to_message
from flux_broker.streams.partition import QUEUE_MAX_BYTES, QUEUE_MAX_MESSAGES, Partition
from flux_proto import api_pb2
from flux_testing import NatsServer, wait_for

pytestmark = pytest.mark.integration

FAST = LogConfig(sync_policy=SyncPolicy.NEVER)
MIB = 1024 * 1024
LEADER = api_pb2.AckPolicy.LEADER
ALL = api_pb2.AckPolicy.ALL
NONE = api_pb2.AckPolicy.NONE
OK = api_pb2.Ack.Error.OK
TOO_LARGE = api_pb2.Ack.Error.TOO_LARGE
INCORRECT_OFFSET = api_pb2.Ack.Error.INCORRECT_OFFSET
ACK_TIMEOUT_S = 10.0


class MakePartition(Protocol):
    async def __call__(
        self,
        subject: str,
        *,
        partition_id: int = 0,
        group: str = "",
        record_max_bytes: int = MIB,
        config: LogConfig = FAST,
        optimistic_concurrency: bool = False,
        queue_max_messages: int = QUEUE_MAX_MESSAGES,
        queue_max_bytes: int = QUEUE_MAX_BYTES,
    ) -> Partition: ...


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    """The broker's connection."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
async def pub(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A publisher's connection."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
def subject() -> str:
    return f"test.{uuid.uuid4().hex}"


@pytest.fixture
async def make_partition(nc: Client, data_dir: Path) -> AsyncIterator[MakePartition]:
    created: list[Partition] = []

    async def make(
        subject: str,
        *,
        partition_id: int = 0,
        group: str = "",
        record_max_bytes: int = MIB,
        config: LogConfig = FAST,
        optimistic_concurrency: bool = False,
        queue_max_messages: int = QUEUE_MAX_MESSAGES,
        queue_max_bytes: int = QUEUE_MAX_BYTES,
    ) -> Partition:
        directory = data_dir / "streams" / "s" / str(len(created))
        log = await FileCommitLog.open(directory, config)
        partition = Partition(
            stream="s",
            partition_id=partition_id,
            subject=subject,
            group=group,
            log=log,
            nc=nc,
            namespace="flux-test",
            record_max_bytes=record_max_bytes,
            optimistic_concurrency=optimistic_concurrency,
            queue_max_messages=queue_max_messages,
            queue_max_bytes=queue_max_bytes,
        )
        created.append(partition)
        await partition.start()
        return partition

    yield make
    for partition in created:
        await partition.stop()
        await partition.log.close()


async def stored(log: FileCommitLog) -> list[Record]:
    """Every record of ``log``, oldest first."""
    reader = log.reader(0, committed=False)
    records: list[Record] = []
    while reader.next_offset <= log.newest_offset:
        batch = await reader.read()
        assert batch is not None
        records.extend(batch.records())
    return records


def envelope(
    value: bytes,
    *,
    inbox: str = "",
    correlation_id: str = "",
    policy: api_pb2.AckPolicy.ValueType = LEADER,
    key: bytes = b"",
    headers: dict[str, bytes] | None = None,
    offset: int = -1,
    crc: bool = False,
) -> bytes:
    return encode_message(
        api_pb2.Message(
            offset=offset,
            key=key,
            value=value,
            headers=headers or {},
            ackInbox=inbox,
            correlationId=correlation_id,
            ackPolicy=policy,
        ),
        crc=crc,
    )


async def next_ack(sub: Subscription) -> api_pb2.Ack:
    msg = await sub.next_msg(timeout=ACK_TIMEOUT_S)
    return decode_ack(msg.data)


# -- envelopes and acks --------------------------------------------------------------------


async def test_envelope_with_leader_policy_is_stored_and_acked(
    make_partition: MakePartition, pub: Client, subject: str
) -> None:
    partition = await make_partition(subject)
    inbox = pub.new_inbox()
    sub = await pub.subscribe(inbox)
    before_ns = time.time_ns()
    data = envelope(
        b"hello",
        key=b"k",
        headers={"h": b"v", "reply": b"spoofed"},
        inbox=inbox,
        correlation_id="c1",
    )
    await pub.publish(subject, data, reply="the.reply")

    ack = await next_ack(sub)
    after_ns = time.time_ns()
    assert ack.ackError == api_pb2.Ack.Error.OK
    assert ack.offset == 0
    assert ack.correlationId == "c1"
    assert ack.ackInbox == inbox
    assert ack.ackPolicy == LEADER
    assert ack.stream == "s"
    assert ack.partitionSubject == subject
    assert ack.msgSubject == subject
    assert before_ns <= ack.receptionTimestamp <= ack.commitTimestamp <= after_ns

    [record] = await stored(partition.log)
    assert record.offset == 0
    assert record.key == b"k"
    assert record.value == b"hello"
    # The broker's subject/reply headers replace user headers of those names, as in Liftbridge.
    assert dict(record.headers) == {"h": b"v", "subject": subject.encode(), "reply": b"the.reply"}
    assert len(record.headers) == 3
    assert partition.log.high_watermark == 0
    assert partition.stats.acks_sent == 1


async def test_all_policy_is_acked_once_committed(
    make_partition: MakePartition, pub: Client, subject: str
) -> None:
    partition = await make_partition(subject)
    inbox = pub.new_inbox()
    sub = await pub.subscribe(inbox)
    await pub.publish(subject, envelope(b"x", inbox=inbox, correlation_id="a", policy=ALL))

    ack = await next_ack(sub)
    assert (ack.offset, ack.correlationId, ack.ackPolicy) == (0, "a", ALL)
    assert partition.log.high_watermark >= ack.offset


async def test_none_policy_is_stored_without_ack(
    make_partition: MakePartition, pub: Client, subject: str
) -> None:
    partition = await make_partition(subject)
    inbox = pub.new_inbox()
    sub = await pub.subscribe(inbox)
    await pub.publish(subject, envelope(b"quiet", inbox=inbox, correlation_id="n", policy=NONE))
    await pub.publish(subject, envelope(b"loud", inbox=inbox, correlation_id="l"))

    # Acks go out in offset order, so the first ack on the inbox is the LEADER message's.
    ack = await next_ack(sub)
    assert (ack.offset, ack.correlationId) == (1, "l")
    assert [r.value for r in await stored(partition.log)] == [b"quiet", b"loud"]
    assert partition.stats.acks_sent == 1


async def test_raw_payload_is_stored_as_the_value_without_ack(
    make_partition: MakePartition, pub: Client, subject: str
) -> None:
    partition = await make_partition(subject)
    await pub.publish(subject, b"plain")
    await pub.publish(subject, b"")

    await wait_for(lambda: partition.stats.appended == 2)
    first, empty = await stored(partition.log)
    assert (first.key, first.value) == (None, b"plain")
    assert dict(first.headers) == {"subject": subject.encode(), "reply": b""}
    assert empty.value == b""  # an empty value is an ordinary value, not null
    assert partition.stats.acks_sent == 0
    assert partition.stats.malformed_envelopes == 0


async def test_broken_envelopes_are_stored_raw_and_counted(
    make_partition: MakePartition, pub: Client, subject: str
) -> None:
    partition = await make_partition(subject)
    too_short = MAGIC + b"\x00"
    bad_protobuf = MAGIC + bytes([0, 8, 0, 0]) + b"\xff\xff\xff"
    wrong_type = MAGIC + bytes([0, 8, 0, 1])
    for data in (too_short, bad_protobuf, wrong_type):
        await pub.publish(subject, data)

    await wait_for(lambda: partition.stats.appended == 3)
    assert [r.value for r in await stored(partition.log)] == [too_short, bad_protobuf, wrong_type]
    assert partition.stats.malformed_envelopes == 3
    assert partition.stats.acks_sent == 0


async def test_too_large_gets_an_error_ack_whatever_the_policy(
    make_partition: MakePartition, pub: Client, subject: str
) -> None:
    partition = await make_partition(subject, record_max_bytes=100)
    inbox = pub.new_inbox()
    sub = await pub.subscribe(inbox)
    await pub.publish(subject, envelope(b"x" * 200, inbox=inbox, correlation_id="big", policy=NONE))
    await pub.publish(subject, b"y" * 101)  # raw: no inbox, so no ack, but not stored either
    await pub.publish(subject, envelope(b"small", inbox=inbox, correlation_id="ok"))

    error_ack = await next_ack(sub)
    assert error_ack.ackError == api_pb2.Ack.Error.TOO_LARGE
    assert (error_ack.correlationId, error_ack.ackPolicy) == ("big", NONE)
    assert error_ack.msgSubject == subject
    ok_ack = await next_ack(sub)
    assert (ok_ack.ackError, ok_ack.offset, ok_ack.correlationId) == (
        api_pb2.Ack.Error.OK,
        0,
        "ok",
    )
    assert [r.value for r in await stored(partition.log)] == [b"small"]
    assert partition.stats.too_large == 2


@pytest.mark.parametrize(
    "headers",
    [
        {f"h{i}": b"" for i in range(0x7FFF)},  # with subject and reply: over the i16 count
        {"n" * 0x8000: b"v"},  # a name over the i16 length
    ],
    ids=["too-many-headers", "header-name-too-long"],
)
async def test_headers_the_format_cannot_hold_get_too_large_and_ingest_goes_on(
    make_partition: MakePartition, pub: Client, subject: str, headers: dict[str, bytes]
) -> None:
    partition = await make_partition(subject, record_max_bytes=4 * MIB)
    inbox = pub.new_inbox()
    sub = await pub.subscribe(inbox)
    await pub.publish(subject, envelope(b"x", inbox=inbox, correlation_id="bad", headers=headers))
    await pub.publish(subject, envelope(b"next", inbox=inbox, correlation_id="ok"))
    bad = await next_ack(sub)
    assert (bad.correlationId, bad.ackError) == ("bad", api_pb2.Ack.Error.TOO_LARGE)
    ok = await next_ack(sub)
    assert (ok.correlationId, ok.ackError, ok.offset) == ("ok", api_pb2.Ack.Error.OK, 0)
    assert [r.value for r in await stored(partition.log)] == [b"next"]
    assert (partition.stats.too_large, partition.stats.ingest_failures) == (1, 0)


# -- batching, subjects and groups ---------------------------------------------------------


async def test_a_burst_is_appended_in_few_batches_and_acked_in_order(
    make_partition: MakePartition, pub: Client, subject: str
) -> None:
    partition = await make_partition(subject, config=LogConfig())  # group commit (fsync)
    inbox = pub.new_inbox()
    acks: list[api_pb2.Ack] = []

    async def on_ack(msg: Msg) -> None:
        acks.append(decode_ack(msg.data))

    await pub.subscribe(inbox, cb=on_ack)
    count = 1000
    for i in range(count):
        await pub.publish(subject, envelope(b"m%d" % i, inbox=inbox, correlation_id=str(i)))

    await wait_for(lambda: len(acks) == count)
    assert [ack.offset for ack in acks] == list(range(count))
    assert [ack.correlationId for ack in acks] == [str(i) for i in range(count)]
    assert partition.stats.appended == count
    assert partition.stats.appends <= count // 10, partition.stats
    assert partition.log.high_watermark == count - 1


async def test_partition_n_listens_on_the_numbered_subject(
    make_partition: MakePartition, pub: Client, subject: str
) -> None:
    partition = await make_partition(subject, partition_id=2)
    assert partition.subject == f"{subject}.2"
    inbox = pub.new_inbox()
    sub = await pub.subscribe(inbox)
    await pub.publish(subject, envelope(b"for partition 0", inbox=inbox))
    await pub.publish(f"{subject}.2", envelope(b"for partition 2", inbox=inbox))

    ack = await next_ack(sub)
    assert (ack.offset, ack.partitionSubject, ack.msgSubject) == (0, f"{subject}.2", f"{subject}.2")
    assert [r.value for r in await stored(partition.log)] == [b"for partition 2"]


async def test_streams_on_one_subject_each_get_every_message_and_groups_share(
    make_partition: MakePartition, pub: Client, subject: str
) -> None:
    ungrouped = await make_partition(subject)
    other_group = await make_partition(subject, group="other")
    shared_a = await make_partition(subject, group="shared")
    shared_b = await make_partition(subject, group="shared")
    count = 200
    for i in range(count):
        await pub.publish(subject, b"%d" % i)

    def shared() -> int:
        return shared_a.stats.appended + shared_b.stats.appended

    await wait_for(
        lambda: (ungrouped.stats.appended, other_group.stats.appended, shared()) == (count,) * 3
    )
    for partition in (ungrouped, other_group):
        assert [r.value for r in await stored(partition.log)] == [b"%d" % i for i in range(count)]
    # NATS picks a queue member at random per message: both get some (failing odds 2**-199).
    assert shared_a.stats.appended > 0
    assert shared_b.stats.appended > 0
    values = {r.value for r in await stored(shared_a.log) + await stored(shared_b.log)}
    assert values == {b"%d" % i for i in range(count)}


# -- failures and stopping -----------------------------------------------------------------


async def test_a_failed_append_is_not_acked_and_ingest_goes_on(
    make_partition: MakePartition,
    pub: Client,
    subject: str,
    file_size_limit: Callable[[int | None], None],
) -> None:
    partition = await make_partition(subject)
    inbox = pub.new_inbox()
    sub = await pub.subscribe(inbox)
    await pub.publish(subject, envelope(b"kept", inbox=inbox, correlation_id="kept"))
    assert (await next_ack(sub)).offset == 0

    size = partition.log.segments[-1].size_bytes
    file_size_limit(size + 100)
    await pub.publish(subject, envelope(b"x" * 1000, inbox=inbox, correlation_id="lost"))
    await wait_for(lambda: partition.stats.append_failures == 1)
    file_size_limit(None)

    await pub.publish(subject, envelope(b"after", inbox=inbox, correlation_id="after"))
    # Acks arrive in order: the failed message's would have come first.
    ack = await next_ack(sub)
    assert (ack.offset, ack.correlationId) == (1, "after")
    assert [r.value for r in await stored(partition.log)] == [b"kept", b"after"]


async def test_stop_while_publishing_keeps_every_acked_message(
    make_partition: MakePartition, pub: Client, subject: str
) -> None:
    partition = await make_partition(subject, config=LogConfig())
    inbox = pub.new_inbox()
    acked: dict[int, str] = {}

    async def on_ack(msg: Msg) -> None:
        ack = decode_ack(msg.data)
        acked[ack.offset] = ack.correlationId

    await pub.subscribe(inbox, cb=on_ack)
    done = asyncio.Event()

    async def publish_until_done() -> None:
        i = 0
        while not done.is_set():
            await pub.publish(subject, envelope(b"m%d" % i, inbox=inbox, correlation_id=str(i)))
            i += 1
            if i % 100 == 0:
                await pub.flush()  # pace the publisher by round trips, letting the broker run

    publisher = asyncio.create_task(publish_until_done())
    await wait_for(lambda: len(acked) >= 500)
    await partition.stop()
    done.set()
    await publisher

    stats = partition.stats
    assert stats.appended == stats.received  # everything delivered before the stop is in
    assert stats.acks_sent == stats.appended
    await wait_for(lambda: len(acked) == stats.acks_sent)  # stop() flushed the last acks
    directory = partition.log.directory
    await partition.log.close()
    reopened = await FileCommitLog.open(directory, FAST)
    try:
        records = await stored(reopened)
    finally:
        await reopened.close()
    assert len(records) == stats.appended
    for offset, correlation_id in acked.items():
        assert records[offset].value == b"m" + correlation_id.encode()


async def test_stop_is_idempotent(make_partition: MakePartition, subject: str) -> None:
    partition = await make_partition(subject)
    await partition.stop()
    await partition.stop()


# -- one batch: ack order, ack bytes, envelopes with a CRC -------------------------------


def hold_appends(monkeypatch: pytest.MonkeyPatch, log: FileCommitLog) -> asyncio.Event:
    """Make every append of ``log`` wait until the returned event is set."""
    release = asyncio.Event()
    append = log.append

    async def held(
        records: Sequence[NewRecord], *, guard: AppendGuard | None = None
    ) -> AppendResult:
        await release.wait()
        return await append(records, guard=guard)

    monkeypatch.setattr(log, "append", held)
    return release


async def test_acks_of_a_batch_go_in_arrival_order_as_canonical_envelopes(
    make_partition: MakePartition, pub: Client, subject: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    partition = await make_partition(subject, record_max_bytes=300)
    release = hold_appends(monkeypatch, partition.log)
    inbox = pub.new_inbox()
    sub = await pub.subscribe(inbox)
    await pub.publish(subject, b"blocker")  # its append holds the task: the rest make a batch
    await wait_for(lambda: partition.stats.received == 1)
    await pub.publish(subject, envelope(b"a", inbox=inbox, correlation_id="a", policy=ALL))
    await pub.publish(subject, envelope(b"x" * 400, inbox=inbox, correlation_id="big"))
    await pub.publish(subject, envelope(b"b", inbox=inbox, correlation_id="b"), reply="r")
    await wait_for(lambda: partition.stats.received == 4)
    release.set()

    raw = [(await sub.next_msg(timeout=ACK_TIMEOUT_S)).data for _ in range(3)]
    acks = [decode_ack(data) for data in raw]
    # The error ack is between the success acks, where its message was.
    assert [(a.correlationId, a.ackError, a.offset) for a in acks] == [
        ("a", OK, 1),
        ("big", TOO_LARGE, 0),
        ("b", OK, 2),
    ]
    for data, ack in zip(raw, acks, strict=True):
        assert data == encode_ack(ack)  # byte for byte what the protobuf library writes
        assert (ack.stream, ack.partitionSubject, ack.msgSubject) == ("s", subject, subject)
        assert ack.ackInbox == inbox
        assert ack.receptionTimestamp > 0
    assert [ack.ackPolicy for ack in acks] == [ALL, LEADER, LEADER]
    assert acks[0].commitTimestamp >= acks[0].receptionTimestamp
    assert acks[1].commitTimestamp == 0  # not stored
    records = await stored(partition.log)
    assert [r.value for r in records] == [b"blocker", b"a", b"b"]
    assert dict(records[2].headers) == {"subject": subject.encode(), "reply": b"r"}
    assert partition.stats.appends == 2


async def test_an_envelope_with_a_crc_is_decoded_and_acked(
    make_partition: MakePartition, pub: Client, subject: str
) -> None:
    partition = await make_partition(subject)
    inbox = pub.new_inbox()
    sub = await pub.subscribe(inbox)
    data = envelope(b"v", key=b"k", inbox=inbox, correlation_id="c", headers={"h": b"1"}, crc=True)
    await pub.publish(subject, data)

    ack = await next_ack(sub)
    assert (ack.correlationId, ack.ackError, ack.offset) == ("c", OK, 0)
    [record] = await stored(partition.log)
    assert (record.key, record.value) == (b"k", b"v")
    assert dict(record.headers) == {"h": b"1", "subject": subject.encode(), "reply": b""}
    assert partition.stats.malformed_envelopes == 0


# -- optimistic concurrency control --------------------------------------------------------


async def test_expected_offsets_are_checked_against_the_offsets_of_the_batch(
    make_partition: MakePartition, pub: Client, subject: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    partition = await make_partition(subject, optimistic_concurrency=True)
    release = hold_appends(monkeypatch, partition.log)
    inbox = pub.new_inbox()
    sub = await pub.subscribe(inbox)
    for correlation_id, offset in (("0", 0), ("wrong", 5), ("1", 1), ("any", -1)):
        await pub.publish(
            subject, envelope(b"m", inbox=inbox, correlation_id=correlation_id, offset=offset)
        )
    await wait_for(lambda: partition.stats.received == 4)
    release.set()

    acks = [await next_ack(sub) for _ in range(4)]
    assert [(a.correlationId, a.ackError, a.offset) for a in acks] == [
        ("0", OK, 0),
        ("wrong", INCORRECT_OFFSET, 0),
        ("1", OK, 1),
        ("any", OK, 2),
    ]
    assert partition.stats.incorrect_offset == 1
    assert partition.stats.occ_conflicts == 0


async def test_a_batch_over_the_log_batch_limit_is_appended_in_chunks_with_occ(
    make_partition: MakePartition, pub: Client, subject: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Records of ~705 bytes (600 B values) and a 2000-byte batch limit: two per write.
    config = LogConfig(sync_policy=SyncPolicy.NEVER, record_max_bytes=1000, batch_max_bytes=2000)
    partition = await make_partition(subject, optimistic_concurrency=True, config=config)
    release = hold_appends(monkeypatch, partition.log)
    inbox = pub.new_inbox()
    sub = await pub.subscribe(inbox)
    await pub.publish(subject, b"blocker")  # the rest make one batch
    await wait_for(lambda: partition.stats.received == 1)
    expected = [1, 2, 3, 4, 4, -1, 6, 7]  # the second 4 is wrong, -1 asks for no check
    for i, offset in enumerate(expected):
        data = envelope(b"%d" % i * 600, inbox=inbox, correlation_id=str(i), offset=offset)
        await pub.publish(subject, data)
    await wait_for(lambda: partition.stats.received == 1 + len(expected))
    release.set()

    acks = [await next_ack(sub) for _ in expected]
    assert [(a.correlationId, a.ackError, a.offset) for a in acks] == [
        ("0", OK, 1),
        ("1", OK, 2),
        ("2", OK, 3),
        ("3", OK, 4),
        ("4", INCORRECT_OFFSET, 0),
        ("5", OK, 5),
        ("6", OK, 6),
        ("7", OK, 7),
    ]
    # The blocker, then chunks of two: [0, 1], [2, 3], [5, 6] and [7] (4 was rejected).
    assert partition.stats.appends == 1 + 4
    assert (partition.stats.occ_conflicts, partition.stats.incorrect_offset) == (0, 1)


def another_writer_first(
    monkeypatch: pytest.MonkeyPatch, log: FileCommitLog, *, call: int = 1
) -> None:
    """Make append number ``call`` of ``log`` come after another writer's (a batched publish)."""
    append = log.append
    calls = 0

    async def raced(
        records: Sequence[NewRecord], *, guard: AppendGuard | None = None
    ) -> AppendResult:
        nonlocal calls
        calls += 1
        if calls == call:
            monkeypatch.setattr(log, "append", append)  # only once
            await append([NewRecord(value=b"batched")])
        return await append(records, guard=guard)

    monkeypatch.setattr(log, "append", raced)


async def test_an_occ_batch_is_refused_when_another_writer_appends_first(
    make_partition: MakePartition,
    pub: Client,
    subject: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="flux_broker.streams.partition")
    partition = await make_partition(subject, optimistic_concurrency=True)
    another_writer_first(monkeypatch, partition.log)
    inbox = pub.new_inbox()
    sub = await pub.subscribe(inbox)
    await pub.publish(subject, envelope(b"first", inbox=inbox, correlation_id="first", offset=0))
    await wait_for(lambda: partition.stats.occ_conflicts == 1)

    # Not stored, no ack: the next ack on the inbox is the next message's.
    await pub.publish(subject, envelope(b"second", inbox=inbox, correlation_id="second", offset=1))
    ack = await next_ack(sub)
    assert (ack.correlationId, ack.ackError, ack.offset) == ("second", OK, 1)
    assert [r.value for r in await stored(partition.log)] == [b"batched", b"second"]
    stats = partition.stats
    assert (stats.appended, stats.appends, stats.incorrect_offset) == (1, 1, 0)
    assert (stats.append_failures, stats.ingest_failures) == (0, 0)
    assert "another writer came first" in caplog.text


async def test_each_chunk_of_an_occ_batch_is_guarded(
    make_partition: MakePartition, pub: Client, subject: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = LogConfig(sync_policy=SyncPolicy.NEVER, record_max_bytes=1000, batch_max_bytes=2000)
    partition = await make_partition(subject, optimistic_concurrency=True, config=config)
    release = hold_appends(monkeypatch, partition.log)
    # Appends: 1 the blocker, 2 the chunk [1, 2], 3 the chunk [3, -1]: another writer first.
    another_writer_first(monkeypatch, partition.log, call=3)
    inbox = pub.new_inbox()
    sub = await pub.subscribe(inbox)
    await pub.publish(subject, b"blocker")
    await wait_for(lambda: partition.stats.received == 1)
    for i, offset in enumerate([1, 2, 3, -1]):  # two per chunk (see the test above)
        data = envelope(b"%d" % i * 600, inbox=inbox, correlation_id=str(i), offset=offset)
        await pub.publish(subject, data)
    await wait_for(lambda: partition.stats.received == 5)
    release.set()
    await wait_for(lambda: partition.stats.occ_conflicts == 1)

    # The second chunk's only check was made for the record that started it: still guarded,
    # so nothing of it is stored or acked; the next ack is the one of a later message.
    await pub.publish(subject, envelope(b"later", inbox=inbox, correlation_id="later", offset=4))
    acks = [await next_ack(sub) for _ in range(3)]
    assert [(a.correlationId, a.ackError, a.offset) for a in acks] == [
        ("0", OK, 1),
        ("1", OK, 2),
        ("later", OK, 4),
    ]
    values = [r.value for r in await stored(partition.log)]
    assert values == [b"blocker", b"0" * 600, b"1" * 600, b"batched", b"later"]


async def test_an_occ_batch_without_expected_offsets_is_not_guarded(
    make_partition: MakePartition, pub: Client, subject: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    partition = await make_partition(subject, optimistic_concurrency=True)
    another_writer_first(monkeypatch, partition.log)
    inbox = pub.new_inbox()
    sub = await pub.subscribe(inbox)
    await pub.publish(subject, envelope(b"unchecked", inbox=inbox, correlation_id="u"))

    ack = await next_ack(sub)
    assert (ack.correlationId, ack.ackError, ack.offset) == ("u", OK, 1)
    assert partition.stats.occ_conflicts == 0


# -- flow control --------------------------------------------------------------------------


async def test_a_full_buffer_drops_new_messages_and_ingest_goes_on(
    make_partition: MakePartition,
    pub: Client,
    subject: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    partition = await make_partition(subject, queue_max_messages=5)
    release = hold_appends(monkeypatch, partition.log)
    count = 50
    for i in range(count):
        await pub.publish(subject, b"%d" % i)
    await wait_for(lambda: partition.stats.received == count)
    stats = partition.stats
    # At most one batch waits in the held append (up to five messages: the buffer's bound)
    # and five messages in the buffer; the others were dropped on arrival.
    assert count - 5 - 5 <= stats.dropped < count
    release.set()
    kept = count - stats.dropped
    await wait_for(lambda: stats.appended == kept)
    values = [int(r.value or b"") for r in await stored(partition.log)]
    assert values == sorted(values)  # the kept ones, in order
    assert len(values) == kept
    warnings = [r for r in caplog.records if "dropping messages" in r.getMessage()]
    assert 1 <= len(warnings) <= 2  # once per episode (the buffer was emptied at most once)

    await pub.publish(subject, b"after")  # the buffer has room again
    await wait_for(lambda: stats.appended == kept + 1)
    assert stats.dropped == count - kept


async def test_the_buffer_is_bounded_in_bytes_too(
    make_partition: MakePartition, pub: Client, subject: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    partition = await make_partition(subject, queue_max_bytes=1000)
    release = hold_appends(monkeypatch, partition.log)
    count = 20
    for i in range(count):
        await pub.publish(subject, bytes([i]) * 400)
    await wait_for(lambda: partition.stats.received == count)
    # At most three messages in the buffer (the third passes the bound) and three more in
    # the held batch; the others were dropped on arrival.
    assert count - 3 - 3 <= partition.stats.dropped < count
    release.set()
    await wait_for(lambda: partition.stats.appended == count - partition.stats.dropped)


# -- delivery ------------------------------------------------------------------------------


def test_record_from_nats_is_delivered_with_its_subjects_and_headers() -> None:
    record = Record(
        offset=7,
        timestamp_ns=123,
        leader_epoch=1,
        key=b"k",
        value=b"v",
        headers=(("h", b"1"), ("subject", b"orders.eu"), ("reply", b"_INBOX.x")),
    )
    message = record_to_message(record, "orders", 3, "orders.*.3")
    assert message == api_pb2.Message(
        offset=7,
        key=b"k",
        value=b"v",
        timestamp=123,
        stream="orders",
        partition=3,
        subject="orders.eu",
        replySubject="_INBOX.x",
        headers={"h": b"1", "subject": b"orders.eu", "reply": b"_INBOX.x"},
    )


def test_record_without_subject_header_is_served_with_the_partition_subject() -> None:
    record = Record(offset=0, timestamp_ns=5, leader_epoch=0, key=None, value=None, headers=())
    message = record_to_message(record, "s", 0, "foo")
    assert (message.subject, message.replySubject) == ("foo", "")
    assert (message.key, message.value) == (b"", b"")
    assert dict(message.headers) == {}
    assert (message.offset, message.timestamp, message.stream, message.partition) == (0, 5, "s", 0)
    assert not message.ackInbox
    assert not message.correlationId


def test_non_utf8_subject_header_does_not_break_delivery() -> None:
    record = Record(0, 1, 0, None, b"v", (("subject", b"\xff"), ("reply", b"r")))
    message = record_to_message(record, "s", 0, "foo")
    assert message.subject == "\ufffd"
    assert message.headers["subject"] == b"\xff"
