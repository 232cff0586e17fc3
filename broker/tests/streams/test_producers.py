"""The idempotent-producer table: duplicates, gaps, bounds, and its rebuild from a real log."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flux_broker.log import FileCommitLog, LogConfig, NewRecord, SyncPolicy
from flux_broker.log.contract import AppendResult
from flux_broker.log.format import Placement, frame, iter_decode
from flux_broker.streams import producers
from flux_broker.streams.producers import (
    ACKS_REMEMBERED,
    PRODUCER_HEADER,
    BatchAck,
    DuplicateBatch,
    DuplicateSequenceError,
    OutOfOrderSequenceError,
    ProducerTable,
    count_records,
    parse_producer_header,
    reserved_header_index,
    with_producer_header,
)

FAST = LogConfig(sync_policy=SyncPolicy.NEVER)


def framed(*values: bytes, headers: tuple[tuple[str, bytes], ...] = ()) -> bytes:
    records = [NewRecord(value=value, headers=headers) for value in values]
    data, _ = frame(records, Placement(0, 0, 0, 0, 0), 1 << 20, 1 << 20)
    return bytes(data)


@pytest.fixture
async def log(data_dir: Path) -> AsyncIterator[FileCommitLog]:
    opened = await FileCommitLog.open(data_dir, FAST)
    yield opened
    await opened.close()


def test_the_next_number_is_written_and_repeats_get_their_ack() -> None:
    table = ProducerTable()
    assert table.duplicate_of(7, 12) is None  # unknown producers start anywhere
    table.record(7, BatchAck(12, 100, 3, 5))
    assert table.duplicate_of(7, 13) is None
    assert table.duplicate_of(7, 12) == BatchAck(12, 100, 3, 5)
    with pytest.raises(OutOfOrderSequenceError, match="expects batch 13"):
        table.duplicate_of(7, 14)
    for sequence in range(13, 13 + ACKS_REMEMBERED):
        table.record(7, BatchAck(sequence, sequence, 1, 5))
    with pytest.raises(DuplicateSequenceError):
        table.duplicate_of(7, 12)  # written, but its ack is no longer remembered
    assert table.duplicate_of(7, 13) is not None


def test_the_least_recently_active_producer_is_forgotten(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(producers, "PRODUCERS_MAX", 2)
    table = ProducerTable()
    table.record(1, BatchAck(0, 0, 1, 0))
    table.record(2, BatchAck(0, 1, 1, 0))
    table.record(1, BatchAck(1, 2, 1, 0))  # 1 is now the most recent
    table.record(3, BatchAck(0, 3, 1, 0))
    assert len(table) == 2
    assert table.duplicate_of(2, 0) is None  # forgotten: unknown again
    assert table.duplicate_of(1, 1) is not None


async def test_the_guard_refuses_a_duplicate_atomically_with_the_write(
    log: FileCommitLog,
) -> None:
    table = ProducerTable()
    result = await log.append_framed(framed(b"a", b"b"), guard=table.guard(9, 0, 2))
    assert result == AppendResult(0, 1, result.timestamp_ns)
    with pytest.raises(DuplicateBatch) as info:
        await log.append_framed(framed(b"a", b"b"), guard=table.guard(9, 0, 2))
    assert info.value.ack == BatchAck(0, 0, 2, result.timestamp_ns)
    assert log.newest_offset == 1  # nothing written


def test_the_header_goes_into_the_first_record_only() -> None:
    data = framed(b"one", b"two", b"three")
    assert count_records(data) == 3
    stamped = with_producer_header(data, 5, 2, 3)
    records = list(iter_decode(stamped))
    assert [r.value for r in records] == [b"one", b"two", b"three"]
    assert records[0].headers == ((PRODUCER_HEADER, records[0].headers[0][1]),)
    assert parse_producer_header(records[0].headers[0][1]) == (5, 2, 3)
    assert records[1].headers == records[2].headers == ()
    forged = framed(b"x", headers=((PRODUCER_HEADER, b""),))
    assert reserved_header_index(data + forged) == 3
    assert reserved_header_index(data) is None
    assert reserved_header_index(framed(PRODUCER_HEADER.encode())) is None  # in a value only
    broken = b"\x00" * 10
    assert with_producer_header(broken, 5, 0, 1) == broken  # left to the log's checks
    assert parse_producer_header(b"short") is None


async def test_the_table_is_rebuilt_from_the_log(log: FileCommitLog) -> None:
    table = ProducerTable()
    for sequence in range(8):
        data = with_producer_header(framed(b"v", b"w"), 4, sequence, 2)
        await log.append_framed(data, guard=table.guard(4, sequence, 2))
        await log.append([NewRecord(value=b"from NATS")])
    await log.append_framed(with_producer_header(framed(b"z"), 6, 40, 1))
    rebuilt = ProducerTable()
    await rebuilt.ensure_rebuilt(log)
    assert rebuilt.rebuilt
    assert len(rebuilt) == 2
    for sequence in range(8 - ACKS_REMEMBERED, 8):
        assert rebuilt.duplicate_of(4, sequence) == table.duplicate_of(4, sequence)
    with pytest.raises(DuplicateSequenceError):
        rebuilt.duplicate_of(4, 8 - ACKS_REMEMBERED - 1)
    assert rebuilt.duplicate_of(4, 8) is None
    assert rebuilt.duplicate_of(6, 40) is not None
    with pytest.raises(OutOfOrderSequenceError):
        rebuilt.duplicate_of(6, 42)


async def test_an_incomplete_newest_idempotent_batch_is_cut(log: FileCommitLog) -> None:
    """A crash tore the newest batch: its whole first records must not claim the batch."""
    await log.append_framed(with_producer_header(framed(b"a", b"b"), 4, 0, 2))
    torn = await log.append_framed(with_producer_header(framed(b"c", b"d", b"e"), 4, 1, 3))
    await log.truncate(torn.base_offset + 2)  # only "c" and "d" reached the file
    assert await producers.cut_partial_batch(log) == torn.base_offset
    assert log.newest_offset == torn.base_offset - 1
    table = ProducerTable()
    await table.ensure_rebuilt(log)
    assert table.duplicate_of(4, 1) is None  # batch 1 may be written (again, whole)
    assert table.duplicate_of(4, 0) is not None


async def test_a_complete_or_plain_newest_batch_is_left_alone(log: FileCommitLog) -> None:
    assert await producers.cut_partial_batch(log) is None  # empty
    await log.append_framed(with_producer_header(framed(b"a", b"b"), 4, 0, 2))
    assert await producers.cut_partial_batch(log) is None
    await log.append_framed(framed(b"plain", b"batch"))
    torn = await log.append_framed(framed(b"x", b"y", b"z"))
    await log.truncate(torn.base_offset + 1)
    assert await producers.cut_partial_batch(log) is None  # no count to check a plain batch
    assert log.newest_offset == torn.base_offset


async def test_an_empty_log_rebuilds_an_empty_table(log: FileCommitLog) -> None:
    table = ProducerTable()
    await table.ensure_rebuilt(log)
    assert table.rebuilt
    assert len(table) == 0
