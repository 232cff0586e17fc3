"""Tests of flux_client._errors, generated from the shared error table (flux_proto errors.json).

Every code of the table must have a class that can be raised and caught as a ``FluxError``, and
every way the broker reports a row (the reason in the trailing metadata, a ``PublishBatchError``,
Liftbridge's fixed text without a reason) must map back to that row's class.
"""

from __future__ import annotations

import inspect

import grpc
import pytest

from flux_client import _errors
from flux_client._errors import (
    AckTimeoutError,
    CallTimeoutError,
    ConnectionFailedError,
    FluxError,
    InternalError,
    StreamNotFoundError,
    UnknownError,
    error_class,
    from_batch_error,
    from_rpc_error,
)
from flux_proto.errors import (
    CLIENT_ERRORS,
    ERROR_CODES,
    ERRORS,
    REASON_METADATA_KEY,
    ClientErrorEntry,
    ErrorEntry,
)

ALL_ROWS: list[ErrorEntry | ClientErrorEntry] = [*ERRORS, *CLIENT_ERRORS]
ROWS = {row.name: row for row in ALL_ROWS}
LIFTBRIDGE_TEXT_ROWS = [row for row in ERRORS if row.liftbridge_message]


def rpc_error(
    code: grpc.StatusCode, details: str | None, reason: str | None = None
) -> grpc.aio.AioRpcError:
    """A failed call as grpc.aio reports it, with ``reason`` in the trailing metadata."""
    trailing = (
        grpc.aio.Metadata((REASON_METADATA_KEY, reason))
        if reason is not None
        else grpc.aio.Metadata()
    )
    return grpc.aio.AioRpcError(
        code=code,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=trailing,
        details=details,
    )


def row_details(row: ErrorEntry) -> str:
    return row.liftbridge_message or row.description


# -- every code of the table ----------------------------------------------------------------


def test_the_table_is_not_empty_and_codes_are_unique() -> None:
    assert len(ERROR_CODES) == len(set(ERROR_CODES)) == len(ERRORS) + len(CLIENT_ERRORS)
    assert len(ERRORS) > 0
    assert len(CLIENT_ERRORS) > 0


@pytest.mark.parametrize("code", ERROR_CODES)
def test_each_code_has_a_class_that_can_be_raised(code: str) -> None:
    cls = error_class(code)
    assert issubclass(cls, FluxError)
    assert cls.code == code
    row = ROWS[code]
    with pytest.raises(FluxError) as caught:
        raise cls(f"raised {code}")
    error = caught.value
    assert type(error) is cls
    assert error.code == code
    assert error.reason == row.reason
    assert error.retriable is row.retriable
    assert error.grpc_code is None
    assert error.message == f"raised {code}"
    assert str(error) == f"raised {code}"
    assert error.cause is None
    assert code in repr(error)


@pytest.mark.parametrize("code", ERROR_CODES)
def test_reason_and_retriable_can_be_overridden(code: str) -> None:
    row = ROWS[code]
    error = error_class(code)(
        "m", reason="other", retriable=not row.retriable, grpc_code=grpc.StatusCode.INTERNAL
    )
    assert error.reason == "other"
    assert error.retriable is (not row.retriable)
    assert error.grpc_code is grpc.StatusCode.INTERNAL


@pytest.mark.parametrize("code", ERROR_CODES)
def test_all_lists_the_class_of_every_code(code: str) -> None:
    cls = error_class(code)
    assert cls.__name__ in _errors.__all__
    assert getattr(_errors, cls.__name__) is cls


def test_the_classes_are_exactly_the_table_codes() -> None:
    classes = [
        value
        for name, value in vars(_errors).items()
        if inspect.isclass(value) and issubclass(value, FluxError) and value is not FluxError
        if name in _errors.__all__
    ]
    assert sorted(cls.code for cls in classes) == sorted(ERROR_CODES)
    assert all(name in _errors.__all__ for name in ("FluxError", "error_class"))


def test_an_unknown_code_has_no_class() -> None:
    with pytest.raises(KeyError):
        error_class("NO_SUCH_CODE")


def test_builtin_bases() -> None:
    assert issubclass(AckTimeoutError, TimeoutError)
    assert issubclass(CallTimeoutError, TimeoutError)
    assert issubclass(ConnectionFailedError, ConnectionError)
    assert issubclass(ConnectionFailedError, OSError)


def raise_from(origin: BaseException, error: FluxError) -> None:
    try:
        raise origin
    except BaseException as cause:
        raise error from cause


def test_cause_is_the_exception_raised_from() -> None:
    origin = ValueError("underneath")
    with pytest.raises(InternalError) as caught:
        raise_from(origin, InternalError("wrapped"))
    assert caught.value.cause is origin
    assert caught.value.cause is caught.value.__cause__


def test_ack_timeout_says_whether_a_retry_is_safe() -> None:
    assert AckTimeoutError("t").retry_safe is False
    safe = AckTimeoutError("t", retry_safe=True)
    assert safe.retry_safe is True
    assert safe.code == "ACK_TIMEOUT"
    assert safe.retriable is ROWS["ACK_TIMEOUT"].retriable
    with pytest.raises(TimeoutError):
        raise safe


# -- broker rows: reason in the trailing metadata --------------------------------------------


@pytest.mark.parametrize("row", ERRORS, ids=lambda row: row.name)
@pytest.mark.parametrize("publish", [False, True], ids=["call", "publish"])
def test_from_rpc_error_maps_each_reason_to_its_row(row: ErrorEntry, publish: bool) -> None:
    details = row_details(row)
    error = from_rpc_error(rpc_error(row.grpc_code, details, row.reason), publish=publish)
    assert type(error) is error_class(row.name)
    assert error.code == row.name
    assert error.reason == row.reason
    assert error.retriable is row.retriable
    assert error.grpc_code is row.grpc_code
    assert details in error.message
    assert details in str(error)


def test_a_reason_given_as_bytes_is_read() -> None:
    trailing = grpc.aio.Metadata((REASON_METADATA_KEY, b"partition-not-found"))
    error = grpc.aio.AioRpcError(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), trailing, "gone")
    assert from_rpc_error(error).code == "PARTITION_NOT_FOUND"


def test_the_reason_wins_over_the_code() -> None:
    # NOT_FOUND alone means STREAM_NOT_FOUND; the reason says which row it really is.
    error = from_rpc_error(rpc_error(grpc.StatusCode.NOT_FOUND, "x", "partition-not-found"))
    assert error.code == "PARTITION_NOT_FOUND"
    # DEADLINE_EXCEEDED alone is a call timeout; with a reason, it is the reason's row.
    error = from_rpc_error(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "x", "ack-timeout"))
    assert isinstance(error, AckTimeoutError)


def test_an_ack_timeout_reason_passes_retry_safe() -> None:
    status = rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "late", "ack-timeout")
    error = from_rpc_error(status, publish=True, retry_safe=True)
    assert isinstance(error, AckTimeoutError)
    assert error.retry_safe is True
    error = from_rpc_error(status, publish=True, retry_safe=False)
    assert isinstance(error, AckTimeoutError)
    assert error.retry_safe is False


def test_the_error_can_be_raised_from_the_status() -> None:
    status = rpc_error(grpc.StatusCode.ALREADY_EXISTS, "exists", "stream-exists")
    with pytest.raises(FluxError) as caught:
        raise_from(status, from_rpc_error(status))
    assert caught.value.cause is status
    assert caught.value.code == "STREAM_EXISTS"


def test_a_status_without_details_names_its_code() -> None:
    error = from_rpc_error(rpc_error(grpc.StatusCode.INTERNAL, None, "internal"))
    assert type(error) is InternalError
    assert "INTERNAL" in error.message


# -- broker rows: PublishBatchError ----------------------------------------------------------


@pytest.mark.parametrize("row", ERRORS, ids=lambda row: row.name)
@pytest.mark.parametrize("retry_safe", [False, True])
def test_from_batch_error_maps_each_reason_to_its_row(row: ErrorEntry, retry_safe: bool) -> None:
    details = row_details(row)
    error = from_batch_error(row.grpc_code.value[0], row.reason, details, retry_safe=retry_safe)
    assert type(error) is error_class(row.name)
    assert error.code == row.name
    assert error.reason == row.reason
    assert error.retriable is row.retriable
    assert error.grpc_code is row.grpc_code
    assert details in error.message
    if isinstance(error, AckTimeoutError):
        assert error.retry_safe is retry_safe


def test_from_batch_error_without_a_message_uses_the_reason() -> None:
    error = from_batch_error(
        grpc.StatusCode.FAILED_PRECONDITION.value[0], "not-leader", "", retry_safe=False
    )
    assert error.code == "NOT_LEADER"
    assert "not-leader" in error.message


def test_from_batch_error_without_a_reason_uses_the_code() -> None:
    error = from_batch_error(grpc.StatusCode.NOT_FOUND.value[0], "", "gone", retry_safe=False)
    assert type(error) is StreamNotFoundError
    assert error.grpc_code is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("code", [999, -1])
def test_from_batch_error_with_an_unknown_code_and_reason(code: int) -> None:
    error = from_batch_error(code, "a-reason-from-the-future", "?", retry_safe=False)
    assert type(error) is UnknownError
    assert error.grpc_code is grpc.StatusCode.UNKNOWN
    assert error.retriable is ROWS["UNKNOWN"].retriable


# -- statuses without a reason ---------------------------------------------------------------


@pytest.mark.parametrize("row", LIFTBRIDGE_TEXT_ROWS, ids=lambda row: row.name)
def test_liftbridge_fixed_texts_map_to_their_row(row: ErrorEntry) -> None:
    assert row.liftbridge_message is not None
    error = from_rpc_error(rpc_error(row.grpc_code, row.liftbridge_message))
    assert type(error) is error_class(row.name)
    assert error.grpc_code is row.grpc_code
    assert row.liftbridge_message in error.message


def test_there_are_liftbridge_fixed_texts() -> None:
    assert LIFTBRIDGE_TEXT_ROWS


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
@pytest.mark.parametrize("publish", [False, True], ids=["call", "publish"])
def test_a_transport_failure_is_a_connection_failure(code: grpc.StatusCode, publish: bool) -> None:
    error = from_rpc_error(rpc_error(code, "Socket closed"), publish=publish)
    assert type(error) is ConnectionFailedError
    assert isinstance(error, ConnectionError)
    assert error.grpc_code is code
    assert error.retriable is True
    assert "Socket closed" in error.message
    with pytest.raises(ConnectionError):
        raise error


def test_a_deadline_on_a_call_is_a_call_timeout() -> None:
    error = from_rpc_error(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
    assert type(error) is CallTimeoutError
    assert isinstance(error, TimeoutError)
    assert error.grpc_code is grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.reason == ROWS["TIMEOUT"].reason


@pytest.mark.parametrize("retry_safe", [False, True])
def test_a_deadline_on_a_publish_is_an_ack_timeout(retry_safe: bool) -> None:
    status = rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
    error = from_rpc_error(status, publish=True, retry_safe=retry_safe)
    assert type(error) is AckTimeoutError
    assert isinstance(error, TimeoutError)
    assert error.retry_safe is retry_safe
    assert error.grpc_code is grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"),
        (grpc.StatusCode.ALREADY_EXISTS, "STREAM_EXISTS"),
        (grpc.StatusCode.NOT_FOUND, "STREAM_NOT_FOUND"),
        (grpc.StatusCode.OUT_OF_RANGE, "OFFSET_OUT_OF_RANGE"),
        (grpc.StatusCode.UNIMPLEMENTED, "UNIMPLEMENTED"),
        (grpc.StatusCode.INTERNAL, "INTERNAL"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "RESOURCE_LIMIT"),
    ],
)
def test_a_plain_liftbridge_status_maps_by_its_code(code: grpc.StatusCode, name: str) -> None:
    error = from_rpc_error(rpc_error(code, "some varying text"))
    assert error.code == name
    assert error.grpc_code is code


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DATA_LOSS,
    ],
)
@pytest.mark.parametrize("reason", [None, "a-reason-from-the-future"])
def test_an_unknown_status_is_an_unknown_error(code: grpc.StatusCode, reason: str | None) -> None:
    error = from_rpc_error(rpc_error(code, "what", reason))
    assert type(error) is UnknownError
    assert error.grpc_code is code
    assert error.retriable is ROWS["UNKNOWN"].retriable
    assert "what" in error.message


def test_a_liftbridge_text_under_another_code_is_not_matched() -> None:
    # "Server not partition leader" is FAILED_PRECONDITION; under INTERNAL it is just INTERNAL.
    error = from_rpc_error(rpc_error(grpc.StatusCode.INTERNAL, "Server not partition leader"))
    assert error.code == "INTERNAL"
