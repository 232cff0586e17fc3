"""A consumer group's state and its transitions: pure functions, no I/O, no clock.

The state (:class:`GroupState`) is what the metadata store keeps durable: the members and the
streams each reads, and the current **owner** of every partition. The assignor says who
*should* read each partition; ownership moves towards that target with
**revoke-before-assign**:

* a partition without an owner (new, or its owner left or expired) goes to its target at once;
* a partition whose owner is not its target is first **revoked**: the owner keeps it (and may
  still commit its final position) but no longer reads it -- it is not in its assignment --
  and nobody else gets it, until the revocation is complete (:func:`complete`: the coordinator
  calls it once the owners confirmed, or the revocation timed out); only then does the
  partition go to its target;
* a partition whose stream is gone, or that no member reads any more, has no owner.

So at every moment each partition has at most one owner, and a member's assignment (what it
should read) never includes a partition another member may still commit.

Every transition that changes anything yields a state with a new, larger **epoch**, the metadata
index of the command that stores it; the caller passes it in. A partition's ownership records
the epoch it was granted in (``since_epoch``), which a member-checked commit must not precede.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from flux_broker.groups.assignor import ASSIGNORS, PartitionKey

__all__ = [
    "GroupState",
    "Ownership",
    "complete",
    "join",
    "leave",
    "new_group",
    "rebalance",
]


@dataclass(frozen=True, slots=True)
class Ownership:
    """Who owns one partition.

    Attributes:
        owner: The consumer id.
        since_epoch: The epoch the partition was granted to it in.
        revoke_epoch: 0, or the epoch its revocation began in (it then is no longer in the
            owner's assignment, but the owner may still commit it).
    """

    owner: str
    since_epoch: int
    revoke_epoch: int = 0

    @property
    def revoking(self) -> bool:
        """Whether the partition is being revoked from its owner."""
        return self.revoke_epoch > 0


@dataclass(frozen=True, slots=True)
class GroupState:
    """One consumer group.

    Attributes:
        group_id: The group id.
        assignor: The assignor's name (a key of :data:`~flux_broker.groups.assignor.ASSIGNORS`).
        coordinator: The broker id of the coordinator.
        epoch: The current epoch (grows with every change).
        members: Consumer id -> the streams it reads, sorted.
        owners: ``(stream, partition)`` -> its ownership.
        streams: Every stream a member of the group has read, sorted: describe and reset use
            them after the last member left.
    """

    group_id: str
    assignor: str
    coordinator: str
    epoch: int
    members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    owners: Mapping[PartitionKey, Ownership] = field(default_factory=dict)
    streams: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        """Whether the group has no members (it is then unknown to FetchMetadata)."""
        return not self.members

    def assignment(self, consumer: str) -> dict[str, tuple[int, ...]]:
        """What ``consumer`` should read: stream -> partition ids (owned, not being revoked)."""
        return _by_stream(
            key for key, own in self.owners.items() if own.owner == consumer and not own.revoking
        )

    def revoking(self, consumer: str) -> dict[str, tuple[int, ...]]:
        """The partitions being revoked from ``consumer``: stream -> partition ids."""
        return _by_stream(
            key for key, own in self.owners.items() if own.owner == consumer and own.revoking
        )

    def may_commit(self, consumer: str, key: PartitionKey, epoch: int) -> bool:
        """Whether a member-checked commit by ``consumer`` at ``epoch`` for ``key`` is allowed."""
        own = self.owners.get(key)
        return own is not None and own.owner == consumer and epoch >= own.since_epoch


def _by_stream(keys: Iterable[PartitionKey]) -> dict[str, tuple[int, ...]]:
    grouped: dict[str, list[int]] = {}
    for stream, partition in keys:
        grouped.setdefault(stream, []).append(partition)
    return {stream: tuple(sorted(grouped[stream])) for stream in sorted(grouped)}


def new_group(group_id: str, assignor: str, coordinator: str) -> GroupState:
    """A group with no members yet (epoch 0), to :func:`join`."""
    if assignor not in ASSIGNORS:
        raise ValueError(f"unknown assignor {assignor!r}")
    return GroupState(group_id=group_id, assignor=assignor, coordinator=coordinator, epoch=0)


def join(
    state: GroupState,
    consumer: str,
    streams: Iterable[str],
    *,
    epoch: int,
    partitions: Mapping[str, int],
) -> GroupState:
    """``consumer`` joins (or re-joins with another stream list) at ``epoch``."""
    wanted = tuple(sorted(set(streams)))
    members = {**state.members, consumer: wanted}
    known = tuple(sorted(set(state.streams) | set(wanted)))
    return _settle(state, replace(state, members=members, streams=known), epoch, partitions)


def leave(
    state: GroupState, consumer: str, *, epoch: int, partitions: Mapping[str, int]
) -> GroupState:
    """``consumer`` leaves (or expired) at ``epoch``; its partitions are free at once."""
    members = {c: s for c, s in state.members.items() if c != consumer}
    owners = {k: o for k, o in state.owners.items() if o.owner != consumer}
    return _settle(state, replace(state, members=members, owners=owners), epoch, partitions)


def rebalance(state: GroupState, *, epoch: int, partitions: Mapping[str, int]) -> GroupState:
    """Re-run the assignment after streams were created or deleted."""
    return _settle(state, state, epoch, partitions)


def complete(
    state: GroupState,
    keys: Iterable[PartitionKey],
    *,
    epoch: int,
    partitions: Mapping[str, int],
) -> GroupState:
    """End the revocations of ``keys`` (confirmed or timed out); their targets get them."""
    doomed = {key for key in keys if (own := state.owners.get(key)) is not None and own.revoking}
    if not doomed:
        return state
    owners = {k: o for k, o in state.owners.items() if k not in doomed}
    return _settle(state, replace(state, owners=owners), epoch, partitions)


def _settle(
    original: GroupState, state: GroupState, epoch: int, partitions: Mapping[str, int]
) -> GroupState:
    """Move ``state``'s ownership towards the assignor's target.

    Returns:
        ``original`` itself if the result holds the same members, streams and owners;
        otherwise the result, at ``epoch``.
    """
    members = {consumer: frozenset(streams) for consumer, streams in state.members.items()}
    target = ASSIGNORS[state.assignor].assign(members, partitions)
    owners: dict[PartitionKey, Ownership] = {}
    for key in sorted(target):
        wanted = target[key]
        own = state.owners.get(key)
        if own is None or own.owner not in members:
            owners[key] = Ownership(wanted, epoch)
        elif own.owner == wanted:
            owners[key] = Ownership(own.owner, own.since_epoch)  # a revocation is called off
        elif own.revoking:
            owners[key] = own
        else:
            owners[key] = Ownership(own.owner, own.since_epoch, revoke_epoch=epoch)
    settled = replace(state, owners=owners)
    if (
        settled.owners == original.owners
        and settled.members == original.members
        and settled.streams == original.streams
    ):
        return original
    if epoch <= original.epoch:
        raise ValueError(f"epoch {epoch} does not grow past {original.epoch}")
    return replace(settled, epoch=epoch)
