"""PauseStream, ResumeStream and SetStreamReadonly in the SQLite metadata store, on real files.

"Nothing changed" is checked on the whole database through an independent connection
(:func:`dump`), as in ``test_store.py``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import aiosqlite
import pytest

from flux_broker.metadata import (
    CreateStream,
    InvalidCommandError,
    MetadataStorageError,
    PartitionAssignment,
    PartitionNotFoundError,
    PauseStream,
    ResumeStream,
    SetStreamReadonly,
    SqliteMetadataStore,
    StreamNotFoundError,
    schema,
)
from flux_broker.metadata.config import INT32_MAX, INT64_MAX

T1: Final = 1_700_000_000_000_000_000
T2: Final = T1 + 1_000
T3: Final = T1 + 2_000


def create(name: str, partitions: int = 3) -> CreateStream:
    """A single-broker CreateStream."""
    return CreateStream(
        name=name,
        subject=f"subj.{name}",
        replication_factor=1,
        partitions=(PartitionAssignment.single("b0"),) * partitions,
        creation_timestamp_ns=T1,
    )


def dump(path: Path) -> list[str]:
    """Every committed row and schema object, read by an independent connection."""
    with sqlite3.connect(path) as db:
        return list(db.iterdump())


@pytest.fixture
def db_path(data_dir: Path) -> Path:
    return data_dir / "metadata.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteMetadataStore]:
    async with await SqliteMetadataStore.open(db_path) as opened:
        await opened.apply(create("s"))
        yield opened


async def flags(store: SqliteMetadataStore, name: str = "s") -> list[tuple[bool, bool]]:
    """(paused, readonly) of every partition of the stream."""
    stream = await store.get_stream(name)
    assert stream is not None
    return [(p.paused, p.readonly) for p in stream.partitions]


async def test_a_new_stream_is_neither_paused_nor_readonly(store: SqliteMetadataStore) -> None:
    stream = await store.get_stream("s")
    assert stream is not None
    assert not stream.resume_all
    for p in stream.partitions:
        assert (p.paused, p.readonly) == (False, False)
        assert (p.pause_first_ns, p.pause_latest_ns) == (0, 0)
        assert (p.readonly_first_ns, p.readonly_latest_ns) == (0, 0)


async def test_pause_all_then_resume_one(store: SqliteMetadataStore) -> None:
    applied = await store.apply(PauseStream(name="s", resume_all=True, timestamp_ns=T1))
    assert applied.index == 2
    stream = await store.get_stream("s")
    assert stream is not None
    assert stream.resume_all
    assert all(
        p.paused and (p.pause_first_ns, p.pause_latest_ns) == (T1, T1) for p in stream.partitions
    )

    await store.apply(ResumeStream(name="s", partitions=(1,), timestamp_ns=T2))
    assert await flags(store) == [(True, False), (False, False), (True, False)]
    resumed = await store.get_partition("s", 1)
    assert resumed is not None
    assert (resumed.pause_first_ns, resumed.pause_latest_ns) == (T1, T2)
    still = await store.get_partition("s", 0)
    assert still is not None
    assert (still.pause_first_ns, still.pause_latest_ns) == (T1, T1)
    stream = await store.get_stream("s")
    assert stream is not None
    assert stream.resume_all  # a resume leaves the pause's choice as it was


async def test_only_a_change_moves_the_timestamps(store: SqliteMetadataStore) -> None:
    await store.apply(PauseStream(name="s", partitions=(0,), timestamp_ns=T1))
    # Pausing it again changes nothing on partition 0 but still records resume_all.
    await store.apply(PauseStream(name="s", partitions=(0, 2), resume_all=True, timestamp_ns=T2))
    p0, p2 = await store.get_partition("s", 0), await store.get_partition("s", 2)
    assert p0 is not None
    assert p2 is not None
    assert (p0.pause_first_ns, p0.pause_latest_ns) == (T1, T1)
    assert (p2.pause_first_ns, p2.pause_latest_ns) == (T2, T2)
    stream = await store.get_stream("s")
    assert stream is not None
    assert stream.resume_all
    # Resuming a partition that is not paused moves nothing either.
    await store.apply(ResumeStream(name="s", partitions=(1,), timestamp_ns=T3))
    p1 = await store.get_partition("s", 1)
    assert p1 is not None
    assert (p1.paused, p1.pause_first_ns, p1.pause_latest_ns) == (False, 0, 0)
    # The latest pause decides resume_all.
    await store.apply(PauseStream(name="s", partitions=(1,), timestamp_ns=T3))
    stream = await store.get_stream("s")
    assert stream is not None
    assert not stream.resume_all


async def test_readonly_set_and_cleared(store: SqliteMetadataStore) -> None:
    await store.apply(
        SetStreamReadonly(name="s", partitions=(0, 2), readonly=True, timestamp_ns=T1)
    )
    assert await flags(store) == [(False, True), (False, False), (False, True)]
    await store.apply(SetStreamReadonly(name="s", readonly=True, timestamp_ns=T2))
    await store.apply(SetStreamReadonly(name="s", partitions=(2,), readonly=False, timestamp_ns=T3))
    assert await flags(store) == [(False, True), (False, True), (False, False)]
    stream = await store.get_stream("s")
    assert stream is not None
    times = [(p.readonly_first_ns, p.readonly_latest_ns) for p in stream.partitions]
    assert times == [(T1, T1), (T2, T2), (T1, T3)]
    assert all((p.pause_first_ns, p.pause_latest_ns) == (0, 0) for p in stream.partitions)


async def test_state_survives_reopen(db_path: Path) -> None:
    async with await SqliteMetadataStore.open(db_path) as store:
        await store.apply(create("s"))
        await store.apply(PauseStream(name="s", partitions=(1,), resume_all=True, timestamp_ns=T1))
        await store.apply(SetStreamReadonly(name="s", readonly=True, timestamp_ns=T2))
        before = await store.list_streams()
    async with await SqliteMetadataStore.open(db_path) as store:
        assert store.applied_index == 3
        assert await store.list_streams() == before
        assert await flags(store) == [(False, True), (True, True), (False, True)]


@pytest.mark.parametrize(
    "command",
    [
        PauseStream(name="nope", timestamp_ns=T1),
        ResumeStream(name="nope", partitions=(0,), timestamp_ns=T1),
        SetStreamReadonly(name="nope", readonly=True, timestamp_ns=T1),
    ],
)
async def test_unknown_stream_changes_nothing(
    store: SqliteMetadataStore, db_path: Path, command: PauseStream
) -> None:
    before = dump(db_path)
    with pytest.raises(StreamNotFoundError) as info:
        await store.apply(command)
    assert info.value.name == "nope"
    assert dump(db_path) == before
    assert store.applied_index == 1


@pytest.mark.parametrize(
    "command",
    [
        PauseStream(name="s", partitions=(0, 3), timestamp_ns=T1),
        ResumeStream(name="s", partitions=(3,), timestamp_ns=T1),
        SetStreamReadonly(name="s", partitions=(1, INT32_MAX), readonly=True, timestamp_ns=T1),
    ],
)
async def test_unknown_partition_changes_nothing(
    store: SqliteMetadataStore, db_path: Path, command: PauseStream
) -> None:
    before = dump(db_path)
    with pytest.raises(PartitionNotFoundError) as info:
        await store.apply(command)
    assert (info.value.stream, info.value.count) == ("s", 3)
    assert info.value.partition == command.partitions[-1]
    assert dump(db_path) == before  # partition 0 (or 1), named first, did not change either
    assert store.applied_index == 1


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (PauseStream(name="", timestamp_ns=T1), "name"),
        (PauseStream(name="s", partitions=(-1,), timestamp_ns=T1), "partitions[0]"),
        (PauseStream(name="s", partitions=(0, 1, 0), timestamp_ns=T1), "partitions"),
        (PauseStream(name="s", partitions=[0], timestamp_ns=T1), "partitions"),  # type: ignore[arg-type]
        (PauseStream(name="s", partitions=(True,), timestamp_ns=T1), "partitions[0]"),
        (PauseStream(name="s", resume_all=1, timestamp_ns=T1), "resume_all"),  # type: ignore[arg-type]
        (PauseStream(name="s", timestamp_ns=0), "timestamp_ns"),
        (ResumeStream(name="s", partitions=(INT32_MAX + 1,), timestamp_ns=T1), "partitions[0]"),
        (ResumeStream(name="s", timestamp_ns=INT64_MAX + 1), "timestamp_ns"),
        (SetStreamReadonly(name="s", readonly=None, timestamp_ns=T1), "readonly"),  # type: ignore[arg-type]
        (
            SetStreamReadonly(name="s", partitions=(2, 2), readonly=True, timestamp_ns=T1),
            "partitions",
        ),
    ],
)
async def test_malformed_command_changes_nothing(
    store: SqliteMetadataStore, db_path: Path, command: PauseStream, field: str
) -> None:
    before = dump(db_path)
    with pytest.raises(InvalidCommandError) as info:
        await store.apply(command)
    assert info.value.field == field
    assert dump(db_path) == before
    assert store.applied_index == 1


async def test_failing_midway_changes_nothing(store: SqliteMetadataStore, db_path: Path) -> None:
    # Partition 0 is updated, then partition 2's update fails.
    with sqlite3.connect(db_path) as db:
        db.execute(
            "CREATE TRIGGER fail BEFORE UPDATE ON partitions WHEN OLD.partition_id = 2 "
            "BEGIN SELECT RAISE(ABORT, 'injected'); END"
        )
    before = dump(db_path)
    command = SetStreamReadonly(name="s", partitions=(0, 2), readonly=True, timestamp_ns=T1)
    with pytest.raises(MetadataStorageError):
        await store.apply(command)
    assert dump(db_path) == before
    assert store.applied_index == 1
    with sqlite3.connect(db_path) as db:
        db.execute("DROP TRIGGER fail")
    assert (await store.apply(command)).index == 2
    assert await flags(store) == [(False, True), (False, False), (False, True)]


async def test_a_version_1_database_upgrades_with_every_partition_running(db_path: Path) -> None:
    db = await aiosqlite.connect(db_path, isolation_level=None)
    try:
        assert await schema.migrate(db, schema.MIGRATIONS[:1]) == 1
        await db.execute("PRAGMA foreign_keys = ON")
        await db.execute("BEGIN")
        await db.execute(
            "INSERT INTO streams (name, subject, group_name, replication_factor, "
            "creation_timestamp_ns) VALUES ('old', 'old', '', 1, 5)"
        )
        await db.execute(
            "INSERT INTO partitions (stream_name, partition_id, leader, leader_epoch, epoch) "
            "VALUES ('old', 0, 'b0', 1, 1)"
        )
        await db.execute(
            "INSERT INTO partition_replicas (stream_name, partition_id, broker_id, position, "
            "in_isr) VALUES ('old', 0, 'b0', 0, 1)"
        )
        await db.execute("UPDATE metadata_state SET applied_index = 1")
        await db.execute("COMMIT")
    finally:
        await db.close()
    async with await SqliteMetadataStore.open(db_path) as store:
        stream = await store.get_stream("old")
        assert stream is not None
        assert not stream.resume_all
        (partition,) = stream.partitions
        assert (partition.paused, partition.readonly, partition.pause_latest_ns) == (
            False,
            False,
            0,
        )
        assert (await store.apply(PauseStream(name="old", timestamp_ns=T1))).index == 2
        assert await flags(store, "old") == [(True, False)]
    with sqlite3.connect(db_path) as check:
        versions = check.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert versions == [(m.version,) for m in schema.MIGRATIONS]
