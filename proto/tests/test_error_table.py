"""The shared error table loads, is consistent, and rejects malformed edits."""

from __future__ import annotations

import json

import grpc
import pytest

from flux_proto import errors


def test_table_has_unique_names_and_reasons() -> None:
    names = [entry.name for entry in errors.ERRORS]
    reasons = [entry.reason for entry in errors.ERRORS]
    assert len(set(names)) == len(names)
    assert len(set(reasons)) == len(reasons)
    assert errors.REASON_METADATA_KEY == "flux-reason"


def test_lookups_return_the_row() -> None:
    entry = errors.by_reason("not-leader")
    assert entry is errors.by_name("NOT_LEADER")
    assert entry.grpc_code is grpc.StatusCode.FAILED_PRECONDITION
    assert entry.retriable
    with pytest.raises(KeyError):
        errors.by_reason("no-such-reason")


@pytest.mark.parametrize(
    ("name", "code", "text"),
    [
        ("STREAM_EXISTS", grpc.StatusCode.ALREADY_EXISTS, None),
        ("PARTITION_NOT_FOUND", grpc.StatusCode.NOT_FOUND, "No such partition"),
        ("NOT_LEADER", grpc.StatusCode.FAILED_PRECONDITION, "Server not partition leader"),
        ("STOP_REACHED", grpc.StatusCode.RESOURCE_EXHAUSTED, "Stop offset reached"),
        ("READONLY_END", grpc.StatusCode.RESOURCE_EXHAUSTED, "End of readonly partition"),
        ("NO_METADATA_LEADER", grpc.StatusCode.INTERNAL, "no known metadata leader"),
        ("SLOW_CONSUMER", grpc.StatusCode.UNAVAILABLE, None),
    ],
    ids=str,
)
def test_liftbridge_codes_and_texts(name: str, code: grpc.StatusCode, text: str | None) -> None:
    """Liftbridge clients match on these codes (and GUFO on one text): they must not drift."""
    entry = errors.by_name(name)
    assert entry.grpc_code is code
    assert entry.liftbridge_message == text


def _table(**row_changes: object) -> str:
    row: dict[str, object] = {
        "name": "A",
        "grpc_code": "NOT_FOUND",
        "reason": "a",
        "liftbridge_message": None,
        "retriable": False,
        "description": "d",
    }
    row.update(row_changes)
    return json.dumps({"version": 1, "reason_metadata_key": "flux-reason", "errors": [row]})


def test_load_table_accepts_a_minimal_table() -> None:
    key, rows = errors.load_table(_table())
    assert key == "flux-reason"
    assert rows[0].grpc_code is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (_table(grpc_code="NOT_A_CODE"), "unknown gRPC status code"),
        (_table(retriable="yes"), "retriable"),
        (_table(reason=""), "'reason'"),
        (_table(liftbridge_message=3), "liftbridge_message"),
        (json.dumps({"version": 2, "errors": []}), "version"),
        (json.dumps({"version": 1, "reason_metadata_key": "Flux", "errors": []}), "lower-case"),
        (json.dumps({"version": 1, "reason_metadata_key": "k", "errors": []}), "non-empty"),
    ],
    ids=["code", "retriable", "reason", "text", "version", "key", "empty"],
)
def test_load_table_rejects_malformed_tables(text: str, complaint: str) -> None:
    with pytest.raises(errors.ErrorTableError, match=complaint):
        errors.load_table(text)


def test_load_table_rejects_duplicate_reasons() -> None:
    row = json.loads(_table())["errors"][0]
    twin = dict(row, name="B")
    text = json.dumps({"version": 1, "reason_metadata_key": "k", "errors": [row, twin]})
    with pytest.raises(errors.ErrorTableError, match="duplicate reasons"):
        errors.load_table(text)


CLIENT_ROWS = [
    ("CLOSED", "closed", False),
    ("BUFFER_FULL", "buffer-full", True),
    ("TIMEOUT", "timeout", True),
    ("CONNECTION_FAILED", "connection-failed", True),
    ("UNKNOWN", "unknown", False),
]


def test_client_rows_load() -> None:
    rows = [(entry.name, entry.reason, entry.retriable) for entry in errors.CLIENT_ERRORS]
    assert rows == CLIENT_ROWS
    assert all(isinstance(entry, errors.ClientErrorEntry) for entry in errors.CLIENT_ERRORS)
    assert all(entry.description for entry in errors.CLIENT_ERRORS)


def test_names_and_reasons_are_unique_across_both_lists() -> None:
    rows: list[errors.ErrorEntry | errors.ClientErrorEntry] = [
        *errors.ERRORS,
        *errors.CLIENT_ERRORS,
    ]
    names = [entry.name for entry in rows]
    reasons = [entry.reason for entry in rows]
    assert len(set(names)) == len(names)
    assert len(set(reasons)) == len(reasons)


def test_error_codes_are_broker_names_then_client_names() -> None:
    broker = tuple(entry.name for entry in errors.ERRORS)
    client = tuple(entry.name for entry in errors.CLIENT_ERRORS)
    assert broker + client == errors.ERROR_CODES
    assert errors.ERROR_CODES[0] == "INVALID_ARGUMENT"
    assert errors.ERROR_CODES[len(broker) :] == tuple(name for name, _, _ in CLIENT_ROWS)
    assert len(set(errors.ERROR_CODES)) == len(errors.ERROR_CODES)


def test_client_rows_are_not_broker_rows() -> None:
    """The broker lookups only know broker rows; a client condition has no gRPC status."""
    with pytest.raises(KeyError):
        errors.by_name("CLOSED")
    with pytest.raises(KeyError):
        errors.by_reason("buffer-full")


def _client_table(*client_rows: object) -> str:
    data = json.loads(_table())
    data["client_errors"] = list(client_rows)
    return json.dumps(data)


def _client_row(**changes: object) -> dict[str, object]:
    row: dict[str, object] = {"name": "C", "reason": "c", "retriable": True, "description": "d"}
    row.update(changes)
    return row


def test_load_client_errors_accepts_a_minimal_table() -> None:
    text = _client_table(_client_row())
    assert errors.load_client_errors(text) == (errors.ClientErrorEntry("C", "c", True, "d"),)
    key, rows = errors.load_table(text)
    assert (key, [row.name for row in rows]) == ("flux-reason", ["A"])


def test_a_table_without_client_rows_has_none() -> None:
    assert errors.load_client_errors(_table()) == ()


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        (_client_table(_client_row(name="A")), r"duplicate names .*\['A'\]"),
        (_client_table(_client_row(reason="a")), r"duplicate reasons .*\['a'\]"),
        (_client_table(_client_row(), _client_row(reason="d")), r"duplicate names .*\['C'\]"),
        (_client_table(_client_row(grpc_code="NOT_FOUND")), "must not have 'grpc_code'"),
        (_client_table(_client_row(liftbridge_message=None)), "'liftbridge_message'"),
        (_client_table(_client_row(retriable=1)), "retriable"),
        (_client_table(_client_row(description="")), "'description'"),
        (_client_table("CLOSED"), "must be an object"),
        (json.dumps(dict(json.loads(_table()), client_errors={})), "client_errors must be a list"),
    ],
    ids=[
        "name-across",
        "reason-across",
        "name-within",
        "grpc-code",
        "liftbridge",
        "retriable",
        "description",
        "row",
        "list",
    ],
)
def test_loaders_reject_malformed_client_rows(text: str, complaint: str) -> None:
    with pytest.raises(errors.ErrorTableError, match=complaint):
        errors.load_client_errors(text)
    with pytest.raises(errors.ErrorTableError, match=complaint):
        errors.load_table(text)
