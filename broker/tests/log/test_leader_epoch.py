"""Leader-epoch cache: KIP-101 semantics and a tolerant, atomic checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from flux_broker.log.leader_epoch import UNDEFINED, EpochEntry, LeaderEpochCache


@pytest.fixture
def cache(tmp_path: Path) -> LeaderEpochCache:
    return LeaderEpochCache(tmp_path / "leader-epoch-checkpoint")


def test_assign_appends_and_persists(cache: LeaderEpochCache) -> None:
    assert cache.assign(1, 0)
    assert cache.assign(3, 10)
    assert cache.path.read_text() == "0\n2\n1 0\n3 10\n"
    loaded, valid = LeaderEpochCache.load(cache.path)
    assert valid
    assert loaded.entries == [EpochEntry(1, 0), EpochEntry(3, 10)]


def test_assign_ignores_stale_epochs_and_offsets(cache: LeaderEpochCache) -> None:
    cache.assign(5, 10)
    assert not cache.assign(5, 20)  # same epoch
    assert not cache.assign(4, 30)  # older epoch
    assert not cache.assign(6, 9)  # earlier start offset
    assert cache.entries == [EpochEntry(5, 10)]


def test_an_epoch_without_records_is_replaced(cache: LeaderEpochCache) -> None:
    cache.assign(1, 0)
    cache.assign(2, 5)
    cache.assign(3, 5)  # epoch 2 wrote nothing
    assert cache.entries == [EpochEntry(1, 0), EpochEntry(3, 5)]


def test_end_offset_for_epoch(cache: LeaderEpochCache) -> None:
    cache.assign(1, 0)
    cache.assign(3, 10)
    cache.assign(5, 20)
    log_end = 30
    assert cache.end_offset_for_epoch(0, log_end) == (0, 0)  # older than all: first start
    assert cache.end_offset_for_epoch(1, log_end) == (1, 10)
    assert cache.end_offset_for_epoch(2, log_end) == (1, 10)  # unknown epoch: the one below
    assert cache.end_offset_for_epoch(3, log_end) == (3, 20)
    assert cache.end_offset_for_epoch(5, log_end) == (5, 30)  # latest: the log end
    assert cache.end_offset_for_epoch(9, log_end) == (UNDEFINED, UNDEFINED)  # newer than all
    empty = LeaderEpochCache(cache.path.with_name("other"))
    assert empty.end_offset_for_epoch(1, log_end) == (UNDEFINED, UNDEFINED)
    assert cache.last_offset_for_leader_epoch(3, log_end) == 20


def test_clear_latest_and_earliest(cache: LeaderEpochCache) -> None:
    for epoch, start in ((1, 0), (2, 10), (3, 20)):
        cache.assign(epoch, start)
    cache.clear_latest(20)
    assert cache.entries == [EpochEntry(1, 0), EpochEntry(2, 10)]
    cache.clear_earliest(15)
    assert cache.entries == [EpochEntry(2, 15)]
    cache.clear_earliest(5)  # nothing before 15 any more
    assert cache.entries == [EpochEntry(2, 15)]
    loaded, _ = LeaderEpochCache.load(cache.path)
    assert loaded.entries == [EpochEntry(2, 15)]


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage", b"0\n2\n1 0\n", b"1\n1\n1 0\n", b"0\n2\n3 0\n2 5\n", b"\xff\xfe"],
    ids=["empty", "garbage", "short", "version", "unordered", "binary"],
)
def test_bad_checkpoints_load_as_invalid(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "leader-epoch-checkpoint"
    path.write_bytes(content)
    cache, valid = LeaderEpochCache.load(path)
    assert not valid
    assert cache.entries == []
