"""SetCursor and FetchCursor: against a real broker process, and the cursor store in-process.

The broker-process tests check the API (statuses, bounds, ``__cursors`` in metadata, restarts,
configuration). The in-process tests drive :class:`~flux_broker.cursors.CursorStore` over a real
stream manager, logs and NATS server, to check what needs the store's insides: compaction, the
index after a reload, records that did not come from SetCursor, and the cursor limit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import grpc
import nats
import pytest
from nats.aio.client import Client

from flux_broker.cursors import (
    CursorLimitError,
    CursorStore,
    NotCursorsLeaderError,
    cursor_key,
    encode_value,
    ensure_cursors_stream,
)
from flux_broker.log import FileCommitLog, LogConfig, SyncPolicy
from flux_broker.log.cleaner import Cleaner
from flux_broker.metadata import CreateStream, PartitionAssignment, SqliteMetadataStore
from flux_broker.nats.envelope import encode_message
from flux_broker.streams.manager import StreamManager
from flux_proto import api_pb2, api_pb2_grpc
from flux_proto.errors import REASON_METADATA_KEY
from flux_testing import NatsServer, wait_for
from flux_testing.broker import BrokerProcess, BrokerProcessError
from flux_testing.pytest_plugin import BrokerFactory

pytestmark = pytest.mark.integration

if TYPE_CHECKING:  # the async stub exists only in the type stubs
    API: TypeAlias = api_pb2_grpc.APIAsyncStub

#: Deadline of calls that must succeed; a healthy run needs milliseconds.
DEADLINE_S = 10.0
CURSORS = "__cursors"
MIB = 1024 * 1024


def _reason(error: grpc.aio.AioRpcError) -> str:
    return str(dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY, ""))


async def _status(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


async def _create(api: API, name: str, *, partitions: int = 1) -> None:
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=name, subject=f"{name}.subject", partitions=partitions),
        timeout=DEADLINE_S,
    )


async def _publish(api: API, stream: str, count: int, partition: int = 0) -> None:
    """Store ``count`` messages in the partition (each acked once written)."""
    for i in range(count):
        await api.Publish(
            api_pb2.PublishRequest(
                stream=stream,
                partition=partition,
                value=b"m%d" % i,
                ackPolicy=api_pb2.AckPolicy.LEADER,
            ),
            timeout=DEADLINE_S,
        )


async def _set(api: API, cursor_id: str, stream: str, offset: int, partition: int = 0) -> None:
    await api.SetCursor(
        api_pb2.SetCursorRequest(
            stream=stream, partition=partition, cursorId=cursor_id, offset=offset
        ),
        timeout=DEADLINE_S,
    )


async def _fetch(api: API, cursor_id: str, stream: str, partition: int = 0) -> int:
    response = await api.FetchCursor(
        api_pb2.FetchCursorRequest(stream=stream, partition=partition, cursorId=cursor_id),
        timeout=DEADLINE_S,
    )
    return response.offset


async def _cursors_metadata(api: API) -> api_pb2.StreamMetadata | None:
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest(), timeout=DEADLINE_S)
    found = [stream for stream in response.streamMetadata if stream.name == CURSORS]
    return found[0] if found else None


async def _cursors_newest(api: API) -> list[int]:
    """The newest offset of every ``__cursors`` partition, by id."""
    stream = await _cursors_metadata(api)
    assert stream is not None
    return [stream.partitions[i].newestOffset for i in sorted(stream.partitions)]


@pytest.fixture
async def stream(api: API) -> str:
    """A stream ``s`` with two partitions: 5 messages in partition 0, none in partition 1."""
    await _create(api, "s", partitions=2)
    await _publish(api, "s", 5)
    return "s"


# -- the API on a broker process -----------------------------------------------------------------


async def test_a_cursor_never_set_is_minus_one(api: API, stream: str) -> None:
    assert await _fetch(api, "c", stream) == -1
    assert await _fetch(api, "c", stream, partition=1) == -1


async def test_set_fetch_overwrite_and_move_backwards(api: API, stream: str) -> None:
    await _set(api, "c", stream, 2)
    assert await _fetch(api, "c", stream) == 2
    await _set(api, "c", stream, 4)
    assert await _fetch(api, "c", stream) == 4
    # Backwards is allowed (Liftbridge semantics: a consumer may rewind).
    await _set(api, "c", stream, 0)
    assert await _fetch(api, "c", stream) == 0
    # Cursors are per (cursor id, stream, partition).
    assert await _fetch(api, "other", stream) == -1
    assert await _fetch(api, "c", stream, partition=1) == -1
    await _set(api, "c", stream, 0, partition=1)
    assert (await _fetch(api, "c", stream), await _fetch(api, "c", stream, 1)) == (0, 0)


async def test_a_cursor_may_point_at_most_one_past_the_newest_offset(api: API, stream: str) -> None:
    # Partition 0 holds offsets 0-4: 5 is the next message (gufo stores "processed + 1").
    await _set(api, "c", stream, 5)
    assert await _fetch(api, "c", stream) == 5
    error = await _status(_set(api, "c", stream, 6))
    assert error.code() is grpc.StatusCode.OUT_OF_RANGE
    assert _reason(error) == "offset-out-of-range"
    assert "(5)" in str(error.details())
    # An empty partition accepts 0 only.
    await _set(api, "c", stream, 0, partition=1)
    error = await _status(_set(api, "c", stream, 1, partition=1))
    assert error.code() is grpc.StatusCode.OUT_OF_RANGE
    # Nothing changed.
    assert (await _fetch(api, "c", stream), await _fetch(api, "c", stream, 1)) == (5, 0)
    # Once the partition grows, the same request succeeds.
    await _publish(api, stream, 1, partition=1)
    await _set(api, "c", stream, 1, partition=1)
    assert await _fetch(api, "c", stream, 1) == 1


async def test_minus_one_clears_a_cursor(api: API, stream: str) -> None:
    await _set(api, "c", stream, 3)
    await _set(api, "c", stream, -1)
    assert await _fetch(api, "c", stream) == -1
    before = await _cursors_newest(api)
    # Clearing a cursor that is not set stores nothing; so does setting the value it holds.
    await _set(api, "c", stream, -1)
    await _set(api, "d", stream, -1)
    await _set(api, "e", stream, 2)
    await _set(api, "e", stream, 2)
    assert await _cursors_newest(api) == [before[0] + 1]


INVALID = (grpc.StatusCode.INVALID_ARGUMENT, "invalid-argument")
NOT_FOUND = grpc.StatusCode.NOT_FOUND

#: (cursor id, stream, partition) and the (code, reason) both SetCursor and FetchCursor get.
BAD_REQUESTS = [
    pytest.param(("", "s", 0), INVALID, id="empty-id"),
    pytest.param(("c", "", 0), INVALID, id="empty-stream"),
    pytest.param(("x" * MIB, "s", 0), INVALID, id="1MiB-id"),
    pytest.param(("é" * 513, "s", 0), INVALID, id="id-over-1KiB-in-utf8"),
    pytest.param(("a\nb", "s", 0), INVALID, id="newline-in-id"),
    pytest.param(("a\u202eb", "s", 0), INVALID, id="bidi-override-in-id"),
    pytest.param(("c", "../../etc/x", 0), INVALID, id="path-as-stream"),
    pytest.param(
        ("c", "__other", 0), (grpc.StatusCode.INVALID_ARGUMENT, "stream-reserved"), id="reserved"
    ),
    pytest.param(("c", "nope", 0), (NOT_FOUND, "stream-not-found"), id="unknown-stream"),
    pytest.param(("c", "s", 2), (NOT_FOUND, "partition-not-found"), id="partition-2-of-2"),
    pytest.param(("c", "s", -1), (NOT_FOUND, "partition-not-found"), id="partition-minus-1"),
]


@pytest.mark.parametrize(("target", "expected"), BAD_REQUESTS)
@pytest.mark.usefixtures("stream")
async def test_bad_requests_change_nothing(
    api: API, target: tuple[str, str, int], expected: tuple[grpc.StatusCode, str]
) -> None:
    cursor_id, name, partition = target
    await _set(api, "kept", "s", 3)
    before = await _cursors_newest(api)
    set_error = await _status(_set(api, cursor_id, name, 0, partition))
    fetch_error = await _status(_fetch(api, cursor_id, name, partition))
    for error in (set_error, fetch_error):
        assert (error.code(), _reason(error)) == expected
        assert len(str(error.details())) < 300  # a huge id is cut short, never echoed whole
    assert await _cursors_newest(api) == before
    assert await _fetch(api, "kept", "s") == 3


@pytest.mark.parametrize("offset", [-2, -5, -(2**63)])
@pytest.mark.usefixtures("stream")
async def test_offsets_below_minus_one_are_invalid(api: API, offset: int) -> None:
    before = await _cursors_newest(api)
    error = await _status(_set(api, "c", "s", offset))
    assert (error.code(), _reason(error)) == (grpc.StatusCode.INVALID_ARGUMENT, "invalid-argument")
    assert await _cursors_newest(api) == before
    assert await _fetch(api, "c", "s") == -1


async def test_ids_with_commas_and_unicode_are_distinct_cursors(api: API, stream: str) -> None:
    # Stream names hold no ',', so "a,s" on stream s and "a" on a stream "s,s" cannot collide.
    ids = ["a", "a,s", "a,s,0", "ünï ✓", "__group:g", "x" * 1024]
    for offset, cursor_id in enumerate(ids):
        await _set(api, cursor_id, stream, offset)
    assert [await _fetch(api, cursor_id, stream) for cursor_id in ids] == list(range(len(ids)))


async def test_concurrent_sets_all_land(api: API, stream: str) -> None:
    await asyncio.gather(*(_set(api, f"c{i}", stream, i % 6) for i in range(60)))
    fetched = await asyncio.gather(*(_fetch(api, f"c{i}", stream) for i in range(60)))
    assert fetched == [i % 6 for i in range(60)]
    assert await _cursors_newest(api) == [59]


async def test_metadata_lists_the_cursors_stream(api: API, broker: BrokerProcess) -> None:
    cursors = await _cursors_metadata(api)
    assert cursors is not None
    assert cursors.subject == "liftbridge-default.cursors"
    assert list(cursors.partitions) == [0]
    assert cursors.partitions[0].leader == broker.broker_id
    # Asked for by name too (gufo looks it up so to find the cursors leader).
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest(streams=[CURSORS]))
    assert [(s.name, s.error) for s in response.streamMetadata] == [(CURSORS, 0)]


async def test_the_cursors_stream_can_be_read_like_any_stream(api: API, stream: str) -> None:
    await _set(api, "c", stream, 2)
    await _set(api, "c", stream, -1)
    call = api.Subscribe(
        api_pb2.SubscribeRequest(
            stream=CURSORS,
            startPosition=api_pb2.StartPosition.EARLIEST,
            stopPosition=api_pb2.StopPosition.STOP_LATEST,
        ),
        timeout=DEADLINE_S,
    )
    messages: list[api_pb2.Message] = []

    async def read_all() -> None:
        async for message in call:
            messages.append(message)

    ended = await _status(read_all())  # at the stop position
    assert ended.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    messages = messages[1:]  # after the handshake
    assert [(m.offset, m.key) for m in messages] == [(0, b"c,s,0"), (1, b"c,s,0")]
    assert len(messages[0].value) == 17  # version, offset, stream creation time
    assert messages[1].value == b""  # the tombstone that cleared it
    assert messages[0].partition == 0


async def test_the_cursors_stream_cannot_be_deleted_or_created(api: API, stream: str) -> None:
    await _set(api, "c", stream, 4)
    # Nor paused or made read-only: the store appends to its logs directly.
    for call in (
        api.DeleteStream(api_pb2.DeleteStreamRequest(name=CURSORS)),
        api.CreateStream(api_pb2.CreateStreamRequest(name=CURSORS, subject="x")),
        api.PauseStream(api_pb2.PauseStreamRequest(name=CURSORS)),
        api.SetStreamReadonly(api_pb2.SetStreamReadonlyRequest(name=CURSORS, readonly=True)),
    ):
        error = await _status(call)
        assert (error.code(), _reason(error)) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "stream-reserved",
        )
    assert await _cursors_metadata(api) is not None
    assert await _fetch(api, "c", stream) == 4
    await _set(api, "c", stream, 1)
    assert await _fetch(api, "c", stream) == 1


async def test_a_recreated_stream_starts_without_cursors(api: API, stream: str) -> None:
    await _set(api, "c", stream, 4)
    await api.DeleteStream(api_pb2.DeleteStreamRequest(name=stream), timeout=DEADLINE_S)
    error = await _status(_fetch(api, "c", stream))
    assert (error.code(), _reason(error)) == (grpc.StatusCode.NOT_FOUND, "stream-not-found")
    await _create(api, stream, partitions=2)
    # The old stream's cursor does not point into the new, empty log.
    assert await _fetch(api, "c", stream) == -1
    await _set(api, "c", stream, 0)
    assert await _fetch(api, "c", stream) == 0


async def test_a_restart_keeps_every_cursor(broker: BrokerProcess) -> None:
    expected: dict[tuple[str, str, int], int] = {}
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        for name, partitions in (("a", 1), ("b", 3)):
            await _create(api, name, partitions=partitions)
            for partition in range(partitions):
                await _publish(api, name, 4, partition)
        for i in range(30):
            key = (f"c{i % 10}", "ab"[i % 2], i % 3 if i % 2 else 0)
            await _set(api, *key[:2], offset=(7 * i) % 5, partition=key[2])
            expected[key] = (7 * i) % 5
        await _set(api, "cleared", "a", 2)
        await _set(api, "cleared", "a", -1)
        await _set(api, "back", "a", 4)
        await _set(api, "back", "a", 1)  # moved backwards: the older value must not come back
        expected[("cleared", "a", 0)] = -1
        expected[("back", "a", 0)] = 1
    assert await broker.stop() == 0
    restarted = await broker.restart()
    async with grpc.aio.insecure_channel(restarted.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        fetched = {key: await _fetch(api, key[0], key[1], key[2]) for key in expected}
        assert fetched == expected
        await _set(api, "back", "a", 3)
        assert await _fetch(api, "back", "a") == 3
    # After a kill too: every acknowledged SetCursor was synced (streams.sync.policy always).
    restarted.kill()
    again = await restarted.restart()
    async with grpc.aio.insecure_channel(again.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        assert await _fetch(api, "back", "a") == 3
        assert await _fetch(api, "c1", "b", 1) == expected[("c1", "b", 1)]


async def test_cursors_spread_over_partitions_by_crc32(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(env={"FLUX_CURSORS_STREAM_PARTITIONS": "4"})
    ids = [f"cursor-{i}" for i in range(40)]
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await _create(api, "s")
        await _publish(api, "s", 1)
        for cursor_id in ids:
            await _set(api, cursor_id, "s", 1)
        written = [0] * 4
        for cursor_id in ids:
            written[zlib.crc32(f"{cursor_id},s,0".encode()) % 4] += 1
        assert await _cursors_newest(api) == [count - 1 for count in written]
        assert [await _fetch(api, cursor_id, "s") for cursor_id in ids] == [1] * len(ids)


async def test_the_partition_count_of_cursors_never_changes(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    data_dir = tmp_path / "kept"
    first = await broker_factory(data_dir, env={"FLUX_CURSORS_STREAM_PARTITIONS": "2"})
    async with grpc.aio.insecure_channel(first.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await _create(api, "s")
        await _set(api, "c", "s", 0)
    assert await first.stop() == 0
    for partitions in ("3", "0"):
        broker = await broker_factory(data_dir, env={"FLUX_CURSORS_STREAM_PARTITIONS": partitions})
        async with grpc.aio.insecure_channel(broker.address) as channel:
            api = api_pb2_grpc.APIStub(channel)
            assert len(await _cursors_newest(api)) == 2
            assert await _fetch(api, "c", "s") == 0
        assert await broker.stop() == 0
        assert "cannot change" in broker.output()


async def test_cursors_disabled(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(env={"FLUX_CURSORS_STREAM_PARTITIONS": "0"})
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await _create(api, "s")
        assert await _cursors_metadata(api) is None
        for call in (_set(api, "c", "s", 0), _fetch(api, "c", "s")):
            error = await _status(call)
            assert (error.code(), _reason(error)) == (grpc.StatusCode.INTERNAL, "cursors-disabled")
            assert "cursors.stream.partitions" in str(error.details())
        # Request checks still come first (Liftbridge: InvalidArgument before Internal).
        error = await _status(_set(api, "", "s", 0))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert not (broker.data_dir / "streams" / CURSORS).exists()


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("FLUX_CURSORS_STREAM_PARTITIONS", "-1", "cursors.stream.partitions -1 is out of range"),
        ("FLUX_CURSORS_STREAM_PARTITIONS", "5000", "cursors.stream.partitions 5000"),
        ("FLUX_CURSORS_STREAM_REPLICATION_FACTOR", "3", "cursors.stream.replication.factor 3"),
        ("FLUX_CURSORS_STREAM_REPLICATION_FACTOR", "-2", "cursors.stream.replication.factor -2"),
    ],
)
async def test_impossible_cursor_settings_stop_start_up(
    broker_factory: BrokerFactory, key: str, value: str, complaint: str
) -> None:
    with pytest.raises(BrokerProcessError, match=complaint):
        await broker_factory(env={key: value})


async def test_cursor_settings_are_supported_not_warned(broker_factory: BrokerFactory) -> None:
    broker = await broker_factory(
        env={"FLUX_CURSORS_STREAM_PARTITIONS": "2", "FLUX_CURSORS_STREAM_REPLICATION_FACTOR": "1"}
    )
    assert await broker.stop() == 0
    output = broker.output()
    assert "cursors.stream.partitions is not supported" not in output
    assert "cursors.stream.replication.factor is not supported" not in output


# -- the store in-process ------------------------------------------------------------------------


#: Small segments, so that a few dozen cursor records roll several and compaction has work.
SMALL_SEGMENTS = LogConfig(sync_policy=SyncPolicy.NEVER, segment_max_bytes=512)


@dataclass
class _Local:
    """An in-process broker's streams and cursor store over the session's NATS server."""

    nats_url: str
    data_dir: Path
    namespace: str = field(default_factory=lambda: f"ns-{uuid.uuid4().hex}")
    nc: Client | None = None
    store: SqliteMetadataStore | None = None
    streams: StreamManager | None = None
    cursors: CursorStore | None = None

    async def open(self, *, partitions: int = 1, max_cursors: int = 1_000_000) -> CursorStore:
        self.nc = await nats.connect(self.nats_url)
        self.store = await SqliteMetadataStore.open(self.data_dir / "metadata.db")
        self.streams = StreamManager(
            data_dir=self.data_dir,
            store=self.store,
            nc=self.nc,
            broker_id="local",
            namespace=self.namespace,
            log_config=SMALL_SEGMENTS,
            batch_max_messages=1024,
        )
        await self.streams.recover()
        count = await ensure_cursors_stream(
            self.streams, partitions=partitions, replication_factor=-1
        )
        self.cursors = CursorStore(self.streams, count, max_cursors=max_cursors)
        await self.cursors.load()
        return self.cursors

    async def close(self) -> None:
        if self.streams is not None:
            await self.streams.close()
        if self.store is not None:
            await self.store.close()
        if self.nc is not None:
            await self.nc.close()
        self.nc, self.store, self.streams, self.cursors = None, None, None, None

    async def create(self, name: str, partitions: int = 1) -> int:
        """Create a stream; return its creation time."""
        assert self.streams is not None
        created_ns = time.time_ns()
        await self.streams.create_stream(
            CreateStream(
                name=name,
                subject=f"{self.namespace}.{name}",
                replication_factor=1,
                partitions=tuple(PartitionAssignment.single("local") for _ in range(partitions)),
                creation_timestamp_ns=created_ns,
            )
        )
        return created_ns

    def log(self, partition: int = 0) -> FileCommitLog:
        assert self.streams is not None
        live = self.streams.partition(CURSORS, partition)
        assert live is not None
        return live.log


@pytest.fixture
async def local(nats_server: NatsServer, data_dir: Path) -> AsyncIterator[_Local]:
    broker = _Local(nats_server.url, data_dir)
    try:
        yield broker
    finally:
        await broker.close()


def _records(log: FileCommitLog) -> int:
    """Records the log holds now."""
    reader = log.reader(0, committed=False)
    count = 0
    while (batch := reader.read_nowait(MIB)) is not None:
        count += batch.count
    return count


async def test_compaction_keeps_the_newest_value_of_every_cursor(local: _Local) -> None:
    store = await local.open()
    created = await local.create("s")
    for round_ in range(40):
        for cursor_id in ("a", "b", "c"):
            await store.set(
                cursor_id, "s", 0, round_ * 10 + len(cursor_id), stream_created_ns=created
            )
    await store.set("b", "s", 0, 7, stream_created_ns=created)  # backwards, newest
    await store.set("c", "s", 0, -1, stream_created_ns=created)  # cleared, newest
    expected = {"a": 391, "b": 7, "c": -1}
    log = local.log()
    assert len(log.segments) > 5
    before = _records(log)
    result = await Cleaner(log).run_once()
    assert result is not None
    assert result.records_removed > 0
    assert _records(log) < before // 3
    # The index did not change, and agrees with what is left in the log.
    assert {
        k: await store.fetch(k, "s", 0, stream_created_ns=created) for k in expected
    } == expected
    reloaded = CursorStore(local.streams, 1)  # type: ignore[arg-type]
    await reloaded.load()
    assert {k: await reloaded.fetch(k, "s", 0, stream_created_ns=created) for k in expected} == (
        expected
    )
    # Writes go on after compaction, and everything survives a reopen from disk.
    await store.set("d", "s", 0, 3, stream_created_ns=created)
    expected["d"] = 3
    await local.close()
    store = await local.open()
    assert len(store) == 3
    assert {
        k: await store.fetch(k, "s", 0, stream_created_ns=created) for k in expected
    } == expected


async def test_records_not_written_by_set_cursor(local: _Local) -> None:
    # __cursors listens on <namespace>.cursors like any stream; whatever lands there is read
    # as the newest record of its key, as Liftbridge and compaction do.
    store = await local.open()
    created = await local.create("s")
    await store.set("a", "s", 0, 5, stream_created_ns=created)
    await store.set("b", "s", 0, 6, stream_created_ns=created)
    assert local.nc is not None
    subject = f"{local.namespace}.cursors"
    await local.nc.publish(subject, b"not an envelope")  # no key: ignored
    await local.nc.publish(
        subject, encode_message(api_pb2.Message(key=cursor_key("a", "s", 0), value=b"junk"))
    )
    await local.nc.publish(
        subject,
        encode_message(
            api_pb2.Message(key=cursor_key("n", "s", 0), value=encode_value(4, created))
        ),
    )
    log = local.log()
    await wait_for(lambda: log.high_watermark == 4, DEADLINE_S, message="3 records ingested")
    fetched = [await store.fetch(k, "s", 0, stream_created_ns=created) for k in "abn"]
    assert fetched == [-1, 6, 4]
    assert store.stats.foreign_records == 2
    # A SetCursor after them applies in log order, and a reload agrees.
    await store.set("a", "s", 0, 1, stream_created_ns=created)
    reloaded = CursorStore(local.streams, 1)  # type: ignore[arg-type]
    await reloaded.load()
    for cursors in (store, reloaded):
        fetched = [await cursors.fetch(k, "s", 0, stream_created_ns=created) for k in "abn"]
        assert fetched == [1, 6, 4]


async def test_the_cursor_limit(local: _Local) -> None:
    store = await local.open(max_cursors=3)
    created = await local.create("s")
    for cursor_id in "abc":
        await store.set(cursor_id, "s", 0, 1, stream_created_ns=created)
    with pytest.raises(CursorLimitError):
        await store.set("d", "s", 0, 1, stream_created_ns=created)
    await store.set("a", "s", 0, 2, stream_created_ns=created)  # existing cursors still move
    await store.set("b", "s", 0, -1, stream_created_ns=created)  # clearing makes room
    await store.set("d", "s", 0, 1, stream_created_ns=created)
    assert len(store) == 3
    assert await store.fetch("d", "s", 0, stream_created_ns=created) == 1


async def test_several_partitions_and_the_leader_check(local: _Local) -> None:
    store = await local.open(partitions=3)
    created = await local.create("s", partitions=2)
    for i in range(30):
        await store.set(f"c{i}", "s", i % 2, i, stream_created_ns=created)
    assert [_records(local.log(p)) for p in range(3)] == [
        sum(1 for i in range(30) if zlib.crc32(cursor_key(f"c{i}", "s", i % 2)) % 3 == p)
        for p in range(3)
    ]
    # Cursors of another stream incarnation (same name, other creation time) are not found.
    assert await store.fetch("c0", "s", 0, stream_created_ns=created) == 0
    assert await store.fetch("c0", "s", 0, stream_created_ns=created + 1) == -1
    # A broker that does not lead the key's __cursors partition refuses (FailedPrecondition).
    assert local.streams is not None
    local.streams.broker_id = "someone-else"
    with pytest.raises(NotCursorsLeaderError):
        await store.fetch("c0", "s", 0, stream_created_ns=created)
    with pytest.raises(NotCursorsLeaderError):
        await store.set("c0", "s", 0, 1, stream_created_ns=created)
