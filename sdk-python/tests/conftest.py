"""Fixtures and helpers shared by the flux_client tests.

- ``proxied_broker`` -- a real broker behind a :class:`~flux_testing.proxy.TcpProxy`, so a test
  can break the network between the SDK and the broker, or restart the broker, while the SDK
  keeps one address.
- ``publish`` -- writes records with the raw ``PublishBatch`` RPC, so consumer tests do not
  depend on the SDK's producer (:func:`publish_records`; :class:`Publish` types the fixture).

Test modules get these as fixtures; for annotations they import the types under
``TYPE_CHECKING`` (``from conftest import ProxiedBroker``), as pytest's importlib mode does not
make ``conftest`` importable at run time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import grpc
import pytest
import pytest_asyncio

from flux_client._records import encode_record
from flux_proto import api_pb2, api_pb2_grpc
from flux_testing.proxy import TcpProxy

if TYPE_CHECKING:
    from flux_testing.broker import BrokerProcess
    from flux_testing.pytest_plugin import BrokerFactory

PUBLISH_TIMEOUT_S = 10.0


@dataclass(slots=True)
class ProxiedBroker:
    """A broker that clients reach, and that advertises itself, at a proxy's address.

    Attributes:
        broker: The broker process (a new one after :meth:`restart`).
        proxy: The proxy; its faults break the network between clients and the broker.
    """

    broker: BrokerProcess
    proxy: TcpProxy

    @property
    def address(self) -> str:
        """The address clients connect to (the proxy's)."""
        return self.proxy.address

    @property
    def direct_address(self) -> str:
        """The broker's own address, bypassing the proxy (for test-side writes)."""
        return self.broker.address

    async def restart(self, *, kill: bool = False) -> None:
        """Stop (SIGTERM) or kill the broker, start it again and point the proxy at it."""
        if kill:
            self.broker.kill()
        else:
            await self.broker.stop()
        self.broker = await self.broker.restart()
        self.proxy.retarget(self.broker.address)


@pytest_asyncio.fixture
async def proxied_broker(broker_factory: BrokerFactory) -> AsyncIterator[ProxiedBroker]:
    """A real broker behind a TCP fault proxy.

    The broker listens on a free port of its own but advertises the proxy's port in its
    metadata, so an SDK that connects to ``.address`` never goes around the proxy (it dials
    the advertised address of a partition's leader).
    """
    proxy = await TcpProxy.start("127.0.0.1:9")  # retargeted once the broker runs
    try:
        broker = await broker_factory(args=("--port", str(proxy.port), "--listen", "127.0.0.1:0"))
        proxy.retarget(broker.address)
        yield ProxiedBroker(broker, proxy)
    finally:
        await proxy.close()


async def publish_records(
    address: str,
    stream: str,
    values: Iterable[bytes | None],
    *,
    partition: int = 0,
    key: bytes | None = None,
    headers: Sequence[tuple[str, bytes]] = (),
    idempotent: bool = False,
) -> api_pb2.PublishBatchResponse:
    """Write ``values`` as one batch to a partition, acked by the leader.

    Args:
        address: The broker's address.
        stream: The stream.
        values: The records' values (``None``: a null value).
        partition: The partition.
        key: The key of every record.
        headers: The headers of every record.
        idempotent: Write as a new idempotent producer (the broker then stores its
            ``flux.producer`` header in the first record).

    Returns:
        The broker's answer (``baseOffset``, ``recordCount``, ``timestamp``).

    Raises:
        AssertionError: The broker refused the batch.
    """
    records = b"".join(encode_record(value, key, headers) for value in values)
    request = api_pb2.PublishBatchRequest(
        stream=stream, partition=partition, records=records, ackPolicy=api_pb2.LEADER
    )

    async def requests() -> AsyncIterator[api_pb2.PublishBatchRequest]:
        yield request

    async with grpc.aio.insecure_channel(address) as channel:
        stub = api_pb2_grpc.APIStub(channel)
        if idempotent:
            answer = await stub.InitProducer(
                api_pb2.InitProducerRequest(), timeout=PUBLISH_TIMEOUT_S
            )
            request.producerId = answer.producerId
        responses = [
            response async for response in stub.PublishBatch(requests(), timeout=PUBLISH_TIMEOUT_S)
        ]
    assert len(responses) == 1, responses
    assert not responses[0].HasField("error"), responses[0].error
    return responses[0]


class Publish(Protocol):
    """Type of the ``publish`` fixture: :func:`publish_records`."""

    async def __call__(
        self,
        address: str,
        stream: str,
        values: Iterable[bytes | None],
        *,
        partition: int = 0,
        key: bytes | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
        idempotent: bool = False,
    ) -> api_pb2.PublishBatchResponse:
        """Write ``values`` as one batch; see :func:`publish_records`."""
        ...


@pytest.fixture
def publish() -> Publish:
    """Write records with the raw ``PublishBatch`` RPC (see :func:`publish_records`)."""
    return publish_records
