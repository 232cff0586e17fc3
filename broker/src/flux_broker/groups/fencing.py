"""One subscriber per group and partition: epoch fencing of consumer-group subscriptions.

Liftbridge's rule (reference ``liftbridge-api.md`` §1.8): a Subscribe carrying
``Consumer{groupId, consumerId, groupEpoch}`` takes the partition's slot of that group. If the
slot is held with a newer epoch the request is refused (FAILED_PRECONDITION, GROUP_FENCED);
with an equal or older one the holder is ended (GROUP_FENCED too) and the new subscription
takes its place. A member that lost a partition in a rebalance therefore cannot keep reading it
once the new owner subscribes with the newer epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from flux_broker.groups.errors import GroupFencedError
from flux_broker.nats.subjects import shown

__all__ = ["GroupSlot", "GroupSubscriptions"]


@dataclass(eq=False, slots=True)
class GroupSlot:
    """A group subscription's hold on its partition.

    Attributes:
        consumer: The member holding it.
        epoch: The group epoch it subscribed with.
        ending: Set when the subscription must end: the broker shuts down or a newer
            subscription replaced it (:attr:`replaced`).
        replaced: Whether a newer subscription took the slot.
    """

    consumer: str
    epoch: int
    ending: asyncio.Event = field(default_factory=asyncio.Event)
    replaced: bool = False


class GroupSubscriptions:
    """The current group subscriber of every (group, stream, partition)."""

    def __init__(self) -> None:
        """Start with no group subscriptions."""
        self._slots: dict[tuple[str, str, int], GroupSlot] = {}

    @contextlib.contextmanager
    def hold(
        self,
        *,
        group: str,
        consumer: str,
        epoch: int,
        stream: str,
        partition: int,
        closing: asyncio.Event,
    ) -> Iterator[GroupSlot]:
        """Take the slot for the duration of the block, replacing an older holder.

        Raises:
            GroupFencedError: The slot is held with a newer epoch (nothing changed).
        """
        key = (group, stream, partition)
        current = self._slots.get(key)
        if current is not None and current.epoch > epoch:
            raise GroupFencedError(
                f"consumer group {shown(group)} reads stream {shown(stream)} partition "
                f"{partition} under epoch {current.epoch}, newer than {epoch}; fetch the "
                "current assignment"
            )
        if current is not None:
            current.replaced = True
            current.ending.set()
        slot = GroupSlot(consumer, epoch)
        self._slots[key] = slot
        # The broker's shutdown ends the subscription too.
        shutdown = asyncio.ensure_future(closing.wait())
        shutdown.add_done_callback(lambda _done: slot.ending.set())
        try:
            yield slot
        finally:
            shutdown.cancel()
            if self._slots.get(key) is slot:
                del self._slots[key]
