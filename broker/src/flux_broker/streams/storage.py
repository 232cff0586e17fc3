"""Where streams live on disk, and the file work the stream manager does around their logs.

``<data.dir>/streams/<stream>/<partition>/`` holds one partition's commit log. A deleted
stream's directory is first renamed to ``.deleted-<nuid>`` (one atomic step) and then removed;
data of a stream the metadata does not know is moved to ``<data.dir>/orphans/`` at start-up,
never deleted. See :mod:`flux_broker.streams.manager` for when each of these happens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from nats.nuid import NUID

from flux_broker.log import checkpoint
from flux_broker.log.config import LogConfig
from flux_broker.log.recovery import HW_CHECKPOINT_FILE
from flux_broker.logs import in_partition_context, partition_fields
from flux_broker.metadata import StreamConfig
from flux_broker.streams.live import LivePartition

__all__ = [
    "DELETED_PREFIX",
    "ORPHANS_DIR",
    "STREAMS_DIR",
    "close_partitions",
    "read_high_watermark",
    "remove_directory",
    "stream_log_config",
    "sweep",
]

_logger = logging.getLogger(__name__)

#: The directory under ``data.dir`` holding one directory per stream.
STREAMS_DIR: Final = "streams"
#: Prefix of a deleted stream's directory while it is being removed. Stream names cannot start
#: with ``.``, so it never clashes with a stream.
DELETED_PREFIX: Final = ".deleted-"
#: The directory under ``data.dir`` where start-up moves stream data the metadata does not know.
ORPHANS_DIR: Final = "orphans"

_MS_PER_S: Final = 1000.0


def stream_log_config(server: LogConfig, overrides: StreamConfig) -> LogConfig:
    """The commit-log settings of a stream: the server's, with the stream's overrides.

    Args:
        server: The server-wide settings (the ``streams.*`` keys).
        overrides: What the stream's CreateStreamRequest set (durations in ms).

    Returns:
        The stream's settings.

    Raises:
        ValueError: An override is out of the log's range (for example a zero cleaner
            interval); the message names the setting.
    """
    changes: dict[str, object] = {}
    if overrides.retention_max_bytes is not None:
        changes["retention_max_bytes"] = overrides.retention_max_bytes
    if overrides.retention_max_messages is not None:
        changes["retention_max_messages"] = overrides.retention_max_messages
    if overrides.retention_max_age_ms is not None:
        changes["retention_max_age_s"] = overrides.retention_max_age_ms / _MS_PER_S
    if overrides.cleaner_interval_ms is not None:
        changes["cleaner_interval_s"] = overrides.cleaner_interval_ms / _MS_PER_S
    if overrides.segment_max_bytes is not None:
        changes["segment_max_bytes"] = overrides.segment_max_bytes
    if overrides.segment_max_age_ms is not None:
        changes["segment_max_age_s"] = overrides.segment_max_age_ms / _MS_PER_S
    if overrides.compact_enabled is not None:
        changes["compact_enabled"] = overrides.compact_enabled
    return dataclasses.replace(server, **changes)  # type: ignore[arg-type]  # checked by LogConfig


def sweep(streams_dir: Path, orphans_dir: Path, known: set[str]) -> None:
    """Finish interrupted deletes; move data no stream owns aside, never delete it.

    Args:
        streams_dir: ``<data.dir>/streams``.
        orphans_dir: ``<data.dir>/orphans``.
        known: The names of the streams the metadata holds.
    """
    for entry in sorted(streams_dir.iterdir()):
        if entry.name in known or not entry.is_dir():
            continue
        if entry.name.startswith(DELETED_PREFIX):
            _logger.info("removing %s, left by a delete that did not finish", entry)
            shutil.rmtree(entry)
            continue
        # Deleting it would turn a lost or rolled-back metadata.db into silent data loss.
        target = orphans_dir / f"{entry.name}-{_unique()}"
        _logger.error(
            "%s holds data of stream %r, which the metadata does not know: moved to %s "
            "(a lost or restored metadata.db, or another broker's directory?)",
            entry,
            entry.name,
            target,
        )
        orphans_dir.mkdir(exist_ok=True)
        entry.rename(target)


def remove_directory(streams_dir: Path, name: str) -> None:
    """Remove a stream's directory: one atomic rename out of the way, then the files."""
    directory = streams_dir / name
    if not directory.exists():
        return
    # Not named after the stream: a 249-character name plus a suffix would pass NAME_MAX.
    doomed = streams_dir / f"{DELETED_PREFIX}{_unique()}"
    directory.rename(doomed)
    _fsync_directory(streams_dir)
    shutil.rmtree(doomed)


def read_high_watermark(directory: Path) -> int:
    """The HW a closed partition log checkpointed (-1 when none), without opening the log.

    A paused partition's log was closed cleanly when it was paused, so its checkpoint holds
    the HW it had -- its newest offset too, in a cluster of one.
    """
    try:
        value = checkpoint.read_int(directory / HW_CHECKPOINT_FILE)
    except OSError:
        value = None
    return -1 if value is None else max(value, -1)


async def close_partitions(partitions: Sequence[LivePartition]) -> None:
    """Stop the leaders of partitions that hold a log (acks go out), then close the logs.

    A partition that fails to stop or close is logged; the others are closed regardless.
    """
    stops = await asyncio.gather(
        *(in_partition_context(p.stream, p.id, p.leader.stop()) for p in partitions),
        return_exceptions=True,
    )
    closes = await asyncio.gather(
        *(in_partition_context(p.stream, p.id, p.log.close()) for p in partitions),
        return_exceptions=True,
    )
    for partition, stop, close in zip(partitions, stops, closes, strict=True):
        for what, outcome in (("stop its leader", stop), ("close its log", close)):
            if isinstance(outcome, BaseException):
                _logger.error(
                    "stream %r partition %d: could not %s",
                    partition.stream,
                    partition.id,
                    what,
                    exc_info=outcome,
                    extra=partition_fields(partition.stream, partition.id),
                )


def _unique() -> str:
    return NUID().next().decode()


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
