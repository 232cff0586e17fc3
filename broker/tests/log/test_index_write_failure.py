"""The log when the disk refuses a write: no partial entry stays, and appends take back.

The refusal is real: a process file-size limit (``file_size_limit``) makes the kernel cut the
write short and fail the rest (EFBIG), as a filling disk does with ENOSPC.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from flux_broker.log import FileCommitLog, LogConfig, SyncPolicy
from flux_broker.log.errors import LogWriteError
from flux_broker.log.format import INDEX_ENTRY, INDEX_ENTRY_BYTES, NewRecord
from flux_broker.log.index import IndexFile


def entries(first: int, count: int) -> bytes:
    return b"".join(
        INDEX_ENTRY.pack(first + i, first + i, (first + i) * 50, 50) for i in range(count)
    )


def test_a_failed_flush_leaves_no_partial_entry_and_truncate_writes_nothing(
    tmp_path: Path, file_size_limit: Callable[[int | None], None]
) -> None:
    path = tmp_path / "0.index"
    index = IndexFile.open(path)
    index.append(entries(0, 3))
    index.flush()
    written = 3 * INDEX_ENTRY_BYTES
    file_size_limit(written + INDEX_ENTRY_BYTES + INDEX_ENTRY_BYTES // 2)  # 1.5 entries fit
    index.append(entries(3, 2))

    with pytest.raises(OSError):  # noqa: PT011 -- EFBIG here, ENOSPC on a full disk
        index.flush()
    assert path.stat().st_size == written  # the entry and a half that fit were cut again

    index.truncate(3)  # an append taking its entries back: works while writes still fail
    assert (index.count, path.stat().st_size) == (3, written)
    file_size_limit(None)
    index.append(entries(3, 1))
    index.flush()
    assert path.stat().st_size == written + INDEX_ENTRY_BYTES
    assert [index.entry(i).relative_offset for i in range(index.count)] == [0, 1, 2, 3]
    index.close()
    assert IndexFile.open(path).read_all() == entries(0, 4)


def test_truncate_keeps_the_pending_entries_below_the_cut(tmp_path: Path) -> None:
    index = IndexFile.open(tmp_path / "0.index")
    index.append(entries(0, 2))
    index.flush()
    index.append(entries(2, 3))  # pending
    index.truncate(3)
    assert index.count == 3
    assert index.read_all() == entries(0, 3)
    index.truncate(1)
    assert index.read_all() == entries(0, 1)
    index.close()


async def test_a_failed_write_that_cannot_be_undone_refuses_appends_until_reopened(
    tmp_path: Path,
    file_size_limit: Callable[[int | None], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """If cutting a failed write back fails too, a later write must not land after its bytes.

    The write fails for real (a file-size limit); the cut-back is made to fail by replacing
    ``os.ftruncate`` for the moment, as a filesystem that needs space to truncate would.
    """
    log = await FileCommitLog.open(tmp_path, LogConfig(sync_policy=SyncPolicy.NEVER))
    await log.append([NewRecord(value=b"acked-%d" % i) for i in range(2)])
    size = log.segments[-1].size_bytes
    file_size_limit(size + 30)  # part of the next batch fits
    real_ftruncate = os.ftruncate

    def failing_ftruncate(fd: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "ftruncate", failing_ftruncate)
    with pytest.raises(LogWriteError):
        await log.append([NewRecord(value=b"never-acked-%d" % i) for i in range(2)])
    file_size_limit(None)
    monkeypatch.setattr(os, "ftruncate", real_ftruncate)
    # Space is back, but the partial bytes are still there: appends stay refused.
    with pytest.raises(LogWriteError, match="could not be undone"):
        await log.append([NewRecord(value=b"acked-2")])
    batch = log.reader(0, committed=False).read_nowait(1 << 20)
    assert batch is not None
    assert [r.value for r in batch.records()] == [b"acked-0", b"acked-1"]
    await log.close()
    # Reopening recovers: the torn tail is cut and appends continue at the next offset.
    log = await FileCommitLog.open(tmp_path, LogConfig(sync_policy=SyncPolicy.NEVER))
    result = await log.append([NewRecord(value=b"acked-2")])
    assert result.base_offset == 2
    batch = log.reader(0, committed=False).read_nowait(1 << 20)
    assert batch is not None
    assert [r.value for r in batch.records()] == [b"acked-0", b"acked-1", b"acked-2"]
    await log.close()
