"""Checkpoint files: small values written atomically and read tolerantly.

Writes go to a temporary file that is fsynced and renamed over the target, then the directory
is fsynced, so a crash leaves either the old or the new content. Reads never fail on bad
content: a missing, empty or garbage file is reported as "no checkpoint" and logged, and the
caller falls back to what the log itself proves.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["fsync_dir", "read_int", "write_atomic", "write_int"]

_log = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Fsync a directory so that entries created, renamed or deleted in it are durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)
    fsync_dir(path.parent)


def write_int(path: Path, value: int) -> None:
    """Checkpoint an integer as decimal ASCII text (Liftbridge's format) plus a newline."""
    write_atomic(path, f"{value}\n".encode("ascii"))


def read_int(path: Path) -> int | None:
    """Read an integer checkpoint; ``None`` if the file is missing, empty or not an integer."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        _log.warning("checkpoint %s unreadable, ignoring it: %s", path, exc)
        return None
    try:
        return int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        _log.warning(
            "checkpoint %s holds %d bytes that are not an integer; ignoring it", path, len(text)
        )
        return None
