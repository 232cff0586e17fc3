"""The metadata-store contract: what the rest of the broker may assume about cluster metadata.

Terms (Liftbridge's, see reference/liftbridge-server.md §2.1 and §3.3):

- **command**: one change to the metadata (:mod:`flux_broker.metadata.commands`). Nothing
  changes the metadata except :meth:`MetadataStore.apply` of a command.
- **metadata index**: the position of an applied command in the metadata log, from 1, strictly
  increasing and stored with the state; 0 means nothing was applied. In a cluster of one the
  store assigns the next index; a replicated log (DESIGN.md §6) will pass its own, which may
  skip numbers but never goes back.
- **partition epoch**: version of a partition's metadata; set to the index of every command
  that changes its leader or ISR.
- **leader epoch**: set to the index of every command that changes the partition's leader;
  stamped on every record the leader writes. Both epochs only grow, across a stream's deletion
  and re-creation too, because indexes do.
- **replicas / ISR / leader**: broker ids holding the partition, the subset in sync with the
  leader, and the leader, which is always in the ISR. The ISR is a set, listed in replica order.

Applying is deterministic and has no effect outside the database: the result depends only on
the command, the index and the stored state (no clock, no randomness, no I/O but SQLite). A
command applies in one transaction, entirely or not at all: every error leaves the state and
the applied index as they were (see :mod:`flux_broker.metadata.errors`).

The store is for metadata operations, not the message path: readers take the frozen snapshots
the queries return and keep them; nothing per message touches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from flux_broker.groups.state import GroupState
from flux_broker.metadata.activity import ActivityEvent
from flux_broker.metadata.commands import Command
from flux_broker.metadata.config import StreamConfig

__all__ = ["AppliedCommand", "MetadataStore", "Partition", "Stream"]


@dataclass(frozen=True, slots=True)
class Partition:
    """One partition's metadata (``PartitionMetadata`` fields 1-4, 7, 8, 10, 11 and the epochs).

    Event timestamps are Unix ns, 0 meaning "never"; "first" is the first change ever, "latest"
    the most recent one. Only a change counts: pausing a paused partition moves nothing.

    Attributes:
        stream: Name of its stream.
        id: Partition id, 0 to the stream's partition count - 1.
        leader: Broker id of the leader.
        replicas: Broker ids holding it, in preference order.
        isr: In-sync replicas, in replica order.
        leader_epoch: See the module docstring.
        epoch: See the module docstring; never below ``leader_epoch``.
        paused: Whether the partition is paused (its log closed, no NATS subscription).
        readonly: Whether the partition refuses new messages.
        pause_first_ns: First pause or resume of the partition.
        pause_latest_ns: Latest pause or resume.
        readonly_first_ns: First time its read-only flag changed.
        readonly_latest_ns: Latest change of its read-only flag.
    """

    stream: str
    id: int
    leader: str
    replicas: tuple[str, ...]
    isr: tuple[str, ...]
    leader_epoch: int
    epoch: int
    paused: bool = False
    readonly: bool = False
    pause_first_ns: int = 0
    pause_latest_ns: int = 0
    readonly_first_ns: int = 0
    readonly_latest_ns: int = 0


@dataclass(frozen=True, slots=True)
class Stream:
    """One stream's metadata.

    Attributes:
        name: Stream name.
        subject: NATS subject of partition 0.
        group: NATS queue group ("" for none).
        replication_factor: Replicas per partition.
        creation_timestamp_ns: Creation time, Unix ns.
        config: Overrides of the server defaults, as requested.
        partitions: Its partitions, by id (``partitions[i].id == i``).
        resume_all: What the latest ``PauseStream`` asked: resuming one paused partition
            resumes every paused partition of the stream.
    """

    name: str
    subject: str
    group: str
    replication_factor: int
    creation_timestamp_ns: int
    config: StreamConfig
    partitions: tuple[Partition, ...]
    resume_all: bool = False


@dataclass(frozen=True, slots=True)
class AppliedCommand:
    """A command the store has applied and made durable.

    Attributes:
        index: The metadata index it was applied at (for ``CreateStream``, the partitions'
            epoch and leader epoch).
        command: The command.
    """

    index: int
    command: Command


class MetadataStore(Protocol):
    """Durable cluster metadata: streams and partitions, changed only by commands."""

    @property
    def applied_index(self) -> int:
        """Index of the last applied command; 0 before the first."""
        ...

    async def apply(self, command: Command, *, index: int | None = None) -> AppliedCommand:
        """Validate ``command`` against the current state and apply it in one transaction.

        When this returns, the change is durable (committed and synced).

        Args:
            command: The change.
            index: The metadata index to apply it at, as a replicated log numbers its entries;
                ``None`` takes ``applied_index + 1``.

        Returns:
            The index it was applied at, with the command.

        Raises:
            InvalidCommandError: The command is malformed on its own.
            StaleIndexError: ``index`` is not above :attr:`applied_index`.
            StreamExistsError: ``CreateStream`` of a stream that exists.
            StreamNotFoundError: A command other than ``CreateStream`` named a stream that
                does not exist.
            PartitionNotFoundError: ``PauseStream``, ``ResumeStream`` or
                ``SetStreamReadonly`` named a partition id the stream does not have.
            MetadataStorageError: SQLite failed; nothing was applied.
            MetadataClosedError: The store is closed.
        """
        ...

    async def get_stream(self, name: str) -> Stream | None:
        """Return the stream called ``name``, or ``None`` if there is none.

        Raises:
            MetadataStorageError: SQLite failed.
            MetadataClosedError: The store is closed.
        """
        ...

    async def list_streams(self) -> tuple[Stream, ...]:
        """Return every stream, ordered by name.

        Raises:
            MetadataStorageError: SQLite failed.
            MetadataClosedError: The store is closed.
        """
        ...

    async def get_partition(self, stream: str, partition_id: int) -> Partition | None:
        """Return one partition, or ``None`` if the stream or the partition does not exist.

        Raises:
            MetadataStorageError: SQLite failed.
            MetadataClosedError: The store is closed.
        """
        ...

    async def list_groups(self) -> tuple[GroupState, ...]:
        """Every consumer group stored (including groups whose last member left), by id.

        Raises:
            MetadataStorageError: The store failed.
            MetadataClosedError: The store is closed.
        """
        ...

    async def pending_activity(self, limit: int) -> tuple[ActivityEvent, ...]:
        """The oldest ``limit`` activity events not yet published, in id order.

        Events are recorded only by a store opened to record activity; ``ActivityPublished``
        removes them (:mod:`flux_broker.metadata.activity`).

        Raises:
            MetadataStorageError: SQLite failed.
            MetadataClosedError: The store is closed.
        """
        ...

    async def close(self) -> None:
        """Close the store; idempotent. Later calls raise :class:`MetadataClosedError`."""
        ...
