"""The activity outbox: metadata changes waiting to be published to ``__activity``.

When the store records activity (``activity.stream.enabled``), ``apply()`` writes one
:class:`ActivityEvent` per stream command into the table ``activity_outbox`` *in the command's
own transaction*, with the command's metadata index as the event id. A change and its event
therefore become durable together: no crash can lose the event of an applied change or leave
an event for a change that was rolled back. The publisher (:mod:`flux_broker.activity`) reads
the pending events in id order, appends them to ``__activity`` and then applies
:class:`~flux_broker.metadata.commands.ActivityPublished`, which deletes them. A crash between
the append and that command publishes the same events again after the restart, with the same
ids -- delivery is at least once, and ids are strictly increasing and never reused, because
metadata indexes are (Liftbridge uses its Raft index the same way).

An event holds what the command asked with its partition list resolved: a pause of "every
partition" lists every partition id, as Liftbridge's events do. Applying ``ActivityPublished``
records nothing itself.

The event's fields live in a JSON object (``detail``) rather than one column each, so the
consumer-group events of a later issue add keys, not a migration.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import aiosqlite

from flux_broker.metadata.commands import (
    ActivityPublished,
    Command,
    CreateStream,
    DeleteStream,
    ForgetConsumerGroup,
    GroupJoined,
    GroupLeft,
    PauseStream,
    PutConsumerGroup,
    ResumeStream,
    SetStreamReadonly,
)

__all__ = [
    "ActivityEvent",
    "ActivityOp",
    "forget_published",
    "pending_events",
    "record_event",
]


class ActivityOp(enum.Enum):
    """What an activity event reports; the names are ``ActivityStreamOp``'s."""

    CREATE_STREAM = "create_stream"
    DELETE_STREAM = "delete_stream"
    PAUSE_STREAM = "pause_stream"
    RESUME_STREAM = "resume_stream"
    SET_STREAM_READONLY = "set_stream_readonly"
    JOIN_CONSUMER_GROUP = "join_consumer_group"
    LEAVE_CONSUMER_GROUP = "leave_consumer_group"


@dataclass(frozen=True, slots=True)
class ActivityEvent:
    """One metadata change to publish to ``__activity``.

    Attributes:
        id: The metadata index of the command; unique and strictly increasing.
        op: What happened.
        stream: The stream it happened to.
        partitions: The partition ids it touched (all of them for create, none for delete).
        resume_all: For ``PAUSE_STREAM``: the pause's ``resumeAll``.
        readonly: For ``SET_STREAM_READONLY``: the flag's new value.
        group: For the group ops: the group id (``stream`` is then empty).
        consumer: For the group ops: the consumer id.
        streams: For ``JOIN_CONSUMER_GROUP``: the streams the consumer reads.
        expired: For ``LEAVE_CONSUMER_GROUP``: removed for missing its heartbeats.
    """

    id: int
    op: ActivityOp
    stream: str
    partitions: tuple[int, ...] = ()
    resume_all: bool = False
    readonly: bool = False
    group: str = ""
    consumer: str = ""
    streams: tuple[str, ...] = ()
    expired: bool = False

    def detail(self) -> str:
        """The JSON stored in the ``detail`` column."""
        return json.dumps(
            {
                "stream": self.stream,
                "partitions": list(self.partitions),
                "resume_all": self.resume_all,
                "readonly": self.readonly,
                "group": self.group,
                "consumer": self.consumer,
                "streams": list(self.streams),
                "expired": self.expired,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_row(cls, event_id: int, op: str, detail: str) -> ActivityEvent:
        """Rebuild an event from its ``activity_outbox`` row."""
        fields = json.loads(detail)
        return cls(
            id=event_id,
            op=ActivityOp(op),
            stream=str(fields["stream"]),
            partitions=tuple(int(p) for p in fields["partitions"]),
            resume_all=bool(fields["resume_all"]),
            readonly=bool(fields["readonly"]),
            # Rows written before consumer groups existed lack these keys.
            group=str(fields.get("group", "")),
            consumer=str(fields.get("consumer", "")),
            streams=tuple(str(s) for s in fields.get("streams", ())),
            expired=bool(fields.get("expired", False)),
        )


_INSERT: Final = "INSERT INTO activity_outbox (id, op, detail) VALUES (?, ?, ?)"
_PENDING: Final = "SELECT id, op, detail FROM activity_outbox ORDER BY id LIMIT ?"


async def record_event(
    db: aiosqlite.Connection, command: Command, index: int, partition_ids: Iterable[int]
) -> None:
    """Write the event of ``command`` applied at ``index``, inside the command's transaction.

    Args:
        db: The connection, in the command's transaction (after the command was applied).
        command: The applied command; ``ActivityPublished`` records nothing.
        index: The metadata index it was applied at: the event id.
        partition_ids: The partition ids the command acted on, resolved (every partition of
            the stream when the command named none).
    """
    partitions = tuple(partition_ids)
    match command:
        case CreateStream():
            event = ActivityEvent(index, ActivityOp.CREATE_STREAM, command.name, partitions)
        case DeleteStream():
            event = ActivityEvent(index, ActivityOp.DELETE_STREAM, command.name)
        case PauseStream():
            event = ActivityEvent(
                index,
                ActivityOp.PAUSE_STREAM,
                command.name,
                partitions,
                resume_all=command.resume_all,
            )
        case ResumeStream():
            event = ActivityEvent(index, ActivityOp.RESUME_STREAM, command.name, partitions)
        case SetStreamReadonly():
            event = ActivityEvent(
                index,
                ActivityOp.SET_STREAM_READONLY,
                command.name,
                partitions,
                readonly=command.readonly,
            )
        case PutConsumerGroup(state=state, event=GroupJoined(consumer=consumer, streams=streams)):
            event = ActivityEvent(
                index,
                ActivityOp.JOIN_CONSUMER_GROUP,
                "",
                group=state.group_id,
                consumer=consumer,
                streams=streams,
            )
        case PutConsumerGroup(state=state, event=GroupLeft(consumer=consumer, expired=expired)):
            event = ActivityEvent(
                index,
                ActivityOp.LEAVE_CONSUMER_GROUP,
                "",
                group=state.group_id,
                consumer=consumer,
                expired=expired,
            )
        case PutConsumerGroup() | ForgetConsumerGroup() | ActivityPublished():
            return
    await db.execute(_INSERT, (event.id, event.op.value, event.detail()))


async def forget_published(db: aiosqlite.Connection, command: ActivityPublished) -> None:
    """Apply ``ActivityPublished``: delete the pending events up to its id."""
    await db.execute("DELETE FROM activity_outbox WHERE id <= ?", (command.through_id,))


async def pending_events(db: aiosqlite.Connection, limit: int) -> tuple[ActivityEvent, ...]:
    """The oldest ``limit`` pending events, in id order."""
    rows = await db.execute_fetchall(_PENDING, (limit,))
    return tuple(ActivityEvent.from_row(int(r[0]), str(r[1]), str(r[2])) for r in rows)
