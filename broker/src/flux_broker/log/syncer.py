"""The durability policy: when appended bytes are forced to disk.

With ``always`` the syncer implements **group commit**: an append waits until an fsync that
started after its write has finished. While one fsync runs, every append that arrives waits for
the next one, so N concurrent appends cost about two fsyncs, not N. The fsync itself runs in a
worker thread on a duplicate of the file descriptor, so the event loop keeps serving and a
segment roll cannot close the descriptor under it.

Only the ``.log`` file is synced (``fdatasync``): the index is rebuilt from the log whenever it
disagrees, so syncing it would buy nothing. New or renamed files are made durable by fsyncing
their directory (done by the log when it rolls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from flux_broker.log.config import SyncPolicy
from flux_broker.log.errors import LogWriteError, SyncFailedError

__all__ = ["Syncer"]

_log = logging.getLogger(__name__)


def _datasync_and_close(fd: int) -> None:
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


class Syncer:
    """Applies a :class:`SyncPolicy` to the log file that ``current_fd`` returns."""

    def __init__(
        self, policy: SyncPolicy, interval_s: float, current_fd: Callable[[], int]
    ) -> None:
        """Prepare the policy; call :meth:`start` from the event loop."""
        self.policy = policy
        self.interval_s = interval_s
        self._current_fd = current_fd
        self._written = 0  # write sequence number
        self._durable = 0  # highest sequence number known to be on disk
        self._inflight: asyncio.Future[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.syncs = 0

    def start(self) -> None:
        """Start the periodic sync of ``interval`` (no-op for the other policies)."""
        if self.policy is SyncPolicy.INTERVAL and self._ticker is None:
            self._ticker = asyncio.create_task(self._tick(), name="log-sync-interval")

    def note_write(self) -> None:
        """Record that bytes were written (and are not yet known to be durable)."""
        self._written += 1

    def mark_durable(self) -> None:
        """Record that everything written so far is on disk (synced by the caller)."""
        self._durable = self._written

    @property
    def dirty(self) -> bool:
        """Whether some written bytes may not be durable yet."""
        return self._durable < self._written

    async def after_append(self) -> None:
        """Apply the policy to the write just noted: wait for it under ``always``."""
        if self.policy is SyncPolicy.ALWAYS:
            await self.sync()

    async def sync(self) -> None:
        """Return once everything written before the call is durable.

        Raises:
            SyncFailedError: fsync failed; the data may not be on disk.
        """
        target = self._written
        while self._durable < target:
            if self._inflight is None:
                self._inflight = asyncio.ensure_future(self._sync_once())
            await asyncio.shield(self._inflight)

    async def _sync_once(self) -> None:
        sequence = self._written
        try:
            fd = os.dup(self._current_fd())
            await asyncio.to_thread(_datasync_and_close, fd)
        except OSError as exc:
            raise SyncFailedError(f"fsync failed: {exc}") from exc
        finally:
            self._inflight = None
        self.syncs += 1
        self._durable = max(self._durable, sequence)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if self.dirty:
                try:
                    await self.sync()
                except LogWriteError:
                    _log.exception("periodic fsync failed; retrying next interval")

    async def stop(self) -> None:
        """Stop the periodic task and wait for a sync in flight."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._inflight is not None:
            with contextlib.suppress(LogWriteError):
                await asyncio.shield(self._inflight)
