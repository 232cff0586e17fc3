"""Log maintenance on real files: truncation (KIP-101), retention, compaction, the cleaner."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flux_broker.clock import ManualClock
from flux_broker.log import FileCommitLog, LogConfig, NewRecord, SyncPolicy
from flux_broker.log.cleaner import Cleaner
from flux_broker.log.compaction import CLEANED_SUFFIX
from flux_broker.log.leader_epoch import EpochEntry

SMALL = LogConfig(sync_policy=SyncPolicy.NEVER, segment_max_bytes=300)


def read_all(log: FileCommitLog, start: int = 0) -> list[tuple[int, bytes | None, bytes | None]]:
    reader = log.reader(start, committed=False)
    out: list[tuple[int, bytes | None, bytes | None]] = []
    while (batch := reader.read_nowait(1 << 20)) is not None:
        out += [(r.offset, r.key, r.value) for r in batch.records()]
    return out


@pytest.fixture
async def log(data_dir: Path) -> AsyncIterator[FileCommitLog]:
    opened = await FileCommitLog.open(data_dir, SMALL, ManualClock())
    yield opened
    await opened.close()


async def fill(log: FileCommitLog, count: int, *, epoch: int = 0, key: bytes | None = None) -> None:
    if epoch:
        log.set_leader_epoch(epoch)
    for _ in range(count):
        n = log.newest_offset + 1
        await log.append([NewRecord(b"value-%03d" % n, key=key)])


# -- leader epochs ------------------------------------------------------------------------


async def test_appends_assign_epochs_and_reopen_keeps_them(data_dir: Path) -> None:
    log = await FileCommitLog.open(data_dir, SMALL)
    await fill(log, 3, epoch=1)
    await fill(log, 2, epoch=4)
    assert log.epochs.entries == [EpochEntry(1, 0), EpochEntry(4, 3)]
    await log.close()
    (data_dir / "leader-epoch-checkpoint").write_bytes(b"garbage")  # rebuilt from records
    log = await FileCommitLog.open(data_dir, SMALL)
    try:
        assert log.epochs.entries == [EpochEntry(1, 0), EpochEntry(4, 3)]
        assert log.leader_epoch == 4
    finally:
        await log.close()


# -- truncation ---------------------------------------------------------------------------


async def test_truncate_cuts_segments_and_a_partial_one(log: FileCommitLog) -> None:
    await fill(log, 20, epoch=1)
    await fill(log, 10, epoch=2)
    log.set_high_watermark(29)
    segments_before = len(log.segments)
    await log.truncate(13)
    assert log.newest_offset == 12
    assert log.high_watermark == 12
    assert [offset for offset, _k, _v in read_all(log)] == list(range(13))
    assert len(log.segments) < segments_before
    assert log.epochs.entries == [EpochEntry(1, 0)]
    appended = await log.append([NewRecord(b"again")])
    assert appended.base_offset == 13
    await log.truncate(100)  # beyond the end: nothing happens
    assert log.newest_offset == 13


async def test_truncate_everything_and_reopen(log: FileCommitLog) -> None:
    await fill(log, 12)
    await log.truncate(0)
    assert (log.oldest_offset, log.newest_offset) == (0, -1)
    await fill(log, 2)
    directory = log.directory
    await log.close()
    reopened = await FileCommitLog.open(directory, SMALL)
    try:
        assert [v for _o, _k, v in read_all(reopened)] == [b"value-000", b"value-001"]
    finally:
        await reopened.close()
    with pytest.raises(ValueError, match="negative"):
        await reopened.truncate(-1)


async def test_a_waiting_reader_past_the_cut_gets_the_new_records(log: FileCommitLog) -> None:
    await fill(log, 5)
    reader = log.reader(5, committed=False)
    await log.truncate(3)
    await log.append([NewRecord(b"new-3")])
    batch = reader.read_nowait(1 << 20)
    assert batch is not None
    assert [(r.offset, r.value) for r in batch.records()] == [(3, b"new-3")]


async def test_crash_in_the_middle_of_a_truncation_leaves_a_prefix(log: FileCommitLog) -> None:
    """Later segments go first: a crash after deleting them but before the cut is a prefix."""
    await fill(log, 20)
    expected = read_all(log)
    last_base = log.segments[-1].base_offset
    crashed = log.directory.parent / "crashed"
    shutil.copytree(log.directory, crashed)
    for suffix in (".log", ".index"):  # the newest segment deleted, nothing else yet
        (crashed / f"{last_base:020d}{suffix}").unlink()
    recovered = await FileCommitLog.open(crashed, SMALL)
    try:
        assert read_all(recovered) == expected[:last_base]
    finally:
        await recovered.close()


async def test_kip101_fast_leader_reelection_loses_nothing(tmp_path: Path) -> None:
    """A follower that truncates by epoch, not by HW, keeps the record the leader acked."""
    leader = await FileCommitLog.open(tmp_path / "a", SMALL)
    follower = await FileCommitLog.open(tmp_path / "b", SMALL)
    try:
        leader.set_leader_epoch(1)
        follower.set_leader_epoch(1)
        await leader.append([NewRecord(b"m1"), NewRecord(b"m2")])
        await follower.append([NewRecord(b"m1"), NewRecord(b"m2")])
        follower.set_high_watermark(0)  # the follower had not learned that m2 is committed
        # The follower restarts and asks the leader where its latest epoch ends.
        _epoch, end = leader.epochs.end_offset_for_epoch(
            follower.epochs.latest_epoch, leader.newest_offset + 1
        )
        await follower.truncate(min(end, follower.newest_offset + 1))
        assert [v for _o, _k, v in read_all(follower)] == [b"m1", b"m2"]
    finally:
        await leader.close()
        await follower.close()


async def test_kip101_divergent_logs_are_reconciled(tmp_path: Path) -> None:
    """Old leader A wrote m2 in epoch 1 that new leader B (epoch 2) never had: A drops it."""
    a = await FileCommitLog.open(tmp_path / "a", SMALL)
    b = await FileCommitLog.open(tmp_path / "b", SMALL)
    try:
        a.set_leader_epoch(1)
        b.set_leader_epoch(1)
        await a.append([NewRecord(b"m1"), NewRecord(b"m2")])
        await b.append([NewRecord(b"m1")])
        b.set_leader_epoch(2)  # B becomes leader and writes m3 at offset 1
        await b.append([NewRecord(b"m3")])
        _epoch, end = b.epochs.end_offset_for_epoch(a.epochs.latest_epoch, b.newest_offset + 1)
        assert end == 1
        await a.truncate(end)
        a.set_leader_epoch(2)
        batch = b.reader(end, committed=False).read_nowait(1 << 20)
        assert batch is not None
        await a.append_framed(batch.data)  # replicate B's records verbatim
        assert [v for _o, _k, v in read_all(a)] == [b"m1", b"m3"]
    finally:
        await a.close()
        await b.close()


# -- retention ----------------------------------------------------------------------------


async def test_retention_by_messages_bytes_and_age(data_dir: Path) -> None:
    clock = ManualClock()
    config = LogConfig(
        sync_policy=SyncPolicy.NEVER, segment_max_bytes=300, retention_max_messages=10
    )
    log = await FileCommitLog.open(data_dir, config, clock)
    try:
        await fill(log, 30)
        log.set_high_watermark(log.newest_offset)
        cleaner = Cleaner(log)
        await cleaner.run_once()
        kept = sum(s.records for s in log.segments)
        assert kept <= 10 + log.segments[0].records  # whole segments only
        assert log.oldest_offset > 0
        assert read_all(log)[0][0] == log.oldest_offset
        assert read_all(log)[-1][0] == 29
    finally:
        await log.close()


async def test_retention_never_deletes_uncommitted_records(data_dir: Path) -> None:
    config = LogConfig(
        sync_policy=SyncPolicy.NEVER,
        segment_max_bytes=300,
        retention_max_messages=5,
        retention_max_age_s=0,
    )
    log = await FileCommitLog.open(data_dir, config)
    try:
        await fill(log, 40)
        log.set_high_watermark(3)
        await Cleaner(log).run_once()
        assert log.oldest_offset <= 4  # records 4.. were never committed: all kept
        log.set_high_watermark(log.newest_offset)
        await Cleaner(log).run_once()
        assert log.oldest_offset > 4
    finally:
        await log.close()


async def test_retention_by_age_never_deletes_the_active_segment(data_dir: Path) -> None:
    clock = ManualClock()
    config = LogConfig(sync_policy=SyncPolicy.NEVER, segment_max_bytes=300, retention_max_age_s=60)
    log = await FileCommitLog.open(data_dir, config, clock)
    try:
        await fill(log, 20)
        log.set_high_watermark(log.newest_offset)
        clock.advance(3600)
        await Cleaner(log).run_once()
        assert len(log.segments) == 1  # only the active one is left
        assert log.newest_offset == 19
        assert log.epochs.entries[0].start_offset == log.oldest_offset
    finally:
        await log.close()


async def test_a_reader_inside_a_deleted_segment_moves_on(data_dir: Path) -> None:
    config = LogConfig(sync_policy=SyncPolicy.NEVER, segment_max_bytes=300, retention_max_bytes=400)
    log = await FileCommitLog.open(data_dir, config)
    try:
        await fill(log, 30)
        log.set_high_watermark(log.newest_offset)
        reader = log.reader(0, committed=False)
        first = reader.read_nowait(60)
        assert first is not None
        assert first.first_offset == 0
        await Cleaner(log).run_once()
        batch = reader.read_nowait(1 << 20)  # no "segment not found": it moves on
        assert batch is not None
        assert batch.first_offset == log.oldest_offset
    finally:
        await log.close()


# -- compaction ---------------------------------------------------------------------------


async def test_compaction_keeps_the_newest_per_key_below_the_hw(data_dir: Path) -> None:
    clock = ManualClock()
    config = LogConfig(
        sync_policy=SyncPolicy.NEVER,
        segment_max_bytes=300,
        compact_enabled=True,
        retention_max_age_s=0,
        compact_tombstone_retention_s=60,
    )
    log = await FileCommitLog.open(data_dir, config, clock)
    try:
        for i in range(30):
            await log.append([NewRecord(b"v%d" % i, key=b"k%d" % (i % 3))])
        await log.append([NewRecord(b"no key")])
        await log.append([NewRecord(None, key=b"k0")])  # tombstone for k0
        await log.append([NewRecord(b"", key=b"k1")])  # an empty value is a value
        log.set_high_watermark(log.newest_offset)
        await log.append([NewRecord(b"above-hw", key=b"k2")])
        before = read_all(log)
        result = await Cleaner(log).run_once()
        assert result is not None
        assert result.records_removed > 0
        after = read_all(log)
        survivors = {(k, v) for _o, k, v in after}
        assert (None, b"no key") in survivors
        assert (b"k0", None) in survivors  # the tombstone is young: kept
        assert (b"k1", b"") in survivors
        assert (b"k2", b"above-hw") in survivors
        offsets = [o for o, _k, _v in after]
        assert offsets == sorted(offsets)
        assert len(offsets) == len(set(offsets))
        assert set(after) <= set(before)  # only removals, nothing changed
        # Keys the active segment holds newer versions of are gone from sealed segments.
        sealed_end = log.segments[-1].base_offset
        sealed_keys = [k for o, k, _v in after if o < sealed_end and k is not None]
        assert len(sealed_keys) == len(set(sealed_keys))
        clock.advance(120)  # the tombstone expires
        await Cleaner(log).run_once()
        tombstone_offset = next(o for o, k, v in before if k == b"k0" and v is None)
        if tombstone_offset < log.segments[-1].base_offset:
            assert all(k != b"k0" for _o, k, _v in read_all(log))
    finally:
        await log.close()


async def test_compaction_respects_the_key_limit(data_dir: Path) -> None:
    config = LogConfig(
        sync_policy=SyncPolicy.NEVER,
        segment_max_bytes=300,
        compact_enabled=True,
        compact_max_keys=2,
    )
    log = await FileCommitLog.open(data_dir, config)
    try:
        for i in range(40):
            await log.append([NewRecord(b"v", key=b"k%d" % (i % 8))])
        log.set_high_watermark(log.newest_offset)
        result = await Cleaner(log).run_once()
        assert result is not None
        assert result.key_limit_reached
        assert result.keys <= 2
        assert [o for o, _k, _v in read_all(log)][-1] == 39
    finally:
        await log.close()


async def test_readers_during_compaction_see_whole_segments(data_dir: Path) -> None:
    config = LogConfig(sync_policy=SyncPolicy.NEVER, segment_max_bytes=300, compact_enabled=True)
    log = await FileCommitLog.open(data_dir, config)
    try:
        for i in range(60):
            await log.append([NewRecord(b"v%d" % i, key=b"k%d" % (i % 4))])
        log.set_high_watermark(log.newest_offset)
        reader = log.reader(0, committed=False)
        first = reader.read_nowait(100)
        assert first is not None
        seen = [r.offset for r in first.records()]
        compaction = asyncio.create_task(Cleaner(log).run_once())
        while not compaction.done():  # keep reading while the pass runs
            batch = reader.read_nowait(100)
            if batch is not None:
                seen += [r.offset for r in batch.records()]
            await asyncio.sleep(0)
        await compaction
        while (batch := reader.read_nowait(100)) is not None:
            seen += [r.offset for r in batch.records()]
        assert seen == sorted(set(seen))  # no duplicates, in order
        assert seen[-1] == 59
    finally:
        await log.close()


async def test_crash_in_the_middle_of_compaction(data_dir: Path) -> None:
    """Leftover .cleaned files are dropped; a log renamed without its index is re-indexed."""
    config = LogConfig(sync_policy=SyncPolicy.NEVER, segment_max_bytes=300, compact_enabled=True)
    log = await FileCommitLog.open(data_dir, config)
    for i in range(30):
        await log.append([NewRecord(b"v%d" % i, key=b"k%d" % (i % 3))])
    log.set_high_watermark(log.newest_offset)
    expected = read_all(log)
    await log.close()
    first = data_dir / f"{0:020d}.log"
    (data_dir / (first.name + CLEANED_SUFFIX)).write_bytes(b"half a cleaned file")
    log = await FileCommitLog.open(data_dir, config)
    try:
        assert not (data_dir / (first.name + CLEANED_SUFFIX)).exists()
        assert read_all(log) == expected
        # A crash between the two renames: a compacted log next to the old index.
        result = await Cleaner(log).run_once()
        assert result is not None
        compacted = read_all(log)
    finally:
        await log.close()
    stale_index = sorted(data_dir.glob("*.index"))[0]
    stale_index.write_bytes(stale_index.read_bytes() + b"\x00" * 40)
    log = await FileCommitLog.open(data_dir, config)
    try:
        assert read_all(log) == compacted
        committed = {(k, v) for _o, k, v in compacted}
        newest = {k: v for _o, k, v in expected}
        assert set(newest.items()) <= committed  # the newest of each key survives
    finally:
        await log.close()


# -- regressions from review ---------------------------------------------------------------

COMPACTING = LogConfig(
    sync_policy=SyncPolicy.NEVER, segment_max_bytes=300, compact_enabled=True, retention_max_age_s=0
)


async def compacted_log(directory: Path) -> FileCommitLog:
    log = await FileCommitLog.open(directory, COMPACTING)
    for i in range(30):
        await log.append([NewRecord(b"v%d" % i, key=b"k%d" % (i % 3))])
    log.set_high_watermark(log.newest_offset)
    await Cleaner(log).run_once()
    return log


async def test_truncating_into_a_compacted_segment_keeps_offsets_unique(data_dir: Path) -> None:
    log = await compacted_log(data_dir)
    try:
        sparse = next(s for s in log.segments if not s.dense)
        cut = sparse.next_offset + 5  # inside the gap compaction left after it, or beyond
        cut = min(cut, log.newest_offset)
        await log.truncate(cut)
        assert log.high_watermark <= log.newest_offset
        appended = await log.append([NewRecord(b"new", key=b"z")])
        assert appended.base_offset == cut
        offsets = [o for o, _k, _v in read_all(log)]
        assert offsets == sorted(set(offsets))
    finally:
        await log.close()


async def test_a_compacted_segment_left_last_by_truncation_survives_a_crash(
    data_dir: Path,
) -> None:
    log = await compacted_log(data_dir)
    try:
        await log.truncate(log.segments[-1].base_offset)
        await log.append([NewRecord(b"new", key=b"z")])
        log.set_high_watermark(log.newest_offset)
        expected = read_all(log)
        crashed = data_dir.parent / "crashed"
        shutil.copytree(data_dir, crashed)
    finally:
        await log.close()
    recovered = await FileCommitLog.open(crashed, COMPACTING)
    try:
        assert read_all(recovered) == expected
    finally:
        await recovered.close()


async def test_a_committed_reverse_reader_never_passes_the_hw_after_truncation(
    log: FileCommitLog,
) -> None:
    await fill(log, 20)
    log.set_high_watermark(19)
    reader = log.reverse_reader(committed=True)
    await log.truncate(10)
    await fill(log, 10)  # uncommitted records at offsets 10..19 again
    batch = await reader.read()
    assert batch is not None
    assert max(r.offset for r in batch.records()) <= log.high_watermark == 9


async def test_truncating_below_the_oldest_offset_restarts_there(data_dir: Path) -> None:
    config = LogConfig(
        sync_policy=SyncPolicy.NEVER,
        segment_max_bytes=300,
        retention_max_messages=5,
        retention_max_age_s=0,
    )
    log = await FileCommitLog.open(data_dir, config)
    await fill(log, 40)
    log.set_high_watermark(log.newest_offset)
    await Cleaner(log).run_once()
    assert log.oldest_offset > 20
    await log.truncate(20)
    assert (log.oldest_offset, log.newest_offset) == (20, 19)
    await log.close()
    log = await FileCommitLog.open(data_dir, config)
    try:
        assert (log.oldest_offset, log.newest_offset) == (20, 19)
        assert (await log.append([NewRecord(b"x")])).base_offset == 20
    finally:
        await log.close()


async def test_compaction_makes_progress_past_the_key_limit(data_dir: Path) -> None:
    config = LogConfig(
        sync_policy=SyncPolicy.NEVER,
        segment_max_bytes=300,
        compact_enabled=True,
        compact_max_keys=5,
    )
    log = await FileCommitLog.open(data_dir, config)
    try:
        for _round in range(6):
            for i in range(8):
                await log.append([NewRecord(b"v", key=b"k%d" % i)])
        log.set_high_watermark(log.newest_offset)
        before = len(read_all(log))
        cleaner = Cleaner(log)
        counts = [before]
        for _ in range(20):  # each pass maps at most 5 keys' worth of new records
            await cleaner.run_once()
            counts.append(len(read_all(log)))
        assert counts == sorted(counts, reverse=True)
        after = read_all(log)
        assert len(after) < before
        sealed_end = log.segments[-1].base_offset
        sealed_keys = [k for o, k, _v in after if o < sealed_end]
        assert len(sealed_keys) == len(set(sealed_keys))  # fully compacted in the end
    finally:
        await log.close()
