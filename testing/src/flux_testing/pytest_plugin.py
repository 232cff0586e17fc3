"""The Flux pytest plugin: fixtures and settings shared by every Python test suite.

Registered through the ``pytest11`` entry point of ``flux-testing``.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, settings

from flux_testing.broker import BrokerProcess, stop_all
from flux_testing.nats_server import NatsServer

# CI machines are 2 shared cores: a deadline there measures the neighbours, not our code. CI is
# also derandomized, so a run is reproducible and a landing never depends on a lucky draw;
# developers' runs (the "dev" profile) keep exploring new examples.
settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


class NatsServerFactory(Protocol):
    """Type of the ``nats_server_factory`` fixture."""

    def __call__(
        self, *, port: int = -1, jetstream: bool = False, args: Sequence[str] = ()
    ) -> NatsServer:
        """Start a private server (``port=-1`` picks a free port; ``args`` go to it)."""
        ...


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A real nats-server on a free 127.0.0.1 port, shared by the whole test session.

    Tests that stop, kill or reconfigure a server use ``nats_server_factory`` instead.
    """
    with NatsServer.start(work_dir=tmp_path_factory.mktemp("nats")) as server:
        yield server


@pytest.fixture
def nats_server_factory(tmp_path: Path) -> Iterator[NatsServerFactory]:
    """Start private nats-servers for one test; all of them are stopped when it ends.

    Call it as ``nats_server_factory(port=-1, jetstream=False, args=())`` (see
    :meth:`NatsServer.start`).
    """
    started: list[NatsServer] = []

    def start(*, port: int = -1, jetstream: bool = False, args: Sequence[str] = ()) -> NatsServer:
        work_dir = tmp_path / f"nats-{len(started)}"
        server = NatsServer.start(port=port, jetstream=jetstream, work_dir=work_dir, args=args)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty data directory for one test, removed afterwards."""
    path = tmp_path / "data"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def file_size_limit() -> Iterator[Callable[[int | None], None]]:
    """Make this process's writes past a size fail with ``EFBIG``, as a full disk would.

    Call the fixture's value with a size in bytes to set the limit, or ``None`` to lift it;
    ``SIGXFSZ`` is ignored meanwhile, and the limit and signal handler are restored after the
    test. A real kernel limit, not a mock: every file write of the process is subject to it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit(max_bytes: int | None) -> None:
        resource.setrlimit(
            resource.RLIMIT_FSIZE,
            (resource.RLIM_INFINITY if max_bytes is None else max_bytes, hard),
        )

    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


class BrokerFactory(Protocol):
    """Type of the ``broker_factory`` fixture."""

    async def __call__(
        self,
        data_dir: Path | None = None,
        *,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> BrokerProcess:
        """Start a broker process (see :meth:`BrokerProcess.start`)."""
        ...


@pytest_asyncio.fixture
async def broker_factory(tmp_path: Path) -> AsyncIterator[BrokerFactory]:
    """Start real ``flux-broker`` processes for one test; all are stopped when it ends.

    Call it as ``await broker_factory(data_dir=None, args=(), env=None)``; without a data
    directory each broker gets a fresh one. Every broker runs its own embedded NATS server on
    a free port unless ``args`` say otherwise.
    """
    started: list[BrokerProcess] = []

    async def start(
        data_dir: Path | None = None,
        *,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> BrokerProcess:
        serial = len(started)
        return await BrokerProcess.start(
            data_dir or tmp_path / f"broker-{serial}-data",
            work_dir=tmp_path / f"broker-{serial}-run",
            args=args,
            env=env,
            registry=started,
        )

    try:
        yield start
    finally:
        await stop_all(started)


@pytest_asyncio.fixture
async def broker(broker_factory: BrokerFactory) -> BrokerProcess:
    """A real ``flux-broker`` process with a fresh data directory and its own embedded NATS."""
    return await broker_factory()
