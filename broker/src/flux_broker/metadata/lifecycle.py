"""How the partition-lifecycle commands change the database, inside ``apply()``'s transaction.

``PauseStream``, ``ResumeStream`` and ``SetStreamReadonly`` (:mod:`flux_broker.metadata.commands`)
each name a stream and some of its partitions (none named means all of them) and set one flag
on those partitions:

- The stream must exist (:class:`~flux_broker.metadata.errors.StreamNotFoundError`) and every
  named id must be one of its partitions
  (:class:`~flux_broker.metadata.errors.PartitionNotFoundError`); otherwise nothing changes.
- Only a partition whose flag actually changes gets its event timestamps moved: the latest one
  to the command's timestamp, the first one too while it is still 0 ("never"). Pausing a paused
  partition, or making a read-only partition read-only, leaves it as it is.
- ``PauseStream`` also records its ``resume_all`` on the stream, replacing the previous value,
  as Liftbridge remembers the flag of the latest pause on the stream.

Like the rest of ``apply()``, this reads no clock: the timestamps come in the commands.
"""

from __future__ import annotations

from typing import Final, assert_never

import aiosqlite

from flux_broker.metadata.commands import PauseStream, ResumeStream, SetStreamReadonly
from flux_broker.metadata.errors import PartitionNotFoundError, StreamNotFoundError

__all__ = ["LifecycleCommand", "apply_lifecycle", "stream_exists"]

#: The commands this module applies.
LifecycleCommand = PauseStream | ResumeStream | SetStreamReadonly

# One statement per flag. Parameters: ?1 the new value (0/1), ?2 the timestamp, ?3 the
# stream, ?4 the partition id. The WHERE clause skips partitions already at the value, so their
# timestamps stay.
_SET_PAUSED: Final = """
UPDATE partitions
SET paused = ?1,
    pause_first_ns = CASE WHEN pause_first_ns = 0 THEN ?2 ELSE pause_first_ns END,
    pause_latest_ns = ?2
WHERE stream_name = ?3 AND partition_id = ?4 AND paused != ?1
"""
_SET_READONLY: Final = """
UPDATE partitions
SET readonly = ?1,
    readonly_first_ns = CASE WHEN readonly_first_ns = 0 THEN ?2 ELSE readonly_first_ns END,
    readonly_latest_ns = ?2
WHERE stream_name = ?3 AND partition_id = ?4 AND readonly != ?1
"""


async def stream_exists(db: aiosqlite.Connection, name: str) -> bool:
    """Whether a stream called ``name`` exists."""
    rows = await db.execute_fetchall("SELECT 1 FROM streams WHERE name = ?", (name,))
    return bool(list(rows))


async def apply_lifecycle(db: aiosqlite.Connection, command: LifecycleCommand) -> tuple[int, ...]:
    """Apply a lifecycle command inside the caller's transaction (see the module docstring).

    Args:
        db: The connection, in the command's transaction.
        command: The command, already checked on its own.

    Returns:
        The partition ids it acted on (every partition when the command named none).

    Raises:
        StreamNotFoundError: The stream does not exist.
        PartitionNotFoundError: A named partition id is not one of the stream's.
    """
    ids = await _partition_ids(db, command.name, command.partitions)
    match command:
        case PauseStream():
            await _set(
                db, _SET_PAUSED, command.name, ids, value=True, timestamp_ns=command.timestamp_ns
            )
            await db.execute(
                "UPDATE streams SET resume_all = ? WHERE name = ?",
                (int(command.resume_all), command.name),
            )
        case ResumeStream():
            await _set(
                db, _SET_PAUSED, command.name, ids, value=False, timestamp_ns=command.timestamp_ns
            )
        case SetStreamReadonly():
            await _set(
                db,
                _SET_READONLY,
                command.name,
                ids,
                value=command.readonly,
                timestamp_ns=command.timestamp_ns,
            )
        case _:  # pragma: no cover - the union is closed
            assert_never(command)
    return ids


async def _partition_ids(
    db: aiosqlite.Connection, stream: str, requested: tuple[int, ...]
) -> tuple[int, ...]:
    """The ids a command acts on: ``requested``, or every partition when it is empty."""
    if not await stream_exists(db, stream):
        raise StreamNotFoundError(stream)
    rows = list(
        await db.execute_fetchall(
            "SELECT count(*) FROM partitions WHERE stream_name = ?", (stream,)
        )
    )
    count = int(rows[0][0])
    for partition_id in requested:
        if partition_id >= count:
            raise PartitionNotFoundError(stream, partition_id, count)
    return requested or tuple(range(count))


async def _set(
    db: aiosqlite.Connection,
    statement: str,
    stream: str,
    ids: tuple[int, ...],
    *,
    value: bool,
    timestamp_ns: int,
) -> None:
    await db.executemany(
        statement, [(int(value), timestamp_ns, stream, partition_id) for partition_id in ids]
    )
