"""The data-directory lock with real processes: one broker per ``--data-dir``, crash or not."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import grpc
import pytest

from flux_broker.data_dir import LOCK_FILE
from flux_proto import api_pb2, api_pb2_grpc
from flux_testing.broker import BrokerProcess, broker_command

from .test_publish_batch import create, framed, publish, read_all

if TYPE_CHECKING:
    from flux_testing.pytest_plugin import BrokerFactory

pytestmark = pytest.mark.integration

#: A refused start-up is over once the interpreter and the broker's imports have loaded.
REFUSAL_WITHIN_S: Final = 20.0


async def run_second_broker(data_dir: Path, work_dir: Path) -> tuple[int, str, float]:
    """Start ``flux-broker`` on ``data_dir`` and wait for it to exit.

    Returns:
        Its exit status, its output and how long it ran, in seconds.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *broker_command(data_dir, work_dir / "second.ready.json"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(REFUSAL_WITHIN_S):
            output, _ = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    assert not (work_dir / "second.ready.json").exists(), "the second broker became ready"
    return process.returncode, output.decode(errors="replace"), time.monotonic() - started


def stream_files(data_dir: Path) -> dict[str, bytes]:
    """Every file under the streams directory, with its content."""
    root = data_dir / "streams"
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


async def values(broker: BrokerProcess, stream: str) -> list[bytes]:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        return [m.value for m in await read_all(api_pb2_grpc.APIStub(channel), stream)]


async def test_a_second_broker_exits_naming_the_holder_and_changes_nothing(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await create(api, "locked")
        await publish(api, [api_pb2.PublishBatchRequest(stream="locked", records=framed(b"a"))])
    before = stream_files(broker.data_dir)

    status, output, took_s = await run_second_broker(broker.data_dir, tmp_path / "second")

    assert status != 0, output
    assert f"in use by process {broker.pid}" in output, output
    assert took_s < REFUSAL_WITHIN_S
    assert (broker.data_dir / LOCK_FILE).read_text().strip() == str(broker.pid)
    assert broker.running
    assert stream_files(broker.data_dir) == before  # nothing recovered, cut or rewritten
    assert await values(broker, "locked") == [b"a"]  # the first one still serves
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await publish(api, [api_pb2.PublishBatchRequest(stream="locked", records=framed(b"b"))])
    assert await values(broker, "locked") == [b"a", b"b"]


async def test_a_killed_holder_leaves_no_stale_lock(
    broker: BrokerProcess, broker_factory: BrokerFactory
) -> None:
    async with grpc.aio.insecure_channel(broker.address) as channel:
        api = api_pb2_grpc.APIStub(channel)
        await create(api, "crash")
        await publish(api, [api_pb2.PublishBatchRequest(stream="crash", records=framed(b"x"))])
    old_pid = broker.pid
    broker.kill()  # SIGKILL: no shutdown, no unlock; the kernel drops the flock

    again = await broker_factory(broker.data_dir)

    assert again.pid != old_pid
    assert (again.data_dir / LOCK_FILE).read_text().strip() == str(again.pid)
    assert await values(again, "crash") == [b"x"]
