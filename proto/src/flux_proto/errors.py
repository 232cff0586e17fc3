"""The Flux error table: broker error, gRPC status code, Liftbridge text, Flux reason, retriable.

The table is data (``errors.json`` next to this module, beside the ``.proto`` spec) so that the
broker, the Python SDK and the TypeScript SDK (whose build generates ``src/gen/errors.ts`` from
the same file) share one source of truth. Every error status Flux returns keeps Liftbridge's
gRPC code and text and adds a machine-readable reason in the trailing metadata key
:data:`REASON_METADATA_KEY`, so clients never parse messages.

Example::

    from flux_proto.errors import ERRORS, by_reason

    entry = by_reason("not-leader")
    assert entry.retriable
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from typing import Final

import grpc

__all__ = [
    "ERRORS",
    "REASON_METADATA_KEY",
    "ErrorEntry",
    "ErrorTableError",
    "by_name",
    "by_reason",
    "load_table",
]

_TABLE_FILE: Final = "errors.json"
_SUPPORTED_VERSION: Final = 1


class ErrorTableError(ValueError):
    """The error table file is malformed (a packaging or editing mistake, never user input)."""


@dataclass(frozen=True, slots=True)
class ErrorEntry:
    """One row of the error table.

    Attributes:
        name: Stable identifier of the condition, upper snake case (``STREAM_EXISTS``).
        grpc_code: The gRPC status code the broker returns, as in Liftbridge.
        reason: Machine-readable reason sent in trailing metadata (``stream-exists``).
        liftbridge_message: Liftbridge's status text for this condition, when it has a fixed
            one; ``None`` when the text varies or Liftbridge has no such condition.
        retriable: Whether a client may retry the same request (after refreshing metadata
            where the condition says so) and expect it to succeed.
        description: One sentence for users: what happened and what to do.
    """

    name: str
    grpc_code: grpc.StatusCode
    reason: str
    liftbridge_message: str | None
    retriable: bool
    description: str


def _str(row: dict[str, object], key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise ErrorTableError(f"error table row {row.get('name')!r}: {key!r} must be a string")
    return value


def _parse_row(row: object) -> ErrorEntry:
    if not isinstance(row, dict):
        raise ErrorTableError(f"error table row must be an object, got {type(row).__name__}")
    code_name = _str(row, "grpc_code")
    try:
        code = grpc.StatusCode[code_name]
    except KeyError:
        raise ErrorTableError(f"unknown gRPC status code {code_name!r}") from None
    message = row.get("liftbridge_message")
    if message is not None and not isinstance(message, str):
        raise ErrorTableError(f"{row.get('name')!r}: liftbridge_message must be string or null")
    retriable = row.get("retriable")
    if not isinstance(retriable, bool):
        raise ErrorTableError(f"{row.get('name')!r}: retriable must be a boolean")
    return ErrorEntry(
        name=_str(row, "name"),
        grpc_code=code,
        reason=_str(row, "reason"),
        liftbridge_message=message,
        retriable=retriable,
        description=_str(row, "description"),
    )


def load_table(text: str) -> tuple[str, tuple[ErrorEntry, ...]]:
    """Parse and validate the JSON text of an error table.

    Args:
        text: The contents of ``errors.json``.

    Returns:
        The trailing-metadata key for reasons and the rows, in file order.

    Raises:
        ErrorTableError: The text is not a valid table (unknown version, a missing field, a
            duplicate name or reason, an unknown gRPC code).
    """
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != _SUPPORTED_VERSION:
        raise ErrorTableError(f"error table must be an object with version {_SUPPORTED_VERSION}")
    key = data.get("reason_metadata_key")
    if not isinstance(key, str) or key != key.lower() or not key:
        raise ErrorTableError("reason_metadata_key must be a lower-case string")
    rows = data.get("errors")
    if not isinstance(rows, list) or not rows:
        raise ErrorTableError("errors must be a non-empty list")
    entries = tuple(_parse_row(row) for row in rows)
    for field in ("name", "reason"):
        values = [getattr(entry, field) for entry in entries]
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ErrorTableError(f"duplicate {field}s in error table: {duplicates}")
    return key, entries


_LOADED: Final = load_table(files("flux_proto").joinpath(_TABLE_FILE).read_text(encoding="utf-8"))

#: Trailing-metadata key that carries the machine-readable reason of an error status.
REASON_METADATA_KEY: Final[str] = _LOADED[0]
#: Every row of the table, in file order.
ERRORS: Final[tuple[ErrorEntry, ...]] = _LOADED[1]

_BY_NAME: Final = {entry.name: entry for entry in ERRORS}
_BY_REASON: Final = {entry.reason: entry for entry in ERRORS}


def by_name(name: str) -> ErrorEntry:
    """Return the row named ``name``.

    Raises:
        KeyError: No row has that name.
    """
    return _BY_NAME[name]


def by_reason(reason: str) -> ErrorEntry:
    """Return the row whose trailing-metadata reason is ``reason``.

    Raises:
        KeyError: No row has that reason (an SDK treats it as an unknown error).
    """
    return _BY_REASON[reason]
