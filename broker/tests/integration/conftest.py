"""Fixtures for tests against a real broker process: a gRPC client for the ``broker``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest_asyncio

from flux_proto import api_pb2_grpc
from flux_testing.broker import BrokerProcess


@pytest_asyncio.fixture
async def api(broker: BrokerProcess) -> AsyncIterator[api_pb2_grpc.APIAsyncStub]:
    """A ``proto.API`` client of the test's broker, over a real gRPC channel."""
    async with grpc.aio.insecure_channel(broker.address) as channel:
        yield api_pb2_grpc.APIStub(channel)
