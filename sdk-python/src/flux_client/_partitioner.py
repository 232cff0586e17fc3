"""Partitioners: which partition of a stream a record goes to when the send names none."""

from __future__ import annotations

import itertools
import zlib
from typing import Protocol

__all__ = ["KeyHashPartitioner", "Partitioner", "RoundRobinPartitioner"]


class Partitioner(Protocol):
    """Chooses a partition for a record.

    ``partition`` is called once per record whose send names no partition, on the event loop;
    it must be fast and must not block. It returns an id in ``range(partition_count)``.
    """

    def partition(self, stream: str, key: bytes | None, partition_count: int) -> int:
        """The partition of ``stream`` (which has ``partition_count``) for a record."""
        ...


class RoundRobinPartitioner:
    """Spreads records over the partitions in turn, per stream."""

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}

    def partition(self, stream: str, key: bytes | None, partition_count: int) -> int:
        """The next partition in turn for ``stream``."""
        counter = self._counters.get(stream)
        if counter is None:
            counter = self._counters[stream] = itertools.count()
        return next(counter) % partition_count


class KeyHashPartitioner:
    """Records with the same key go to the same partition; the default.

    The partition is the IEEE CRC-32 of the key modulo the partition count — the Go Liftbridge
    client's key partitioner, so Go and Python producers agree on where a key goes. Records
    without a key are spread round-robin.
    """

    def __init__(self) -> None:
        self._round_robin = RoundRobinPartitioner()

    def partition(self, stream: str, key: bytes | None, partition_count: int) -> int:
        """The key's partition, or the next one in turn when there is no key."""
        if key is None:
            return self._round_robin.partition(stream, key, partition_count)
        return zlib.crc32(key) % partition_count
