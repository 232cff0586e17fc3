"""The activity outbox of the SQLite metadata store, on real files."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Final

import pytest

from flux_broker.metadata import (
    ActivityEvent,
    ActivityOp,
    ActivityPublished,
    CreateStream,
    DeleteStream,
    InvalidCommandError,
    PartitionAssignment,
    PauseStream,
    ResumeStream,
    SetStreamReadonly,
    SqliteMetadataStore,
    StreamNotFoundError,
)
from flux_broker.metadata.config import INT64_MAX

T1: Final = 1_700_000_000_000_000_000


def create(name: str, partitions: int = 3) -> CreateStream:
    return CreateStream(
        name=name,
        subject=f"subj.{name}",
        replication_factor=1,
        partitions=(PartitionAssignment.single("b0"),) * partitions,
        creation_timestamp_ns=T1,
    )


async def test_each_stream_command_records_one_event_with_its_index(data_dir: Path) -> None:
    path = data_dir / "metadata.db"
    async with await SqliteMetadataStore.open(path, record_activity=True) as store:
        await store.apply(create("s"))
        await store.apply(PauseStream(name="s", resume_all=True, timestamp_ns=T1))
        await store.apply(ResumeStream(name="s", partitions=(2,), timestamp_ns=T1))
        await store.apply(
            SetStreamReadonly(name="s", partitions=(0, 1), readonly=True, timestamp_ns=T1)
        )
        await store.apply(DeleteStream("s"))
        events = await store.pending_activity(100)
    assert events == (
        ActivityEvent(1, ActivityOp.CREATE_STREAM, "s", (0, 1, 2)),
        ActivityEvent(2, ActivityOp.PAUSE_STREAM, "s", (0, 1, 2), resume_all=True),
        ActivityEvent(3, ActivityOp.RESUME_STREAM, "s", (2,)),
        ActivityEvent(4, ActivityOp.SET_STREAM_READONLY, "s", (0, 1), readonly=True),
        ActivityEvent(5, ActivityOp.DELETE_STREAM, "s"),
    )


async def test_events_are_durable_and_published_ones_are_forgotten(data_dir: Path) -> None:
    path = data_dir / "metadata.db"
    async with await SqliteMetadataStore.open(path, record_activity=True) as store:
        for name in ("a", "b", "c"):
            await store.apply(create(name))
    async with await SqliteMetadataStore.open(path, record_activity=True) as store:
        assert [e.id for e in await store.pending_activity(2)] == [1, 2]
        applied = await store.apply(ActivityPublished(through_id=2))
        assert applied.index == 4  # a command of its own, recording no event
        assert [e.stream for e in await store.pending_activity(100)] == ["c"]
        await store.apply(ActivityPublished(through_id=3))
        assert await store.pending_activity(100) == ()
        await store.apply(create("d"))
        assert [e.id for e in await store.pending_activity(100)] == [6]


async def test_a_failed_command_records_nothing(data_dir: Path) -> None:
    async with await SqliteMetadataStore.open(
        data_dir / "metadata.db", record_activity=True
    ) as store:
        with pytest.raises(StreamNotFoundError):
            await store.apply(DeleteStream("missing"))
        assert await store.pending_activity(100) == ()


async def test_nothing_is_recorded_unless_asked(data_dir: Path) -> None:
    path = data_dir / "metadata.db"
    async with await SqliteMetadataStore.open(path) as store:
        await store.apply(create("s"))
        assert await store.pending_activity(100) == ()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM activity_outbox").fetchone() == (0,)


@pytest.mark.parametrize("through_id", [0, -1, INT64_MAX + 1, True, "1"])
async def test_activity_published_is_checked(data_dir: Path, through_id: object) -> None:
    async with await SqliteMetadataStore.open(data_dir / "metadata.db") as store:
        with pytest.raises(InvalidCommandError):
            await store.apply(ActivityPublished(through_id=through_id))  # type: ignore[arg-type]
        assert store.applied_index == 0
