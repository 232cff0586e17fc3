"""Consumer groups in the metadata database: applying ``PutConsumerGroup`` and reading groups.

Tables (schema version 4)::

    consumer_groups            group_id PK, assignor, coordinator, epoch, streams (JSON array
                               of every stream the group has read)
    consumer_group_members     (group_id, consumer_id) PK -> consumer_groups ON DELETE CASCADE;
                               streams (JSON array)
    consumer_group_owners      (group_id, stream_name, partition_id) PK; owner ->
                               consumer_group_members ON DELETE CASCADE; since_epoch,
                               revoke_epoch (0 = not being revoked)

The foreign key from an owner to the members makes the database itself refuse a partition
owned by a non-member. A group whose last member left keeps its ``consumer_groups`` row:
its positions (cursors) outlive it, and describe and reset work on its id.

A group's rows are replaced as a whole by each ``PutConsumerGroup``: the state is small (one
row per member and per partition) and a replacement cannot leave a half-updated group.
"""

from __future__ import annotations

import json
from typing import Final

import aiosqlite

from flux_broker.groups.state import GroupState, Ownership
from flux_broker.metadata.commands import ForgetConsumerGroup, PutConsumerGroup
from flux_broker.metadata.errors import InvalidCommandError

__all__ = ["GROUP_TABLES", "apply_forget_group", "apply_put_group", "read_groups"]

_INT64: Final = "BETWEEN 0 AND 9223372036854775807"

#: The DDL of schema version 4.
GROUP_TABLES: Final = (
    f"""
    CREATE TABLE consumer_groups (
        group_id     TEXT PRIMARY KEY CHECK (length(group_id) > 0),
        assignor     TEXT NOT NULL CHECK (length(assignor) > 0),
        coordinator  TEXT NOT NULL CHECK (length(coordinator) > 0),
        epoch        INTEGER NOT NULL CHECK (epoch {_INT64}),
        streams      TEXT NOT NULL CHECK (json_valid(streams))
    ) WITHOUT ROWID
    """,
    """
    CREATE TABLE consumer_group_members (
        group_id     TEXT NOT NULL REFERENCES consumer_groups (group_id) ON DELETE CASCADE,
        consumer_id  TEXT NOT NULL CHECK (length(consumer_id) > 0),
        streams      TEXT NOT NULL CHECK (json_valid(streams)),
        PRIMARY KEY (group_id, consumer_id)
    ) WITHOUT ROWID
    """,
    f"""
    CREATE TABLE consumer_group_owners (
        group_id      TEXT NOT NULL,
        stream_name   TEXT NOT NULL CHECK (length(stream_name) > 0),
        partition_id  INTEGER NOT NULL CHECK (partition_id >= 0),
        owner         TEXT NOT NULL,
        since_epoch   INTEGER NOT NULL CHECK (since_epoch {_INT64}),
        revoke_epoch  INTEGER NOT NULL CHECK (revoke_epoch {_INT64}),
        PRIMARY KEY (group_id, stream_name, partition_id),
        FOREIGN KEY (group_id, owner)
            REFERENCES consumer_group_members (group_id, consumer_id) ON DELETE CASCADE
    ) WITHOUT ROWID
    """,
)


async def apply_put_group(db: aiosqlite.Connection, command: PutConsumerGroup, index: int) -> None:
    """Replace the group's rows with ``command.state``, inside the caller's transaction."""
    state = command.state
    if state.epoch != index:
        raise InvalidCommandError(
            "epoch", f"a group's epoch is the index it is stored at: {state.epoch} != {index}"
        )
    group_id = state.group_id
    await db.execute("DELETE FROM consumer_groups WHERE group_id = ?", (group_id,))
    await db.execute(
        "INSERT INTO consumer_groups (group_id, assignor, coordinator, epoch, streams) "
        "VALUES (?, ?, ?, ?, ?)",
        (group_id, state.assignor, state.coordinator, state.epoch, json.dumps(state.streams)),
    )
    await db.executemany(
        "INSERT INTO consumer_group_members (group_id, consumer_id, streams) VALUES (?, ?, ?)",
        [(group_id, consumer, json.dumps(streams)) for consumer, streams in state.members.items()],
    )
    await db.executemany(
        "INSERT INTO consumer_group_owners (group_id, stream_name, partition_id, owner, "
        "since_epoch, revoke_epoch) VALUES (?, ?, ?, ?, ?, ?)",
        [
            (group_id, stream, partition, own.owner, own.since_epoch, own.revoke_epoch)
            for (stream, partition), own in state.owners.items()
        ],
    )


async def apply_forget_group(db: aiosqlite.Connection, command: ForgetConsumerGroup) -> None:
    """Delete a group without members, inside the caller's transaction."""
    rows = list(
        await db.execute_fetchall(
            "SELECT count(*) FROM consumer_group_members WHERE group_id = ?", (command.group_id,)
        )
    )
    if int(rows[0][0]):
        raise InvalidCommandError("group_id", f"{command.group_id!r} still has members")
    await db.execute("DELETE FROM consumer_groups WHERE group_id = ?", (command.group_id,))


async def read_groups(db: aiosqlite.Connection) -> tuple[GroupState, ...]:
    """Every stored group, ordered by id, inside the caller's read transaction."""
    members: dict[str, dict[str, tuple[str, ...]]] = {}
    for group_id, consumer, streams in await db.execute_fetchall(
        "SELECT group_id, consumer_id, streams FROM consumer_group_members "
        "ORDER BY group_id, consumer_id"
    ):
        members.setdefault(str(group_id), {})[str(consumer)] = tuple(json.loads(str(streams)))
    owners: dict[str, dict[tuple[str, int], Ownership]] = {}
    for group_id, stream, partition, owner, since, revoke in await db.execute_fetchall(
        "SELECT group_id, stream_name, partition_id, owner, since_epoch, revoke_epoch "
        "FROM consumer_group_owners ORDER BY group_id, stream_name, partition_id"
    ):
        owners.setdefault(str(group_id), {})[str(stream), int(partition)] = Ownership(
            str(owner), int(since), int(revoke)
        )
    rows = await db.execute_fetchall(
        "SELECT group_id, assignor, coordinator, epoch, streams FROM consumer_groups "
        "ORDER BY group_id"
    )
    return tuple(
        GroupState(
            group_id=str(group_id),
            assignor=str(assignor),
            coordinator=str(coordinator),
            epoch=int(epoch),
            members=members.get(str(group_id), {}),
            owners=owners.get(str(group_id), {}),
            streams=tuple(json.loads(str(streams))),
        )
        for group_id, assignor, coordinator, epoch, streams in rows
    )
