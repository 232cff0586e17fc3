"""Broker errors reach clients as the error table says, over a real grpc.aio server and channel.

Each test starts a real server on 127.0.0.1 with a small servicer whose handlers, wrapped with
:func:`guarded`, raise whatever the test puts in :attr:`_Servicer.error`; a real stub checks
the status code, the text and the ``flux-reason`` trailer the client receives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import grpc
import pytest

from flux_broker.api.status import (
    INTERNAL_MESSAGE,
    STORAGE_FAILED_MESSAGE,
    SYNC_FAILED_MESSAGE,
    UNAVAILABLE_MESSAGE,
    FluxStatus,
    guarded,
    status_for,
)
from flux_broker.log.errors import (
    BatchTooLargeError,
    CorruptRecordError,
    InvalidBatchError,
    LogClosedError,
    LogWriteError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
    SyncFailedError,
)
from flux_broker.metadata.errors import (
    InvalidCommandError,
    MetadataClosedError,
    MetadataStorageError,
    PartitionNotFoundError,
    StreamExistsError,
    StreamNotFoundError,
)
from flux_broker.nats.subjects import validate_stream_name, validate_subject
from flux_proto import api_pb2, api_pb2_grpc
from flux_proto.errors import ERRORS, REASON_METADATA_KEY, ErrorEntry, by_name

pytestmark = pytest.mark.integration

TIMEOUT_S: Final = 5.0
#: A detail only the broker log may show (a path, an OS or SQLite message).
INTERNAL_DETAIL: Final = "/var/lib/flux/streams/orders/0 No space left on device"


def _raised(check: Callable[[], None]) -> Exception:
    """The error a real validator raises, so the tests use the broker's own messages."""
    try:
        check()
    except Exception as error:  # noqa: BLE001
        return error
    raise AssertionError("the check did not raise")


class _Servicer(api_pb2_grpc.APIServicer):
    def __init__(self) -> None:
        self.error: BaseException = RuntimeError("no error set")
        self.cancelled = asyncio.Event()

    @guarded
    async def CreateStream(  # noqa: N802 -- gRPC method names are the RPC names
        self,
        request: api_pb2.CreateStreamRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> api_pb2.CreateStreamResponse:
        raise self.error

    @guarded
    async def DeleteStream(  # noqa: N802
        self,
        request: api_pb2.DeleteStreamRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> api_pb2.DeleteStreamResponse:
        # A handler that aborts on its own keeps its status: guarded adds nothing.
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")

    @guarded
    async def FetchMetadata(  # noqa: N802
        self,
        request: api_pb2.FetchMetadataRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> api_pb2.FetchMetadataResponse:
        context.set_trailing_metadata((("x-trace", "t1"), (REASON_METADATA_KEY, "stale")))
        raise self.error

    @guarded
    async def Subscribe(  # noqa: N802
        self, request: api_pb2.SubscribeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[api_pb2.Message]:
        yield api_pb2.Message()  # the handshake Liftbridge clients expect first
        if request.stream == "hang":
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        yield api_pb2.Message(offset=request.startOffset, stream=request.stream)
        raise self.error


@dataclass
class _Api:
    servicer: _Servicer
    stub: api_pb2_grpc.APIAsyncStub


@pytest.fixture
async def api() -> AsyncIterator[_Api]:
    # The RPCs the servicer does not define stay unimplemented on purpose.
    servicer = _Servicer()  # type: ignore[abstract]
    server = grpc.aio.server()
    api_pb2_grpc.add_APIServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield _Api(servicer, api_pb2_grpc.APIStub(channel))
    finally:
        await server.stop(grace=None)


def _reasons_of(metadata: grpc.aio.Metadata) -> list[str | bytes]:
    return [value for key, value in metadata if key == REASON_METADATA_KEY]


def _reasons(error: grpc.aio.AioRpcError) -> list[str | bytes]:
    return _reasons_of(error.trailing_metadata())


async def _until_status(
    call: grpc.aio.UnaryStreamCall[api_pb2.SubscribeRequest, api_pb2.Message],
) -> AsyncIterator[api_pb2.Message]:
    """The messages of a stream up to its (error) status, which the caller reads from ``call``."""
    try:
        async for message in call:
            yield message
    except grpc.aio.AioRpcError:
        return


async def _create_stream_fails(api: _Api, error: BaseException) -> grpc.aio.AioRpcError:
    api.servicer.error = error
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await api.stub.CreateStream(
            api_pb2.CreateStreamRequest(name="s", subject="s"), timeout=TIMEOUT_S
        )
    return failure.value


# (error raised by the handler, row expected, text expected; None = the error's own message)
MAPPINGS: Final[list[tuple[Exception, str, str | None]]] = [
    (StreamExistsError("orders"), "STREAM_EXISTS", None),
    (StreamNotFoundError("orders"), "STREAM_NOT_FOUND", None),
    (PartitionNotFoundError("orders", 3, 2), "PARTITION_NOT_FOUND", "No such partition"),
    (_raised(lambda: validate_stream_name("__mine")), "STREAM_RESERVED", "Stream is reserved"),
    (_raised(lambda: validate_stream_name("../etc")), "INVALID_ARGUMENT", None),
    (_raised(lambda: validate_subject("fo*.bar", partitions=1)), "INVALID_ARGUMENT", None),
    (InvalidCommandError("partitions[1].leader", "unknown broker"), "INVALID_ARGUMENT", None),
    (InvalidBatchError(3, "header count is negative"), "INVALID_ARGUMENT", None),
    (RecordTooLargeError(0, 2_000_000, 1_048_576), "MESSAGE_TOO_LARGE", None),
    (BatchTooLargeError(9_000_000, 8_388_608), "MESSAGE_TOO_LARGE", None),
    (OffsetOutOfRangeError(42, 10, 20), "OFFSET_OUT_OF_RANGE", None),
    (LogClosedError(INTERNAL_DETAIL), "UNAVAILABLE", UNAVAILABLE_MESSAGE),
    (MetadataClosedError(INTERNAL_DETAIL), "UNAVAILABLE", UNAVAILABLE_MESSAGE),
    (LogWriteError(INTERNAL_DETAIL), "STORAGE_FAILED", STORAGE_FAILED_MESSAGE),
    (SyncFailedError(INTERNAL_DETAIL), "STORAGE_FAILED", SYNC_FAILED_MESSAGE),
    (MetadataStorageError(INTERNAL_DETAIL), "STORAGE_FAILED", STORAGE_FAILED_MESSAGE),
    (
        CorruptRecordError(7, Path(INTERNAL_DETAIL), 4096, "CRC mismatch"),
        "CORRUPT_RECORD",
        "corrupt record at offset 7; the broker log has the details",
    ),
]
LOGGED: Final = frozenset({"STORAGE_FAILED", "CORRUPT_RECORD", "INTERNAL"})


@pytest.mark.parametrize(
    ("error", "name", "text"), MAPPINGS, ids=[type(error).__name__ for error, _, _ in MAPPINGS]
)
async def test_typed_errors_reach_the_client_as_their_row(
    api: _Api, caplog: pytest.LogCaptureFixture, error: Exception, name: str, text: str | None
) -> None:
    entry = by_name(name)
    with caplog.at_level(logging.DEBUG, logger="flux_broker.api.status"):
        failure = await _create_stream_fails(api, error)
    assert failure.code() is entry.grpc_code
    assert _reasons(failure) == [entry.reason]
    if entry.liftbridge_message is not None:
        assert failure.details() == entry.liftbridge_message
    assert failure.details() == (str(error) if text is None else text)
    details = failure.details() or ""
    assert INTERNAL_DETAIL not in details
    assert "Traceback" not in details
    logged = [record for record in caplog.records if record.exc_info]
    if name in LOGGED:
        assert [record.exc_info[1] for record in logged if record.exc_info] == [error]
    else:
        assert logged == []


async def test_an_unexpected_error_is_internal_generic_and_logged(
    api: _Api, caplog: pytest.LogCaptureFixture
) -> None:
    error = KeyError(INTERNAL_DETAIL)
    with caplog.at_level(logging.ERROR, logger="flux_broker.api.status"):
        failure = await _create_stream_fails(api, error)
    assert failure.code() is grpc.StatusCode.INTERNAL
    assert failure.details() == INTERNAL_MESSAGE
    assert _reasons(failure) == ["internal"]
    (record,) = caplog.records
    assert record.exc_info is not None
    assert record.exc_info[1] is error
    assert "KeyError" in caplog.text
    assert "Traceback" in caplog.text


@pytest.mark.parametrize("entry", ERRORS, ids=lambda entry: entry.name)
async def test_every_row_arrives_intact(api: _Api, entry: ErrorEntry) -> None:
    failure = await _create_stream_fails(api, FluxStatus.from_entry(entry.name))
    assert failure.code() is entry.grpc_code
    assert failure.details() == (entry.liftbridge_message or entry.description)
    assert _reasons(failure) == [entry.reason]


async def test_a_flux_status_keeps_its_own_message(api: _Api) -> None:
    failure = await _create_stream_fails(
        api, FluxStatus.from_entry("RESOURCE_LIMIT", "at most 1000 streams")
    )
    assert failure.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert failure.details() == "at most 1000 streams"
    assert _reasons(failure) == ["resource-limit"]


async def test_a_stream_ends_with_the_status_after_its_messages(api: _Api) -> None:
    api.servicer.error = StreamNotFoundError("orders")
    call = api.stub.Subscribe(
        api_pb2.SubscribeRequest(stream="orders", startOffset=3), timeout=TIMEOUT_S
    )
    received = [message async for message in _until_status(call)]
    assert received == [api_pb2.Message(), api_pb2.Message(offset=3, stream="orders")]
    assert await call.code() is grpc.StatusCode.NOT_FOUND
    assert await call.details() == "stream 'orders' does not exist"
    assert _reasons_of(await call.trailing_metadata()) == ["stream-not-found"]


async def test_a_stream_ending_with_a_liftbridge_text(api: _Api) -> None:
    api.servicer.error = FluxStatus.from_entry("STOP_REACHED")
    call = api.stub.Subscribe(api_pb2.SubscribeRequest(stream="s"), timeout=TIMEOUT_S)
    assert len([message async for message in _until_status(call)]) == 2
    assert await call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await call.details() == "Stop offset reached"
    assert _reasons_of(await call.trailing_metadata()) == ["stop-reached"]


async def test_other_trailing_metadata_is_kept_and_the_reason_replaced(api: _Api) -> None:
    api.servicer.error = LogClosedError()
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await api.stub.FetchMetadata(api_pb2.FetchMetadataRequest(), timeout=TIMEOUT_S)
    assert failure.value.code() is grpc.StatusCode.UNAVAILABLE
    trailers = list(failure.value.trailing_metadata())
    assert ("x-trace", "t1") in trailers
    assert _reasons(failure.value) == ["unavailable"]


async def test_a_handler_abort_passes_through_untouched(api: _Api) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await api.stub.DeleteStream(api_pb2.DeleteStreamRequest(name="s"), timeout=TIMEOUT_S)
    assert failure.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert failure.value.details() == "not yours"
    assert _reasons(failure.value) == []


async def test_cancellation_reaches_the_handler_untouched(
    api: _Api, caplog: pytest.LogCaptureFixture
) -> None:
    call = api.stub.Subscribe(api_pb2.SubscribeRequest(stream="hang"), timeout=TIMEOUT_S)
    assert await call.read() == api_pb2.Message()
    call.cancel()
    async with asyncio.timeout(TIMEOUT_S):
        await api.servicer.cancelled.wait()
    assert await call.code() is grpc.StatusCode.CANCELLED
    assert not [record for record in caplog.records if record.name == "flux_broker.api.status"]


def test_status_for_a_base_exception_is_internal(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="flux_broker.api.status"):
        entry, text = status_for(KeyboardInterrupt())
    assert (entry, text) == (by_name("INTERNAL"), INTERNAL_MESSAGE)
    assert "KeyboardInterrupt" in caplog.text


def test_from_entry_rejects_an_unknown_name() -> None:
    with pytest.raises(KeyError):
        FluxStatus.from_entry("NO_SUCH_ROW")


def test_guarded_rejects_a_plain_function() -> None:
    def handler(request: object, context: object) -> None:
        return None

    with pytest.raises(TypeError, match="async def"):
        guarded(handler)  # type: ignore[type-var]


def test_guarded_keeps_the_handler_name() -> None:
    assert _Servicer.CreateStream.__name__ == "CreateStream"
    assert _Servicer.Subscribe.__name__ == "Subscribe"
