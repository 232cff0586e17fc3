r"""The broker's log lines: readable by a person by default, one JSON object each on request.

Every line names its **component**, a short name derived from the logger (``flux_broker.log.
segment`` → ``log.segment``, ``flux_broker.server`` → ``server``; other libraries' loggers keep
their names), and, where the line concerns one partition, its **stream** and **partition**::

    2025-01-31 12:00:00,123 INFO    streams.partition [orders/0]: could not send an ack ...
    {"time": "2025-01-31T12:00:00.123Z", "level": "info", "component": "streams.partition",
     "stream": "orders", "partition": 0, "message": "could not send an ack ..."}

(the JSON object is one line). ``logging.format`` (``--log-format``) chooses: ``text``, the
default, or ``json``.

**Stream and partition** come from the record's attributes ``stream`` and ``partition``, set in
one of two ways, both ending in the same attributes:

- work that runs on behalf of one partition runs inside :func:`partition_context` (a context
  variable): opening its log, whose recovery runs in a worker thread, and starting its leader,
  whose ingest task, HW checkpoints and cleaner inherit the context, so every line they log
  carries the partition without passing it down to the log layer;
- a call site that speaks of a partition without running on its behalf passes
  ``extra=partition_fields(stream, partition)``, which wins over the context.

**Untrusted text never breaks a line.** Stream names, subjects and inboxes come from clients.
JSON escapes every control character. The text format escapes them as Python's ``repr``
would (``\n``, ``\x1b``, ``\u2028``), in the message and in the stream name; only a traceback
appended to a text line spans further lines, as Python prints it (in JSON it is the field
``exception``, one string).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import enum
import json
import logging
import sys
from collections.abc import Awaitable, Iterator
from typing import Final, TextIO, TypeVar

__all__ = [
    "LogFormat",
    "configure",
    "escape",
    "formatter",
    "in_partition_context",
    "partition_context",
    "partition_fields",
]

#: The broker's package: its loggers' components drop this prefix.
_PACKAGE: Final = "flux_broker"
_PREFIX: Final = _PACKAGE + "."
TEXT_FORMAT: Final = "%(asctime)s %(levelname)-7s %(component)s%(where)s: %(message)s"

_T = TypeVar("_T")
#: Marks the handler :func:`configure` installed.
_INSTALLED: Final = "_flux_broker_handler"

_partition: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "flux_log_partition", default=None
)


class LogFormat(enum.Enum):
    """The values of ``logging.format``."""

    TEXT = "text"
    JSON = "json"


@contextlib.contextmanager
def partition_context(stream: str, partition: int) -> Iterator[None]:
    """Mark what the block logs, and the tasks and threads it starts, as about one partition."""
    token = _partition.set((stream, partition))
    try:
        yield
    finally:
        _partition.reset(token)


async def in_partition_context(stream: str, partition: int, work: Awaitable[_T]) -> _T:
    """Await ``work`` inside :func:`partition_context` (for work run as its own task)."""
    with partition_context(stream, partition):
        return await work


def partition_fields(stream: str, partition: int | None = None) -> dict[str, object]:
    """``extra=`` for a call about one partition (or a whole stream) outside its context."""
    return {"stream": stream, "partition": partition}


# Every character that can end or disturb a line: C0 and C1 controls, DEL, and the Unicode line
# and paragraph separators (str.splitlines breaks at them). Escaped as repr() writes them.
_ESCAPES: Final[dict[int, str]] = {
    code: repr(chr(code))[1:-1] for code in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)
}


def escape(text: str) -> str:
    r"""``text`` with every control character escaped (a newline becomes ``\n``)."""
    return text.translate(_ESCAPES)


_components: dict[str, str] = {}


def _component(name: str) -> str:
    component = _components.get(name)
    if component is None:
        if name == _PACKAGE:
            component = "broker"
        elif name.startswith(_PREFIX):
            component = name[len(_PREFIX) :]
        else:
            component = name
        _components[name] = component
    return component


def _where(record: logging.LogRecord) -> tuple[object, object]:
    """The record's (stream, partition): its own attributes, else the partition context."""
    stream = getattr(record, "stream", None)
    if stream is not None:
        return stream, getattr(record, "partition", None)
    context = _partition.get()
    if context is not None:
        return context
    return None, None


class TextFormatter(logging.Formatter):
    """``time LEVEL component [stream/partition]: message``, control characters escaped."""

    def __init__(self) -> None:
        """The broker's text line (:data:`TEXT_FORMAT`)."""
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 -- logging's API
        """The line before any traceback, escaped."""
        record.component = _component(record.name)
        stream, partition = _where(record)
        if stream is None:
            record.where = ""
        elif partition is None:
            record.where = f" [{escape(str(stream))}]"
        else:
            record.where = f" [{escape(str(stream))}/{partition}]"
        record.message = escape(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, component, stream, partition, message."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON (a traceback in ``exception``)."""
        line: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            )[:-6]
            + "Z",
            "level": record.levelname.lower(),
            "component": _component(record.name),
        }
        stream, partition = _where(record)
        if stream is not None:
            line["stream"] = stream
            if partition is not None:
                line["partition"] = partition
        line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # ensure_ascii: every control or non-ASCII character becomes an escape; default=str:
        # a value of an unexpected type is written as text rather than losing the line.
        return json.dumps(line, ensure_ascii=True, default=str)


def configure(
    log_format: LogFormat = LogFormat.TEXT, level: int = logging.INFO, stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record at ``level`` and above to ``stream`` (stderr) in ``log_format``.

    Replaces the handler an earlier call installed (other handlers stay), so calling it again
    switches the format. Returns the handler.
    """
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _INSTALLED, False)]:
        root.removeHandler(old)
        old.close()
    setattr(handler, _INSTALLED, True)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def formatter(log_format: LogFormat) -> logging.Formatter:
    """The formatter of ``log_format``."""
    return JsonFormatter() if log_format is LogFormat.JSON else TextFormatter()
