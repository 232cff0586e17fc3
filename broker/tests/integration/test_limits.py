"""The resource limits (``limits.*``): each breach gets its status, and nothing changes.

Brokers here run with small limits set through the environment (``FLUX_LIMITS_*``), so that
reaching them takes a handful of requests; every test also checks that a request just under
its limit still works. The limits are documented in docs/operating.md ("Limits").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc
import pytest

from flux_broker.api.limits import KEY_NAMES, LimitSettings
from flux_broker.config import KEYS, env_name, load_config
from flux_proto import api_pb2, api_pb2_grpc
from flux_proto.errors import REASON_METADATA_KEY
from flux_testing import wait_for
from flux_testing.broker import BrokerProcess, BrokerProcessError

pytestmark = pytest.mark.integration

if TYPE_CHECKING:
    from flux_testing.pytest_plugin import BrokerFactory

    API: TypeAlias = api_pb2_grpc.APIAsyncStub

TIMEOUT_S: Final = 10.0
MIB: Final = 1024 * 1024
STREAMS: Final = 3
PARTITIONS: Final = 4
HEADERS: Final = 3
HEADER_BYTES: Final = 100
SUBSCRIPTIONS: Final = 2
RECEIVE_BYTES: Final = 2 * MIB
#: Small limits for every test's broker; batches and records stay under the receive limit.
SMALL_LIMITS: Final = {
    env_name("limits.streams.max.count"): str(STREAMS),
    env_name("limits.stream.partitions.max.count"): str(PARTITIONS),
    env_name("limits.message.headers.max.count"): str(HEADERS),
    env_name("limits.message.headers.max.bytes"): str(HEADER_BYTES),
    env_name("limits.connection.subscriptions.max.count"): str(SUBSCRIPTIONS),
    env_name("limits.grpc.receive.max.bytes"): str(RECEIVE_BYTES),
    env_name("streams.batch.max.bytes"): str(MIB),
}


@contextlib.asynccontextmanager
async def _client(broker: BrokerProcess, *, own_connection: bool = False) -> AsyncIterator[API]:
    """A client; gRPC channels of one process share their connection unless ``own_connection``."""
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else []
    async with grpc.aio.insecure_channel(broker.address, options=options) as channel:
        yield api_pb2_grpc.APIStub(channel)


@pytest.fixture
async def small(broker_factory: BrokerFactory) -> BrokerProcess:
    """A broker with :data:`SMALL_LIMITS`."""
    return await broker_factory(env=SMALL_LIMITS)


def _reason(error: grpc.aio.AioRpcError) -> str:
    return str(dict(error.trailing_metadata() or ()).get(REASON_METADATA_KEY, ""))


async def _refused(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def _create(api: API, name: str, partitions: int = 1) -> None:
    await api.CreateStream(
        api_pb2.CreateStreamRequest(name=name, subject=name, partitions=partitions),
        timeout=TIMEOUT_S,
    )


async def _user_streams(api: API) -> list[str]:
    response = await api.FetchMetadata(api_pb2.FetchMetadataRequest(), timeout=TIMEOUT_S)
    return sorted(s.name for s in response.streamMetadata if not s.name.startswith("__"))


def _stream_dirs(broker: BrokerProcess) -> list[str]:
    return sorted(
        path.name
        for path in (broker.data_dir / "streams").iterdir()
        if not path.name.startswith("__")
    )


# -- configuration ------------------------------------------------------------------------------


def test_every_limit_is_a_key_with_its_documented_default() -> None:
    defaults = LimitSettings()
    for field, key in KEY_NAMES.items():
        assert KEYS[key].default == getattr(defaults, field), key
    assert LimitSettings.from_config(load_config(environ={})) == defaults


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"limits.grpc.receive.max.bytes": str(MIB)}, "too small for the requests"),
        ({"limits.streams.max.count": "0"}, "limits.streams.max.count is 0"),
        ({"limits.message.headers.max.bytes": "-1"}, "limits.message.headers.max.bytes is -1"),
    ],
)
def test_impossible_limits_are_refused(env: dict[str, str], complaint: str) -> None:
    config = load_config(environ={env_name(key): value for key, value in env.items()})
    with pytest.raises(ValueError, match=complaint):
        LimitSettings.from_config(config)


async def test_a_receive_limit_below_the_batch_limit_stops_start_up(
    broker_factory: BrokerFactory,
) -> None:
    with pytest.raises(BrokerProcessError) as info:
        await broker_factory(env={env_name("limits.grpc.receive.max.bytes"): str(4 * MIB)})
    # The default batch limit is 8 MiB: a full batch could never arrive.
    assert "limits.grpc.receive.max.bytes is 4194304" in str(info.value)
    assert "streams.batch.max.bytes" in str(info.value)


# -- counts of things: RESOURCE_EXHAUSTED -------------------------------------------------------


async def test_the_stream_limit(small: BrokerProcess) -> None:
    async with _client(small) as api:
        names = [f"s{i}" for i in range(STREAMS)]
        for name in names:  # __cursors exists too, and does not count
            await _create(api, name)
        error = await _refused(_create(api, "one-more"))
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _reason(error) == "resource-limit"
        assert "limits.streams.max.count" in (error.details() or "")
        assert await _user_streams(api) == names
        assert _stream_dirs(small) == names
        # An existing name is still ALREADY_EXISTS, as Liftbridge answers.
        error = await _refused(_create(api, "s0"))
        assert error.code() is grpc.StatusCode.ALREADY_EXISTS
        # Deleting one makes room for exactly one.
        await api.DeleteStream(api_pb2.DeleteStreamRequest(name="s0"), timeout=TIMEOUT_S)
        await api.DeleteStream(api_pb2.DeleteStreamRequest(name="s1"), timeout=TIMEOUT_S)
        racing = [f"r{i}" for i in range(6)]
        results = await asyncio.gather(
            *(_create(api, name) for name in racing), return_exceptions=True
        )
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(refused) == len(racing) - 2
        assert all(r.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
        assert len(await _user_streams(api)) == STREAMS
        assert _stream_dirs(small) == await _user_streams(api)


async def test_the_subscription_limit_of_a_connection(small: BrokerProcess) -> None:
    async with _client(small) as api, _client(small, own_connection=True) as other:
        await _create(api, "subs")
        request = api_pb2.SubscribeRequest(stream="subs")
        open_calls = [api.Subscribe(request, timeout=TIMEOUT_S * 3) for _ in range(SUBSCRIPTIONS)]
        for call in open_calls:
            assert await call.read() == api_pb2.Message()  # the handshake: open
        refused_calls: list[grpc.aio.UnaryStreamCall[Any, Any]] = [
            api.Subscribe(request, timeout=TIMEOUT_S),
            api.SubscribeBatch(api_pb2.SubscribeBatchRequest(subscribe=request), timeout=TIMEOUT_S),
        ]
        for refused in refused_calls:
            error = await _refused(refused.read())
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert _reason(error) == "resource-limit"
            assert "limits.connection.subscriptions.max.count" in (error.details() or "")
        # Another connection has its own allowance.
        elsewhere = other.Subscribe(request, timeout=TIMEOUT_S)
        assert await elsewhere.read() == api_pb2.Message()
        elsewhere.cancel()
        # An ended subscription frees its place (the broker notices the cancel soon after).
        open_calls[0].cancel()

        async def subscribed_again() -> grpc.aio.UnaryStreamCall[Any, Any] | None:
            call = api.Subscribe(request, timeout=TIMEOUT_S)
            with contextlib.suppress(grpc.aio.AioRpcError):  # still full: try again
                await call.read()
                return call
            assert await call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            return None

        again = await wait_for(subscribed_again, TIMEOUT_S, interval_s=0.05)
        # The open subscriptions still deliver.
        await api.Publish(api_pb2.PublishRequest(stream="subs", value=b"v"), timeout=TIMEOUT_S)
        for call in (open_calls[1], again):
            message = await call.read()
            assert isinstance(message, api_pb2.Message)
            assert message.value == b"v"
            call.cancel()


# -- requests too big: INVALID_ARGUMENT (partitions, headers) or RESOURCE_EXHAUSTED (gRPC) -------


async def test_the_partition_limit(small: BrokerProcess) -> None:
    async with _client(small) as api:
        error = await _refused(_create(api, "wide", PARTITIONS + 1))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert _reason(error) == "invalid-argument"
        assert f"1..{PARTITIONS}" in (error.details() or "")
        assert "limits.stream.partitions.max.count" in (error.details() or "")
        assert await _user_streams(api) == []
        assert _stream_dirs(small) == []
        await _create(api, "wide", PARTITIONS)
        error = await _refused(
            api.PauseStream(
                api_pb2.PauseStreamRequest(name="wide", partitions=range(PARTITIONS + 1)),
                timeout=TIMEOUT_S,
            )
        )
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        await api.PauseStream(
            api_pb2.PauseStreamRequest(name="wide", partitions=range(PARTITIONS)),
            timeout=TIMEOUT_S,
        )


async def test_the_header_limits(small: BrokerProcess) -> None:
    under = {"a": b"x" * 40, "b": b"y" * 40, "c": b""}  # 3 headers, 83 bytes
    too_many = {**under, "d": b""}
    too_big = {"a": b"x" * 99, "b": b""}  # 2 headers, 101 bytes
    async with _client(small) as api:
        await _create(api, "h")
        for headers, key in (
            (too_many, "limits.message.headers.max.count"),
            (too_big, "limits.message.headers.max.bytes"),
        ):
            for call in (
                api.Publish(api_pb2.PublishRequest(stream="h", headers=headers), timeout=TIMEOUT_S),
                api.PublishToSubject(
                    api_pb2.PublishToSubjectRequest(subject="h", headers=headers),
                    timeout=TIMEOUT_S,
                ),
            ):
                error = await _refused(call)
                assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
                assert _reason(error) == "invalid-argument"
                assert key in (error.details() or "")

        async def requests() -> AsyncIterator[api_pb2.PublishRequest]:
            yield api_pb2.PublishRequest(stream="h", headers=too_big, correlationId="big")
            yield api_pb2.PublishRequest(stream="h", headers=under, correlationId="ok")

        responses = [r async for r in api.PublishAsync(requests(), timeout=TIMEOUT_S)]
        by_id = {r.correlationId: r for r in responses}
        assert by_id["big"].asyncError.code == api_pb2.PublishAsyncError.Code.BAD_REQUEST
        assert "limits.message.headers.max.bytes" in by_id["big"].asyncError.message
        assert by_id["ok"].ack.offset == 0  # nothing of the refused ones was stored
        ack = await api.Publish(
            api_pb2.PublishRequest(stream="h", headers=under), timeout=TIMEOUT_S
        )
        assert ack.ack.offset == 1


async def test_the_grpc_receive_limit(small: BrokerProcess) -> None:
    async with _client(small) as api:
        await _create(api, "big")
        error = await _refused(
            api.Publish(api_pb2.PublishRequest(stream="big", value=bytes(RECEIVE_BYTES)))
        )
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (error.details() or "")
        # Under the gRPC limit, over the record limit: the broker's own INVALID_ARGUMENT.
        error = await _refused(
            api.Publish(api_pb2.PublishRequest(stream="big", value=bytes(MIB)), timeout=TIMEOUT_S)
        )
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert _reason(error) == "too-large"
        ack = await api.Publish(
            api_pb2.PublishRequest(stream="big", value=bytes(MIB // 2)), timeout=TIMEOUT_S
        )
        assert ack.ack.offset == 0
