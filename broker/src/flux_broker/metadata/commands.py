"""Metadata commands: every change to the metadata is one of these, applied by one ``apply()``.

A command carries everything its effect depends on, including what a broker would otherwise
read from its surroundings (the creation time, the chosen leader and replicas), so applying the
same command to the same state gives the same result on every broker. That is what lets a
replicated log order them later (DESIGN.md §6): each broker mirrors the log into its own store
through the same ``apply()``.

:meth:`check` validates a command's shape on its own; checks against the current state (does
the stream exist?) are the store's, inside the command's transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias

from flux_broker.groups.assignor import ASSIGNORS
from flux_broker.groups.state import GroupState
from flux_broker.metadata.config import INT32_MAX, INT64_MAX, StreamConfig
from flux_broker.metadata.errors import InvalidCommandError

__all__ = [
    "ActivityPublished",
    "Command",
    "CreateStream",
    "DeleteStream",
    "ForgetConsumerGroup",
    "GroupJoined",
    "GroupLeft",
    "PartitionAssignment",
    "PauseStream",
    "PutConsumerGroup",
    "ResumeStream",
    "SetStreamReadonly",
]


@dataclass(frozen=True, slots=True)
class PartitionAssignment:
    """The brokers of one new partition, chosen by the caller (the controller).

    Attributes:
        replicas: Broker ids holding the partition, in preference order, without duplicates.
        leader: The broker leading it; must be in ``isr``.
        isr: The in-sync replicas, a subset of ``replicas`` (Liftbridge starts with all of them).
            It is a set: the store returns it in ``replicas`` order.
    """

    replicas: tuple[str, ...]
    leader: str
    isr: tuple[str, ...]

    @classmethod
    def single(cls, broker_id: str) -> PartitionAssignment:
        """The assignment of a cluster of one: ``broker_id`` is replica, leader and ISR."""
        return cls(replicas=(broker_id,), leader=broker_id, isr=(broker_id,))

    def check(self, where: str, replication_factor: int) -> None:
        """Raise :class:`InvalidCommandError` if the assignment is inconsistent.

        Args:
            where: Dotted path of this assignment in its command, for the error.
            replication_factor: The stream's replication factor; ``replicas`` must match it.

        Raises:
            InvalidCommandError: Empty or duplicate broker ids, a replica count other than
                ``replication_factor``, an ISR outside the replicas, or a leader outside the ISR.
        """
        _check_broker_ids(f"{where}.replicas", self.replicas)
        _check_broker_ids(f"{where}.isr", self.isr)
        if len(self.replicas) != replication_factor:
            raise InvalidCommandError(
                f"{where}.replicas",
                f"{len(self.replicas)} replicas for replication factor {replication_factor}",
            )
        if not set(self.isr) <= set(self.replicas):
            raise InvalidCommandError(f"{where}.isr", "must be a subset of the replicas")
        if self.leader not in self.isr:
            raise InvalidCommandError(f"{where}.leader", f"{self.leader!r} is not in the ISR")


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateStream:
    """Create a stream and its partitions (Liftbridge's ``CREATE_STREAM``).

    The partitions' epoch and leader epoch are set to the metadata index the command is
    applied at, as Liftbridge sets them to the Raft index, so they exceed every epoch a
    stream of the same name had before.

    Attributes:
        name: Stream name, unique in the store (the API layer enforces DESIGN.md §7's rules;
            internal streams such as ``__cursors`` are created through here too).
        subject: NATS subject of partition 0; partition N uses ``<subject>.<N>``.
        group: NATS queue group of the partitions' subscriptions ("" for none).
        replication_factor: Replicas per partition, already resolved (0 → 1, -1 → all brokers
            is the caller's job).
        partitions: One assignment per partition; partition ids are the positions (0, 1, …).
        creation_timestamp_ns: Creation time, Unix ns (``StreamMetadata.creationTimestamp``),
            read from the clock by the caller so that applying stays deterministic.
        config: The request's overrides of the server defaults.
    """

    name: str
    subject: str
    group: str = ""
    replication_factor: int
    partitions: tuple[PartitionAssignment, ...]
    creation_timestamp_ns: int
    config: StreamConfig = field(default_factory=StreamConfig)

    def check(self) -> None:
        """Raise :class:`InvalidCommandError` if the command is malformed on its own.

        Raises:
            InvalidCommandError: An empty name or subject, a replication factor below 1, no
                partitions, a bad assignment, a negative timestamp, or a bad config value.
        """
        _check_text("name", self.name)
        _check_text("subject", self.subject)
        if not isinstance(self.group, str):
            raise InvalidCommandError("group", "must be a string")
        _check_int("replication_factor", self.replication_factor, 1, INT32_MAX)
        _check_int("partitions", len(self.partitions), 1, INT32_MAX)
        _check_int("creation_timestamp_ns", self.creation_timestamp_ns, 0, INT64_MAX)
        for i, assignment in enumerate(self.partitions):
            assignment.check(f"partitions[{i}]", self.replication_factor)
        for name, reason in self.config.problems():
            raise InvalidCommandError(f"config.{name}", reason)


@dataclass(frozen=True, slots=True)
class DeleteStream:
    """Delete a stream and its partitions (Liftbridge's ``DELETE_STREAM``).

    Deleting the partitions' data on disk is the streams layer's reaction to the applied
    command, not part of applying it.

    Attributes:
        name: The stream's name.
    """

    name: str

    def check(self) -> None:
        """Raise :class:`InvalidCommandError` if the name is empty.

        Raises:
            InvalidCommandError: The name is empty or not a string.
        """
        _check_text("name", self.name)


@dataclass(frozen=True, slots=True, kw_only=True)
class PauseStream:
    """Pause partitions of a stream (Liftbridge's ``PAUSE_STREAM``).

    A paused partition is marked paused and its pause timestamps move (the first one only the
    first time); partitions already paused keep theirs. The stream remembers ``resume_all``,
    replacing what an earlier pause said. Closing the logs is the streams layer's reaction.

    Attributes:
        name: The stream's name.
        partitions: Partition ids to pause, without duplicates; empty means every partition.
        resume_all: Whether a publish (or a resuming subscription) to one paused partition
            later resumes every paused partition of the stream.
        timestamp_ns: When the pause was asked for, Unix ns (read from the clock by the
            caller, so that applying stays deterministic); at least 1, since 0 means "never".
    """

    name: str
    partitions: tuple[int, ...] = ()
    resume_all: bool = False
    timestamp_ns: int

    def check(self) -> None:
        """Raise :class:`InvalidCommandError` if the command is malformed on its own.

        Raises:
            InvalidCommandError: An empty name, a bad partition list, a non-bool
                ``resume_all`` or a timestamp outside [1, INT64_MAX].
        """
        _check_text("name", self.name)
        _check_partition_ids(self.partitions)
        _check_bool("resume_all", self.resume_all)
        _check_int("timestamp_ns", self.timestamp_ns, 1, INT64_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResumeStream:
    """Resume paused partitions of a stream (Liftbridge's ``RESUME_STREAM``).

    A resumed partition is marked not paused and its pause timestamps move (the latest one;
    the first one too if it was never set). Partitions that are not paused are left as they
    are. The stream's ``resume_all`` stays as the last pause set it.

    Attributes:
        name: The stream's name.
        partitions: Partition ids to resume, without duplicates; empty means every partition.
        timestamp_ns: When the resume was asked for, Unix ns; at least 1.
    """

    name: str
    partitions: tuple[int, ...] = ()
    timestamp_ns: int

    def check(self) -> None:
        """Raise :class:`InvalidCommandError` if the command is malformed on its own.

        Raises:
            InvalidCommandError: An empty name, a bad partition list or a timestamp outside
                [1, INT64_MAX].
        """
        _check_text("name", self.name)
        _check_partition_ids(self.partitions)
        _check_int("timestamp_ns", self.timestamp_ns, 1, INT64_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class SetStreamReadonly:
    """Set or clear the read-only flag of partitions (Liftbridge's ``SET_STREAM_READONLY``).

    A partition whose flag changes gets its read-only timestamps moved (the first one only the
    first time); one that already has the wanted value keeps them.

    Attributes:
        name: The stream's name.
        partitions: Partition ids to change, without duplicates; empty means every partition.
        readonly: The flag's new value.
        timestamp_ns: When the change was asked for, Unix ns; at least 1.
    """

    name: str
    partitions: tuple[int, ...] = ()
    readonly: bool
    timestamp_ns: int

    def check(self) -> None:
        """Raise :class:`InvalidCommandError` if the command is malformed on its own.

        Raises:
            InvalidCommandError: An empty name, a bad partition list, a non-bool ``readonly``
                or a timestamp outside [1, INT64_MAX].
        """
        _check_text("name", self.name)
        _check_partition_ids(self.partitions)
        _check_bool("readonly", self.readonly)
        _check_int("timestamp_ns", self.timestamp_ns, 1, INT64_MAX)


@dataclass(frozen=True, slots=True, kw_only=True)
class ActivityPublished:
    """Record that activity events are in ``__activity`` (Liftbridge's ``PUBLISH_ACTIVITY``).

    The store forgets every pending event whose id is at most ``through_id``, so a restarted
    (or, later, a newly elected) publisher resumes after them. Events above it stay pending.

    Attributes:
        through_id: The id (metadata index) of the last event published; at least 1.
    """

    through_id: int

    def check(self) -> None:
        """Raise :class:`InvalidCommandError` if the command is malformed on its own.

        Raises:
            InvalidCommandError: ``through_id`` is outside [1, INT64_MAX].
        """
        _check_int("through_id", self.through_id, 1, INT64_MAX)


@dataclass(frozen=True, slots=True)
class GroupJoined:
    """A consumer joined a group (for the activity stream's ``JOIN_CONSUMER_GROUP``)."""

    consumer: str
    streams: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class GroupLeft:
    """A consumer left a group, or was removed (``expired``) for missing its heartbeats."""

    consumer: str
    expired: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class PutConsumerGroup:
    """Store a consumer group's new state, computed by :mod:`flux_broker.groups.state`.

    The command carries the whole state rather than the operation (join, leave, a finished
    revocation), so applying it needs no clock or assignor and gives the same rows on every
    broker. It must be applied at the index equal to ``state.epoch``: a group's epoch *is* the
    metadata index of its latest change (as Liftbridge uses its Raft index), which is how
    epochs only grow, across groups emptied and joined again too.

    Attributes:
        state: The group after the change.
        event: The membership change, for the activity stream; ``None`` for other changes.
    """

    state: GroupState
    event: GroupJoined | GroupLeft | None = None

    def check(self) -> None:
        """Raise :class:`InvalidCommandError` if the command is malformed on its own.

        Raises:
            InvalidCommandError: An empty id, an unknown assignor, an epoch out of range, an
                owner that is not a member, or a member without streams.
        """
        state = self.state
        _check_text("group_id", state.group_id)
        _check_text("coordinator", state.coordinator)
        if state.assignor not in ASSIGNORS:
            raise InvalidCommandError("assignor", f"{state.assignor!r} is not an assignor")
        _check_int("epoch", state.epoch, 1, INT64_MAX)
        for consumer, streams in state.members.items():
            _check_text("consumer", consumer)
            if not streams:
                raise InvalidCommandError("members", f"{consumer!r} reads no stream")
        for (stream, partition), own in state.owners.items():
            _check_text("stream", stream)
            _check_int("partition", partition, 0, INT32_MAX)
            if own.owner not in state.members:
                raise InvalidCommandError("owners", f"{own.owner!r} is not a member")


@dataclass(frozen=True, slots=True, kw_only=True)
class ForgetConsumerGroup:
    """Forget a consumer group without members (its positions stay in ``__cursors``).

    Attributes:
        group_id: The group; applying fails if it has members.
    """

    group_id: str

    def check(self) -> None:
        """Raise :class:`InvalidCommandError` if the command is malformed on its own.

        Raises:
            InvalidCommandError: The group id is empty.
        """
        _check_text("group_id", self.group_id)


#: Every metadata command. Later commands (leader and ISR changes) join this union.
Command: TypeAlias = (
    CreateStream
    | DeleteStream
    | PauseStream
    | ResumeStream
    | SetStreamReadonly
    | ActivityPublished
    | PutConsumerGroup
    | ForgetConsumerGroup
)


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidCommandError(name, "must be a non-empty string")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidCommandError(name, f"must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidCommandError(name, f"{value} is outside [{low}, {high}]")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidCommandError(name, f"must be a bool, not {type(value).__name__}")


def _check_partition_ids(ids: object) -> None:
    if not isinstance(ids, tuple):
        raise InvalidCommandError("partitions", "must be a tuple of partition ids")
    for i, partition_id in enumerate(ids):
        _check_int(f"partitions[{i}]", partition_id, 0, INT32_MAX)
    if len(set(ids)) != len(ids):
        raise InvalidCommandError("partitions", "has duplicate partition ids")


def _check_broker_ids(name: str, ids: tuple[str, ...]) -> None:
    for broker_id in ids:
        _check_text(name, broker_id)
    if len(set(ids)) != len(ids):
        raise InvalidCommandError(name, "has duplicate broker ids")
