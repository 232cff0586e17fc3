"""A full disk against a real broker: the failing append leaves nothing, and writes resume.

The broker's data directory is a 2 MiB tmpfs, filled with a filler file until a few batches
fit. Mounting needs root (as on the project's machines and in CI); where it is not permitted
the test fails and says so, because a skipped disk-full test would hide a broken write path.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Final

import grpc
import pytest

from flux_broker.log.format import INDEX_ENTRY_BYTES
from flux_broker.log.segment import LOG_SUFFIX, scan
from flux_proto import api_pb2, api_pb2_grpc
from flux_proto.errors import by_name
from flux_testing.broker import BrokerProcess

from .test_publish_batch import create, framed, publish, read_all

if TYPE_CHECKING:
    from flux_testing.pytest_plugin import BrokerFactory

    API = api_pb2_grpc.APIAsyncStub

pytestmark = pytest.mark.integration

TMPFS_BYTES: Final = 2 * 1024 * 1024
#: Room left beside the filler: a few batches fit, then one does not.
ROOM_BYTES: Final = 24 * 1024
BATCH_RECORDS: Final = 8
VALUE_BYTES: Final = 1000
#: More batches than the room holds: the loop ends at the first refusal well before this.
BATCHES_MAX: Final = 200
NATS_PUBLISH_DEADLINE_S: Final = 3.0
DISK_FULL: Final = by_name("DISK_FULL")


@contextmanager
def small_tmpfs(mount_point: Path) -> Iterator[Path]:
    """A fresh 2 MiB tmpfs at ``mount_point``, unmounted afterwards."""
    mount, umount = shutil.which("mount"), shutil.which("umount")
    if mount is None or umount is None:
        pytest.fail("the disk-full test needs mount and umount (util-linux) on the PATH")
    mount_point.mkdir()
    mounted = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(
            "the disk-full test mounts a 2 MiB tmpfs and needs root for it (as on the project's "
            f"machines and in CI): mount failed with {mounted.returncode}: {mounted.stderr.strip()}"
        )
    try:
        yield mount_point
    finally:
        subprocess.run([umount, "-l", str(mount_point)], check=False)


def fill(mount_point: Path, leave_bytes: int) -> Path:
    """Write a filler file so that only about ``leave_bytes`` stay free; return its path."""
    filler = mount_point / "filler"
    stat = os.statvfs(mount_point)
    free = stat.f_bavail * stat.f_frsize
    with filler.open("wb") as file:
        file.write(b"\0" * max(free - leave_bytes, 0))
    return filler


def value(i: int) -> bytes:
    return b"%0*d" % (VALUE_BYTES, i)


def batch(first: int) -> api_pb2.PublishBatchRequest:
    return api_pb2.PublishBatchRequest(
        stream="full", records=framed(*(value(first + i) for i in range(BATCH_RECORDS)))
    )


def check_segment_files(partition_dir: Path, expected_records: int) -> None:
    """Every record on disk is whole and verified, and there are exactly the acked ones."""
    logs = sorted(partition_dir.glob("*" + LOG_SUFFIX))
    assert logs, f"no segment in {partition_dir}"
    records = 0
    for log_path in logs:
        base = int(log_path.stem)
        size = log_path.stat().st_size
        fd = os.open(log_path, os.O_RDONLY)
        try:
            result = scan(fd, base, size)
        finally:
            os.close(fd)
        assert result.stop_reason is None, f"{log_path}: {result.stop_reason}"
        assert result.end_position == size, f"{log_path}: bytes past the last whole record"
        records += result.count
        index_size = log_path.with_suffix(".index").stat().st_size
        assert index_size % INDEX_ENTRY_BYTES == 0, f"{log_path}: a partial index entry"
        assert index_size <= result.count * INDEX_ENTRY_BYTES
    assert records == expected_records


async def publish_until_full(api: API) -> tuple[int, api_pb2.PublishBatchError]:
    """Publish batches one by one until one is refused: (records acked, the refusal)."""
    acked = 0
    for _ in range(BATCHES_MAX):
        (response,) = await publish(api, [batch(acked)])
        if response.HasField("error"):
            return acked, response.error
        assert (response.baseOffset, response.recordCount) == (acked, BATCH_RECORDS)
        acked += BATCH_RECORDS
    raise AssertionError(f"{BATCHES_MAX} batches fit on a full disk")


async def values(api: API) -> list[bytes]:
    return [message.value for message in await read_all(api, "full")]


async def test_a_full_disk_fails_the_append_cleanly_and_writes_resume(
    broker_factory: BrokerFactory, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "tmpfs") as mount_point:
        broker: BrokerProcess | None = None
        try:
            broker = await broker_factory(mount_point / "data")
            async with grpc.aio.insecure_channel(broker.address) as channel:
                api = api_pb2_grpc.APIStub(channel)
                await create(api, "full")
                filler = fill(mount_point, ROOM_BYTES)

                acked, refusal = await publish_until_full(api)

                assert acked > 0, "not even one batch fit: ROOM_BYTES is too small"
                assert (refusal.code, refusal.reason) == (DISK_FULL.grpc_code.value[0], "disk-full")
                assert "disk is full" in refusal.message
                partition_dir = mount_point / "data" / "streams" / "full" / "0"
                check_segment_files(partition_dir, acked)  # nothing partial stayed behind
                assert await values(api) == [value(i) for i in range(acked)]  # reads go on
                # Still full: refused again, and the NATS path gets no ack.
                (again,) = await publish(api, [batch(acked)])
                assert again.error.reason == "disk-full"
                with pytest.raises(grpc.aio.AioRpcError) as no_ack:
                    await api.Publish(
                        api_pb2.PublishRequest(
                            stream="full", value=b"n" * 16 * 1024, ackPolicy=api_pb2.LEADER
                        ),
                        timeout=NATS_PUBLISH_DEADLINE_S,
                    )
                assert no_ack.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
                check_segment_files(partition_dir, acked)

                filler.unlink()  # space is back: the next batch takes the next offset
                (resumed,) = await publish(api, [batch(acked)])
                assert not resumed.HasField("error"), resumed.error
                assert (resumed.baseOffset, resumed.recordCount) == (acked, BATCH_RECORDS)
                expected = [value(i) for i in range(acked + BATCH_RECORDS)]
                assert await values(api) == expected

            assert await broker.stop() == 0
            check_segment_files(partition_dir, acked + BATCH_RECORDS)
            broker = await broker.restart()
            assert "cutting" not in broker.output()  # recovery found no torn tail
            async with grpc.aio.insecure_channel(broker.address) as channel:
                assert await values(api_pb2_grpc.APIStub(channel)) == expected
        finally:
            if broker is not None and broker.running:  # before the unmount
                await broker.stop()
