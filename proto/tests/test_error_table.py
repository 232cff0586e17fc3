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
