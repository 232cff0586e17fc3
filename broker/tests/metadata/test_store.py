"""Tests of the SQLite metadata store, on real database files.

Every test opens real SQLite files under ``data_dir``. "Nothing changed" is checked on the
whole database: :func:`dump` reads every row through a second, independent connection, so it
sees what is committed on disk, not what the store believes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import sqlite3
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import aiosqlite
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flux_broker.metadata
from flux_broker.metadata import (
    CreateStream,
    DeleteStream,
    InvalidCommandError,
    MetadataClosedError,
    MetadataStorageError,
    Partition,
    PartitionAssignment,
    PartitionNotFoundError,
    PauseStream,
    ResumeStream,
    SetStreamReadonly,
    SqliteMetadataStore,
    StaleIndexError,
    Stream,
    StreamConfig,
    StreamExistsError,
    StreamNotFoundError,
    UnsupportedSchemaError,
    schema,
)
from flux_broker.metadata.config import INT32_MAX, INT64_MAX

BROKERS: Final = ("b0", "b1", "b2")
TS_NS: Final = 1_700_000_000_000_000_000
FULL_CONFIG: Final = StreamConfig(
    retention_max_bytes=INT64_MAX,
    retention_max_messages=1000,
    retention_max_age_ms=3_600_000,
    cleaner_interval_ms=0,
    segment_max_bytes=1 << 20,
    segment_max_age_ms=60_000,
    compact_max_goroutines=INT32_MAX,
    compact_enabled=True,
    auto_pause_time_ms=5000,
    auto_pause_disable_if_subscribers=False,
    min_isr=2,
    optimistic_concurrency_control=True,
    encryption=False,
)


def create(
    name: str,
    *,
    partitions: int = 1,
    subject: str | None = None,
    config: StreamConfig | None = None,
    ts_ns: int = TS_NS,
) -> CreateStream:
    """A single-broker CreateStream."""
    return CreateStream(
        name=name,
        subject=subject or f"subj.{name}",
        group="",
        replication_factor=1,
        partitions=(PartitionAssignment.single("b0"),) * partitions,
        creation_timestamp_ns=ts_ns,
        config=config or StreamConfig(),
    )


def replicated(name: str) -> CreateStream:
    """A three-replica, two-partition CreateStream with an ISR smaller than the replicas."""
    return CreateStream(
        name=name,
        subject=f"subj.{name}",
        group="workers",
        replication_factor=3,
        partitions=(
            PartitionAssignment(replicas=("b2", "b0", "b1"), leader="b0", isr=("b1", "b0")),
            PartitionAssignment(replicas=("b1", "b2", "b0"), leader="b1", isr=BROKERS),
        ),
        creation_timestamp_ns=TS_NS,
        config=FULL_CONFIG,
    )


def expected_stream(command: CreateStream, index: int) -> Stream:
    """What the store must return for ``command`` applied at ``index``."""
    return Stream(
        name=command.name,
        subject=command.subject,
        group=command.group,
        replication_factor=command.replication_factor,
        creation_timestamp_ns=command.creation_timestamp_ns,
        config=command.config,
        partitions=tuple(
            Partition(
                stream=command.name,
                id=i,
                leader=a.leader,
                replicas=a.replicas,
                isr=tuple(b for b in a.replicas if b in a.isr),  # a set, in replica order
                leader_epoch=index,
                epoch=index,
            )
            for i, a in enumerate(command.partitions)
        ),
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
        yield opened


# -- surface --------------------------------------------------------------------------------


def test_public_names() -> None:
    assert sorted(flux_broker.metadata.__all__) == flux_broker.metadata.__all__
    for name in flux_broker.metadata.__all__:
        assert hasattr(flux_broker.metadata, name)


def test_migration_versions_run_from_one_without_gaps() -> None:
    versions = [m.version for m in schema.MIGRATIONS]
    assert versions == list(range(1, len(versions) + 1))
    assert versions[-1] == schema.LATEST_SCHEMA_VERSION


# -- opening ---------------------------------------------------------------------------------


async def test_open_uses_wal_full_sync_and_foreign_keys(store: SqliteMetadataStore) -> None:
    db = store._db
    assert db is not None
    assert list(await db.execute_fetchall("PRAGMA journal_mode")) == [("wal",)]
    assert list(await db.execute_fetchall("PRAGMA synchronous")) == [(2,)]  # FULL
    assert list(await db.execute_fetchall("PRAGMA foreign_keys")) == [(1,)]
    assert store.applied_index == 0
    assert await store.list_streams() == ()


async def test_migrations_are_idempotent_on_reopen(db_path: Path) -> None:
    async with await SqliteMetadataStore.open(db_path) as store:
        await store.apply(create("s"))
    before = dump(db_path)
    for _ in range(3):
        async with await SqliteMetadataStore.open(db_path):
            pass
    assert dump(db_path) == before
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT version, name FROM schema_version").fetchall()
    assert rows == [(m.version, m.name) for m in schema.MIGRATIONS]


async def test_a_later_migration_upgrades_a_database_with_data(db_path: Path) -> None:
    async with await SqliteMetadataStore.open(db_path) as store:
        await store.apply(create("s"))
    step = schema.Migration(
        version=len(schema.MIGRATIONS) + 1,
        name="a future partition column",
        statements=(
            "ALTER TABLE partitions ADD COLUMN future INTEGER NOT NULL DEFAULT 7 "
            "CHECK (future >= 0)",
        ),
    )
    db = await aiosqlite.connect(db_path, isolation_level=None)
    try:
        assert await schema.migrate(db, (*schema.MIGRATIONS, step)) == step.version
        assert await schema.migrate(db, (*schema.MIGRATIONS, step)) == step.version
        rows = list(await db.execute_fetchall("SELECT stream_name, future FROM partitions"))
        assert rows == [("s", 7)]
    finally:
        await db.close()
    # This Flux knows only the older schema and refuses the newer database, untouched.
    before = dump(db_path)
    with pytest.raises(UnsupportedSchemaError) as info:
        await SqliteMetadataStore.open(db_path)
    assert (info.value.found, info.value.supported) == (step.version, step.version - 1)
    assert dump(db_path) == before


async def test_garbage_file_is_a_storage_error(db_path: Path) -> None:
    db_path.write_bytes(b"this is not a sqlite database, not even close" * 100)
    with pytest.raises(MetadataStorageError):
        await SqliteMetadataStore.open(db_path)


async def test_missing_directory_is_a_storage_error(data_dir: Path) -> None:
    with pytest.raises(MetadataStorageError):
        await SqliteMetadataStore.open(data_dir / "missing" / "metadata.db")


async def test_closed_store_raises(db_path: Path) -> None:
    store = await SqliteMetadataStore.open(db_path)
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(MetadataClosedError):
        await store.apply(create("s"))
    with pytest.raises(MetadataClosedError):
        await store.get_stream("s")
    with pytest.raises(MetadataClosedError):
        await store.list_streams()
    with pytest.raises(MetadataClosedError):
        await store.get_partition("s", 0)


# -- create, read, delete --------------------------------------------------------------------


async def test_create_get_list_delete(store: SqliteMetadataStore) -> None:
    a = await store.apply(replicated("a"))
    b = await store.apply(create("b", partitions=3))
    assert (a.index, b.index) == (1, 2)
    assert a.command == replicated("a")

    stream_a = expected_stream(replicated("a"), 1)
    stream_b = expected_stream(create("b", partitions=3), 2)
    assert await store.get_stream("a") == stream_a
    assert await store.list_streams() == (stream_a, stream_b)
    assert stream_a.partitions[0].isr == ("b0", "b1")  # replica order, not the command's
    assert await store.get_partition("b", 2) == stream_b.partitions[2]
    assert await store.get_partition("b", 3) is None
    assert await store.get_partition("nope", 0) is None
    assert await store.get_stream("nope") is None

    deleted = await store.apply(DeleteStream("a"))
    assert deleted.index == 3
    assert await store.get_stream("a") is None
    assert await store.get_partition("a", 0) is None
    assert await store.list_streams() == (stream_b,)


async def test_delete_removes_every_partition_and_replica_row(
    store: SqliteMetadataStore, db_path: Path
) -> None:
    await store.apply(replicated("a"))
    await store.apply(DeleteStream("a"))
    with sqlite3.connect(db_path) as db:
        for table in ("streams", "partitions", "partition_replicas"):
            assert db.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)  # noqa: S608


async def test_recreated_stream_has_higher_epochs(store: SqliteMetadataStore) -> None:
    first = await store.apply(create("s"))
    await store.apply(DeleteStream("s"))
    second = await store.apply(create("s", ts_ns=TS_NS + 1))
    partition = await store.get_partition("s", 0)
    assert partition is not None
    assert partition.leader_epoch == partition.epoch == second.index > first.index


async def test_duplicate_create_raises_and_changes_nothing(
    store: SqliteMetadataStore, db_path: Path
) -> None:
    await store.apply(create("s"))
    before = dump(db_path)
    with pytest.raises(StreamExistsError) as info:
        await store.apply(replicated("s"))
    assert info.value.name == "s"
    assert dump(db_path) == before
    assert store.applied_index == 1
    assert (await store.apply(create("t"))).index == 2


async def test_delete_unknown_raises_and_changes_nothing(
    store: SqliteMetadataStore, db_path: Path
) -> None:
    await store.apply(create("s"))
    before = dump(db_path)
    with pytest.raises(StreamNotFoundError) as info:
        await store.apply(DeleteStream("nope"))
    assert info.value.name == "nope"
    assert dump(db_path) == before
    assert store.applied_index == 1


def _one_partition(**changes: object) -> CreateStream:
    assignment = dataclasses.replace(PartitionAssignment.single("b0"), **changes)  # type: ignore[arg-type]
    return dataclasses.replace(create("s"), partitions=(assignment,))


@pytest.mark.parametrize(
    ("command", "field"),
    [
        (create(""), "name"),
        (dataclasses.replace(create("s"), subject=""), "subject"),
        (dataclasses.replace(create("s"), replication_factor=0), "replication_factor"),
        (dataclasses.replace(create("s"), partitions=()), "partitions"),
        (dataclasses.replace(create("s"), creation_timestamp_ns=-1), "creation_timestamp_ns"),
        (_one_partition(replicas=("b0", "b1")), "partitions[0].replicas"),
        (_one_partition(replicas=("b0", "b0")), "partitions[0].replicas"),
        (_one_partition(replicas=("",), isr=("",), leader=""), "partitions[0].replicas"),
        (_one_partition(isr=("b1",)), "partitions[0].isr"),
        (_one_partition(leader="b1"), "partitions[0].leader"),
        (_one_partition(isr=()), "partitions[0].leader"),
        (create("s", config=StreamConfig(min_isr=INT32_MAX + 1)), "config.min_isr"),
        (create("s", config=StreamConfig(segment_max_bytes=-1)), "config.segment_max_bytes"),
        (
            create("s", config=StreamConfig(retention_max_bytes=INT64_MAX + 1)),
            "config.retention_max_bytes",
        ),
        (create("s", config=StreamConfig(encryption=1)), "config.encryption"),  # type: ignore[arg-type]
        (create("s", config=StreamConfig(min_isr=True)), "config.min_isr"),
        (DeleteStream(""), "name"),
    ],
)
async def test_malformed_command_is_rejected_before_anything_changes(
    store: SqliteMetadataStore, db_path: Path, command: CreateStream | DeleteStream, field: str
) -> None:
    before = dump(db_path)
    with pytest.raises(InvalidCommandError) as info:
        await store.apply(command)
    assert info.value.field == field
    assert dump(db_path) == before
    assert store.applied_index == 0


# -- the metadata index ----------------------------------------------------------------------


async def test_indexes_strictly_increase_and_survive_reopen(db_path: Path) -> None:
    indexes: list[int] = []
    for round_ in range(3):
        async with await SqliteMetadataStore.open(db_path) as store:
            assert store.applied_index == (indexes[-1] if indexes else 0)
            indexes.append((await store.apply(create(f"s{round_}"))).index)
            indexes.append((await store.apply(DeleteStream(f"s{round_}"))).index)
            with pytest.raises(StreamNotFoundError):  # a failed command takes no index
                await store.apply(DeleteStream(f"s{round_}"))
    assert indexes == list(range(1, 7))


async def test_explicit_indexes_may_skip_but_never_go_back(
    store: SqliteMetadataStore, db_path: Path
) -> None:
    assert (await store.apply(create("a"), index=10)).index == 10
    before = dump(db_path)
    for stale in (10, 9):
        with pytest.raises(StaleIndexError) as info:
            await store.apply(create("b"), index=stale)
        assert (info.value.index, info.value.applied_index) == (stale, 10)
    with pytest.raises(InvalidCommandError):
        await store.apply(create("b"), index=INT64_MAX + 1)
    assert dump(db_path) == before
    assert (await store.apply(create("b"))).index == 11
    partition = await store.get_partition("a", 0)
    assert partition is not None
    assert partition.epoch == partition.leader_epoch == 10


async def test_concurrent_applies_are_serialised(store: SqliteMetadataStore) -> None:
    applies = [store.apply(create(f"s{i:02}", partitions=2)) for i in range(20)]
    reads = [store.list_streams() for _ in range(5)]
    applied, listed = await asyncio.gather(asyncio.gather(*applies), asyncio.gather(*reads))
    assert sorted(a.index for a in applied) == list(range(1, 21))
    final = await store.list_streams()
    assert len(final) == 20
    for snapshot in listed:  # every read saw whole commands only
        assert all(len(s.partitions) == 2 for s in snapshot)


# -- atomicity and recovery ------------------------------------------------------------------


@pytest.mark.parametrize(
    "trigger",
    [
        # The stream row is in; the second partition row fails.
        "BEFORE INSERT ON partitions WHEN NEW.partition_id = 1",
        # Stream and partitions are in; the last replica row fails.
        "BEFORE INSERT ON partition_replicas WHEN NEW.partition_id = 1 AND NEW.position = 2",
        # Everything is in; recording the applied index fails.
        "BEFORE UPDATE ON metadata_state",
        # Delete: the cascade has started removing replicas when it fails.
        "BEFORE DELETE ON partitions WHEN OLD.partition_id = 1",
    ],
)
async def test_command_failing_midway_changes_nothing(
    store: SqliteMetadataStore, db_path: Path, trigger: str
) -> None:
    await store.apply(replicated("old"))
    with sqlite3.connect(db_path) as db:
        db.execute(f"CREATE TRIGGER fail {trigger} BEGIN SELECT RAISE(ABORT, 'injected'); END")
    before = dump(db_path)
    command = DeleteStream("old") if "DELETE" in trigger else replicated("new")

    with pytest.raises(MetadataStorageError) as info:
        await store.apply(command)

    assert isinstance(info.value.__cause__, sqlite3.IntegrityError)
    assert dump(db_path) == before
    assert store.applied_index == 1
    assert [s.name for s in await store.list_streams()] == ["old"]
    with sqlite3.connect(db_path) as db:
        db.execute("DROP TRIGGER fail")
    assert (await store.apply(command)).index == 2  # the same command, now at the next index


async def test_schema_constraints_back_up_validation(
    store: SqliteMetadataStore, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without the Python checks, partition 1's leader (not a replica) is caught by the
    # deferred foreign key at COMMIT, after every row was inserted.
    monkeypatch.setattr(PartitionAssignment, "check", lambda *_: None)
    bad = dataclasses.replace(
        replicated("s"),
        partitions=(
            replicated("s").partitions[0],
            PartitionAssignment(replicas=BROKERS, leader="elsewhere", isr=BROKERS),
        ),
    )
    before = dump(db_path)
    with pytest.raises(MetadataStorageError):
        await store.apply(bad)
    assert dump(db_path) == before
    assert store.applied_index == 0
    assert (await store.apply(replicated("s"))).index == 1


async def test_reopen_after_close_recovers_everything(db_path: Path) -> None:
    commands = [replicated("a"), create("b", partitions=4, config=FULL_CONFIG), create("c")]
    async with await SqliteMetadataStore.open(db_path) as store:
        for command in commands:
            await store.apply(command)
        await store.apply(DeleteStream("b"))
        streams = await store.list_streams()
    async with await SqliteMetadataStore.open(db_path) as store:
        assert store.applied_index == 4
        assert await store.list_streams() == streams
        assert streams == (expected_stream(commands[0], 1), expected_stream(commands[2], 3))


# -- model-based -----------------------------------------------------------------------------

NAMES: Final = st.sampled_from(["a", "b", "c", "__cursors"])


@st.composite
def assignments(draw: st.DrawFn, replication_factor: int) -> PartitionAssignment:
    replicas = tuple(draw(st.permutations(BROKERS))[:replication_factor])
    leader = draw(st.sampled_from(replicas))
    others = draw(st.lists(st.sampled_from(replicas), unique=True))
    isr = tuple(draw(st.permutations(sorted({leader, *others}))))
    return PartitionAssignment(replicas=replicas, leader=leader, isr=isr)


def optional(values: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.none() | values


CONFIGS: Final = st.builds(
    StreamConfig,
    **{
        f.name: optional(st.booleans() if "bool" in str(f.type) else st.integers(0, INT32_MAX))
        for f in dataclasses.fields(StreamConfig)
    },
)


@st.composite
def creates(draw: st.DrawFn) -> CreateStream:
    replication_factor = draw(st.integers(1, len(BROKERS)))
    return CreateStream(
        name=draw(NAMES),
        subject=draw(st.sampled_from(["x", "x.y", "x.*"])),
        group=draw(st.sampled_from(["", "g"])),
        replication_factor=replication_factor,
        partitions=tuple(draw(st.lists(assignments(replication_factor), min_size=1, max_size=3))),
        creation_timestamp_ns=draw(st.integers(0, INT64_MAX)),
        config=draw(CONFIGS),
    )


#: Partition ids of lifecycle commands: up to 3 distinct ids, some beyond every stream's count.
PARTITION_IDS: Final = st.lists(st.integers(0, 3), unique=True, max_size=3).map(tuple)
TIMESTAMPS: Final = st.integers(1, INT64_MAX)
LIFECYCLE: Final = (
    st.builds(
        PauseStream,
        name=NAMES,
        partitions=PARTITION_IDS,
        resume_all=st.booleans(),
        timestamp_ns=TIMESTAMPS,
    )
    | st.builds(ResumeStream, name=NAMES, partitions=PARTITION_IDS, timestamp_ns=TIMESTAMPS)
    | st.builds(
        SetStreamReadonly,
        name=NAMES,
        partitions=PARTITION_IDS,
        readonly=st.booleans(),
        timestamp_ns=TIMESTAMPS,
    )
)
COMMANDS: Final = st.lists(creates() | NAMES.map(DeleteStream) | LIFECYCLE, max_size=25)
_example_dirs = itertools.count()

Lifecycle = PauseStream | ResumeStream | SetStreamReadonly


def _with_flag(partition: Partition, command: Lifecycle) -> Partition:
    """The model of one partition after ``command`` (which names it)."""
    ts = command.timestamp_ns
    if isinstance(command, SetStreamReadonly):
        if partition.readonly == command.readonly:
            return partition
        return dataclasses.replace(
            partition,
            readonly=command.readonly,
            readonly_first_ns=partition.readonly_first_ns or ts,
            readonly_latest_ns=ts,
        )
    paused = isinstance(command, PauseStream)
    if partition.paused == paused:
        return partition
    return dataclasses.replace(
        partition, paused=paused, pause_first_ns=partition.pause_first_ns or ts, pause_latest_ns=ts
    )


def model_lifecycle(stream: Stream, command: Lifecycle) -> Stream:
    """The model of ``stream`` after a lifecycle command whose partition ids all exist."""
    ids = set(command.partitions or range(len(stream.partitions)))
    partitions = tuple(_with_flag(p, command) if p.id in ids else p for p in stream.partitions)
    resume_all = command.resume_all if isinstance(command, PauseStream) else stream.resume_all
    return dataclasses.replace(stream, partitions=partitions, resume_all=resume_all)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(commands=COMMANDS)
async def test_random_commands_match_a_dict_model(
    data_dir: Path, commands: list[CreateStream | DeleteStream | Lifecycle]
) -> None:
    path = Path(tempfile.mkdtemp(dir=data_dir, prefix=f"ex{next(_example_dirs)}-")) / "m.db"
    model: dict[str, Stream] = {}
    index = 0
    async with await SqliteMetadataStore.open(path) as store:
        for command in commands:
            match command:
                case CreateStream() if command.name in model:
                    with pytest.raises(StreamExistsError):
                        await store.apply(command)
                case CreateStream():
                    index += 1
                    assert (await store.apply(command)).index == index
                    model[command.name] = expected_stream(command, index)
                case _ if command.name not in model:
                    with pytest.raises(StreamNotFoundError):
                        await store.apply(command)
                case DeleteStream():
                    index += 1
                    assert (await store.apply(command)).index == index
                    del model[command.name]
                case _ if any(i >= len(model[command.name].partitions) for i in command.partitions):
                    with pytest.raises(PartitionNotFoundError):
                        await store.apply(command)
                case _:
                    index += 1
                    assert (await store.apply(command)).index == index
                    model[command.name] = model_lifecycle(model[command.name], command)
            assert store.applied_index == index
        assert await store.list_streams() == tuple(model[n] for n in sorted(model))
    async with await SqliteMetadataStore.open(path) as store:
        assert store.applied_index == index
        assert await store.list_streams() == tuple(model[n] for n in sorted(model))
        for name, stream in model.items():
            assert await store.get_stream(name) == stream
            for partition in stream.partitions:
                assert await store.get_partition(name, partition.id) == partition
