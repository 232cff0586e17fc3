"""The data directory's owner lock: one broker process per data directory (DESIGN.md §4.1).

Two brokers appending to the same segment files would interleave records and corrupt both
logs, so the broker takes an exclusive ``flock`` on ``<data.dir>/flux.lock`` before it reads
anything there, and holds it until it exits. The kernel releases the lock when the process
ends, however it ends (``kill -9`` included), so a crash never leaves a stale lock behind. The
file holds the owner's pid, so a second broker can say which process holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Final

__all__ = ["LOCK_FILE", "DataDirInUseError", "DataDirLock"]

#: The lock file in the data directory.
LOCK_FILE: Final = "flux.lock"
_HOLDER_MAX_BYTES: Final = 64


class DataDirInUseError(Exception):
    """Another process holds the data directory."""

    def __init__(self, data_dir: Path, holder: str) -> None:
        """Name the directory and the holder (a pid, or "another process" if unknown)."""
        super().__init__(
            f"the data directory {data_dir} is in use by {holder}: stop that broker first, "
            "or give this one another --data-dir"
        )
        self.data_dir = data_dir
        self.holder = holder


class DataDirLock:
    """The exclusive lock on a data directory, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, fd: int, path: Path) -> None:
        """Wrap a locked file descriptor; use :meth:`acquire`."""
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, data_dir: Path) -> DataDirLock:
        """Lock ``data_dir`` (which must exist) for this process, without waiting.

        Raises:
            DataDirInUseError: Another process holds it; the message names its pid.
            OSError: The lock file cannot be created.
        """
        path = data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, _HOLDER_MAX_BYTES, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DataDirInUseError(
                data_dir, f"process {holder}" if holder.isdigit() else "another process"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            # The pid is only a hint for a second broker's message: a full disk must not stop
            # the owner from starting (it can still serve reads); the other one then names
            # "another process".
            pass
        return cls(fd, path)

    def release(self) -> None:
        """Unlock (idempotent). The file stays; its content is only a hint."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
