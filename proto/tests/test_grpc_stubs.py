"""The generated grpc.aio stub and servicer talk to each other over a real gRPC channel."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from flux_proto import api_pb2, api_pb2_grpc

LIFTBRIDGE_RPCS = (
    "CreateStream",
    "DeleteStream",
    "PauseStream",
    "SetStreamReadonly",
    "Subscribe",
    "FetchMetadata",
    "FetchPartitionMetadata",
    "Publish",
    "PublishAsync",
    "PublishToSubject",
    "SetCursor",
    "FetchCursor",
    "JoinConsumerGroup",
    "LeaveConsumerGroup",
    "FetchConsumerGroupAssignments",
    "ReportConsumerGroupCoordinator",
)


class _Servicer(api_pb2_grpc.APIServicer):
    async def FetchMetadata(  # noqa: N802 -- gRPC method names are the RPC names
        self,
        request: api_pb2.FetchMetadataRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> api_pb2.FetchMetadataResponse:
        return api_pb2.FetchMetadataResponse(
            streamMetadata=[
                api_pb2.StreamMetadata(name=name, error=api_pb2.StreamMetadata.UNKNOWN_STREAM)
                for name in request.streams
            ]
        )

    async def Subscribe(  # noqa: N802
        self, request: api_pb2.SubscribeRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[api_pb2.Message]:
        yield api_pb2.Message()  # the handshake Liftbridge clients expect first
        yield api_pb2.Message(offset=request.startOffset, stream=request.stream)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "Stop offset reached")


async def test_stub_and_servicer_have_every_liftbridge_rpc() -> None:
    service = api_pb2.DESCRIPTOR.services_by_name["API"]
    assert [method.name for method in service.methods][: len(LIFTBRIDGE_RPCS)] == list(
        LIFTBRIDGE_RPCS
    )
    # A channel does not connect until it is used, so no server is needed here.
    async with grpc.aio.insecure_channel("127.0.0.1:9") as channel:
        stub = api_pb2_grpc.APIStub(channel)
        for name in LIFTBRIDGE_RPCS:
            assert callable(getattr(stub, name)), name
            assert callable(getattr(api_pb2_grpc.APIServicer, name)), name


@pytest.mark.integration
async def test_unary_and_server_streaming_over_a_real_channel() -> None:
    server = grpc.aio.server()
    # The other RPCs stay unimplemented on purpose: the test expects UNIMPLEMENTED from them.
    api_pb2_grpc.add_APIServicer_to_server(_Servicer(), server)  # type: ignore[abstract]
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = api_pb2_grpc.APIStub(channel)
            reply = await stub.FetchMetadata(
                api_pb2.FetchMetadataRequest(streams=["a", "b"]), timeout=5
            )
            assert [m.name for m in reply.streamMetadata] == ["a", "b"]

            call = stub.Subscribe(api_pb2.SubscribeRequest(stream="s", startOffset=7), timeout=5)
            received = [message async for message in _until_status(call)]
            assert received == [api_pb2.Message(), api_pb2.Message(offset=7, stream="s")]
            assert await call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert await call.details() == "Stop offset reached"

            with pytest.raises(grpc.aio.AioRpcError) as unimplemented:
                await stub.DeleteStream(api_pb2.DeleteStreamRequest(name="x"), timeout=5)
            assert unimplemented.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(grace=None)


async def _until_status(
    call: grpc.aio.UnaryStreamCall[api_pb2.SubscribeRequest, api_pb2.Message],
) -> AsyncIterator[api_pb2.Message]:
    try:
        async for message in call:
            yield message
    except grpc.aio.AioRpcError:
        return
