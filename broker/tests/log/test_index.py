"""The dense index file: buffered appends, lookups from disk and buffer, truncation, reopen."""

from __future__ import annotations

from pathlib import Path

from flux_broker.log.format import INDEX_ENTRY, INDEX_ENTRY_BYTES
from flux_broker.log.index import PENDING_MAX_BYTES, IndexEntry, IndexFile


def entries(first: int, count: int, *, position: int = 0, size: int = 50) -> bytes:
    return b"".join(
        INDEX_ENTRY.pack(first + i, 1000 + 10 * (first + i), position + i * size, size)
        for i in range(count)
    )


def test_entries_are_readable_before_and_after_they_are_written(tmp_path: Path) -> None:
    path = tmp_path / "0.index"
    index = IndexFile.open(path)
    index.append(entries(0, 3))
    assert path.stat().st_size == 0  # still buffered
    assert index.count == 3
    assert index.entry(2) == IndexEntry(2, 1020, 100, 50)
    index.flush()
    assert path.stat().st_size == 3 * INDEX_ENTRY_BYTES
    index.append(entries(3, 2, position=150))
    assert index.entry(1) == IndexEntry(1, 1010, 50, 50)  # from disk
    assert index.entry(4) == IndexEntry(4, 1040, 200, 50)  # from the buffer
    index.close()
    reopened = IndexFile.open(path)
    assert reopened.count == 5  # close wrote the buffer
    reopened.close()


def test_the_buffer_is_bounded(tmp_path: Path) -> None:
    index = IndexFile.open(tmp_path / "0.index")
    per_batch = 100
    for batch in range(PENDING_MAX_BYTES // (per_batch * INDEX_ENTRY_BYTES) + 1):
        index.append(entries(batch * per_batch, per_batch))
    assert (tmp_path / "0.index").stat().st_size > 0
    assert index.entry(index.count - 1).relative_offset == index.count - 1
    index.close()


def test_lookups(tmp_path: Path) -> None:
    index = IndexFile.open(tmp_path / "0.index")
    # Sparse offsets (as after compaction): 0, 2, 4, ...
    index.append(b"".join(INDEX_ENTRY.pack(2 * i, 100 * i, 10 * i, 10) for i in range(10)))
    assert index.find_offset(4) == 2
    assert index.find_offset(5) == 3  # the next one at or after
    assert index.find_offset(99) is None
    assert index.find_timestamp(0) == 0
    assert index.find_timestamp(250) == 3
    assert index.find_timestamp(10_000) is None
    index.close()


def test_truncate_and_torn_trailing_entry(tmp_path: Path) -> None:
    path = tmp_path / "0.index"
    index = IndexFile.open(path)
    index.append(entries(0, 4))
    index.truncate(2)
    assert index.count == 2
    index.close()
    with path.open("ab") as torn:
        torn.write(b"\x00" * 7)  # part of an entry: ignored
    reopened = IndexFile.open(path)
    assert reopened.count == 2
    reopened.close()
