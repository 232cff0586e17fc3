"""FileCommitLog behaviour on real files: appends, readers, rolls, HW, epochs, limits, close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from flux_broker.clock import ManualClock
from flux_broker.log import (
    FileCommitLog,
    LogClosedError,
    LogConfig,
    LogWriteError,
    NewRecord,
    RecordBatch,
    RecordTooLargeError,
    SyncPolicy,
)
from flux_broker.log.commitlog import CLEAN_SHUTDOWN_FILE, HW_CHECKPOINT_FILE
from flux_testing import wait_for

FAST = LogConfig(sync_policy=SyncPolicy.NEVER)


def values(batch: RecordBatch) -> list[bytes | None]:
    return [record.value for record in batch.records()]


@pytest.fixture
async def log(data_dir: Path) -> AsyncIterator[FileCommitLog]:
    opened = await FileCommitLog.open(data_dir, FAST)
    yield opened
    await opened.close()


async def test_empty_log_offsets(log: FileCommitLog) -> None:
    assert (log.oldest_offset, log.newest_offset, log.high_watermark) == (0, -1, -1)
    assert log.offset_for_timestamp(0) == 0


async def test_append_assigns_consecutive_offsets(log: FileCommitLog) -> None:
    first = await log.append([NewRecord(b"a"), NewRecord(b"b")])
    second = await log.append([NewRecord(b"c")])
    assert (first.base_offset, first.last_offset, first.count) == (0, 1, 2)
    assert (second.base_offset, second.last_offset) == (2, 2)
    assert log.newest_offset == 2
    assert second.timestamp_ns >= first.timestamp_ns
    with pytest.raises(ValueError, match="at least one record"):
        await log.append([])


async def test_uncommitted_reader_waits_for_an_append(log: FileCommitLog) -> None:
    reader = log.reader(0, committed=False)
    pending = asyncio.create_task(reader.read())
    await asyncio.sleep(0)  # let the reader reach its wait; the assertion below is the check
    assert not pending.done()
    await log.append([NewRecord(b"hello")])
    batch = await asyncio.wait_for(pending, 5)
    assert values(batch) == [b"hello"]
    assert reader.next_offset == 1


async def test_committed_reader_waits_for_the_high_watermark(log: FileCommitLog) -> None:
    await log.append([NewRecord(b"x"), NewRecord(b"y")])
    reader = log.reader(0)
    assert reader.read_nowait(1 << 20) is None  # nothing committed yet
    pending = asyncio.create_task(reader.read())
    log.set_high_watermark(0)
    batch = await asyncio.wait_for(pending, 5)
    assert (batch.first_offset, batch.last_offset) == (0, 0)
    log.set_high_watermark(1)
    batch = await asyncio.wait_for(reader.read(), 5)
    assert values(batch) == [b"y"]


async def test_high_watermark_only_moves_forward_and_not_past_newest(log: FileCommitLog) -> None:
    await log.append([NewRecord(b"x")] * 3)
    log.set_high_watermark(2)
    log.set_high_watermark(1)
    assert log.high_watermark == 2
    with pytest.raises(ValueError, match="beyond the newest"):
        log.set_high_watermark(3)


async def test_leader_epoch_is_stamped_and_only_grows(log: FileCommitLog) -> None:
    log.set_leader_epoch(5)
    await log.append([NewRecord(b"x")])
    with pytest.raises(ValueError, match="below the current"):
        log.set_leader_epoch(4)
    batch = log.reader(0, committed=False).read_nowait(1 << 20)
    assert batch is not None
    assert [r.leader_epoch for r in batch.records()] == [5]


async def test_reads_respect_the_byte_budget_but_always_make_progress(log: FileCommitLog) -> None:
    await log.append([NewRecord(b"v" * 100) for _ in range(10)])
    reader = log.reader(0, committed=False)
    batch = reader.read_nowait(300)  # each record is 144 bytes framed
    assert batch is not None
    assert batch.count == 2
    assert len(batch.data) <= 300
    big = reader.read_nowait(10)  # smaller than one record: still one record
    assert big is not None
    assert (big.count, big.first_offset) == (1, 2)


async def test_start_offsets_are_clamped(log: FileCommitLog) -> None:
    await log.append([NewRecord(b"a"), NewRecord(b"b")])
    assert log.reader(-5, committed=False).next_offset == 0
    assert log.reader(99, committed=False).next_offset == 2


async def test_rolls_by_size_and_reads_across_segments(data_dir: Path) -> None:
    log = await FileCommitLog.open(
        data_dir, LogConfig(sync_policy=SyncPolicy.NEVER, segment_max_bytes=500)
    )
    try:
        for i in range(30):
            await log.append([NewRecord(str(i).encode() * 20)])
        assert len(log.segments) > 3
        assert log.stats.rolls == len(log.segments) - 1
        names = sorted(p.name for p in data_dir.glob("*.log"))
        assert names == [f"{s.base_offset:020d}.log" for s in log.segments]
        reader = log.reader(0, committed=False)
        seen: list[bytes | None] = []
        while (batch := reader.read_nowait(1 << 20)) is not None:
            seen += values(batch)
        assert seen == [str(i).encode() * 20 for i in range(30)]
    finally:
        await log.close()


async def test_rolls_by_age_and_keeps_timestamps_monotonic(data_dir: Path) -> None:
    clock = ManualClock()
    config = LogConfig(sync_policy=SyncPolicy.NEVER, segment_max_age_s=60)
    log = await FileCommitLog.open(data_dir, config, clock)
    try:
        first = await log.append([NewRecord(b"a")])
        clock.advance(59)
        await log.append([NewRecord(b"b")])
        assert len(log.segments) == 1
        clock.advance(2)
        third = await log.append([NewRecord(b"c")])
        assert len(log.segments) == 2
        clock.set_ns(first.timestamp_ns - 10**9)  # the wall clock steps backwards
        fourth = await log.append([NewRecord(b"d")])
        assert fourth.timestamp_ns == third.timestamp_ns
        assert log.offset_for_timestamp(first.timestamp_ns + 1) == 1
        assert log.offset_for_timestamp(third.timestamp_ns) == 2
        assert log.offset_for_timestamp(third.timestamp_ns + 1) == 4
    finally:
        await log.close()


async def test_limits_refuse_the_whole_batch(log: FileCommitLog) -> None:
    small = await FileCommitLog.open(log.directory / "small", LogConfig(record_max_bytes=64))
    try:
        with pytest.raises(RecordTooLargeError) as refused:
            await small.append([NewRecord(b"ok"), NewRecord(b"x" * 100)])
        assert refused.value.index == 1
        assert small.newest_offset == -1
    finally:
        await small.close()


async def test_close_wakes_readers_and_refuses_work(data_dir: Path) -> None:
    log = await FileCommitLog.open(data_dir, FAST)
    reader = log.reader(0)
    pending = asyncio.create_task(reader.read())
    await asyncio.sleep(0)
    await log.close()
    with pytest.raises(LogClosedError):
        await asyncio.wait_for(pending, 5)
    with pytest.raises(LogClosedError):
        await log.append([NewRecord(b"late")])
    await log.close()  # idempotent


async def test_closing_a_reader_ends_its_wait(log: FileCommitLog) -> None:
    reader = log.reader(0)
    pending = asyncio.create_task(reader.read())
    await asyncio.sleep(0)
    reader.close()
    with pytest.raises(LogClosedError, match="reader closed"):
        await asyncio.wait_for(pending, 5)


async def test_reopen_recovers_records_and_checkpointed_hw(data_dir: Path) -> None:
    log = await FileCommitLog.open(data_dir, FAST)
    await log.append([NewRecord(b"a", key=b"k", headers=(("h", b"1"),)), NewRecord(None)])
    log.set_high_watermark(0)
    await log.close()
    assert (data_dir / CLEAN_SHUTDOWN_FILE).exists()
    assert (data_dir / HW_CHECKPOINT_FILE).read_text() == "0\n"
    reopened = await FileCommitLog.open(data_dir, FAST)
    try:
        assert not (data_dir / CLEAN_SHUTDOWN_FILE).exists()  # consumed at open
        assert (reopened.newest_offset, reopened.high_watermark) == (1, 0)
        batch = reopened.reader(0, committed=False).read_nowait(1 << 20)
        assert batch is not None
        records = list(batch.records())
        assert (records[0].key, records[0].headers) == (b"k", (("h", b"1"),))
        assert records[1].value is None
        appended = await reopened.append([NewRecord(b"c")])
        assert appended.base_offset == 2
    finally:
        await reopened.close()


async def test_sealed_segment_handles_are_bounded(data_dir: Path) -> None:
    config = LogConfig(
        sync_policy=SyncPolicy.NEVER, segment_max_bytes=200, open_segment_handles_max=2
    )
    log = await FileCommitLog.open(data_dir, config)
    try:
        for _ in range(20):
            await log.append([NewRecord(b"z" * 100)])
        await log.close()
        log = await FileCommitLog.open(data_dir, config)
        reader = log.reader(0, committed=False)
        count = 0
        while (batch := reader.read_nowait(1 << 20)) is not None:
            count += batch.count
            open_sealed = sum(1 for s in log.segments[:-1] if s.is_open)
            assert open_sealed <= 2
        assert count == 20
    finally:
        await log.close()


async def test_always_policy_shares_fsyncs_between_concurrent_appends(data_dir: Path) -> None:
    log = await FileCommitLog.open(data_dir, LogConfig(sync_policy=SyncPolicy.ALWAYS))
    try:
        results = await asyncio.gather(*(log.append([NewRecord(b"x")]) for _ in range(50)))
        assert sorted(r.base_offset for r in results) == list(range(50))
        assert not log._syncer.dirty
        assert 1 <= log._syncer.syncs < 50
    finally:
        await log.close()


async def test_interval_policy_syncs_in_the_background(data_dir: Path) -> None:
    config = LogConfig(sync_policy=SyncPolicy.INTERVAL, sync_interval_s=0.05)
    log = await FileCommitLog.open(data_dir, config)
    try:
        await log.append([NewRecord(b"x")])
        assert log._syncer.dirty  # the append did not wait for a sync
        await wait_for(lambda: not log._syncer.dirty, 5, message="the periodic sync")
        assert log._syncer.syncs >= 1
    finally:
        await log.close()


async def test_a_failed_write_leaves_no_partial_record(
    data_dir: Path, file_size_limit: Callable[[int | None], None]
) -> None:
    log = await FileCommitLog.open(data_dir, FAST)
    try:
        await log.append([NewRecord(b"kept")])
        size = log.segments[-1].size_bytes
        file_size_limit(size + 100)
        with pytest.raises(LogWriteError):
            await log.append([NewRecord(b"y" * 1000)])
        file_size_limit(None)
        assert log.segments[-1].log_path.stat().st_size == size
        assert log.newest_offset == 0
        resumed = await log.append([NewRecord(b"after")])
        assert resumed.base_offset == 1
        batch = log.reader(0, committed=False).read_nowait(1 << 20)
        assert batch is not None
        assert values(batch) == [b"kept", b"after"]
    finally:
        await log.close()
