"""Assignors: which member of a consumer group reads which partition.

An assignor is a pure function of the group's membership and the partition counts of the
streams its members read, so the same inputs always give the same assignment -- on any broker,
after any restart, whatever order the members joined in. Three are offered, chosen per group
when it is created (``JoinConsumerGroupRequest.assignor``):

``least-loaded`` (default, Liftbridge's rule)
    Streams in name order; each partition 0..n-1 of a stream goes to the subscribed member
    holding the fewest partitions so far (counted over every stream), ties to the smallest
    consumer id. Liftbridge applies the rule incrementally, so its result depends on the order
    of joins; here it is recomputed from scratch, so it does not.
``range`` (Kafka's RangeAssignor)
    Per stream, the subscribed members in id order get contiguous runs of partitions; the
    first ``n % m`` members get one more.
``round-robin`` (Kafka's RoundRobinAssignor)
    Every (stream, partition) in order is dealt to the members in id order, in turn, skipping
    members not subscribed to its stream.

Every partition of a stream with at least one subscribed member gets exactly one member; a
stream nobody subscribes to, or one that does not exist (0 partitions), gets none.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Final, Protocol, TypeAlias

__all__ = [
    "ASSIGNORS",
    "DEFAULT_ASSIGNOR",
    "Assignment",
    "Assignor",
    "LeastLoadedAssignor",
    "PartitionKey",
    "RangeAssignor",
    "RoundRobinAssignor",
]

#: ``(stream, partition id)``.
PartitionKey: TypeAlias = tuple[str, int]
#: Each assigned partition and the consumer id that reads it.
Assignment: TypeAlias = dict[PartitionKey, str]


class Assignor(Protocol):
    """Maps a group's members to partitions; must be a pure, deterministic function."""

    name: str

    def assign(
        self, members: Mapping[str, frozenset[str]], partitions: Mapping[str, int]
    ) -> Assignment:
        """Assign every partition of every subscribed stream to one subscribed member.

        Args:
            members: Consumer id -> the streams it reads (non-empty ids and sets).
            partitions: Stream name -> partition count; a stream missing here has none.

        Returns:
            ``(stream, partition)`` -> consumer id, covering exactly the partitions of the
            streams at least one member reads.
        """
        ...


def _subscribers(members: Mapping[str, frozenset[str]]) -> dict[str, list[str]]:
    """Stream -> its subscribed consumer ids in id order, streams in name order."""
    by_stream: dict[str, list[str]] = {}
    for consumer in sorted(members):
        for stream in members[consumer]:
            by_stream.setdefault(stream, []).append(consumer)
    return {stream: by_stream[stream] for stream in sorted(by_stream)}


class LeastLoadedAssignor:
    """Liftbridge's rule, recomputed from scratch; see the module docstring."""

    name = "least-loaded"

    def assign(
        self, members: Mapping[str, frozenset[str]], partitions: Mapping[str, int]
    ) -> Assignment:
        """See :meth:`Assignor.assign`."""
        load = dict.fromkeys(members, 0)
        assignment: Assignment = {}
        for stream, consumers in _subscribers(members).items():
            for partition in range(partitions.get(stream, 0)):
                # min() keeps the first of equals, and ``consumers`` is in id order.
                chosen = min(consumers, key=load.__getitem__)
                assignment[stream, partition] = chosen
                load[chosen] += 1
        return assignment


class RangeAssignor:
    """Kafka's range rule; see the module docstring."""

    name = "range"

    def assign(
        self, members: Mapping[str, frozenset[str]], partitions: Mapping[str, int]
    ) -> Assignment:
        """See :meth:`Assignor.assign`."""
        assignment: Assignment = {}
        for stream, consumers in _subscribers(members).items():
            count = partitions.get(stream, 0)
            share, extra = divmod(count, len(consumers))
            partition = 0
            for index, consumer in enumerate(consumers):
                for _ in range(share + (1 if index < extra else 0)):
                    assignment[stream, partition] = consumer
                    partition += 1
        return assignment


class RoundRobinAssignor:
    """Kafka's round-robin rule; see the module docstring."""

    name = "round-robin"

    def assign(
        self, members: Mapping[str, frozenset[str]], partitions: Mapping[str, int]
    ) -> Assignment:
        """See :meth:`Assignor.assign`."""
        assignment: Assignment = {}
        ring = itertools.cycle(sorted(members))
        for stream, _consumers in _subscribers(members).items():
            for partition in range(partitions.get(stream, 0)):
                # Some member reads the stream, so the walk ends within one turn of the ring.
                consumer = next(ring)
                while stream not in members[consumer]:
                    consumer = next(ring)
                assignment[stream, partition] = consumer
        return assignment


#: Every assignor, by the name a join asks for.
ASSIGNORS: Final[Mapping[str, Assignor]] = {
    assignor.name: assignor
    for assignor in (LeastLoadedAssignor(), RangeAssignor(), RoundRobinAssignor())
}
#: The assignor of a group whose first join names none (Liftbridge's).
DEFAULT_ASSIGNOR: Final = LeastLoadedAssignor.name
