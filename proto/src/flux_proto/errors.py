"""The Flux error table: broker error, gRPC status code, Liftbridge text, Flux reason, retriable.

The table is data (``errors.json`` next to this module, beside the ``.proto`` spec) so that the
broker, the Python SDK and the TypeScript SDK (whose build generates ``src/gen/errors.ts`` from
the same file) share one source of truth. Every error status Flux returns keeps Liftbridge's
gRPC code and text and adds a machine-readable reason in the trailing metadata key
:data:`REASON_METADATA_KEY`, so clients never parse messages.

The file has two lists:

- ``errors`` -- broker conditions, each with a gRPC code (:data:`ERRORS`, rows
  :class:`ErrorEntry`, looked up with :func:`by_name` and :func:`by_reason`);
- ``client_errors`` -- conditions an SDK raises itself, with no broker status: closed, buffer
  full, timeout, connection failed, unknown status (:data:`CLIENT_ERRORS`, rows
  :class:`ClientErrorEntry`).

Names and reasons are unique across both lists, so :data:`ERROR_CODES` (every broker name, then
every client name) is the closed set of ``code`` values an SDK error can have.

:func:`load_table` parses a table and returns the broker rows; :func:`load_client_errors`
parses the same text and returns the client rows. Both validate the whole table, both lists.

Example::

    from flux_proto.errors import ERROR_CODES, ERRORS, by_reason

    entry = by_reason("not-leader")
    assert entry.retriable
    assert "CLOSED" in ERROR_CODES
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from typing import Final

import grpc

__all__ = [
    "CLIENT_ERRORS",
    "ERRORS",
    "ERROR_CODES",
    "REASON_METADATA_KEY",
    "ClientErrorEntry",
    "ErrorEntry",
    "ErrorTableError",
    "by_name",
    "by_reason",
    "load_client_errors",
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


@dataclass(frozen=True, slots=True)
class ClientErrorEntry:
    """One row of the table's ``client_errors``: a condition an SDK raises without a broker status.

    Attributes:
        name: Stable identifier of the condition, upper snake case (``BUFFER_FULL``); an SDK
            error's ``code``.
        reason: Machine-readable reason (``buffer-full``), in the same namespace as the broker
            rows' reasons but never sent by a broker.
        retriable: Whether retrying the same call may succeed.
        description: One or two sentences for users: what happened and what to do.
    """

    name: str
    reason: str
    retriable: bool
    description: str


# Keys a client row must not have: it has no broker status.
_BROKER_ONLY_KEYS: Final = ("grpc_code", "liftbridge_message")


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
    return ErrorEntry(
        name=_str(row, "name"),
        grpc_code=code,
        reason=_str(row, "reason"),
        liftbridge_message=message,
        retriable=_retriable(row),
        description=_str(row, "description"),
    )


def _retriable(row: dict[str, object]) -> bool:
    retriable = row.get("retriable")
    if not isinstance(retriable, bool):
        raise ErrorTableError(f"{row.get('name')!r}: retriable must be a boolean")
    return retriable


def _parse_client_row(row: object) -> ClientErrorEntry:
    if not isinstance(row, dict):
        raise ErrorTableError(f"client error row must be an object, got {type(row).__name__}")
    for key in _BROKER_ONLY_KEYS:
        if key in row:
            raise ErrorTableError(
                f"client error row {row.get('name')!r} must not have {key!r} (no broker status)"
            )
    return ClientErrorEntry(
        name=_str(row, "name"),
        reason=_str(row, "reason"),
        retriable=_retriable(row),
        description=_str(row, "description"),
    )


def _parse(text: str) -> tuple[str, tuple[ErrorEntry, ...], tuple[ClientErrorEntry, ...]]:
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
    # Optional, so a version 1 table written before SDK-side rows existed still loads.
    client_rows = data.get("client_errors", [])
    if not isinstance(client_rows, list):
        raise ErrorTableError("client_errors must be a list")
    client_entries = tuple(_parse_client_row(row) for row in client_rows)
    for field in ("name", "reason"):
        values = [getattr(entry, field) for entry in (*entries, *client_entries)]
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise ErrorTableError(
                f"duplicate {field}s in error table (errors and client_errors): {duplicates}"
            )
    return key, entries, client_entries


def load_table(text: str) -> tuple[str, tuple[ErrorEntry, ...]]:
    """Parse and validate the JSON text of an error table.

    Args:
        text: The contents of ``errors.json``.

    The whole table is validated, including the optional ``client_errors`` list (see
    :func:`load_client_errors`), but only the broker rows are returned.

    Returns:
        The trailing-metadata key for reasons and the broker rows (``errors``), in file order.

    Raises:
        ErrorTableError: The text is not a valid table (unknown version, a missing field, a
            name or reason used twice in either list or across both, an unknown gRPC code, a
            client row with a gRPC code or Liftbridge text).
    """
    key, entries, _ = _parse(text)
    return key, entries


def load_client_errors(text: str) -> tuple[ClientErrorEntry, ...]:
    """Parse and validate the JSON text of an error table; return its client-side rows.

    Validates exactly as :func:`load_table` does. A table without ``client_errors`` has none.

    Args:
        text: The contents of ``errors.json``.

    Returns:
        The rows of ``client_errors``, in file order.

    Raises:
        ErrorTableError: The text is not a valid table (see :func:`load_table`).
    """
    return _parse(text)[2]


_LOADED: Final = _parse(files("flux_proto").joinpath(_TABLE_FILE).read_text(encoding="utf-8"))

#: Trailing-metadata key that carries the machine-readable reason of an error status.
REASON_METADATA_KEY: Final[str] = _LOADED[0]
#: Every broker row of the table (``errors``), in file order.
ERRORS: Final[tuple[ErrorEntry, ...]] = _LOADED[1]
#: Every client-side row of the table (``client_errors``), in file order.
CLIENT_ERRORS: Final[tuple[ClientErrorEntry, ...]] = _LOADED[2]
#: The closed set of SDK error codes: every broker row name, then every client row name, each
#: once and in file order.
ERROR_CODES: Final[tuple[str, ...]] = (
    *(entry.name for entry in ERRORS),
    *(entry.name for entry in CLIENT_ERRORS),
)

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
