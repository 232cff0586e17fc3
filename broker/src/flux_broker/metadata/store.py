"""The SQLite metadata store: :class:`MetadataStore` on one database file through ``aiosqlite``.

The connection runs in WAL mode with ``synchronous=FULL``, so a committed command survives power
loss, and with foreign keys on, so the schema's constraints hold (see
:mod:`flux_broker.metadata.schema`). It is in autocommit mode: the store writes every
``BEGIN IMMEDIATE … COMMIT`` itself, and one :class:`asyncio.Lock` serialises all operations on
the single connection, so a query never sees a half-applied command and two applies never
interleave their statements.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Final, Self, assert_never

import aiosqlite

from flux_broker.groups.state import GroupState
from flux_broker.metadata.activity import (
    ActivityEvent,
    forget_published,
    pending_events,
    record_event,
)
from flux_broker.metadata.commands import (
    ActivityPublished,
    Command,
    CreateStream,
    DeleteStream,
    ForgetConsumerGroup,
    PauseStream,
    PutConsumerGroup,
    ResumeStream,
    SetStreamReadonly,
)
from flux_broker.metadata.config import FLAG_FIELDS, INT64_MAX, StreamConfig
from flux_broker.metadata.contract import AppliedCommand, Partition, Stream
from flux_broker.metadata.errors import (
    InvalidCommandError,
    MetadataClosedError,
    MetadataStorageError,
    StaleIndexError,
    StreamExistsError,
    StreamNotFoundError,
)
from flux_broker.metadata.groups import apply_forget_group, apply_put_group, read_groups
from flux_broker.metadata.lifecycle import apply_lifecycle, stream_exists
from flux_broker.metadata.schema import migrate

__all__ = ["BUSY_TIMEOUT_MS", "SqliteMetadataStore"]

#: How long a statement waits for a lock held by another connection (an operator's sqlite3
#: shell, a backup) before failing; one process owns the data directory, so waits are rare.
BUSY_TIMEOUT_MS: Final = 5000

#: Bound on waiting for aiosqlite's worker thread after a failed connect; it only has to close
#: a connection that never opened.
_THREAD_JOIN_TIMEOUT_S: Final = 5.0

_CONFIG_FIELDS: Final = StreamConfig.field_names()
_STREAM_COLUMNS: Final = (
    "name, subject, group_name, replication_factor, creation_timestamp_ns, "
    + ", ".join(_CONFIG_FIELDS)
)
_INSERT_STREAM: Final = (
    f"INSERT INTO streams ({_STREAM_COLUMNS}) "  # noqa: S608 - constant column names
    f"VALUES ({', '.join('?' * (5 + len(_CONFIG_FIELDS)))})"
)
_SELECT_STREAMS: Final = f"SELECT {_STREAM_COLUMNS}, resume_all FROM streams"  # noqa: S608 - constants
_ALL_STREAMS: Final = f"{_SELECT_STREAMS} ORDER BY name"
_ONE_STREAM: Final = f"{_SELECT_STREAMS} WHERE name = ?"

# One row per replica, so the partition columns repeat; ordered by partition, then replica.
_SELECT_PARTITIONS: Final = """
SELECT p.stream_name, p.partition_id, p.leader, p.leader_epoch, p.epoch,
       p.paused, p.readonly, p.pause_first_ns, p.pause_latest_ns,
       p.readonly_first_ns, p.readonly_latest_ns,
       r.broker_id, r.in_isr
FROM partitions AS p JOIN partition_replicas AS r USING (stream_name, partition_id)
"""
#: Partition columns before the replica's (broker id, in ISR) in each row of the query above.
_HEAD: Final = 11
_ALL_PARTITIONS: Final = f"{_SELECT_PARTITIONS} ORDER BY p.stream_name, p.partition_id, r.position"
_STREAM_PARTITIONS: Final = (
    f"{_SELECT_PARTITIONS} WHERE p.stream_name = ? ORDER BY p.partition_id, r.position"
)
_ONE_PARTITION: Final = (
    f"{_SELECT_PARTITIONS} WHERE p.stream_name = ? AND p.partition_id = ? ORDER BY r.position"
)


class SqliteMetadataStore:
    """The metadata store on a SQLite file. Create it with :meth:`open`.

    Implements :class:`~flux_broker.metadata.contract.MetadataStore`; see that contract for
    the terms and the guarantees of every method.
    """

    def __init__(
        self,
        db: aiosqlite.Connection,
        path: Path,
        applied_index: int,
        *,
        record_activity: bool = False,
    ) -> None:
        """Wrap an opened, migrated connection; use :meth:`open` instead."""
        self._db: aiosqlite.Connection | None = db
        self._path = path
        self._applied_index = applied_index
        self._record_activity = record_activity
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str, *, record_activity: bool = False) -> SqliteMetadataStore:
        """Open (creating if needed) the database at ``path`` and migrate it to this version.

        Args:
            path: The database file, normally ``<data.dir>/metadata.db``; its directory must
                exist.
            record_activity: Write an activity event for every stream command applied
                (``activity.stream.enabled``; see :mod:`flux_broker.metadata.activity`).

        Returns:
            The open store.

        Raises:
            UnsupportedSchemaError: The database comes from a newer Flux; it is not changed.
            MetadataStorageError: The file cannot be opened, is not a SQLite database, cannot
                use WAL, or a migration failed (the database stays at its previous version).
        """
        path = Path(path)
        db = aiosqlite.connect(path, isolation_level=None)
        try:
            await db
        except sqlite3.Error as e:
            # aiosqlite (0.22) stops its worker thread without waiting for it when connecting
            # fails; the thread then reports to this event loop, which may be closed by then.
            # Wait for it here, so that it never outlives the loop.
            await asyncio.to_thread(db._thread.join, _THREAD_JOIN_TIMEOUT_S)
            raise MetadataStorageError(f"cannot open metadata database {path}: {e}") from e
        try:
            await _configure(db, path)
            await migrate(db)
            applied_index = await _read_applied_index(db)
        except sqlite3.Error as e:
            await db.close()
            raise MetadataStorageError(f"cannot open metadata database {path}: {e}") from e
        except BaseException:
            await db.close()
            raise
        return cls(db, path, applied_index, record_activity=record_activity)

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    @property
    def applied_index(self) -> int:
        """Index of the last applied command; 0 before the first."""
        return self._applied_index

    async def apply(self, command: Command, *, index: int | None = None) -> AppliedCommand:
        """Validate ``command`` and apply it in one transaction; see the contract.

        Args:
            command: The change.
            index: Metadata index to apply it at; ``None`` takes ``applied_index + 1``.

        Returns:
            The index it was applied at, with the command.

        Raises:
            InvalidCommandError: The command (or ``index``) is malformed on its own.
            StaleIndexError: ``index`` is not above :attr:`applied_index`.
            StreamExistsError: ``CreateStream`` of a stream that exists.
            StreamNotFoundError: A command other than ``CreateStream`` named an unknown stream.
            PartitionNotFoundError: A command named a partition id its stream does not have.
            MetadataStorageError: SQLite failed; nothing was applied.
            MetadataClosedError: The store is closed.
        """
        command.check()
        if index is not None and not 1 <= index <= INT64_MAX:
            raise InvalidCommandError("index", f"{index!r} is outside [1, {INT64_MAX}]")
        async with self._lock:
            db = self._require_open()
            try:
                await db.execute("BEGIN IMMEDIATE")
                applied_index = await _read_applied_index(db)
                at = applied_index + 1 if index is None else index
                if at <= applied_index:
                    raise StaleIndexError(at, applied_index)
                partition_ids = await _apply(db, command, at)
                if self._record_activity:
                    await record_event(db, command, at, partition_ids)
                await db.execute("UPDATE metadata_state SET applied_index = ? WHERE id = 1", (at,))
                await db.execute("COMMIT")
            except sqlite3.Error as e:
                await _rollback(db)
                name = type(command).__name__
                raise MetadataStorageError(f"applying {name} failed, nothing changed: {e}") from e
            except BaseException:
                await _rollback(db)
                raise
            self._applied_index = at
        return AppliedCommand(index=at, command=command)

    async def get_stream(self, name: str) -> Stream | None:
        """Return the stream called ``name``, or ``None``; see the contract.

        Raises:
            MetadataStorageError: SQLite failed.
            MetadataClosedError: The store is closed.
        """
        streams = await self._read_streams(_ONE_STREAM, _STREAM_PARTITIONS, (name,))
        return streams[0] if streams else None

    async def list_streams(self) -> tuple[Stream, ...]:
        """Return every stream, ordered by name; see the contract.

        Raises:
            MetadataStorageError: SQLite failed.
            MetadataClosedError: The store is closed.
        """
        return await self._read_streams(_ALL_STREAMS, _ALL_PARTITIONS, ())

    async def get_partition(self, stream: str, partition_id: int) -> Partition | None:
        """Return one partition, or ``None``; see the contract.

        Raises:
            MetadataStorageError: SQLite failed.
            MetadataClosedError: The store is closed.
        """
        async with self._lock:
            db = self._require_open()
            try:
                rows = await db.execute_fetchall(_ONE_PARTITION, (stream, partition_id))
            except sqlite3.Error as e:
                raise MetadataStorageError(f"reading partition failed: {e}") from e
        partitions = _partitions_from_rows(rows)
        return partitions[0] if partitions else None

    async def list_groups(self) -> tuple[GroupState, ...]:
        """Every consumer group, ordered by id; see the contract.

        Raises:
            MetadataStorageError: SQLite failed.
            MetadataClosedError: The store is closed.
        """
        async with self._lock:
            db = self._require_open()
            try:
                await db.execute("BEGIN")
                groups = await read_groups(db)
                await db.execute("COMMIT")
            except sqlite3.Error as e:
                await _rollback(db)
                raise MetadataStorageError(f"reading consumer groups failed: {e}") from e
            except BaseException:
                await _rollback(db)
                raise
        return groups

    async def pending_activity(self, limit: int) -> tuple[ActivityEvent, ...]:
        """The oldest ``limit`` activity events not yet published, in id order; see the contract.

        Raises:
            MetadataStorageError: SQLite failed.
            MetadataClosedError: The store is closed.
        """
        async with self._lock:
            db = self._require_open()
            try:
                return await pending_events(db, limit)
            except sqlite3.Error as e:
                raise MetadataStorageError(f"reading activity events failed: {e}") from e

    async def close(self) -> None:
        """Close the database; idempotent."""
        async with self._lock:
            db, self._db = self._db, None
            if db is not None:
                await db.close()

    async def __aenter__(self) -> Self:
        """Use the open store in an ``async with`` block that closes it."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Close the store."""
        await self.close()

    def _require_open(self) -> aiosqlite.Connection:
        if self._db is None:
            raise MetadataClosedError(f"metadata store {self._path} is closed")
        return self._db

    async def _read_streams(
        self, streams_sql: str, partitions_sql: str, params: tuple[str, ...]
    ) -> tuple[Stream, ...]:
        async with self._lock:
            db = self._require_open()
            try:
                # One read transaction, so both queries see the same state.
                await db.execute("BEGIN")
                stream_rows = await db.execute_fetchall(streams_sql, params)
                partition_rows = await db.execute_fetchall(partitions_sql, params)
                await db.execute("COMMIT")
            except sqlite3.Error as e:
                await _rollback(db)
                raise MetadataStorageError(f"reading streams failed: {e}") from e
            except BaseException:
                await _rollback(db)
                raise
        by_stream: dict[str, list[Partition]] = {}
        for partition in _partitions_from_rows(partition_rows):
            by_stream.setdefault(partition.stream, []).append(partition)
        return tuple(_stream_from_row(row, by_stream.get(row[0], [])) for row in stream_rows)


async def _configure(db: aiosqlite.Connection, path: Path) -> None:
    rows = list(await db.execute_fetchall("PRAGMA journal_mode = WAL"))
    mode = str(rows[0][0]).lower()
    if mode != "wal":
        raise MetadataStorageError(f"metadata database {path} cannot use WAL (mode {mode!r})")
    await db.execute("PRAGMA synchronous = FULL")
    await db.execute("PRAGMA foreign_keys = ON")
    await db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS:d}")


async def _read_applied_index(db: aiosqlite.Connection) -> int:
    rows = list(await db.execute_fetchall("SELECT applied_index FROM metadata_state WHERE id = 1"))
    return int(rows[0][0])


async def _rollback(db: aiosqlite.Connection) -> None:
    # SQLite rolls some failed transactions back by itself (e.g. on SQLITE_FULL); others, such
    # as a COMMIT refused by a deferred foreign key, stay open and must be ended here.
    if db.in_transaction:
        await db.execute("ROLLBACK")


async def _apply(db: aiosqlite.Connection, command: Command, index: int) -> tuple[int, ...]:
    """Apply ``command`` at ``index`` inside the caller's transaction: the state machine.

    Returns:
        The partition ids the command acted on (for its activity event).
    """
    match command:
        case CreateStream():
            await _create_stream(db, command, index)
            return tuple(range(len(command.partitions)))
        case DeleteStream():
            await _delete_stream(db, command)
            return ()
        case PauseStream() | ResumeStream() | SetStreamReadonly():
            return await apply_lifecycle(db, command)
        case ActivityPublished():
            await forget_published(db, command)
            return ()
        case PutConsumerGroup():
            await apply_put_group(db, command, index)
            return ()
        case ForgetConsumerGroup():
            await apply_forget_group(db, command)
            return ()
        case _:  # pragma: no cover - the union is closed
            assert_never(command)


async def _create_stream(db: aiosqlite.Connection, command: CreateStream, index: int) -> None:
    if await stream_exists(db, command.name):
        raise StreamExistsError(command.name)
    config = tuple(getattr(command.config, name) for name in _CONFIG_FIELDS)
    await db.execute(
        _INSERT_STREAM,
        (
            command.name,
            command.subject,
            command.group,
            command.replication_factor,
            command.creation_timestamp_ns,
            *config,
        ),
    )
    # A new partition's epoch and leader epoch are the command's index, as Liftbridge sets
    # them to the Raft index of CREATE_STREAM.
    await db.executemany(
        "INSERT INTO partitions (stream_name, partition_id, leader, leader_epoch, epoch) "
        "VALUES (?, ?, ?, ?, ?)",
        [(command.name, pid, a.leader, index, index) for pid, a in enumerate(command.partitions)],
    )
    await db.executemany(
        "INSERT INTO partition_replicas "
        "(stream_name, partition_id, broker_id, position, in_isr) VALUES (?, ?, ?, ?, ?)",
        [
            (command.name, pid, broker_id, position, broker_id in a.isr)
            for pid, a in enumerate(command.partitions)
            for position, broker_id in enumerate(a.replicas)
        ],
    )


async def _delete_stream(db: aiosqlite.Connection, command: DeleteStream) -> None:
    if not await stream_exists(db, command.name):
        raise StreamNotFoundError(command.name)
    # Partitions and replicas go with it (ON DELETE CASCADE).
    await db.execute("DELETE FROM streams WHERE name = ?", (command.name,))


def _partitions_from_rows(rows: Iterable[sqlite3.Row | tuple[object, ...]]) -> list[Partition]:
    """Fold replica rows (ordered by stream, partition, position) into partitions."""
    partitions: list[Partition] = []
    key: tuple[object, object] | None = None
    head: tuple[object, ...] = ()
    replicas: list[str] = []
    isr: list[str] = []
    for row in rows:
        if (row[0], row[1]) != key:
            if key is not None:
                partitions.append(_partition(head, replicas, isr))
            key, head, replicas, isr = (row[0], row[1]), tuple(row[:_HEAD]), [], []
        broker_id, in_isr = row[_HEAD], row[_HEAD + 1]
        replicas.append(str(broker_id))
        if in_isr:
            isr.append(str(broker_id))
    if key is not None:
        partitions.append(_partition(head, replicas, isr))
    return partitions


def _partition(head: tuple[object, ...], replicas: list[str], isr: list[str]) -> Partition:
    stream, partition_id, leader, leader_epoch, epoch, paused, readonly, *timestamps = head
    pause_first, pause_latest, readonly_first, readonly_latest = map(_int, timestamps)
    return Partition(
        stream=str(stream),
        id=_int(partition_id),
        leader=str(leader),
        replicas=tuple(replicas),
        isr=tuple(isr),
        leader_epoch=_int(leader_epoch),
        epoch=_int(epoch),
        paused=bool(paused),
        readonly=bool(readonly),
        pause_first_ns=pause_first,
        pause_latest_ns=pause_latest,
        readonly_first_ns=readonly_first,
        readonly_latest_ns=readonly_latest,
    )


def _int(value: object) -> int:
    assert isinstance(value, int), value
    return value


def _stream_from_row(row: sqlite3.Row | tuple[object, ...], partitions: list[Partition]) -> Stream:
    name, subject, group, replication_factor, creation_timestamp_ns = row[:5]
    values = dict(zip(_CONFIG_FIELDS, row[5:-1], strict=True))
    config = StreamConfig(
        **{k: (bool(v) if k in FLAG_FIELDS and v is not None else v) for k, v in values.items()}
    )
    assert [p.id for p in partitions] == list(range(len(partitions)))
    return Stream(
        name=str(name),
        subject=str(subject),
        group=str(group),
        replication_factor=_int(replication_factor),
        creation_timestamp_ns=_int(creation_timestamp_ns),
        config=config,
        partitions=tuple(partitions),
        resume_all=bool(row[-1]),
    )
